"""Promotion to the serving endpoint, as a flow of its own and as the pipeline's last stage.

``cifar10-promote`` puts a registry version (default: the champion; it must be Approved) on the
serving endpoint, blue/green as ``config.serving`` says: a version a person approved
(`cifar10-pipeline models approve`), promoted from the UI (deployment ``cifar10-promote/manual``)
or the command line (`serving promote`, `serving rollback`). The pipeline and the sweep call
``promote_stage`` after registration, when ``config.serving.enabled``. A promotion that rolls
back or fails ends the run Failed (``raise_unless_served``), once everything is reported.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow
from prefect.runtime import flow_run as current_flow_run

from flows.config import PipelineConfig, get_backend
from flows.run_context import RunContext
from tasks.lib.summary import PromotionSummary, RegistrySummary
from tasks.promotion import PromotionNotCompleted, promote_model


def _run_name() -> str:
    config = PipelineConfig.model_validate(current_flow_run.parameters.get("config") or {})
    version = current_flow_run.parameters.get("version")
    which = "champion" if version is None else f"v{version}"
    return f"{config.backend}-promote-{which}-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="cifar10-promote", flow_run_name=_run_name, log_prints=True)
def cifar10_promote(version: int | None = None,
                    config: PipelineConfig = PipelineConfig()) -> PromotionSummary:  # noqa: B008
    """Promote a registry version to the serving endpoint, blue/green with automatic rollback.

    Args:
        version: the version of config.registry.group to promote (it must be Approved);
            empty: the champion, the newest Approved version
        config: the backend, the registry group, and config.serving: the endpoint, the
            traffic shift, the rollback alarms (serving.enabled is the pipeline's switch for
            promoting after each run; it is not needed here)
    """
    backend = get_backend(config)
    backend.prepare()
    owner = f"prefect-flow-run/{current_flow_run.id or uuid.uuid4()}"
    promotion = promote_model(backend, config.registry.group, config.serving_plan(), owner,
                              version=version)
    raise_unless_served(promotion)
    return promotion


def promote_stage(run: RunContext,
                  registration: RegistrySummary | None) -> PromotionSummary | None:
    """The pipeline's (and the sweep's) promote stage: the version this run registered goes
    to the serving endpoint if it is the Approved champion (otherwise the summary says why
    not). None, and no stage, when serving is off."""
    if not run.config.serving.enabled or registration is None:
        return None
    with run.stage("promote"):
        return promote_model(run.backend, registration.group, run.config.serving_plan(),
                             run.owner, version=registration.version, auto=True)


def raise_unless_served(promotion: PromotionSummary | None) -> None:
    """Fails the run when a promotion rolled back or failed: a nightly run nobody watches
    reaches someone through the failure automation. Called after the summary is published."""
    if promotion is not None and not promotion.ok:
        raise PromotionNotCompleted(promotion.line(), promotion)
