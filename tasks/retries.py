"""When a task's retry helps: transient faults (network, throttling, a server restarting), not
mistakes that fail the same way every time (missing settings or permissions, bad input)."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from backends.base import ConfigurationError
from tasks.lib.download import BadArchive, ChecksumMismatch

PERMANENT = (ConfigurationError, ChecksumMismatch, BadArchive, FileNotFoundError,
             PermissionError, ValueError, TypeError)


def retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """``retry_condition_fn`` for tasks: retry unless the failure is one of PERMANENT."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception:
        return True
    return False
