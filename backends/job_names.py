"""Training job names across the retries of one flow run, the same rule on every backend.

The pipeline names a training job after its flow run, so that a retried task re-attaches to the
job its first attempt started instead of paying for a second one. SageMaker never lets a
training job name be used again in an account and region, though, so a flow run retried after
its job Failed or was Stopped (spot capacity reclaimed, a cancelled run) would never train
again under that name. It trains under the next name of the name's chain instead:
``{name}``, ``{name}-r1``, ``{name}-r2``... A job still InProgress, or Completed, is
re-attached to, never replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from backends.base import BackendError
from model_src.contract import MAX_NAME_LENGTH  # SageMaker's TrainingJobName

MAX_RETRIES = 99  # a flow run retried this often has a problem that another job won't fix
# What never turns into a model: the name's next job trains instead. Stopping ends as Stopped.
RETIRED = frozenset({"Failed", "Stopping", "Stopped"})

# The status of the job of that name, None when there is none.
StatusOf = Callable[[str], str | None]


def retry_name(name: str, retry: int) -> str:
    """The ``retry``-th name of ``name``'s chain (0: ``name`` itself), within SageMaker's
    63 characters: a long name is shortened before its suffix, the same way every time."""
    if retry == 0:
        return name
    suffix = f"-r{retry}"
    return name[:MAX_NAME_LENGTH - len(suffix)].rstrip("-") + suffix


def names_of(name: str) -> Iterator[str]:
    """``name``'s chain, first to last possible."""
    return (retry_name(name, retry) for retry in range(MAX_RETRIES + 1))


def job_to_run(name: str, status_of: StatusOf) -> tuple[str, str | None]:
    """The job of ``name``'s chain that a run should re-attach to or create, with its status
    (None: it does not exist yet, create it): the first that is not retired. The chain's jobs
    are created in order, so the first name that is free ends it."""
    for candidate in names_of(name):
        status = status_of(candidate)
        if status not in RETIRED:
            return candidate, status
    raise BackendError(f"training job {name} failed or was stopped {MAX_RETRIES + 1} times "
                       f"(names {name} to {retry_name(name, MAX_RETRIES)}): not training it "
                       f"again; look at why those jobs failed")


def existing_jobs(name: str, status_of: StatusOf) -> Iterator[tuple[str, str]]:
    """Every job of ``name``'s chain that exists, with its status, first to last. A job that
    is not retired is the chain's last: nothing is created after a job that can still
    produce the model."""
    for candidate in names_of(name):
        status = status_of(candidate)
        if status is None:
            return
        yield candidate, status
        if status not in RETIRED:
            return
