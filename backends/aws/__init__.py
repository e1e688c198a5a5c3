"""The AWS backend: Amazon SageMaker through the SageMaker Python SDK v3 and boto3.

- ``storage``: the data directory mirrored to ``s3://{bucket}/{prefix}/data/`` (``storage``);
- ``jobs``: SageMaker training jobs on the PyTorch training DLC, request built by the SDK's
  ``ModelTrainer``, created and followed with boto3 (``training``);
- ``endpoints``: model, endpoint config and endpoint on the PyTorch inference DLC, invoked
  through boto3's ``sagemaker-runtime`` client, the same client code as the local backend
  (``hosting``);
- ``registry``: SageMaker Model Registry (``registry``);
- ``serving``: the long-lived serving endpoint, updated blue/green with SageMaker's deployment
  guardrails, CloudWatch rollback alarms and optional autoscaling (``serving``).

Building the backend is cheap and offline; region, credentials, role and bucket are resolved
on first use, and a missing one raises ``ConfigurationError`` saying what to set.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3

from backends.aws.config import AwsOptions
from backends.aws.errors import aws_errors
from backends.aws.hosting import AwsEndpoints
from backends.aws.registry import AwsRegistry
from backends.aws.serving import AwsServing
from backends.aws.session import AwsSession, SessionFactory
from backends.aws.storage import S3Storage
from backends.aws.training import AwsTrainingJobs
from backends.base import Backend


class AwsBackend(Backend):
    """S3 storage, training jobs, endpoints and the model registry over one boto3 session."""

    name = "aws"

    def __init__(self, region: str | None = None, role_arn: str | None = None,
                 bucket: str | None = None, prefix: str | None = None, *,
                 boto_session: boto3.Session | None = None,
                 session_factory: SessionFactory | None = None, **options: Any) -> None:
        """``options``: the other ``AwsOptions`` fields (framework_version, py_version,
        use_spot, max_wait_minutes, poll_seconds, deploy_timeout_seconds...).
        ``session_factory``: where the boto3 session comes from instead of the default
        credential chain (a Prefect credentials block: ``flows/aws_credentials.py``); every
        client, the SageMaker SDK's included, is made from that one session."""
        self.options = AwsOptions.from_settings(
            region=region, role_arn=role_arn, bucket=bucket,
            prefix=prefix or AwsOptions.prefix, **options)
        # A factory gets the region the config names, not the environment's: a credentials
        # block's own region comes before the machine's AWS_REGION (the factory falls back to it).
        self.aws = AwsSession(region if session_factory else self.options.region, boto_session,
                              session_factory)
        self._sdk_session: Any = None
        self._bucket = self.options.bucket
        self._lock = threading.Lock()
        self.storage = S3Storage(self.aws, self.bucket, self.options.prefix)
        self.jobs = AwsTrainingJobs(self.aws, self.options, self.sdk_session, self.bucket)
        self.endpoints = AwsEndpoints(self.aws, self.options)
        self.registry = AwsRegistry(self.aws, self.options, self.bucket, self.endpoints.image)
        self.serving = AwsServing(self.aws, self.options, self.endpoints)

    def sdk_session(self) -> Any:
        """The SageMaker SDK session over our boto3 session, its default bucket ours."""
        with self._lock:
            if self._sdk_session is None:
                from sagemaker.core.helper.session_helper import Session

                with aws_errors("starting a SageMaker SDK session"):
                    self._sdk_session = Session(boto_session=self.aws.session,
                                                default_bucket=self.options.bucket)
            return self._sdk_session

    def bucket(self) -> str:
        """The configured bucket, else the SageMaker default bucket
        ``sagemaker-{region}-{account}`` (the SDK creates it when missing)."""
        if self._bucket is None:
            session = self.sdk_session()
            with aws_errors("finding the SageMaker default bucket (sts:GetCallerIdentity, "
                            "s3:CreateBucket when it is missing)"):
                self._bucket = session.default_bucket()
        return self._bucket
