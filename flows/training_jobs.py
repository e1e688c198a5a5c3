"""A training job as a flow plans it: its spec, its cache key (what makes the same model) and
its lineage (what the registry records as having made it)."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import ModelVersionSpec, TrainingResult, TrainingSpec
from flows.config import TrainingSettings
from flows.run_context import RunContext
from tasks.lib.download import Dataset, display_url
from tasks.lib.lineage import cache_key
from tasks.lib.summary import SmokeTestResult
from tasks.registry import registry_metrics


@dataclass(frozen=True)
class PlannedJob:
    spec: TrainingSpec
    cache_key: str
    lineage: dict[str, str]

    def candidate(self, run: RunContext, training: TrainingResult,
                  smoke: SmokeTestResult | None) -> ModelVersionSpec:
        """The model this job trained (or reused), as the registry's next version."""
        return ModelVersionSpec(
            group=run.config.registry.group, model_uri=training.model_uri,
            training_job=training.cached_from or training.job_name, cache_key=self.cache_key,
            metrics=registry_metrics(training, smoke), lineage=self.lineage,
            instance_type=run.hosting_instance, tags=self.spec.tags)


def plan_training_job(run: RunContext, training: TrainingSettings, name: str,
                      dataset: Dataset, data_uri: str) -> PlannedJob:
    """The job for ``training`` (the config's, or a sweep point's). The same data, code,
    hyperparameters, instances and backend train the same model: that is the cache key."""
    instance_type, _ = run.config.instance_types()
    hyperparameters = training.hyperparameters()
    spec = TrainingSpec(job_name=name, data_uri=data_uri, hyperparameters=hyperparameters,
                        instance_type=instance_type, instance_count=training.instance_count,
                        max_runtime_seconds=training.max_runtime_minutes * 60, tags=run.tags)
    key = cache_key(data_md5=dataset.md5, code=run.code, hyperparameters=hyperparameters,
                    instance_type=instance_type, instance_count=training.instance_count,
                    backend=run.backend.name)
    lineage = {"data_url": display_url(dataset.url), "data_md5": dataset.md5,
               "code_digest": run.code, "hyperparameters": " ".join(
                   f"{k}={v}" for k, v in sorted(hyperparameters.items())),
               "flow_run_id": run.run_id, "backend": run.backend.name,
               "instance_type": instance_type, "instance_count": str(training.instance_count)}
    return PlannedJob(spec, key, lineage)
