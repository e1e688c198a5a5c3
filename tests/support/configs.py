"""The configs the tests run the flows with, in one place: a fast run on the generated archive
that the test HTTP server serves, on the local backend or on the moto account, and a sweep over
such a run."""

from __future__ import annotations

from typing import Any

from backends.base import ModelVersionSpec, TrainingResult
from flows.config import PipelineConfig, SweepConfig
from tasks.lib.summary import SmokeTestResult
from tasks.registry import registry_metrics
from tests.support.aws_fakes import BUCKET, REGION, ROLE_ARN
from tests.support.pipeline import FAST_HYPERPARAMETERS

FAST_TRAINING = {"epochs": FAST_HYPERPARAMETERS["epochs"], "learning_rate": 0.02,
                 "batch_size": FAST_HYPERPARAMETERS["batch-size"]}
# What the AWS runs ask for, written out (the tests check them in the requests).
AWS_TRAINING = {**FAST_TRAINING, "instance_type": "ml.m5.xlarge", "max_runtime_minutes": 30}
AWS_SETTINGS = {"region": REGION, "role_arn": ROLE_ARN, "bucket": BUCKET}


def local_config(http_server: str, cifar_tarball: tuple[str, str],
                 **overrides: Any) -> PipelineConfig:
    """The flow's config for the generated archive served by the test HTTP server, with fast
    hyperparameters and a smoke test the generated data passes; ``overrides`` replace whole
    sections."""
    name, md5 = cifar_tarball
    return PipelineConfig.model_validate({
        "data": {"url": f"{http_server}/{name}", "md5": md5},
        "training": FAST_TRAINING,
        "smoke_test": {"images": 100, "accuracy_floor": 0.5},
        **overrides,
    })


def aws_config(http_server: str, cifar_tarball: tuple[str, str],
               **overrides: Any) -> PipelineConfig:
    """The same run on the AWS backend, with the moto account's region, bucket and role."""
    return local_config(http_server, cifar_tarball, **{
        "backend": "aws", "training": AWS_TRAINING, "endpoint": {"instance_type": "ml.m5.large"},
        "aws": AWS_SETTINGS, **overrides})


def sweep_config(base: PipelineConfig, learning_rates: list[float],
                 **settings: Any) -> SweepConfig:
    """A sweep over ``base``'s learning rate."""
    return SweepConfig.model_validate({"base": base.model_dump(mode="json"),
                                       "grid": {"learning_rate": learning_rates}, **settings})


def candidate(group: str, training: TrainingResult, smoke: SmokeTestResult | None,
              cache_key: str, lineage: dict[str, str], instance_type: str = "local",
              tags: dict[str, str] | None = None) -> ModelVersionSpec:
    """The model ``training`` made, as the registry stage gets it from a flow."""
    return ModelVersionSpec(group=group, model_uri=training.model_uri,
                            training_job=training.cached_from or training.job_name,
                            cache_key=cache_key, metrics=registry_metrics(training, smoke),
                            lineage=lineage, instance_type=instance_type, tags=tags or {})
