"""The endpoint reaper as a Prefect flow, for a schedule (see deployments/)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from prefect import flow
from pydantic import Field

from backends.reaper import reap_endpoints
from flows.config import AwsSettings, PipelineConfig, get_backend
from tasks.reporting import logger


class ReapIncomplete(RuntimeError):
    """Some endpoints could not be deleted (the others were)."""


@flow(name="cifar10-endpoint-reaper", log_prints=True)
def reap_endpoints_flow(
    backend: Literal["local", "aws"] = "local",
    # The bound goes in Annotated: from a Field() default Prefect's parameter schema keeps no
    # bound, so the API could not reject 0. (Its descriptions come from the docstring.)
    older_than_minutes: Annotated[int, Field(ge=1)] = 120,
    dry_run: bool = False,
    aws: AwsSettings = AwsSettings(),  # noqa: B008
) -> dict:
    """Deletes pipeline-owned endpoints (tagged managed-by=cifar10-pipeline) older than the
    TTL: what a crashed or killed run could not tear down. An endpoint that cannot be deleted
    does not stop the others; the run fails afterwards, naming it.

    Args:
        backend: where the endpoints live: local (this machine) or aws
        older_than_minutes: delete endpoints older than this
        dry_run: only report what would be deleted
        aws: region, role, bucket and credentials block (a Prefect AwsCredentials
            block's name) for the aws backend
    """
    target = get_backend(PipelineConfig(backend=backend, aws=aws))
    report = reap_endpoints(target, dt.timedelta(minutes=older_than_minutes), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    logger().info("%s %d endpoint(s) older than %d min: %s; kept %d", verb, len(report.deleted),
                  older_than_minutes, ", ".join(report.deleted) or "none", len(report.younger))
    if report.kept_by_user:
        logger().info("left %d endpoint(s) the user chose to keep: %s", len(report.kept_by_user),
                      ", ".join(report.kept_by_user))
    for error in report.errors:
        logger().error("could not delete %s", error)
    if report.errors:
        # After the others were reaped: a failed run is what tells someone (the notification
        # automation) that an endpoint may still be up and costing.
        raise ReapIncomplete(f"{len(report.errors)} endpoint(s) could not be deleted: "
                             + "; ".join(report.errors))
    return {"deleted": report.deleted, "younger": report.younger,
            "kept_by_user": report.kept_by_user, "errors": report.errors, "dry_run": dry_run}
