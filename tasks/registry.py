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
from tasks.lib.lineage import decide
from tasks.lib.summary import RegistrySummary, SmokeTestResult
from tasks.reporting import logger, publish_markdown


# Not retried: a retry after a version was created would register the model twice.
@task(name="register_model", task_run_name="register model in {group}", cache_policy=NO_CACHE)
def register_model(backend: Backend, group: str, training: TrainingResult,
                   smoke: SmokeTestResult | None, lineage: dict[str, str], cache_key: str,
                   hosting_instance: str, tags: dict[str, str], tolerance: float = 0.005,
                   auto_approve: bool = True, passed_over: str | None = None) -> RegistrySummary:
    """Registers the model as the next version of ``group``, approved, rejected or pending as
    the promotion gate decides against the current champion. A rejected model does not fail
    the run: the decision is reported. A model that was never hosted (``smoke`` None: a sweep
    point that another point beat, ``passed_over`` says how) is rejected."""
    log = logger()
    before = champion(backend.list_model_versions(group))
    test_accuracy = float(training.metrics.get("test_accuracy", 0.0))
    metrics = {"test_accuracy": test_accuracy,
               "test_loss": float(training.metrics.get("test_loss", 0.0))}
    if smoke is None:
        status, reason = REJECTED, f"not hosted: {passed_over or 'no smoke test'}"
        if not auto_approve:
            status, reason = PENDING, f"awaiting manual approval ({reason})"
    else:
        status, reason = decide(test_accuracy, smoke.passed,
                                smoke.accuracy, smoke.accuracy_floor, before, tolerance,
                                auto_approve)
        metrics["smoke_accuracy"] = smoke.accuracy
    version = backend.register_model(ModelVersionSpec(
        group=group, model_uri=training.model_uri, training_job=training.cached_from
        or training.job_name, cache_key=cache_key, status=status, reason=reason,
        metrics=metrics, lineage=lineage, instance_type=hosting_instance, tags=tags))
    log.info("registered %s version %d: %s (%s)", group, version.version, version.status,
             reason)
    publish_markdown("cifar10-model-lineage", lineage_markdown(version, before),
                     description=f"{group} v{version.version} beside the champion")
    return RegistrySummary(group=group, version=version.version, status=version.status,
                           reason=reason, champion_before=before.version if before else None)


def lineage_markdown(version: ModelVersion, before: ModelVersion | None) -> str:
    """The new version beside the champion it was measured against."""
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
    champion_label = f"champion before (v{before.version})" if before else "champion before"
    return (f"## Model lineage: `{version.group}` v{version.version}\n\n"
            f"| | this run | {champion_label} |\n|---|---|---|\n{rows}\n")
