"""The AWS backend: Amazon SageMaker through the SageMaker Python SDK v3 and boto3.

- upload: the data directory mirrored to ``s3://{bucket}/{prefix}/data/`` (``s3``);
- train: a SageMaker training job on the PyTorch training DLC, request built by the SDK's
  ``ModelTrainer``, created and followed with boto3 (``training``);
- host: model, endpoint config and endpoint on the PyTorch inference DLC (``hosting``);
- invoke: boto3's ``sagemaker-runtime`` client, the same client code as the local backend.

Building the backend is cheap and offline; region, credentials, role and bucket are resolved
on first use, and a missing one raises ``ConfigurationError`` saying what to set.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import boto3

from backends.aws.config import AwsOptions
from backends.aws.errors import aws_errors
from backends.aws.hosting import AwsEndpoints
from backends.aws.registry import AwsRegistry
from backends.aws.s3 import mirror_directory, object_exists, s3_uri, why_unreadable
from backends.aws.session import AwsSession, SessionFactory
from backends.aws.training import AwsTrainingJobs
from backends.base import (
    Backend,
    Decide,
    EndpointInfo,
    EndpointSpec,
    Invocation,
    LogCallback,
    ModelVersion,
    ModelVersionSpec,
    Registration,
    TrainingResult,
    TrainingSpec,
)


class AwsBackend(Backend):
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
        self.training = AwsTrainingJobs(self.aws, self.options, self.sdk_session, self.bucket)
        self.endpoints = AwsEndpoints(self.aws, self.options)
        self.registry = AwsRegistry(self.aws, self.options, self.bucket)

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

    def upload_data(self, local_dir: Path, on_log: LogCallback | None = None) -> str:
        report = mirror_directory(self.aws.s3, Path(local_dir), self.bucket(),
                                  f"{self.options.prefix}/data")
        if on_log:
            on_log(report.summary())
        return report.uri

    def train(self, spec: TrainingSpec, on_log: LogCallback | None = None) -> TrainingResult:
        return self.training.run(spec, on_log)

    def stop_training(self, job_name: str) -> bool:
        return self.training.stop(job_name)

    def deploy(self, spec: EndpointSpec, on_log: LogCallback | None = None) -> EndpointInfo:
        return self.endpoints.deploy(spec, on_log)

    def describe_endpoint(self, name: str) -> EndpointInfo | None:
        return self.endpoints.describe(name)

    def list_endpoints(self) -> list[EndpointInfo]:
        return self.endpoints.list()

    def list_orphans(self) -> list[EndpointInfo]:
        return self.endpoints.orphans()

    def delete_endpoint(self, name: str) -> bool:
        return self.endpoints.delete(name)

    def register_model(self, spec: ModelVersionSpec, decide: Decide) -> Registration:
        return self.registry.register(spec, decide, self.endpoints.image(spec.instance_type))

    def list_model_versions(self, group: str) -> list[ModelVersion]:
        return self.registry.versions(group)

    def set_model_status(self, group: str, version: int, status: str,
                         reason: str) -> ModelVersion:
        return self.registry.set_status(group, version, status, reason)

    def artifact_exists(self, uri: str) -> bool:
        return uri.startswith("s3://") and object_exists(self.aws.s3, uri)

    def why_not_reusable(self, uri: str) -> str | None:
        """Only artifacts under this backend's bucket and prefix are reused. The cache key
        names neither (keys stay stable across a bucket move), while the registry group is
        shared by the whole account: a version may point at another bucket or prefix (an
        earlier configuration, a colleague's run) whose objects the caller's policy does not
        cover. Those are not even asked about; ours are, and a 403 is "not reusable" too."""
        root = s3_uri(self.bucket(), f"{self.options.prefix}/")
        if not uri.startswith(root):
            return f"it is outside this backend's bucket and prefix ({root})"
        return why_unreadable(self.aws.s3, uri)

    def training_result(self, job_name: str) -> TrainingResult | None:
        described = self.training.describe(job_name)
        if described is None or described["TrainingJobStatus"] != "Completed":
            return None
        return self.training.result(described)

    def runtime_client(self, endpoint_name: str) -> Any:
        """boto3's ``sagemaker-runtime`` client for this region (``AWS_ENDPOINT_URL_SAGEMAKER_
        RUNTIME`` redirects it, as for any boto3 client). No DescribeEndpoint first: a missing
        endpoint is InvokeEndpoint's own clear ValidationError."""
        return self.aws.runtime

    def invoke(self, endpoint_name: str, body: bytes, content_type: str,
               accept: str = "application/json") -> Invocation:
        with aws_errors(f"invoking endpoint {endpoint_name}"):
            return super().invoke(endpoint_name, body, content_type, accept)
