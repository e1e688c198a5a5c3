"""The pipeline's parameters: one typed config, validated by Prefect when a run is created
and shown as a form in the Prefect UI."""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.base import (
    MODEL_GROUP_PATTERN,
    Autoscaling,
    Backend,
    ConfigurationError,
    RollbackAlarms,
    TrafficShift,
)
from backends.settings import state_dir
from model_src.contract import NAME_PATTERN, whole_if_integral
from tasks.lib.download import (
    DEFAULT_DEADLINE_MINUTES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MD5,
    DEFAULT_URL,
)
from tasks.lib.promotion import ServingPlan
from tasks.lib.promotion_gate import GatePolicy


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not ignored


class DataSettings(_Section):
    url: str = Field(DEFAULT_URL, description="CIFAR-10 python archive: https://, http:// or "
                                              "file:// (mirrors welcome)")
    md5: str | None = Field(DEFAULT_MD5, pattern=r"^[0-9a-fA-F]{32}$",
                            description="expected md5 of the archive; set it for a mirror, "
                                        "null skips the check")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1 << 20,
                           description="refuse a download larger than this, in bytes "
                                       "(CIFAR-10's archive is 170 MB)")
    deadline_minutes: float = Field(DEFAULT_DEADLINE_MINUTES, gt=0, le=24 * 60,
                                    description="give up a download attempt that has not "
                                                "finished after this long")
    preview_images: int = Field(32, ge=1, le=64, description="images in the preview grid")


class TrainingSettings(_Section):
    model: Literal["tutorial", "airbench"] = Field(
        "tutorial", description="tutorial: the seed notebook's network (~56% in seconds on 2 "
                                "CPUs); airbench: the stronger network, its recipe chosen "
                                "by hardware (airbench94 on a GPU, a narrower one on a CPU)")
    epochs: float | None = Field(None, gt=0, le=1000, description="passes over the training "
                                 "set, fractions allowed (1.5); unset: the preset's value")
    batch_size: int | None = Field(None, ge=1, le=8192,
                                   description="global batch: images per step, all hosts "
                                               "together (each host takes its share)")
    learning_rate: float | None = Field(None, gt=0, le=10)
    momentum: float | None = Field(None, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast only where the hardware computes bf16 "
                            "natively (AVX-512 BF16, AMX, a bf16 GPU), fp32 elsewhere; "
                            "airbench's GPU recipe takes fp16 on any GPU")
    instance_type: str = Field("ml.m5.xlarge", description="SageMaker training instance "
                                                           "(ignored by the local backend)")
    instance_count: int = Field(1, ge=1, le=16, description="hosts training data-parallel")
    max_runtime_minutes: int = Field(60, ge=1, le=5 * 24 * 60)
    cache: bool = Field(True, description="reuse a completed training with the same data, "
                                          "code, hyperparameters and instances instead of "
                                          "training again")

    def hyperparameters(self) -> dict[str, str | int | float]:
        """What the entry script receives as ``--key value`` arguments."""
        chosen = {"model": self.model, "epochs": whole_if_integral(self.epochs),
                  "batch-size": self.batch_size, "lr": self.learning_rate,
                  "momentum": self.momentum, "seed": self.seed, "precision": self.precision}
        return {k: v for k, v in chosen.items() if v is not None}


class EndpointSettings(_Section):
    instance_type: str = Field("ml.m5.large", description="SageMaker hosting instance "
                                                          "(ignored by the local backend)")
    instance_count: int = Field(1, ge=1, le=10)
    keep: bool = Field(False, description="keep the endpoint after the run (it is deleted "
                                          "otherwise, even when the run fails)")


class SmokeTestSettings(_Section):
    images: int = Field(64, ge=1, le=10_000, description="test images sent to the endpoint")
    accuracy_floor: float = Field(0.4, ge=0, le=1, description="fail the run under this "
                                                               "accuracy on those images")


class RegistrySettings(_Section):
    group: str = Field("cifar10-pipeline", pattern=MODEL_GROUP_PATTERN,
                       description="model package group every trained model is registered in")
    auto_approve: bool = Field(True, description="let the promotion gate approve or reject; "
                                                 "false leaves versions pending a person")
    tolerance: float = Field(0.005, ge=0, le=1, description="a new version is approved when "
                                                           "its test accuracy is at least the "
                                                           "champion's minus this")

    def gate_policy(self) -> GatePolicy:
        return GatePolicy(tolerance=self.tolerance, auto_approve=self.auto_approve)


class AutoscalingSettings(_Section):
    """Target tracking on invocations per instance (Application Auto Scaling; aws only)."""

    min_instances: int = Field(1, ge=1, le=100, description="never fewer instances")
    max_instances: int = Field(2, ge=1, le=100, description="never more instances")
    invocations_per_instance: int = Field(1000, ge=1, le=1_000_000,
                                          description="the target: invocations per instance "
                                                      "per minute")

    @model_validator(mode="after")
    def _min_below_max(self) -> AutoscalingSettings:
        if self.min_instances > self.max_instances:
            raise ValueError(f"autoscaling: min_instances {self.min_instances} is more than "
                             f"max_instances {self.max_instances}")
        return self


class ServingSettings(_Section):
    """The serving endpoint: a long-lived endpoint that holds the registry's champion, updated
    blue/green as SageMaker's deployment guardrails update one (traffic shifted all at once,
    as a canary, or in linear steps, watched by rollback alarms). The limits are the API's
    (UpdateEndpoint's DeploymentConfig), and the local backend honours the same ones: a
    canary of at most 50%, linear steps of 10-50%, waits and baking of 0-3600 s, a whole
    update of 600-28800 s, longer than its waits added up."""

    enabled: bool = Field(False, description="after registration, promote a new champion to "
                                             "the serving endpoint (runs around the clock: on "
                                             "AWS it bills every hour)")
    endpoint_name: str = Field("cifar10-serving", pattern=NAME_PATTERN,
                               description="the serving endpoint (SageMaker's name rule)")
    strategy: Literal["all_at_once", "canary", "linear"] = Field(
        "canary", description="all_at_once; canary: percent of capacity first, then the "
                              "rest; linear: steps of percent")
    percent: int = Field(10, ge=1, le=50, description="canary: its share of capacity (at "
                                                      "most 50); linear: each step (10-50)")
    wait_seconds: int = Field(300, ge=0, le=3600, description="watch each canary or linear "
                                                              "step this long (0-3600)")
    baking_seconds: int = Field(300, ge=0, le=3600, description="watch all traffic on the new "
                                                                "fleet this long before the "
                                                                "old one stops (0-3600)")
    max_seconds: int = Field(3600, ge=600, le=28800, description="the whole update may take "
                                                                 "this long (600-28800)")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="roll back above this share "
                                                                "of 5xx answers")
    max_p99_latency_ms: float = Field(2000.0, gt=0, le=60_000,
                                      description="roll back above this p99 model latency")
    instance_type: str = Field("ml.m5.large", description="SageMaker hosting instance "
                                                          "(ignored by the local backend)")
    instance_count: int = Field(1, ge=1, le=10, description="instances per fleet")
    autoscaling: AutoscalingSettings | None = Field(None, description="scale on invocations "
                                                                      "(aws); null: fixed")

    @model_validator(mode="after")
    def _guardrail_limits(self) -> ServingSettings:
        if self.strategy == "linear" and self.percent < 10:
            raise ValueError(f"serving: a linear step of {self.percent}% is below the 10% "
                             f"SageMaker allows (10-50%)")
        if (waits := self.total_wait_seconds()) >= self.max_seconds:
            raise ValueError(f"serving: the waits add up to {waits} s ({self.strategy}, "
                             f"wait_seconds and baking_seconds), so max_seconds "
                             f"{self.max_seconds} must be larger (at most 28800)")
        return self

    def total_wait_seconds(self) -> int:
        """What an update waits in all: each interval between traffic steps, then baking."""
        steps = {"all_at_once": 0, "canary": 1,
                 "linear": math.ceil(100 / self.percent) - 1}[self.strategy]
        return steps * self.wait_seconds + self.baking_seconds

    def plan(self, instance_type: str) -> ServingPlan:
        """The promotion's request, less the model: the endpoint, its instances, the traffic
        shift, the rollback alarms and the scaling."""
        scaling = self.autoscaling
        return ServingPlan(
            endpoint=self.endpoint_name, instance_type=instance_type,
            instance_count=self.instance_count,
            shift=TrafficShift(strategy=self.strategy, percent=self.percent,
                               wait_seconds=self.wait_seconds,
                               baking_seconds=self.baking_seconds,
                               max_seconds=self.max_seconds),
            alarms=RollbackAlarms(max_error_rate=self.max_error_rate,
                                  max_p99_latency_ms=self.max_p99_latency_ms),
            autoscaling=None if scaling is None else Autoscaling(
                min_instances=scaling.min_instances, max_instances=scaling.max_instances,
                invocations_per_instance=scaling.invocations_per_instance))


class AwsSettings(_Section):
    region: str | None = Field(None, description="default: AWS_REGION / AWS_DEFAULT_REGION")
    role_arn: str | None = Field(None, description="SageMaker execution role; default: "
                                                   "SAGEMAKER_ROLE_ARN")
    bucket: str | None = Field(None, description="default: SAGEMAKER_BUCKET, else the "
                                                 "SageMaker default bucket")
    prefix: str = Field("cifar10-pipeline", description="S3 key prefix for data and models")
    use_spot: bool = Field(False, description="managed spot training (cheaper, may wait for "
                                              "capacity), checkpoints synced to S3")
    max_wait_minutes: int | None = Field(None, ge=1, le=5 * 24 * 60,
                                         description="spot only: runtime plus time waiting "
                                                     "for capacity; default twice the runtime")
    credentials_block: str | None = Field(
        None, pattern=r"^(?:[a-z0-9-]+/)?[a-z0-9-]+$",
        description="name of a Prefect AwsCredentials block (prefect-aws) to take credentials, "
                    "assumed role and region from; default: boto3's chain (environment, "
                    "profile, instance role). aws.region, when set, still wins over the "
                    "block's region")


class RetentionSettings(_Section):
    """What the local backend keeps on this machine, applied at the start of every run and
    sweep (the aws backend keeps nothing here: bound its bucket with S3 lifecycle rules).
    Whatever the limits, nothing is removed that an Approved or PendingManualApproval version,
    a kept or running endpoint, or a running job needs.

    The defaults, for a nightly run left alone for months: ``keep_jobs`` 10, since a nightly
    run that reuses its cached model trains only when its data, code or settings change, so
    ten trainings are weeks of history, and a finished job weighs its log, its metrics and
    its model (a few MB with the stronger network), so ten stay well under the dataset's
    size. ``max_age_days`` 14: two weeks to look into a failed night after a holiday.
    ``log_max_bytes`` 10 MB with ``log_backups`` 1: a healthy training log is a few kB (a line
    per epoch); only a runaway script reaches the limit, and the newest 10-20 MB of it is what
    tells why."""

    keep_jobs: int | None = Field(10, ge=0, le=100_000,
                                  description="training jobs kept, newest first (directory, "
                                              "log, metrics, model); null: no count limit")
    max_age_days: float | None = Field(14, ge=0, le=36_500,
                                       description="jobs older than this go, even among the "
                                                   "newest; null: no age limit")
    log_max_bytes: int = Field(10_000_000, ge=4096, le=10**12,
                               description="a training log rotates at this size")
    log_backups: int = Field(1, ge=0, le=100, description="rotated parts of a training log "
                                                          "kept besides the current one")


class PipelineConfig(_Section):
    backend: Literal["local", "aws"] = Field(
        "local", description="local: this machine, no AWS or Docker; aws: Amazon SageMaker")
    data: DataSettings = DataSettings()
    training: TrainingSettings = TrainingSettings()
    endpoint: EndpointSettings = EndpointSettings()
    smoke_test: SmokeTestSettings = SmokeTestSettings()
    registry: RegistrySettings = RegistrySettings()
    aws: AwsSettings = AwsSettings()
    retention: RetentionSettings = RetentionSettings()
    serving: ServingSettings = ServingSettings()

    @model_validator(mode="after")
    def _x86_instances_on_aws(self) -> PipelineConfig:
        if self.backend == "aws":
            from backends.aws.images import check_x86

            try:
                for instance_type in (self.training.instance_type, self.endpoint.instance_type,
                                      self.serving.instance_type):
                    check_x86(instance_type)
            except ConfigurationError as e:
                raise ValueError(str(e)) from None
        return self

    def instance_types(self) -> tuple[str, str]:
        """(training, hosting) instance types; the local backend runs on this machine."""
        if self.backend == "local":
            return "local", "local"
        return self.training.instance_type, self.endpoint.instance_type

    def serving_plan(self) -> ServingPlan:
        """How the serving endpoint is updated, on this backend's instances."""
        return self.serving.plan("local" if self.backend == "local"
                                 else self.serving.instance_type)


MAX_SWEEP_POINTS = 64
AWS_DEFAULT_PARALLEL_JOBS = 4  # within SageMaker's default per-instance-type quota


class SweepGrid(_Section):
    """The values to try, each field named as the TrainingSettings field it sets; every
    combination of the non-empty lists is one point (one training job). An empty list keeps
    the base config's value."""

    learning_rate: list[float] = Field([0.025, 0.05, 0.1], description="learning rates")
    epochs: list[float] = Field([], description="passes over the training set")
    model: list[Literal["tutorial", "airbench"]] = Field([], description="networks")
    batch_size: list[int] = Field([], description="global batch sizes")
    seed: list[int] = Field([], description="random seeds (the spread of one recipe)")

    def swept(self) -> dict[str, list[Any]]:
        """The non-empty lists, in the order above."""
        return {name: list(values) for name, values in self if values}


class SweepConfig(_Section):
    """A sweep: the pipeline's config as the base, a grid over its training settings, and how
    many training jobs may run at once."""

    base: PipelineConfig = PipelineConfig()
    grid: SweepGrid = SweepGrid()
    max_parallel: int | None = Field(None, ge=1, le=MAX_SWEEP_POINTS,
                                     description="training jobs at once; default: local, one "
                                                 "per CPU core (each takes its share of them); "
                                                 f"aws, {AWS_DEFAULT_PARALLEL_JOBS}")

    @model_validator(mode="after")
    def _points_in_range(self) -> SweepConfig:
        swept = self.grid.swept()
        for name, values in swept.items():
            if len(set(values)) != len(values):
                raise ValueError(f"grid.{name} lists a value twice: {values}")
        count = len(self.points())
        if count > MAX_SWEEP_POINTS:
            raise ValueError(f"the grid has {count} points; at most {MAX_SWEEP_POINTS}")
        return self

    def points(self) -> list[TrainingSettings]:
        """One training configuration per grid point (at least one: the base)."""
        swept = self.grid.swept()
        base = self.base.training.model_dump()
        return [TrainingSettings.model_validate({**base, **dict(zip(swept, combo, strict=True))})
                for combo in itertools.product(*swept.values())]

    def parallel_jobs(self, usable_cpus: int) -> int:
        """``max_parallel``, else the backend's default, never more than there are points."""
        if self.max_parallel is not None:
            limit = self.max_parallel
        elif self.base.backend == "local":
            limit = max(1, usable_cpus // self.base.training.instance_count)
        else:
            limit = AWS_DEFAULT_PARALLEL_JOBS
        return max(1, min(limit, len(self.points())))


def get_backend(config: PipelineConfig, concurrent_jobs: int = 1) -> Backend:
    """The backend the config names, built with its settings (cheap and offline: an AWS
    backend resolves credentials, region and role on first use; only a named credentials
    block is read now, from the Prefect API, so that a missing one fails at once). With
    ``concurrent_jobs`` training jobs at once, each local job takes its share of this
    machine's CPUs."""
    if config.backend == "aws":
        from backends.aws import AwsBackend

        settings = config.aws.model_dump(exclude={"credentials_block"})
        if config.aws.credentials_block is None:
            return AwsBackend(**settings)  # boto3's default credential chain
        from flows.aws_credentials import block_session_factory

        # Loaded here, in flows/ (backends never import Prefect), by every process that
        # rebuilds the backend from the config: the run, its teardown hooks, the reaper.
        return AwsBackend(**settings,
                          session_factory=block_session_factory(config.aws.credentials_block))
    from backends.local import LocalBackend
    from backends.local.retention import RetentionPolicy

    return LocalBackend(concurrent_jobs=concurrent_jobs,
                        retention=RetentionPolicy(**config.retention.model_dump()))


def data_root() -> str:
    """Where downloaded datasets live: the state directory's ``data/``."""
    return str(state_dir() / "data")
