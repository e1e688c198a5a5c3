"""The registry stage: every trained model becomes a version, with its lineage, the promotion
gate's decision, and a "model lineage" artifact beside the champion it was measured against."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from backends.base import (
    PENDING,
    REJECTED,
    Backend,
    ModelVersion,
    ModelVersionSpec,
    TrainingResult,
    champion,
)
from tasks.lib.promotion_gate import GatePolicy, verdict
from tasks.lib.summary import RegistrySummary, SmokeTestResult
from tasks.reporting import logger, publish_markdown


def registry_metrics(training: TrainingResult,
                     smoke: SmokeTestResult | None) -> dict[str, float]:
    """What a version records of how its model did: the test split, and its smoke test."""
    metrics = {"test_accuracy": float(training.metrics.get("test_accuracy", 0.0)),
               "test_loss": float(training.metrics.get("test_loss", 0.0))}
    if smoke is not None:
        metrics["smoke_accuracy"] = smoke.accuracy
    return metrics


# Not retried: a retry after a version was created would register the model twice.
@task(name="register_model", task_run_name="register model in {candidate.group}",
      cache_policy=NO_CACHE)
def register_model(backend: Backend, candidate: ModelVersionSpec, training: TrainingResult,
                   smoke: SmokeTestResult | None, policy: GatePolicy = GatePolicy(),  # noqa: B008
                   passed_over: str | None = None) -> RegistrySummary:
    """Registers ``candidate`` (the model ``training`` made) as the next version of its group,
    approved, rejected or pending as the promotion gate decides against the champion at the
    moment of registration (under the registry's lock where it has one). A rejected model does
    not fail the run: the decision is reported. A model that was never hosted (``smoke`` None:
    a sweep point that another point beat, ``passed_over`` says how) is rejected. A cached
    model that is already registered is not registered again: the summary names the existing
    version."""
    log = logger()
    group = candidate.group
    if existing := already_registered(backend, group, training, smoke):
        log.info("the model of job %s is already %s version %d (%s: %s): not registered again",
                 existing.training_job, group, existing.version, existing.status,
                 existing.reason)
        now = champion(backend.registry.versions(group))
        publish_markdown("cifar10-model-lineage", lineage_markdown(existing, now, reused=True),
                         description=f"{group} v{existing.version} (already registered) "
                                     f"beside the champion")
        return RegistrySummary(group=group, version=existing.version, status=existing.status,
                               reason=existing.reason, champion_before=None, reused=True)

    def gate(before: ModelVersion | None) -> tuple[str, str]:
        # Called by the backend at the moment of registration (locally: under the group's
        # lock), so the champion is the one the new version really follows.
        if smoke is None:
            reason = f"not hosted: {passed_over or 'no smoke test'}"
            return (REJECTED, reason) if policy.auto_approve else (
                PENDING, f"awaiting manual approval ({reason})")
        return verdict(candidate.metrics["test_accuracy"], smoke.passed, smoke.accuracy,
                       smoke.accuracy_floor, before, policy.tolerance, policy.auto_approve)

    registration = backend.registry.register(candidate, gate)
    version, before = registration.version, registration.champion_before
    log.info("registered %s version %d: %s (%s)", group, version.version, version.status,
             version.reason)
    publish_markdown("cifar10-model-lineage", lineage_markdown(version, before),
                     description=f"{group} v{version.version} beside the champion")
    return RegistrySummary(group=group, version=version.version, status=version.status,
                           reason=version.reason,
                           champion_before=before.version if before else None)


def already_registered(backend: Backend, group: str, training: TrainingResult,
                       smoke: SmokeTestResult | None) -> ModelVersion | None:
    """The newest version of ``group`` holding this cached model (same artifact, same job),
    else None. A model that was never hosted before (a sweep point another point beat) but is
    smoke-tested now is registered again, so that the gate decides on the new evidence. Read
    outside the lock: two cached runs at the same moment may both register, which costs a
    duplicate version, never a wrong decision."""
    if not training.cached_from:
        return None
    same = [v for v in backend.registry.versions(group)
            if v.model_uri == training.model_uri and v.training_job == training.cached_from]
    if smoke is not None:
        same = [v for v in same if "smoke_accuracy" in v.metrics]
    return max(same, key=lambda v: v.version, default=None)


def lineage_markdown(version: ModelVersion, before: ModelVersion | None,
                     reused: bool = False) -> str:
    """The new version beside the champion it was measured against (``reused``: the version
    that already held this cached model, beside the champion now)."""
    def cells(v: ModelVersion | None) -> list[str]:
        if v is None:
            return ["-"] * 11
        return [f"v{v.version}", f"**{v.status}**: {v.reason}",
                f"{v.metrics.get('test_accuracy', 0):.4f}",
                "-" if v.metrics.get("smoke_accuracy") is None
                else f"{v.metrics['smoke_accuracy']:.3f}",
                f"`{v.lineage.get('data_url', '')}`", f"`{v.lineage.get('data_md5', '')}`",
                f"`{v.lineage.get('code_digest', '')[:16]}`",
                f"`{v.lineage.get('hyperparameters', '')}`", f"`{v.training_job}`",
                f"`{v.lineage.get('flow_run_id', '')}`", f"`{v.model_uri}`"]

    labels = ["version", "decision", "test accuracy", "smoke-test accuracy", "data", "data md5",
              "code digest (model_src/)", "hyperparameters", "training job", "flow run",
              "model artifact"]
    rows = "\n".join(f"| {label} | {new} | {old} |" for label, new, old in
                     zip(labels, cells(version), cells(before), strict=True))
    champion_label = "champion now" if reused else "champion before"
    champion_label += f" (v{before.version})" if before else ""
    note = (f"\nThis run's model was cached from job `{version.training_job}`, already "
            f"registered as v{version.version}: it was not registered again.\n" if reused else "")
    return (f"## Model lineage: `{version.group}` v{version.version}\n{note}\n"
            f"| | this run | {champion_label} |\n|---|---|---|\n{rows}\n")
