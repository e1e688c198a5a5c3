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
``train()`` itself calls (and the one SageMaker Pipelines use). It is private API, so it is
called through ``backends.aws.sdk_adapter`` (with the SDK's other private API this backend
uses), and ``tests/test_aws_backend.py`` checks the request it produces, field by field, with
botocore's Stubber; the SDK is pinned below 4.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import monotonic, sleep
from typing import Any

from botocore.exceptions import ClientError

from backends.aws.config import AwsOptions
from backends.aws.errors import aws_errors, error_code, translate, unless_missing
from backends.aws.faults import CREDENTIALS, QuotaRefusal, fault_kind, quota_refusal
from backends.aws.images import pytorch_image
from backends.aws.logs import LOG_GROUP, TrainingLogTail
from backends.aws.s3 import read_tar_member, s3_uri
from backends.aws.sdk_adapter import staging_in_own_bucket, training_job_request
from backends.aws.session import AwsSession
from backends.base import (
    TRAINING_CHANNEL,
    BackendError,
    ConfigurationError,
    LogCallback,
    QuotaExceeded,
    TrainingJobFailed,
    TrainingResult,
    TrainingSpec,
)
from backends.job_names import existing_jobs, job_to_run
from backends.polling import poll
from backends.settings import SOURCE_DIR
from model_src.contract import (
    METRIC_NAMES,
    METRICS_FILE,
    SAGEMAKER_CHECKPOINT_DIR,
    SOURCE_IGNORE,
    TRAINING_PROGRAM,
    metric_regex,
)

TERMINAL = {"Completed", "Failed", "Stopped"}
# What the entry script logs as "name=value;" lines (model_src/contract.py's metric_line).
METRIC_DEFINITIONS = [{"Name": name, "Regex": metric_regex(name)} for name in METRIC_NAMES]

# Following a job through AWS faults: the retry lives here, in the backend, and not in the fit
# task's retries (tasks/retries.py). Only here is a transient fault told apart from the job's
# own failure (the task sees translated errors); the log tail keeps its place and the wait its
# bound across a re-attach; and the last attempt knows it is the last, so it stops the job
# rather than leave it billing with nobody coming back for it, which a task retry could not
# know. The CLI and any other caller of the backend get the same.
REATTACH_ATTEMPTS = 5  # faults in a row; pauses of 2, 4 ... 32 polls: 10 minutes at 10 s
# A quota refusal waits for other jobs to end: first pause 3 polls, doubling up to 30 polls.
QUOTA_FIRST_PAUSE_POLLS, QUOTA_MAX_PAUSE_POLLS = 3, 30

VALIDATE_ROLE_ENV = "SAGEMAKER_VALIDATE_ROLE"
# The SDK reads VALIDATE_ROLE_ENV from the process environment whenever a ModelTrainer is
# built, and validates the role unless it says false. A sweep builds its points' trainers in
# threads at once: the variable is set and restored under one lock, so that no thread
# restores it while another one is still building.
_SDK_ENVIRONMENT = threading.Lock()


@contextmanager
def sdk_role_validation_off() -> Iterator[None]:
    """Builds a ModelTrainer without the SDK's role validation. That simulation asks IAM
    about actions the pipeline never needs (``ec2:*NetworkInterface*``, ``ec2:Describe*``,
    ``cloudwatch:PutMetricData``, ``ecr:GetAuthorizationToken`` on ``*``: what a VPC job
    needs), so it rejects the documented least-privilege role, and it needs
    ``iam:SimulatePrincipalPolicy`` and ``iam:GetRole`` on the caller. A role that is really
    missing something fails CreateTrainingJob with AWS's own reason, which ``translate``
    turns into what to grant."""
    with _SDK_ENVIRONMENT:
        before = os.environ.get(VALIDATE_ROLE_ENV)
        os.environ[VALIDATE_ROLE_ENV] = "false"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(VALIDATE_ROLE_ENV, None)
            else:
                os.environ[VALIDATE_ROLE_ENV] = before


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

    def build_request(self, spec: TrainingSpec, chain: str | None = None) -> dict[str, Any]:
        """The CreateTrainingJob request for ``spec``, built by ModelTrainer (which uploads
        the source code and its drivers), named ``spec.job_name``. ``chain``: the first name
        of the job's chain (``backends.job_names``), whose spot checkpoints it resumes from."""
        from sagemaker.core.helper.iam_role_resolver import RoleValidationError
        from sagemaker.core.shapes import MetricDefinition, Tag
        from sagemaker.core.training.configs import (
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
        doing = f"preparing training job {spec.job_name} (ModelTrainer uploads model_src/)"
        with aws_errors(doing):
            try:
                trainer = self._trainer(
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
                    checkpoint_config=self._checkpoints(chain or spec.job_name),
                    hyperparameters=dict(spec.hyperparameters),
                    tags=[Tag(key=k, value=v) for k, v in spec.tags.items()],
                ).with_metric_definitions(
                    [MetricDefinition(name=d["Name"], regex=d["Regex"])
                     for d in METRIC_DEFINITIONS])
                request = training_job_request(
                    trainer, [InputData(channel_name=TRAINING_CHANNEL, data_source=spec.data_uri)])
            except RoleValidationError as e:
                raise ConfigurationError(f"{doing}: {e}") from e
        request["TrainingJobName"] = spec.job_name
        return request

    @staticmethod
    def _trainer(**settings: Any) -> Any:
        """A ModelTrainer that stages code in our bucket, built without the SDK's role
        validation (``sdk_role_validation_off``)."""
        with sdk_role_validation_off():
            return staging_in_own_bucket()(**settings)

    def _checkpoints(self, chain: str) -> Any:
        """Spot only: spot capacity can be reclaimed; SageMaker restarts the job and syncs
        /opt/ml/checkpoints from S3, so a script that saves there resumes. Kept per chain
        (``backends.job_names``): a retry of a failed or stopped job resumes from its
        checkpoints too, as the same flow run trains the same recipe."""
        from sagemaker.core.training.configs import CheckpointConfig

        if not self.options.use_spot:
            return None
        root = f"{self.options.prefix}/training-jobs/{chain}/checkpoints"
        return CheckpointConfig(s3_uri=s3_uri(self.bucket(), root),
                                local_path=SAGEMAKER_CHECKPOINT_DIR)

    # -- running ---------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any] | None:
        return unless_missing(f"describing training job {name}",
                              self.aws.sagemaker.describe_training_job, TrainingJobName=name)

    def completed(self, name: str) -> TrainingResult | None:
        described = self.describe(name)
        if described is None or described["TrainingJobStatus"] != "Completed":
            return None
        return self.result(described)

    def status(self, name: str) -> str | None:
        described = self.describe(name)
        return described["TrainingJobStatus"] if described is not None else None

    def run(self, spec: TrainingSpec, on_log: LogCallback | None = None) -> TrainingResult:
        """Creates the job named ``spec.job_name``, or re-attaches to it when an earlier
        attempt created it, then waits for it, streaming its logs. When that job Failed or
        was Stopped, trains under the next name of its chain (``backends.job_names``)."""
        emit = on_log or (lambda line: None)
        if spec.instance_count < 1:
            raise ValueError("instance_count must be >= 1")
        self.options.require_role()  # fail before any AWS call, not after the code upload
        name, status = job_to_run(spec.job_name, self.status)
        quota_wait = 0.0
        if status is not None:
            emit(f"training job {name} already exists: re-attaching to it")
        else:
            if name != spec.job_name:
                emit(f"training job {spec.job_name}: earlier attempts failed or were stopped, "
                     f"and SageMaker never reuses a job name: training again as {name}")
            quota_wait = self._create(dataclasses.replace(spec, job_name=name), emit,
                                      chain=spec.job_name)
        described = self.wait(name, emit, label_hosts=spec.instance_count > 1)
        return dataclasses.replace(self.result(described),
                                   quota_wait_seconds=round(quota_wait, 1))

    def _create(self, spec: TrainingSpec, emit: LogCallback, chain: str) -> float:
        """Creates the job. While the account's quota refuses it (ResourceLimitExceeded) and
        other jobs ending could make room, asks again after growing pauses, up to
        ``quota_wait_seconds``: in a sweep, a point waits for a slot while the others train.
        Returns the seconds waited for the quota."""
        request = self.build_request(spec, chain)
        started, waited = monotonic(), 0.0
        pause = self.options.poll_seconds * QUOTA_FIRST_PAUSE_POLLS
        while (refusal := self._try_create(spec, request, emit)) is not None:
            waited = monotonic() - started
            if not refusal.can_clear or waited + pause > self.options.quota_wait_seconds:
                raise self._over_quota(spec.job_name, refusal, waited)
            emit(f"training job {spec.job_name}: the account's SageMaker quota is in use "
                 f"({refusal.message}); asking again in {pause:.0f}s, waited {waited:.0f}s "
                 f"of {self.options.quota_wait_seconds:.0f}s")
            sleep(pause)
            pause = min(2 * pause, self.options.poll_seconds * QUOTA_MAX_PAUSE_POLLS)
        return monotonic() - started if waited else 0.0

    def _try_create(self, spec: TrainingSpec, request: dict[str, Any],
                    emit: LogCallback) -> QuotaRefusal | None:
        """CreateTrainingJob; the quota's refusal, None when the job exists now."""
        doing = f"creating training job {spec.job_name}"
        with aws_errors(doing):
            try:
                self.aws.sagemaker.create_training_job(**request)
            except ClientError as e:
                if (refusal := quota_refusal(e)) is not None:
                    return refusal
                if error_code(e) != "ResourceInUse":
                    raise translate(e, doing) from e
                # Another attempt created it between our describe and create.
                emit(f"training job {spec.job_name} was created meanwhile: re-attaching")
                return None
        spot = " (managed spot)" if self.options.use_spot else ""
        image = request["AlgorithmSpecification"]["TrainingImage"]
        emit(f"created training job {spec.job_name}: {spec.instance_count} x "
             f"{spec.instance_type}{spot}, image {image}")
        return None

    def _over_quota(self, name: str, refusal: QuotaRefusal, waited: float) -> QuotaExceeded:
        why = (f"waited {waited:.0f}s for other jobs to make room (quota_wait_seconds "
               f"{self.options.quota_wait_seconds:.0f})" if refusal.can_clear
               else "the job alone needs more than the quota allows, so waiting cannot help")
        return QuotaExceeded(f"creating training job {name}: AWS refused it: "
                             f"{refusal.message} — {why}; {refusal.how_to_raise()}", waited)

    def wait(self, name: str, emit: LogCallback, label_hosts: bool = False) -> dict[str, Any]:
        """Polls the job until it ends, forwarding its CloudWatch lines. Bounded: the job's
        own stopping condition plus ``training_wait_slack_seconds``.

        A transient fault (throttling that outlived botocore's retries, a lost connection,
        expired credentials, for which a fresh session is made) re-attaches: the job is
        asked about again after growing pauses, up to REATTACH_ATTEMPTS faults in a row.
        Giving up for any reason (those attempts spent, another error, the bound passed, an
        interrupt or a cancellation) stops the job: none bills with nobody waiting for it."""
        watch = JobWatch(self, name, emit, label_hosts)
        try:
            return poll(watch.check, interval=self.options.poll_seconds,
                        timeout=lambda: watch.bound, on_timeout=watch.timed_out)
        except Exception as e:
            outcome = self.stop_abandoned(name)
            emit(f"gave up waiting for training job {name}: {outcome}")
            kind = ConfigurationError if isinstance(e, ConfigurationError) else BackendError
            raise kind(f"{e}; gave up waiting for training job {name}: {outcome}") from e
        except BaseException:
            emit(f"interrupted: {self.stop_abandoned(name)}")
            raise

    def stop(self, name: str) -> bool:
        """StopTrainingJob for the job of ``name``'s chain that is InProgress (SageMaker stops
        billing once it is Stopped); False when none is running."""
        for job, status in existing_jobs(name, self.status):
            if status == "InProgress":
                unless_missing(f"stopping training job {job}",
                               self.aws.sagemaker.stop_training_job, TrainingJobName=job)
                return True
        return False

    def stop_abandoned(self, name: str) -> str:
        """Stops a job that nobody will wait for any more (once more with a fresh session
        when the credentials expired); says what became of it."""
        failure: BaseException | None = None
        for attempt in range(2):
            try:
                self.aws.sagemaker.stop_training_job(TrainingJobName=name)
                return "the job was stopped so it stops billing"
            except ClientError as e:
                if error_code(e) == "ValidationException":  # it has ended, or never was
                    return "the job is not running, so nothing bills for it"
                failure = e
            except Exception as e:  # lost connection, no session: said below
                failure = e
            if attempt or fault_kind(failure) != CREDENTIALS or not self.aws.renew():
                break
        return (f"stopping it failed too ({type(failure).__name__}: {failure}), so it may "
                f"still be running and billing until its stopping condition ends it: stop "
                f"it with `aws sagemaker stop-training-job --training-job-name {name}`")

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


class JobWatch:
    """One wait for a training job: the bound its first answer sets, the status last said,
    and the transient faults in a row (``AwsTrainingJobs.wait``)."""

    def __init__(self, jobs: AwsTrainingJobs, name: str, emit: LogCallback,
                 label_hosts: bool) -> None:
        self.jobs, self.name, self.emit = jobs, name, emit
        self.tail = TrainingLogTail(jobs.aws.logs, name, emit, label_hosts=label_hosts)
        self.bound = float("inf")  # the job's stopping condition, from the first answer, + slack
        self.status: tuple[str, str] | None = None
        self.faults = 0

    def check(self) -> dict[str, Any] | None:
        """The job's description once it has ended; None meanwhile."""
        described = self.describe()
        if described is None:
            return None
        if self.status is None:
            stopping = described.get("StoppingCondition", {})
            self.bound = ((stopping.get("MaxWaitTimeInSeconds")
                           or stopping.get("MaxRuntimeInSeconds") or 0)
                          + self.jobs.options.training_wait_slack_seconds)
        self.tail.logs = self.jobs.aws.logs  # renewed, maybe by another point's wait
        self.tail.poll()
        now = described["TrainingJobStatus"]
        now_status = (now, described.get("SecondaryStatus", now))
        if now_status != self.status:
            self.status = now_status
            self.emit(f"training job {self.name}: {now} ({now_status[1]})"
                      f"{_status_message(described)}")
        if now in TERMINAL:
            self.tail.poll(final=True)  # the lines written just before the job ended
            return described
        return None

    def describe(self) -> dict[str, Any] | None:
        """DescribeTrainingJob; None after a transient fault (re-attach: ask again later)."""
        try:
            described = self.jobs.describe(self.name)
        except Exception as e:
            kind = fault_kind(e)
            if kind is None:
                raise
            if self.faults >= REATTACH_ATTEMPTS:
                raise BackendError(f"training job {self.name}: {self.faults + 1} AWS faults "
                                   f"in a row while following it, the last: {e}") from e
            self.faults += 1
            self.reattach(e, renew=kind == CREDENTIALS)
            return None
        self.faults = 0
        if described is None:
            raise BackendError(f"training job {self.name} disappeared while waiting for it")
        return described

    def reattach(self, error: BaseException, renew: bool) -> None:
        pause = self.jobs.options.poll_seconds * 2 ** self.faults
        renewed = renew and self.jobs.aws.renew()
        self.emit(f"lost sight of training job {self.name} ({type(error).__name__}: {error}); "
                  f"re-attaching in {pause:.0f}s{' with a fresh AWS session' if renewed else ''}"
                  f" (attempt {self.faults} of {REATTACH_ATTEMPTS})")
        sleep(pause)

    def timed_out(self, elapsed: float) -> BackendError:
        status = self.status[0] if self.status else "unknown"
        return BackendError(
            f"training job {self.name} is still {status} after {elapsed:.0f}s, past its "
            f"stopping condition plus {self.jobs.options.training_wait_slack_seconds:.0f}s")


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
