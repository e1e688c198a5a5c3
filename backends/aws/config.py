"""The AWS backend's settings: what the flow config passes, completed from the environment.

Region, role and bucket come from the config, else from ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``SAGEMAKER_ROLE_ARN`` and ``SAGEMAKER_BUCKET``. Nothing falls back to
``sagemaker.get_execution_role()``: outside a SageMaker notebook it cannot know the role, and
guessing one from the caller's identity hides a configuration mistake until a job fails.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from backends.aws.errors import ROLE_HELP
from backends.base import ConfigurationError

ROLE_ENV = "SAGEMAKER_ROLE_ARN"
BUCKET_ENV = "SAGEMAKER_BUCKET"
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class AwsOptions:
    region: str | None = None  # None: the AWS profile's region
    role_arn: str | None = None  # required to train and to host, not to list or delete
    bucket: str | None = None  # None: the SageMaker default bucket sagemaker-{region}-{account}
    prefix: str = "cifar10-pipeline"
    # PyTorch DLC versions (sagemaker 3.27 knows training images up to 2.9 and inference images
    # up to 2.6). The entry script saves a state_dict, so weights load across these versions.
    framework_version: str = "2.8"
    inference_framework_version: str = "2.6"
    py_version: str = "py312"
    use_spot: bool = False  # managed spot training, checkpoints to S3
    max_wait_minutes: int | None = None  # spot only: runtime plus waiting for capacity
    poll_seconds: float = 10.0  # DescribeTrainingJob / DescribeEndpoint / log polling
    training_wait_slack_seconds: float = 3600.0  # beyond the job's own stopping condition
    deploy_timeout_seconds: float = 1800.0  # endpoints usually take 4-10 minutes
    # How long a delete waits for an endpoint still being created or updated (which SageMaker
    # refuses to delete): a container failing its health checks keeps it Creating for about
    # an hour before it turns Failed.
    delete_wait_seconds: float = 3900.0
    # How long a training job that the account's SageMaker quota refuses (ResourceLimitExceeded)
    # waits for other jobs to end before it fails: a sweep's points queue for the quota.
    quota_wait_seconds: float = 3600.0

    @classmethod
    def from_settings(cls, **settings: object) -> AwsOptions:
        """The options from keyword settings, completed from the environment. Checks formats
        only; nothing here calls AWS."""
        options = cls(**settings)  # type: ignore[arg-type]  # unknown keys: TypeError
        region = options.region or next((os.environ[k] for k in REGION_ENVS
                                         if os.environ.get(k)), None)
        role = options.role_arn or os.environ.get(ROLE_ENV) or None
        bucket = options.bucket or os.environ.get(BUCKET_ENV) or None
        prefix = (options.prefix or "").strip("/")
        if not prefix:
            raise ConfigurationError("aws.prefix must not be empty: it keeps the pipeline's "
                                     "objects apart in the bucket")
        if bucket is not None and (bucket.startswith("s3://") or not BUCKET_NAME.match(bucket)):
            raise ConfigurationError(f"{bucket!r} is not an S3 bucket name (give the name "
                                     f"alone, e.g. my-bucket, not s3://my-bucket/path)")
        if options.max_wait_minutes is not None and not options.use_spot:
            raise ConfigurationError("max_wait_minutes only applies to managed spot training "
                                     "(use_spot)")
        return dataclasses.replace(options, region=region, role_arn=role, bucket=bucket,
                                   prefix=prefix)

    def require_role(self) -> str:
        """The execution role ARN; a ``ConfigurationError`` when it is missing or malformed."""
        if not self.role_arn:
            raise ConfigurationError(ROLE_HELP)
        if not ROLE_ARN.match(self.role_arn):
            raise ConfigurationError(
                f"{self.role_arn!r} is not an IAM role ARN (expected "
                f"arn:aws:iam::<account>:role/<name>). {ROLE_HELP}")
        return self.role_arn

    def max_wait_seconds(self, max_runtime_seconds: int) -> int | None:
        """Spot: how long SageMaker may wait for capacity plus run (at least the runtime)."""
        if not self.use_spot:
            return None
        if self.max_wait_minutes is None:
            return 2 * max_runtime_seconds
        wait = self.max_wait_minutes * 60
        if wait < max_runtime_seconds:
            raise ConfigurationError(
                f"max_wait_minutes ({self.max_wait_minutes}) must be at least the training "
                f"max runtime ({max_runtime_seconds // 60} minutes)")
        return wait
