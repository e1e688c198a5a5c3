"""Shared by the fault-injection suites (``test_faults.py`` in-process, ``test_faults_live.py``
against a real Prefect server): the summary table they fill, and the leak counts they assert."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.support.aws_fakes import MotoAccount, SageMakerStandIn
from tests.support.pipeline import processes_under
from tests.support.reporting import ReportTable, Row, report_table

FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection"  # its sitecustomize.py
LEAK_COLUMNS = ["endpoints", "configs", "models", "processes"]
NOT_APPLICABLE = "-"  # the local backend keeps an endpoint's model and config in its record


def _leaked(rows: list[Row]) -> int:
    return sum(v for r in rows for c in LEAK_COLUMNS if isinstance(v := r.get(c), int))


def fault_summary(rows: list[Row]) -> str:
    return (f"scenarios run: {len(rows)}; resources leaked: {_leaked(rows)} (endpoints, "
            f"endpoint configs, models and server/training processes remaining after each "
            f"scenario)")


def fault_table() -> ReportTable:
    return report_table(
        "Teardown under faults: what each scenario left behind (must be 0)",
        ["backend", "scenario", "final state", "cause (state message)", "reaper deleted",
         *LEAK_COLUMNS, "seconds"],
        summary=fault_summary)


# Prefect's own words around the cause, left out of the table to leave room for the cause.
BOILERPLATE = ("Flow run encountered an exception: ", "Flow run failed due to timeout: ")


def short(message: str | None, limit: int = 100) -> str:
    """A state message for the table: on one line, without Prefect's preamble, cut short."""
    text = " ".join((message or "").split())
    for prefix in BOILERPLATE:
        text = text.removeprefix(prefix)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def local_leaks(root: Path, run: str = "") -> dict[str, Any]:
    """What a local backend rooted at ``root`` still holds: endpoint directories (with or
    without a record: a half-created one counts) and live processes started under it (endpoint
    servers, training hosts); with ``run`` (a flow run's resource name), only that run's: its
    endpoint, its jobs' hosts and its server, whose directories carry the name."""
    endpoints = root / "endpoints"
    return {
        "endpoints": len([p for p in endpoints.iterdir() if p.is_dir()
                          and p.name.startswith(run)]) if endpoints.is_dir() else 0,
        "configs": NOT_APPLICABLE, "models": NOT_APPLICABLE,
        "processes": len([p for p in processes_under(root) if run in p.cmdline + p.cwd]),
    }


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def environment_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*")
            if int(p.name) != os.getpid() and parent_of(int(p.name)) == pid]


def aws_leaks(aws: MotoAccount, stand_in: SageMakerStandIn) -> dict[str, int]:
    """What moto still holds, and the stand-in's model servers still running."""
    left = aws.sagemaker_resources()
    return {"endpoints": len(left["endpoints"]), "configs": len(left["endpoint_configs"]),
            "models": len(left["models"]), "processes": len(processes_under(stand_in.root))}
