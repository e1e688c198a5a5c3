"""The backend interface: what the pipeline's tasks ask of SageMaker, or of its local emulation.

A backend is a thin client: it uploads data, runs training jobs, hosts endpoints and deletes
them, and reports what happened. It never imports Prefect; orchestration, retries and reporting
belong to ``tasks/``.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every resource the pipeline creates carries this tag; the reaper only touches tagged ones.
MANAGED_BY_KEY = "managed-by"
MANAGED_BY_VALUE = "cifar10-pipeline"
OWNER_KEY = "owner"  # the flow run (or person) that created the resource
CREATED_KEY = "created-at"  # ISO-8601 UTC, so the reaper needs no extra API call
KEPT_KEY = "kept"  # "true": the user asked to keep the endpoint; the reaper leaves it alone
# Every name the pipeline gives a training job or endpoint starts with this, so that listings
# can be narrowed (ListEndpoints' NameContains) before the tags are read.
NAME_PREFIX = "cifar10-"

TRAINING_CHANNEL = "training"
# The one production variant of every endpoint (SageMaker's usual name for it).
VARIANT = "AllTraffic"

LogCallback = Callable[[str], None]


class BackendError(RuntimeError):
    """Something the backend was asked to do failed; the message says what and why."""


class ConfigurationError(BackendError):
    """The backend is missing settings it needs (credentials, region, role, bucket...)."""


class TrainingJobFailed(BackendError):
    def __init__(self, job_name: str, status: str, reason: str) -> None:
        super().__init__(f"training job {job_name} {status.lower()}: {reason}")
        self.job_name, self.status, self.reason = job_name, status, reason


class EndpointFailed(BackendError):
    def __init__(self, endpoint_name: str, reason: str) -> None:
        super().__init__(f"endpoint {endpoint_name} failed: {reason}")
        self.endpoint_name, self.reason = endpoint_name, reason


class EndpointExists(BackendError):
    def __init__(self, endpoint_name: str) -> None:
        super().__init__(f"endpoint {endpoint_name} already exists; delete it or pick another name")
        self.endpoint_name = endpoint_name


def managed_tags(owner: str, created: dt.datetime | None = None,
                 kept: bool = False) -> dict[str, str]:
    """The tags that mark a resource as this pipeline's (and, ``kept``, as one the user chose
    to keep: never reaped)."""
    created = created or dt.datetime.now(dt.UTC)
    return {
        MANAGED_BY_KEY: MANAGED_BY_VALUE,
        OWNER_KEY: owner,
        CREATED_KEY: created.astimezone(dt.UTC).isoformat(timespec="seconds"),
        **({KEPT_KEY: "true"} if kept else {}),
    }


@dataclass(frozen=True)
class UploadReport:
    """What mirroring a data directory to the store did."""

    uri: str  # the training channel
    uploaded: int
    skipped: int  # unchanged since the last upload
    removed: int  # no longer in the directory
    bytes_uploaded: int


@dataclass(frozen=True)
class TrainingSpec:
    job_name: str
    data_uri: str  # the "training" channel
    hyperparameters: dict[str, str | int | float]
    instance_type: str = "local"
    instance_count: int = 1
    max_runtime_seconds: int = 3600
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingResult:
    job_name: str
    status: str  # Completed
    model_uri: str  # model.tar.gz with the weights and code/
    metrics: dict[str, Any]  # the entry script's metrics.json: history, test accuracy...
    billable_seconds: int
    log_location: str  # a file path (local) or a CloudWatch log stream (aws)


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    model_uri: str
    instance_type: str = "local"
    instance_count: int = 1
    tags: dict[str, str] = field(default_factory=dict)
    # The serving container's environment (CreateModel's PrimaryContainer.Environment), e.g.
    # SAGEMAKER_PROGRAM to serve handlers from another module than code/inference.py.
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EndpointInfo:
    name: str
    status: str  # Creating | InService | Failed | Deleting
    created: dt.datetime
    tags: dict[str, str]
    instance_type: str = "local"
    url: str | None = None  # where a local endpoint listens; None on AWS
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def managed(self) -> bool:
        return self.tags.get(MANAGED_BY_KEY) == MANAGED_BY_VALUE

    @property
    def kept(self) -> bool:
        """The user chose to keep it (``--keep-endpoint``): only an explicit delete removes it."""
        return self.tags.get(KEPT_KEY) == "true"


@dataclass(frozen=True)
class Invocation:
    body: bytes
    content_type: str


class Backend(abc.ABC):
    """One SageMaker-shaped engine: ``LocalBackend`` (default) or ``AwsBackend``."""

    name: str

    @abc.abstractmethod
    def upload_data(self, local_dir: Path, on_log: LogCallback | None = None) -> str:
        """Uploads a data directory; returns the channel URI. Unchanged files are skipped."""

    @abc.abstractmethod
    def train(self, spec: TrainingSpec, on_log: LogCallback | None = None) -> TrainingResult:
        """Runs (or re-attaches to) the training job named ``spec.job_name`` and waits for it,
        streaming its log lines to ``on_log``. Raises ``TrainingJobFailed`` unless Completed."""

    @abc.abstractmethod
    def deploy(self, spec: EndpointSpec, on_log: LogCallback | None = None) -> EndpointInfo:
        """Creates model, endpoint config and endpoint; returns once it is InService."""

    @abc.abstractmethod
    def describe_endpoint(self, name: str) -> EndpointInfo | None:
        """The endpoint, or None when there is none of that name."""

    @abc.abstractmethod
    def list_endpoints(self) -> list[EndpointInfo]:
        """Endpoints created by this pipeline (tagged managed-by=cifar10-pipeline)."""

    @abc.abstractmethod
    def delete_endpoint(self, name: str) -> bool:
        """Deletes the endpoint with its config and model. Idempotent: True when something
        was deleted, False when there was nothing to delete."""

    def list_orphans(self) -> list[EndpointInfo]:
        """Pipeline-owned parts of endpoints that no longer exist: an endpoint config or a model
        left by a teardown or a deploy that stopped half-way (``status`` "Orphaned"). They are
        named like their endpoint, so ``delete_endpoint(name)`` removes them. None on backends
        whose endpoints have no separate parts (local: the record holds them)."""
        return []

    @abc.abstractmethod
    def runtime_client(self, endpoint_name: str) -> Any:
        """A boto3 ``sagemaker-runtime`` client that reaches ``endpoint_name``."""

    def invoke(self, endpoint_name: str, body: bytes, content_type: str,
               accept: str = "application/json") -> Invocation:
        """InvokeEndpoint through boto3, the same client code on every backend."""
        response = self.runtime_client(endpoint_name).invoke_endpoint(
            EndpointName=endpoint_name, Body=body, ContentType=content_type, Accept=accept
        )
        return Invocation(body=response["Body"].read(),
                          content_type=response.get("ContentType", ""))
