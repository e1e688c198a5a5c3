"""The project's Prefect deployments, defined once: the nightly pipeline, the hourly endpoint
reaper, the on-demand sweep and the manual promotion to the serving endpoint (these two have no
schedule: run them from the UI or `prefect deployment run`), with their schedules, default
parameters, descriptions, tags and version.

``deployments/serve.py`` serves these; ``deployments/prefect.yaml`` (the work-pool route) states
the same values in YAML, and a test keeps the two in step.
"""

from __future__ import annotations

import os
import zoneinfo
from importlib import metadata
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.config import PipelineConfig, SweepConfig
from flows.pipeline import cifar10_pipeline
from flows.promote import cifar10_promote
from flows.reaper import reap_endpoints_flow
from flows.sweep import cifar10_sweep

PIPELINE_DEPLOYMENT = "nightly"
REAPER_DEPLOYMENT = "hourly"
SWEEP_DEPLOYMENT = "on-demand"
PROMOTE_DEPLOYMENT = "manual"
PIPELINE_CRON = "0 2 * * *"   # 02:00: the machine is idle and the result is there by morning
REAPER_CRON = "30 * * * *"    # half past every hour, away from the pipeline's start
REAPER_TTL_MINUTES = 120      # a healthy run deletes its endpoint within minutes of creating it

# One knob for both routes: `serve.py --timezone` defaults to it and prefect.yaml reads it.
TIMEZONE_ENV = "CIFAR10_SCHEDULE_TZ"
DEFAULT_TIMEZONE = "UTC"

TAGS = ["cifar10", "sagemaker", "pytorch"]
PIPELINE_DESCRIPTION = (
    "Nightly: download CIFAR-10, train the CNN as a SageMaker training job, host it as a "
    "real-time endpoint, smoke-test it and delete the endpoint. Runs on this machine with the "
    "local backend unless config.backend is 'aws'."
)
SWEEP_DESCRIPTION = (
    "On demand (not scheduled): train one model per grid point in parallel, host and "
    "smoke-test only the best, delete its endpoint, register every point. Edit config.grid "
    "and config.max_parallel in the run form."
)
PROMOTE_DESCRIPTION = (
    "By hand (not scheduled): promote a registry version (empty: the champion; it must be "
    "Approved) to the serving endpoint, blue/green with canary or linear traffic shifting and "
    "automatic rollback, as config.serving says. Use it for a version approved by hand."
)
REAPER_DESCRIPTION = (
    "Hourly: delete pipeline-owned endpoints older than the TTL, i.e. what a crashed or "
    "killed pipeline run could not tear down."
)


def schedule_timezone() -> str:
    """The IANA timezone the cron schedules are read in: ``$CIFAR10_SCHEDULE_TZ``, else UTC."""
    return os.environ.get(TIMEZONE_ENV) or DEFAULT_TIMEZONE


def checked_timezone(name: str | None) -> str:
    """``name`` (default: :func:`schedule_timezone`) if it is a known IANA timezone. Checked
    here because Prefect accepts any string and the mistake would only show in the scheduler."""
    name = name or schedule_timezone()
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}; use an IANA name such as UTC, "
                         f"Europe/Berlin or America/New_York") from None
    return name


def project_version() -> str:
    """The installed project's version: the deployment's version in the UI."""
    try:
        return metadata.version("cifar10-pipeline")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def pipeline_parameters(config: PipelineConfig | None = None) -> dict[str, Any]:
    """Every field spelt out, so the deployment page and the UI's run form show what a
    scheduled run will use."""
    return {"config": (config or PipelineConfig()).model_dump(mode="json")}


def reaper_parameters() -> dict[str, Any]:
    return {"backend": "local", "older_than_minutes": REAPER_TTL_MINUTES, "dry_run": False}


def _deployment(flow: Any, **settings: Any) -> RunnerDeployment:
    """``flow.to_deployment(**settings)`` with what every deployment here shares."""
    return flow.to_deployment(
        **settings,
        version=project_version(),
        # The API validates run parameters against the flow's schema (the default, stated
        # because the "rejected before anything starts" guarantee depends on it).
        enforce_parameter_schema=True,
        # Loaded by import, so the runner may be started from any directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def pipeline_deployment(cron: str = PIPELINE_CRON, timezone: str | None = None,
                        parameters: dict[str, Any] | None = None) -> RunnerDeployment:
    return _deployment(
        cifar10_pipeline, name=PIPELINE_DEPLOYMENT,
        schedules=[Cron(cron, timezone=checked_timezone(timezone))],
        parameters=parameters or pipeline_parameters(), description=PIPELINE_DESCRIPTION,
        tags=TAGS)


def reaper_deployment(cron: str = REAPER_CRON, timezone: str | None = None) -> RunnerDeployment:
    return _deployment(
        reap_endpoints_flow, name=REAPER_DEPLOYMENT,
        schedules=[Cron(cron, timezone=checked_timezone(timezone))],
        parameters=reaper_parameters(), description=REAPER_DESCRIPTION,
        tags=[*TAGS, "reaper"])


def sweep_parameters() -> dict[str, Any]:
    return {"config": SweepConfig().model_dump(mode="json")}


def sweep_deployment() -> RunnerDeployment:
    """Not scheduled: a sweep runs when someone asks for one."""
    return _deployment(cifar10_sweep, name=SWEEP_DEPLOYMENT, parameters=sweep_parameters(),
                       description=SWEEP_DESCRIPTION, tags=[*TAGS, "sweep"])


def promote_parameters() -> dict[str, Any]:
    return {"version": None, "config": PipelineConfig().model_dump(mode="json")}


def promote_deployment() -> RunnerDeployment:
    """Not scheduled: a person promotes (the nightly pipeline promotes its own champion when
    its config.serving.enabled is set)."""
    return _deployment(cifar10_promote, name=PROMOTE_DEPLOYMENT, parameters=promote_parameters(),
                       description=PROMOTE_DESCRIPTION, tags=[*TAGS, "serving"])
