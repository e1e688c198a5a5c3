"""The promote stage: a registry version onto the serving endpoint, blue/green as SageMaker's
deployment guardrails do it (``backend.serving``); then the registry records where each version
stands ("serving on NAME", "replaced by vN", "rolled back: REASON"), and the run's page gets the
promotion's steps as a table and its course as a plot."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from backends.base import (
    CREATED,
    FAILED,
    PROMOTED,
    ROLLED_BACK,
    Backend,
    BackendError,
    ModelVersion,
    PromotionResult,
    ServingStatus,
)
from tasks.lib.plots import promotion_plot
from tasks.lib.promotion import (
    FAILED_PREFIX,
    ServingPlan,
    chosen_version,
    notes_after,
    rolled_back,
    serves,
    why_not_auto_promoted,
)
from tasks.lib.summary import NOT_PROMOTED, PromotionStepRow, PromotionSummary
from tasks.reporting import logger, markdown_image, publish_markdown, publish_table


class PromotionNotCompleted(RuntimeError):
    """The promotion rolled back or failed: the new version does not serve. The flows raise it
    once the summary is published, so that the run ends Failed and the failure automation
    tells someone (a nightly run nobody watches)."""

    def __init__(self, message: str, summary: PromotionSummary | None = None) -> None:
        # The message as the one argument: the exception pickles (Prefect stores it).
        super().__init__(message)
        self.summary = summary


class DeploymentNotRecorded(RuntimeError):
    """The promotion ended, but the registry could not record where the versions stand."""


# Not retried: the backend already waits through transient faults; a blind retry would start
# a second blue/green update over the first (SageMaker refuses UpdateEndpoint while one is in
# progress) or promote again a model the alarms just rolled back.
@task(name="promote_model", task_run_name="promote {group} to {plan.endpoint}",
      cache_policy=NO_CACHE)
def promote_model(backend: Backend, group: str, plan: ServingPlan, owner: str,
                  version: int | None = None, auto: bool = False) -> PromotionSummary:
    """Puts ``group`` ``version`` on the serving endpoint. ``auto`` (the pipeline's stage):
    only if it is the Approved champion, does not serve already and was never rolled back;
    otherwise nothing is done and the summary says why ("not promoted: ..."). By hand
    (``auto`` False; ``version`` None: the champion): any Approved version, else
    ``PromotionRefused``. A rollback or a failure is an outcome, not an error: the summary
    says so, and the flow fails the run after publishing it."""
    log = logger()
    versions = backend.registry.versions(group)
    before = backend.serving.describe(plan.endpoint)
    target, why = _target(versions, group, version, auto, before, plan.endpoint)
    if target is None or why is not None:
        log.info("not promoted: %s", why)
        return PromotionSummary(endpoint=plan.endpoint, group=group,
                                version=target.version if target else version,
                                outcome=NOT_PROMOTED, reason=str(why),
                                shift=plan.describe_shift(),
                                status=before.status if before else None,
                                serving_version=_of_group(before, group),
                                serving_before=_of_group(before, group))
    log.info("promoting %s v%d to %s (%s; rolled back above %.3g 5xx rate or %.0f ms p99)",
             group, target.version, plan.endpoint, plan.describe_shift(),
             plan.alarms.max_error_rate, plan.alarms.max_p99_latency_ms)
    result = _promote(backend, plan, target, owner)
    summary = _summary(result, plan, target, _of_group(before, group))
    (log.info if summary.ok else log.error)("%s", summary.line())
    publish_promotion(summary, plan)
    record_deployment(backend, versions, plan.endpoint, target, summary)
    return summary


def _target(versions: list[ModelVersion], group: str, version: int | None, auto: bool,
            before: ServingStatus | None, endpoint: str
            ) -> tuple[ModelVersion | None, str | None]:
    """The version to promote, and why not (None: go ahead)."""
    if auto:
        found = next((v for v in versions if v.version == version), None)
        if found is None:
            return None, f"{group} has no readable version {version}"
        return found, why_not_auto_promoted(found, versions, before, endpoint)
    chosen = chosen_version(versions, group, version)  # PromotionRefused: not Approved
    if serves(before, group, chosen.version):
        return chosen, f"v{chosen.version} already serves on {endpoint}"
    return chosen, None


def _of_group(status: ServingStatus | None, group: str) -> int | None:
    """The version of ``group`` the endpoint serves (None: nothing, or another group's)."""
    return status.version if status is not None and status.group == group else None


def _promote(backend: Backend, plan: ServingPlan, target: ModelVersion,
             owner: str) -> PromotionResult:
    """``backend.serving.promote``; a backend error (the new fleet never came up, a quota,
    missing permissions) becomes a failed outcome, with what serves afterwards."""
    log = logger()
    try:
        return backend.serving.promote(plan.spec(target, owner), on_log=log.info)
    except BackendError as e:
        log.error("promoting v%d failed: %s: %s", target.version, type(e).__name__, e)
        try:
            after = backend.serving.describe(plan.endpoint)
        except BackendError:
            after = None
        return PromotionResult(endpoint=plan.endpoint, outcome=FAILED,
                               reason=f"{type(e).__name__}: {e}",
                               status=after.status if after else "unknown",
                               serving_version=_of_group(after, target.group))


def _summary(result: PromotionResult, plan: ServingPlan, target: ModelVersion,
             serving_before: int | None) -> PromotionSummary:
    serving = result.serving_version
    if serving is None and result.outcome in (CREATED, PROMOTED):
        serving = target.version  # it serves: that is what the outcome says
    return PromotionSummary(
        endpoint=plan.endpoint, group=target.group, version=target.version,
        outcome=result.outcome, reason=result.reason, shift=plan.describe_shift(),
        status=result.status, serving_version=serving, serving_before=serving_before,
        steps=[PromotionStepRow(at=s.at, action=s.action, new_share=s.new_share,
                                error_rate=s.error_rate, p99_latency_ms=s.p99_latency_ms,
                                invocations=s.invocations, note=s.note)
               for s in result.steps])


def record_deployment(backend: Backend, versions: list[ModelVersion], endpoint: str,
                      promoted: ModelVersion, summary: PromotionSummary) -> None:
    """The registry's notes after the promotion: the serving version "serving on", the one it
    replaced "replaced by vN", a refused one "rolled back: REASON". Only changed notes are
    written."""
    log = logger()
    outcome_note = (rolled_back(summary.reason) if summary.outcome == ROLLED_BACK
                    else f"{FAILED_PREFIX}{summary.reason}")
    notes = notes_after(versions, endpoint, promoted, summary.serving_before,
                        summary.serving_version, outcome_note)
    current = {v.version: v.deployment for v in versions}
    for number, deployment in sorted(notes.items()):
        if current.get(number) == deployment:
            continue
        try:
            backend.registry.set_deployment(promoted.group, number, deployment)
        except BackendError as e:
            raise DeploymentNotRecorded(
                f"{summary.line()}; but the registry could not record that {promoted.group} "
                f"v{number} is {deployment!r} ({e}); `cifar10-pipeline serving status` says "
                f"what serves") from e
        log.info("registry: %s v%d %s", promoted.group, number, deployment)


def publish_promotion(summary: PromotionSummary, plan: ServingPlan) -> None:
    """The steps as a table, and the course of traffic, error rate and latency as a plot."""
    rows = [{"at": s.at.isoformat(timespec="seconds"), "action": s.action,
             "new_share": round(s.new_share, 3), "error_rate": s.error_rate,
             "p99_latency_ms": s.p99_latency_ms, "invocations": s.invocations,
             "note": s.note} for s in summary.steps]
    publish_table("cifar10-promotion-steps", rows,
                  description=f"{summary.group} v{summary.version} onto {summary.endpoint} "
                              f"({summary.shift}), step by step")
    markdown = (f"## Promotion to `{summary.endpoint}`\n\n"
                f"{summary.line() if summary.ok else '**' + summary.line() + '**'}\n")
    if summary.steps:
        start = summary.steps[0].at
        png = promotion_plot(
            [(s.at - start).total_seconds() for s in summary.steps],
            [s.new_share for s in summary.steps], [s.error_rate for s in summary.steps],
            [s.p99_latency_ms for s in summary.steps], plan.alarms.max_error_rate,
            plan.alarms.max_p99_latency_ms,
            title=f"v{summary.version} on {summary.endpoint}: {summary.outcome}")
        markdown += "\n" + markdown_image(png, "traffic, error rate and latency") + "\n"
    publish_markdown("cifar10-promotion", markdown,
                     description=f"promotion of {summary.group} v{summary.version}: "
                                 f"{summary.outcome}")
