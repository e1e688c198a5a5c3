"""Training stages: upload the data channel, then fit (run the SageMaker training job)."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from backends.base import Backend, TrainingResult, TrainingSpec
from tasks.download import Dataset
from tasks.reporting import Progress, logger, publish_table
from tasks.retries import retry_transient

EPOCH_LINE = re.compile(r"\bepoch=(\d+);.*\btrain_loss=([0-9.]+);")


@task(name="upload_data", task_run_name="upload data to {backend.name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def upload_data(backend: Backend, dataset: Dataset) -> str:
    """Uploads the batch directory as the training channel; unchanged files are skipped."""
    log = logger()
    uri = backend.upload_data(Path(dataset.path), on_log=log.info)
    log.info("training channel: %s", uri)
    return uri


@task(name="fit", task_run_name="fit {spec.job_name}", cache_policy=NO_CACHE)
def fit(backend: Backend, spec: TrainingSpec) -> TrainingResult:
    """Runs the training job, streaming its log into the run's logs and its progress into a
    progress artifact. Not retried: a job that failed on its own fails the same way again."""
    log = logger()
    # Epoch log lines count whole or partial passes: 1.5 epochs log epochs 1 and 2.
    epochs = math.ceil(float(spec.hyperparameters.get("epochs", 0))) or None
    progress = Progress("cifar10-training-progress",
                        f"Training job {spec.job_name}: epochs completed")
    started = time.monotonic()

    def on_log(line: str) -> None:
        log.info(line)
        match = EPOCH_LINE.search(line)
        if match and epochs:
            epoch = int(match.group(1))
            progress.update(100 * epoch / epochs,
                            f"epoch {epoch}/{epochs}, train loss {float(match.group(2)):.3f}, "
                            f"{time.monotonic() - started:.0f}s")

    log.info("starting training job %s on %s (%d x %s), hyperparameters %s", spec.job_name,
             backend.name, spec.instance_count, spec.instance_type, spec.hyperparameters)
    result = backend.train(spec, on_log=on_log)
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
