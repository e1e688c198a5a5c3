"""The retention stage: at the start of a run, the backend prunes what it keeps on this machine
past the config's retention policy, and the run's log says what went."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from backends.base import Backend
from tasks.reporting import logger


@task(name="apply_retention", task_run_name="apply retention on {backend.name}",
      cache_policy=NO_CACHE)
def apply_retention(backend: Backend) -> list[str]:
    """Old job directories and their artifacts, dead endpoints' directories, rotated logs and
    stale temporaries go (see ``backends/local/retention.py``); what a registry version,
    an endpoint or a running job needs stays. Never fails the run: a pass that breaks is
    logged as a warning, and the next run tries again."""
    log = logger()
    try:
        pruned = backend.apply_retention()
    except Exception as e:  # disk hygiene must not stop a nightly run
        log.warning("retention could not run (%s: %s); nothing else is affected and the next "
                    "run tries again", type(e).__name__, e)
        return []
    for line in pruned:
        log.info("retention: %s", line)
    if not pruned:
        log.info("retention: nothing to prune")
    return pruned
