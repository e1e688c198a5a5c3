"""When a task's retry helps: transient faults (network, throttling, a server restarting), not
mistakes that fail the same way every time (missing settings or permissions, bad input).

``fit`` has no task retries: waiting for a training job through transient faults is the
backend's loop (``AwsTrainingJobs.wait``), which keeps its place in the job's log and its time
bound, and on giving up stops the job, which a task retry could not know to do on its last
attempt. A retried task would also re-run the cache lookup and a fresh bound."""

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
