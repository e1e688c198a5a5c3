"""Offline AWS for the AWS backend's tests: moto's server for S3, IAM, STS, CloudWatch Logs and
the SageMaker control plane, a recorder of every SageMaker call the backend makes, and a stand-in
for what moto cannot do (run a training job's container, serve an endpoint).

The fixtures that set these up are in ``aws_fixtures`` (a plugin the AWS test modules load with
``pytest_plugins``). Nothing reaches past loopback: ``no_network`` makes any other host name
fail at once instead of hanging.

moto gaps and the shims for them (each used only here):

- training jobs complete the moment they are created and write nothing: ``SageMakerStandIn``
  plays the container on CreateTrainingJob, putting a real model.tar.gz (from a local training
  run) where DescribeTrainingJob says the model is, the run's metrics.json in output.tar.gz
  beside it, and the run's log lines in CloudWatch;
- endpoints are InService at once and moto's InvokeEndpoint cannot carry binary bodies: on
  CreateEndpoint the stand-in starts the local model server on the model artifact and points
  ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` at it; on DeleteEndpoint it stops it;
- the SDK builds its STS client with an explicit regional endpoint URL, ignoring
  ``AWS_ENDPOINT_URL`` (``session_helper.sts_regional_endpoint``, used to name the default
  bucket): patched to moto's URL;
- moto does not implement iam:SimulatePrincipalPolicy, which ModelTrainer calls (and tolerates
  failing) while staging code: moto logs a 500, nothing else happens;
- moto accepts a second CreateTrainingJob of the same name, ignores MetricDefinitions and has
  no StopTrainingJob: those request shapes are checked with botocore's Stubber instead.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import sys
import tarfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from backends.aws.s3 import parse_s3_uri
from backends.aws.session import new_boto_session as unrecorded_session
from backends.base import EndpointSpec
from backends.local.endpoints import LocalEndpoints

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account
BUCKET = "cifar10-pipeline-test"
ROLE_NAME = "cifar10-sagemaker"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE_NAME}"
# The Deep Learning Container images the backend must pick for a CPU instance in REGION.
TRAINING_IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-training:2.8-cpu-py312"
INFERENCE_IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-inference:2.6-cpu-py312"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "", None}
RUNTIME_URL_ENV = "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"
JOB = "cifar10-0123456789ab"  # a training job name of the pipeline's shape


def described_job(status: str = "Completed", name: str = JOB, **extra: Any) -> dict[str, Any]:
    """SageMaker's DescribeTrainingJob answer for a job of the pipeline's shape; ``extra``
    adds or replaces fields."""
    return {
        "TrainingJobName": name,
        "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{name}",
        "TrainingJobStatus": status, "SecondaryStatus": status,
        "AlgorithmSpecification": {"TrainingImage": TRAINING_IMAGE, "TrainingInputMode": "File"},
        "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1,
                           "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 1800},
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://{BUCKET}/cifar10-pipeline/training-jobs/"
                                               f"{name}/output/model.tar.gz"},
        "CreationTime": dt.datetime.now(dt.UTC), **extra,
    }


def isolate_aws_environment(mp: pytest.MonkeyPatch) -> None:
    """No AWS_*/SAGEMAKER_* variable or ~/.aws file of the person running the tests leaks in."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "SAGEMAKER_")):
            mp.delenv(name)
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class MotoAccount:
    """Test-side clients (their calls are not recorded) on a freshly reset moto."""

    url: str
    # The backend's way of making sessions, as bound at import (tests replace it later to
    # record the backend's calls, not these): its sessions share botocore's parsed API models,
    # where a plain new session re-reads them (a quarter of a second for every test account).
    session: boto3.Session = field(default_factory=lambda: unrecorded_session(REGION))

    @property
    def sm(self) -> Any:
        return self.session.client("sagemaker")

    @property
    def s3(self) -> Any:
        return self.session.client("s3")

    @property
    def logs(self) -> Any:
        return self.session.client("logs")

    def sagemaker_resources(self) -> dict[str, list[str]]:
        """Every endpoint, endpoint config and model in the account."""
        sm = self.sm
        return {
            "endpoints": [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]],
            "endpoint_configs": [c["EndpointConfigName"]
                                 for c in sm.list_endpoint_configs()["EndpointConfigs"]],
            "models": [m["ModelName"] for m in sm.list_models()["Models"]],
        }

    def keys(self, bucket: str = BUCKET, prefix: str = "") -> list[str]:
        response = self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for o in response.get("Contents", []))


def fresh_account(moto_server: str) -> MotoAccount:
    """Resets moto, then creates the pipeline's bucket and execution role."""
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    account = MotoAccount(moto_server)
    account.s3.create_bucket(Bucket=BUCKET)
    account.session.client("iam").create_role(
        RoleName=ROLE_NAME, AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"},
                "Action": "sts:AssumeRole"}]}))
    return account


@dataclass
class Call:
    service: str  # sagemaker | sagemaker-runtime
    operation: str
    params: dict[str, Any]


class CallRecorder:
    """Every SageMaker (control plane and runtime) call made through the backend's boto3
    sessions, in order, with its API parameters (botocore's before-parameter-build event,
    which also fires for calls a Stubber answers)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def attach(self, session: boto3.Session) -> None:
        for service in ("sagemaker", "sagemaker-runtime"):
            session.events.register(f"before-parameter-build.{service}",
                                    self._record(service))

    def _record(self, service: str):
        def handler(model, params, **kwargs):
            with self._lock:
                self.calls.append(Call(service, model.name, dict(params)))
        return handler

    def names(self) -> list[str]:
        return [c.operation for c in self.calls]

    def params(self, operation: str) -> list[dict[str, Any]]:
        return [c.params for c in self.calls if c.operation == operation]


@dataclass(frozen=True)
class TrainedModel:
    """What a real (local) training run of the entry script produced."""

    model_tar: bytes
    metrics: dict[str, Any]
    log_lines: list[str]


class SageMakerStandIn:
    """Plays SageMaker's data plane where moto has none, hooked on the backend's calls
    (botocore after-call events): the training container and the endpoint's model server."""

    def __init__(self, account: MotoAccount, model: TrainedModel, root: Path) -> None:
        self.account = account
        self.model = model
        self.endpoints = LocalEndpoints(root / "endpoints", python=sys.executable)
        self.root = root
        self.trained: list[str] = []
        self.served: list[str] = []
        # A call's parameters until its response, per thread: a sweep's points call
        # CreateTrainingJob concurrently.
        self._params: dict[tuple[int, str], dict[str, Any]] = {}
        self._log_group_lock = threading.Lock()

    def attach(self, session: boto3.Session) -> None:
        for operation in ("CreateTrainingJob", "CreateEndpoint", "DeleteEndpoint"):
            session.events.register(f"before-parameter-build.sagemaker.{operation}",
                                    self._remember)
            session.events.register(f"after-call.sagemaker.{operation}", self._after)

    def _remember(self, model, params, **kwargs) -> None:
        self._params[threading.get_ident(), model.name] = dict(params)

    def _after(self, model, http_response, **kwargs) -> None:
        if http_response.status_code >= 300:  # the call failed: nothing happened
            return
        params = self._params.pop((threading.get_ident(), model.name))
        {"CreateTrainingJob": self.run_training_job, "CreateEndpoint": self.start_endpoint,
         "DeleteEndpoint": self.stop_endpoint}[model.name](params)

    def run_training_job(self, params: dict[str, Any]) -> None:
        """What the container would leave behind: model.tar.gz where DescribeTrainingJob
        says, output.tar.gz (metrics.json) beside it, the log in CloudWatch."""
        name = params["TrainingJobName"]
        described = self.account.sm.describe_training_job(TrainingJobName=name)
        bucket, key = parse_s3_uri(described["ModelArtifacts"]["S3ModelArtifacts"])
        s3 = self.account.s3
        s3.put_object(Bucket=bucket, Key=key, Body=self.model.model_tar)
        s3.put_object(Bucket=bucket, Key=key.rsplit("/", 1)[0] + "/output.tar.gz",
                      Body=tar_gz({"metrics.json": json.dumps(self.model.metrics).encode()}))
        logs = self.account.logs
        group, stream = "/aws/sagemaker/TrainingJobs", f"{name}/algo-1-1700000000"
        with self._log_group_lock:  # concurrent jobs: the group is created once
            if not logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"]:
                logs.create_log_group(logGroupName=group)
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        now = int(time.time() * 1000)  # CloudWatch drops events older than 14 days
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
            {"timestamp": now + i, "message": line} for i, line in enumerate(self.model.log_lines)])
        self.trained.append(name)

    def start_endpoint(self, params: dict[str, Any]) -> None:
        """The local model server on the artifact the model points at, with the model's
        container environment, reached through AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME."""
        name = params["EndpointName"]
        sm = self.account.sm
        config = sm.describe_endpoint_config(EndpointConfigName=params["EndpointConfigName"])
        model = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
        container = model["PrimaryContainer"]
        bucket, key = parse_s3_uri(container["ModelDataUrl"])
        artifact = self.root / "artifacts" / name / "model.tar.gz"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        self.account.s3.download_file(bucket, key, str(artifact))
        info = self.endpoints.deploy(EndpointSpec(name=name, model_uri=artifact.as_uri(),
                                                  environment=container["Environment"]))
        os.environ[RUNTIME_URL_ENV] = info.url
        self.served.append(name)

    def stop_endpoint(self, params: dict[str, Any]) -> None:
        self.endpoints.delete(params["EndpointName"])

    def running(self) -> list[str]:
        return [e.name for e in self.endpoints.all()]

    def close(self) -> None:
        for endpoint in self.endpoints.all():
            self.endpoints.delete(endpoint.name)
        os.environ.pop(RUNTIME_URL_ENV, None)


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
