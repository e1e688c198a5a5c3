"""Training stages: upload the data channel, then fit (run the SageMaker training job)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from backends.base import Backend, TrainingResult, TrainingSpec
from backends.cache import cached_training
from model_src.contract import metric_values
from tasks.lib.download import Dataset
from tasks.reporting import Progress, logger, publish_table
from tasks.retries import retry_transient


class TrainingProgress:
    """Follows the entry script's log: its plan line (``total_steps=N;``) and one line per
    epoch (``epoch=E; ... steps=S; train_loss=L;``) give the fraction of steps done."""

    def __init__(self) -> None:
        self.total_steps: int | None = None

    def read(self, line: str) -> tuple[float, str] | None:
        """(percent, description) when ``line`` moves training on, else None."""
        values = metric_values(line)
        if "total_steps" in values:
            self.total_steps = int(values["total_steps"])
        elif {"epoch", "steps", "train_loss"} <= values.keys() and self.total_steps:
            steps = int(values["steps"])
            return (100 * steps / self.total_steps,
                    f"epoch {values['epoch']}, step {steps}/{self.total_steps}, "
                    f"train loss {float(values['train_loss']):.3f}")
        return None


@task(name="upload_data", task_run_name="upload data to {backend.name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def upload_data(backend: Backend, dataset: Dataset) -> str:
    """Uploads the batch directory as the training channel; unchanged files are skipped."""
    log = logger()
    uri = backend.storage.upload(Path(dataset.path), on_log=log.info)
    log.info("training channel: %s", uri)
    return uri


@task(name="fit", task_run_name="fit {spec.job_name}", cache_policy=NO_CACHE)
def fit(backend: Backend, spec: TrainingSpec, registry_group: str | None = None,
        cache_key: str | None = None) -> TrainingResult:
    """Runs the training job, streaming its log into the run's logs and its progress into a
    progress artifact. Not retried as a task: a job that failed on its own fails the same way
    again, and the backend already re-attaches through transient faults while it waits, then
    stops the job when it gives up (the reasons: ``backends/aws/training.py``), so a failed
    fit leaves no job billing. A flow run retried after its job failed or was stopped trains
    under the next free name (``backends/job_names.py``); the result names the job that ran.

    With a ``cache_key`` (and the registry ``registry_group`` to find it in), a completed job
    of this pipeline with the same key, whose model still exists, is reused instead: the same
    data, code, hyperparameters and instances train the same model (0 billable seconds)."""
    log = logger()
    progress = Progress("cifar10-training-progress",
                        f"Training job {spec.job_name}: training steps completed")
    if cache_key and registry_group:
        cached = cached_training(backend, registry_group, cache_key, on_log=log.info)
        if cached is not None:
            result = dataclasses.replace(cached, billable_seconds=0,
                                         cached_from=cached.job_name)
            log.info("cached from job %s (same data, code, hyperparameters and instances; "
                     "cache key %s): model %s, test accuracy %.4f, nothing trained",
                     cached.job_name, cache_key[:12], cached.model_uri,
                     cached.metrics.get("test_accuracy", 0))
            publish_table("cifar10-training-metrics", metrics_rows(result.metrics),
                          description=f"Cached from training job {cached.job_name}: its "
                                      f"per-epoch metrics, then the test split")
            progress.update(100.0, f"cached from job {cached.job_name}: nothing to train")
            return result
    training_progress = TrainingProgress()
    started = time.monotonic()

    def on_log(line: str) -> None:
        log.info(line)
        if advanced := training_progress.read(line):
            percent, description = advanced
            progress.update(percent, f"{description}, {time.monotonic() - started:.0f}s")

    log.info("starting training job %s on %s (%d x %s), hyperparameters %s", spec.job_name,
             backend.name, spec.instance_count, spec.instance_type, spec.hyperparameters)
    result = backend.jobs.run(spec, on_log=on_log)
    progress.update(100.0, f"{result.status}: {result.job_name}")
    publish_table("cifar10-training-metrics", metrics_rows(result.metrics),
                  description=f"Training job {result.job_name}: per-epoch metrics, then the "
                              f"test split")
    log.info("training job %s %s: test accuracy %.4f, %d billable seconds, model %s",
             result.job_name, result.status.lower(), result.metrics.get("test_accuracy", 0),
             result.billable_seconds, result.model_uri)
    return result


def metrics_rows(metrics: dict) -> list[dict]:
    """One row per epoch plus a final row for the test split, all with the same columns."""
    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    rows = [{"epoch": str(h["epoch"]), "train_loss": r(h.get("train_loss")),
             "train_accuracy": r(h.get("train_accuracy")), "seconds": r(h.get("epoch_seconds")),
             "test_loss": None, "test_accuracy": None} for h in metrics.get("history", [])]
    rows.append({"epoch": "test", "train_loss": None, "train_accuracy": None,
                 "seconds": r(metrics.get("train_seconds")),
                 "test_loss": r(metrics.get("test_loss")),
                 "test_accuracy": r(metrics.get("test_accuracy"))})
    return rows
