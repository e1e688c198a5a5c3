"""The run summary as a markdown artifact on the run's page."""

from __future__ import annotations

from prefect import task

from tasks.lib.summary import RunSummary
from tasks.reporting import publish_markdown


@task(name="publish_summary", task_run_name="publish run summary")
def publish_summary(summary: RunSummary) -> None:
    """What the run did, what it cost and how long each stage took."""
    publish_markdown("cifar10-run-summary", summary.markdown(), description="What this run did")
