"""SageMaker training jobs for the AWS backend.

The request is built by the SDK v3 ``ModelTrainer``: it packages and uploads ``source_dir``
and its container drivers, and serialises the image, hyperparameters, channels, compute,
stopping condition, spot and checkpoint settings, metric definitions and tags. The job is then
created with boto3, under our own name. Why not ``ModelTrainer.train()``:

- it always names the job ``{base_job_name}-{timestamp}`` (``sagemaker.train.utils.
  _get_unique_name``), so a retried task could not find the job its first attempt started;
  the pipeline needs one deterministic name per flow run to re-attach instead of paying twice;
- its wait prints logs to stdout and polls on its own schedule; the pipeline streams the job's
  CloudWatch lines into the Prefect log callback and bounds the wait.

Building the request uses ``ModelTrainer._create_training_job_args(boto3=True)``, the method
``train()`` itself calls (and the one SageMaker Pipelines use). It is private API, so
``tests/test_aws_backend.py`` checks the request it produces, field by field, with botocore's
Stubber; the SDK is pinned below 4.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from botocore.exceptions import ClientError

from backends.aws.config import AwsOptions
from backends.aws.errors import aws_errors, error_code, translate, unless_missing
from backends.aws.images import pytorch_image
from backends.aws.logs import LOG_GROUP, TrainingLogTail
from backends.aws.s3 import read_tar_member, s3_uri
from backends.aws.session import AwsSession
from backends.base import (
    TRAINING_CHANNEL,
    BackendError,
    ConfigurationError,
    LogCallback,
    TrainingJobFailed,
    TrainingResult,
    TrainingSpec,
)
from backends.polling import poll
from backends.settings import SOURCE_DIR
from model_src.cifar import METRICS_FILE, SOURCE_IGNORE, TRAINING_PROGRAM, metric_regex

TERMINAL = {"Completed", "Failed", "Stopped"}
# What the entry script logs as "name=value;" lines (model_src/cifar.py's metric_line).
METRIC_NAMES = ("epoch", "train_loss", "train_accuracy", "epoch_seconds", "test_loss",
                "test_accuracy", "train_seconds")
METRIC_DEFINITIONS = [{"Name": name, "Regex": metric_regex(name)} for name in METRIC_NAMES]
CHECKPOINT_DIR = "/opt/ml/checkpoints"


@contextmanager
def role_validation(enabled: bool) -> Iterator[None]:
    """The SDK simulates the execution role's IAM policy when a ModelTrainer is built, which
    needs iam:SimulatePrincipalPolicy and iam:GetRole on the caller. Off unless asked for:
    a missing role permission surfaces anyway when the job starts, with AWS's own reason."""
    if enabled or "SAGEMAKER_VALIDATE_ROLE" in os.environ:
        yield
        return
    os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    try:
        yield
    finally:
        os.environ.pop("SAGEMAKER_VALIDATE_ROLE", None)


class AwsTrainingJobs:
    def __init__(self, aws: AwsSession, options: AwsOptions, sdk_session: Callable[[], Any],
                 bucket: Callable[[], str]) -> None:
        self.aws = aws
        self.options = options
        self.sdk_session = sdk_session
        self.bucket = bucket

    # -- the request ---------------------------------------------------------------------

    def image(self, instance_type: str) -> str:
        return pytorch_image("training", self.aws.region, self.options.framework_version,
                             self.options.py_version, instance_type)

    def output_path(self) -> str:
        """Where SageMaker writes ``{job}/output/model.tar.gz`` and ``output.tar.gz``."""
        return s3_uri(self.bucket(), f"{self.options.prefix}/training-jobs")

    def build_request(self, spec: TrainingSpec) -> dict[str, Any]:
        """The CreateTrainingJob request for ``spec``, built by ModelTrainer (which uploads
        the source code and its drivers), named ``spec.job_name``."""
        from sagemaker.core.helper.iam_role_resolver import RoleValidationError
        from sagemaker.core.shapes import MetricDefinition, Tag
        from sagemaker.core.training.configs import (
            CheckpointConfig,
            Compute,
            InputData,
            OutputDataConfig,
            SourceCode,
            StoppingCondition,
        )
        role = self.options.require_role()
        if not spec.data_uri.startswith("s3://"):
            raise BackendError(f"the aws backend trains from S3; got channel {spec.data_uri} "
                               f"(upload the data with this backend first)")
        image = self.image(spec.instance_type)
        max_wait = self.options.max_wait_seconds(spec.max_runtime_seconds)
        job_root = f"{self.options.prefix}/training-jobs/{spec.job_name}"
        checkpoint = None
        if self.options.use_spot:
            # Spot capacity can be reclaimed; SageMaker restarts the job and syncs
            # /opt/ml/checkpoints from here, so a script that saves there resumes.
            checkpoint = CheckpointConfig(s3_uri=s3_uri(self.bucket(), f"{job_root}/checkpoints"),
                                          local_path=CHECKPOINT_DIR)
        doing = f"preparing training job {spec.job_name} (ModelTrainer uploads model_src/)"
        with aws_errors(doing), role_validation(self.options.validate_role):
            try:
                trainer = staging_in_own_bucket()(
                    sagemaker_session=self.sdk_session(),
                    role=role,
                    training_image=image,
                    # The SDK stages code under {input_s3_key_prefix}/{base}-{timestamp}/input/:
                    # keep it beside the job's output, under the pipeline's prefix.
                    base_job_name="source",
                    input_s3_key_prefix=job_root,
                    source_code=SourceCode(source_dir=str(SOURCE_DIR),
                                           entry_script=TRAINING_PROGRAM,
                                           ignore_patterns=list(SOURCE_IGNORE)),
                    compute=Compute(instance_type=spec.instance_type,
                                    instance_count=spec.instance_count,
                                    enable_managed_spot_training=self.options.use_spot or None),
                    stopping_condition=StoppingCondition(
                        max_runtime_in_seconds=spec.max_runtime_seconds,
                        max_wait_time_in_seconds=max_wait),
                    output_data_config=OutputDataConfig(s3_output_path=self.output_path(),
                                                        compression_type="GZIP"),
                    checkpoint_config=checkpoint,
                    hyperparameters=dict(spec.hyperparameters),
                    tags=[Tag(key=k, value=v) for k, v in spec.tags.items()],
                ).with_metric_definitions(
                    [MetricDefinition(name=d["Name"], regex=d["Regex"])
                     for d in METRIC_DEFINITIONS])
                request = trainer._create_training_job_args(
                    input_data_config=[InputData(channel_name=TRAINING_CHANNEL,
                                                 data_source=spec.data_uri)],
                    boto3=True)
            except RoleValidationError as e:
                raise ConfigurationError(f"{doing}: {e}") from e
        request["TrainingJobName"] = spec.job_name
        return request

    # -- running ---------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any] | None:
        return unless_missing(f"describing training job {name}",
                              self.aws.sagemaker.describe_training_job, TrainingJobName=name)

    def run(self, spec: TrainingSpec, on_log: LogCallback | None = None) -> TrainingResult:
        """Creates the job named ``spec.job_name``, or re-attaches to it when an earlier
        attempt created it, then waits for it, streaming its logs."""
        emit = on_log or (lambda line: None)
        if spec.instance_count < 1:
            raise ValueError("instance_count must be >= 1")
        self.options.require_role()  # fail before any AWS call, not after the code upload
        if self.describe(spec.job_name) is not None:
            emit(f"training job {spec.job_name} already exists: re-attaching to it")
        else:
            self._create(spec, emit)
        described = self.wait(spec.job_name, emit, label_hosts=spec.instance_count > 1)
        return self.result(described)

    def _create(self, spec: TrainingSpec, emit: LogCallback) -> None:
        request = self.build_request(spec)
        doing = f"creating training job {spec.job_name}"
        with aws_errors(doing):
            try:
                self.aws.sagemaker.create_training_job(**request)
            except ClientError as e:
                if error_code(e) != "ResourceInUse":
                    raise translate(e, doing) from e
                # Another attempt created it between our describe and create.
                emit(f"training job {spec.job_name} was created meanwhile: re-attaching")
                return
        spot = " (managed spot)" if self.options.use_spot else ""
        image = request["AlgorithmSpecification"]["TrainingImage"]
        emit(f"created training job {spec.job_name}: {spec.instance_count} x "
             f"{spec.instance_type}{spot}, image {image}")

    def wait(self, name: str, emit: LogCallback, label_hosts: bool = False) -> dict[str, Any]:
        """Polls the job until it ends, forwarding its CloudWatch lines. Bounded: the job's
        own stopping condition plus ``training_wait_slack_seconds``. An error while waiting
        leaves the job running (a retry re-attaches to it); an interrupt or cancellation stops
        it, so nothing is billed for a run nobody waits for."""
        tail = TrainingLogTail(self.aws.logs, name, emit, label_hosts=label_hosts)
        bound = float("inf")  # the job's stopping condition, from the first answer, + slack
        status: tuple[str, str] | None = None

        def check() -> dict[str, Any] | None:
            nonlocal bound, status
            described = self.describe(name)
            if described is None:
                raise BackendError(f"training job {name} disappeared while waiting for it")
            if status is None:
                stopping = described.get("StoppingCondition", {})
                bound = ((stopping.get("MaxWaitTimeInSeconds")
                          or stopping.get("MaxRuntimeInSeconds") or 0)
                         + self.options.training_wait_slack_seconds)
            tail.poll()
            now = described["TrainingJobStatus"]
            now_status = (now, described.get("SecondaryStatus", now))
            if now_status != status:
                status = now_status
                emit(f"training job {name}: {now} ({status[1]}){_status_message(described)}")
            if now in TERMINAL:
                tail.poll(final=True)  # the lines written just before the job ended
                return described
            return None

        try:
            return poll(check, interval=self.options.poll_seconds, timeout=lambda: bound,
                        on_timeout=lambda elapsed: BackendError(
                            f"training job {name} is still {status[0]} after {elapsed:.0f}s; "
                            f"it keeps running, bounded by its stopping condition, and a retry "
                            f"of this task re-attaches to it"))
        except Exception:
            raise
        except BaseException:
            self._stop(name, emit)
            raise

    def stop(self, name: str) -> bool:
        """StopTrainingJob when the job is InProgress (SageMaker stops billing once it is
        Stopped); False when it had already ended or does not exist."""
        described = self.describe(name)
        if described is None or described["TrainingJobStatus"] != "InProgress":
            return False
        unless_missing(f"stopping training job {name}", self.aws.sagemaker.stop_training_job,
                       TrainingJobName=name)
        return True

    def _stop(self, name: str, emit: LogCallback) -> None:
        try:
            self.aws.sagemaker.stop_training_job(TrainingJobName=name)
            emit(f"interrupted: asked SageMaker to stop training job {name}")
        except Exception as e:  # best effort while interrupted; the job has a max runtime
            emit(f"interrupted: could not stop training job {name}: {e}")

    def result(self, described: dict[str, Any]) -> TrainingResult:
        name = described["TrainingJobName"]
        status = described["TrainingJobStatus"]
        model_uri = described.get("ModelArtifacts", {}).get("S3ModelArtifacts")
        if status != "Completed" or not model_uri:
            raise TrainingJobFailed(name, status, described.get("FailureReason")
                                    or "no failure reason given and no model was produced")
        return TrainingResult(
            job_name=name, status=status, model_uri=model_uri,
            metrics=self.metrics(described, model_uri),
            billable_seconds=billable_seconds(described),
            log_location=f"CloudWatch {LOG_GROUP}, streams {name}/* in {self.aws.region}",
        )

    def metrics(self, described: dict[str, Any], model_uri: str) -> dict[str, Any]:
        """The entry script's metrics.json from the job's output.tar.gz (beside model.tar.gz);
        else the last values SageMaker scraped with the metric definitions."""
        output_uri = model_uri.rsplit("/", 1)[0] + "/output.tar.gz"
        data = read_tar_member(self.aws.s3, output_uri, METRICS_FILE)
        if data is not None:
            try:
                return json.loads(data)
            except ValueError:
                pass
        return {m["MetricName"]: m["Value"] for m in described.get("FinalMetricDataList", [])}


@functools.cache
def staging_in_own_bucket() -> type:
    """ModelTrainer, staging the code always in the session's bucket under the key prefix we
    give it. The SDK otherwise asks IAM (SimulatePrincipalPolicy) whether the role may write
    anywhere in that bucket and, when the answer is no (the least-privilege role may write only
    under the pipeline's prefix), stages under the output path's prefix *and* ours:
    PREFIX/training-jobs/PREFIX/training-jobs/JOB/..."""
    from sagemaker.train import ModelTrainer

    class PipelineModelTrainer(ModelTrainer):
        def _resolve_staging_bucket(self) -> tuple[str, None]:
            return self.sagemaker_session.default_bucket(), None

    return PipelineModelTrainer


def billable_seconds(described: dict[str, Any]) -> int:
    """Billable instance-seconds, as the local backend counts them. SageMaker reports
    BillableTimeInSeconds per instance (spot savings included); without it, the training
    time, else the time between start and end."""
    per_instance = described.get("BillableTimeInSeconds") or described.get("TrainingTimeInSeconds")
    if per_instance is None:
        start, end = described.get("TrainingStartTime"), described.get("TrainingEndTime")
        per_instance = int((end - start).total_seconds()) if start and end else 0
    return int(per_instance) * int(described.get("ResourceConfig", {}).get("InstanceCount", 1))


def _status_message(described: dict[str, Any]) -> str:
    transitions = described.get("SecondaryStatusTransitions") or []
    message = transitions[-1].get("StatusMessage") if transitions else None
    return f": {message}" if message else ""
