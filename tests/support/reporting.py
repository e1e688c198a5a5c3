"""Figures that suites report at the end of the pytest run: tables that tests fill row by row,
printed by the ``pytest_terminal_summary`` hook in ``conftest.py`` (so they show in CI's output,
under the pass/fail summary) as markdown, ready to paste into a closing note.

A suite asks for its table by title and adds a row per scenario::

    table = report_table("Teardown under faults", ["backend", "scenario", "leaked"],
                         summary=lambda rows: f"{len(rows)} scenarios")
    table.add(backend="local", scenario="cancel during training", leaked=0)

Rows are added as soon as a scenario's figures are known, before its assertions, so a failing
scenario shows in the table too.

With pytest-xdist the tests run in worker processes: each worker sends its tables to the
controller (``shipped``/``merge``), which prints them, rows of one title together. A summary
written as a module-level function of the rows is recomputed over all of them; any other is
the line its worker rendered.
"""

from __future__ import annotations

import importlib
import json
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

    # Summary lines rendered by workers, for a summary the controller cannot recompute.
    worker_summaries: list[str] = field(default_factory=list)

    def render(self) -> list[str]:
        """The table as markdown lines, columns padded so that it also reads as plain text."""
        cells = [[_cell(row.get(c)) for c in self.columns] for row in self.rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(self.columns)]
        lines = [_line(self.columns, widths), _line(["-" * w for w in widths], widths)]
        lines += [_line(r, widths) for r in cells]
        if self.summary is not None:
            lines += ["", self.summary(self.rows)]
        elif self.worker_summaries:
            lines += ["", *self.worker_summaries]
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


def shipped() -> str:
    """This (worker) process's tables as JSON, for the controller's ``merge``."""
    def summary_ref(summary: Callable | None) -> str | None:
        name = getattr(summary, "__qualname__", "")
        return None if summary is None or "<" in name else f"{summary.__module__}:{name}"

    return json.dumps([{"title": t.title, "columns": t.columns, "rows": t.rows,
                        "summary": summary_ref(t.summary),
                        "summary_line": t.summary(t.rows) if t.summary else None}
                       for t in tables()], default=str)


def merge(payload: str) -> None:
    """Adds a worker's tables (``shipped``) to this process's."""
    for sent in json.loads(payload):
        summary = None
        if sent["summary"]:
            module, name = sent["summary"].split(":")
            summary = getattr(importlib.import_module(module), name)
        table = report_table(sent["title"], sent["columns"], summary)
        table.rows += sent["rows"]
        if summary is None and sent["summary_line"]:
            table.worker_summaries.append(sent["summary_line"])


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
