"""Figures that suites report at the end of the pytest run: tables that tests fill row by row,
printed by the ``pytest_terminal_summary`` hook in ``conftest.py`` (so they show in CI's output,
under the pass/fail summary) as markdown, ready to paste into a closing note.

A suite asks for its table by title and adds a row per scenario::

    table = report_table("Teardown under faults", ["backend", "scenario", "leaked"],
                         summary=lambda rows: f"{len(rows)} scenarios")
    table.add(backend="local", scenario="cancel during training", leaked=0)

Rows are added as soon as a scenario's figures are known, before its assertions, so a failing
scenario shows in the table too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]


@dataclass
class ReportTable:
    title: str
    columns: list[str]
    summary: Callable[[list[Row]], str] | None = None  # a closing line: totals, verdict
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row | None = None, **values: Any) -> None:
        """Adds one row; a column left out is shown empty, an unknown one is an error (a
        typo would otherwise vanish from the report)."""
        row = {**(row or {}), **values}
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.title}: no column(s) {sorted(unknown)}; "
                           f"columns are {self.columns}")
        self.rows.append(row)

    def render(self) -> list[str]:
        """The table as markdown lines, columns padded so that it also reads as plain text."""
        cells = [[_cell(row.get(c)) for c in self.columns] for row in self.rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(self.columns)]
        lines = [_line(self.columns, widths), _line(["-" * w for w in widths], widths)]
        lines += [_line(r, widths) for r in cells]
        if self.summary is not None:
            lines += ["", self.summary(self.rows)]
        return lines


_TABLES: dict[str, ReportTable] = {}


def report_table(title: str, columns: Sequence[str],
                 summary: Callable[[list[Row]], str] | None = None) -> ReportTable:
    """The session's table of that title, created on first use (every module that reports
    into it gets the same object)."""
    table = _TABLES.get(title)
    if table is None:
        table = _TABLES[title] = ReportTable(title, list(columns), summary)
    elif table.columns != list(columns):
        raise ValueError(f"table {title!r} already exists with columns {table.columns}")
    return table


def tables() -> list[ReportTable]:
    """Every table that received at least one row, in the order they were created."""
    return [t for t in _TABLES.values() if t.rows]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _line(values: Sequence[str], widths: Sequence[int]) -> str:
    return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"
