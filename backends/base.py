"""The backend interface: what the pipeline's tasks ask of SageMaker, or of its local emulation.

A backend is a thin client: it uploads data, runs training jobs, hosts endpoints and deletes
them, and reports what happened. It is a small object with four named collaborators, each a
Protocol here and implemented once per family: ``storage`` (``Storage``), ``jobs``
(``TrainingJobs``), ``endpoints`` (``Endpoints``) and ``registry`` (``Registry``). It never
imports Prefect; orchestration, retries and reporting belong to ``tasks/``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from model_src.contract import NAME_PATTERN

# Every resource the pipeline creates carries this tag; the reaper only touches tagged ones.
MANAGED_BY_KEY = "managed-by"
MANAGED_BY_VALUE = "cifar10-pipeline"
OWNER_KEY = "owner"  # the flow run (or person) that created the resource
CREATED_KEY = "created-at"  # ISO-8601 UTC, so the reaper needs no extra API call
KEPT_KEY = "kept"  # "true": the user asked to keep the endpoint; the reaper leaves it alone
SERVING_KEY = "serving"  # "true": the long-lived serving endpoint (and its fleets); never reaped
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


class QuotaExceeded(BackendError):
    """The AWS account's quota refused a resource, for longer than the backend waits for room
    (or for good: the request alone is over it). The message says which quota and how to
    raise it."""

    def __init__(self, message: str, waited_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.waited_seconds = waited_seconds


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

    def summary(self) -> str:
        return (f"uploaded {self.uploaded} files ({self.bytes_uploaded / 1e6:.1f} MB), skipped "
                f"{self.skipped} unchanged, removed {self.removed} to {self.uri}")


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
    cached_from: str | None = None  # the earlier job whose model this is (no training ran)
    quota_wait_seconds: float = 0.0  # waited for the account's quota to let the job start


# A model version's approval status, SageMaker Model Registry's words.
APPROVED, REJECTED, PENDING = "Approved", "Rejected", "PendingManualApproval"
# A model package group's name, as SageMaker allows it (the local registry checks it too).
MODEL_GROUP_PATTERN = NAME_PATTERN


@dataclass(frozen=True)
class ModelVersionSpec:
    """A trained model to register: where it is, what made it, how it did. The decision
    (status and reason) is made at registration, against the champion of that moment."""

    group: str
    model_uri: str
    training_job: str
    cache_key: str  # what made it: data, code, hyperparameters, instances, backend
    metrics: dict[str, float]  # test_accuracy, test_loss, smoke_accuracy
    lineage: dict[str, str]  # data_url, data_md5, code_digest, hyperparameters, flow_run_id...
    instance_type: str = "local"  # the hosting instance the smoke test used
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersion:
    group: str
    version: int
    status: str
    reason: str
    created: dt.datetime
    model_uri: str
    training_job: str
    cache_key: str
    metrics: dict[str, float]
    lineage: dict[str, str]
    arn: str | None = None  # aws
    # Where it stands on the serving endpoint: "serving on NAME", "replaced by vN",
    # "rolled back: 5xx rate 0.31 > 0.05 during canary"; None: never promoted.
    deployment: str | None = None

    @property
    def approved(self) -> bool:
        return self.status == APPROVED


def champion(versions: list[ModelVersion]) -> ModelVersion | None:
    """The approved version with the highest number: the one the team trusts now."""
    approved = [v for v in versions if v.approved]
    return max(approved, key=lambda v: v.version) if approved else None


# The promotion gate: given the champion (None: there is none yet), the new version's
# (status, reason): APPROVED, REJECTED or PENDING, and why.
Decide = Callable[[ModelVersion | None], tuple[str, str]]


@dataclass(frozen=True)
class Registration:
    """A registered version and the champion its decision was measured against."""

    version: ModelVersion
    champion_before: ModelVersion | None


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
    # Creating | InService | Failed | Deleting; Unknown: its local record is unreadable
    status: str
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


# -- the collaborators: one Protocol each, implemented once per family ------------------------


class Storage(Protocol):
    """Where training data and model artifacts live: S3 (aws) or a directory (local)."""

    def upload(self, local_dir: Path, on_log: LogCallback | None = None) -> str:
        """Mirrors a data directory to the store; returns the channel URI. Unchanged files are
        skipped."""
        ...

    def exists(self, uri: str) -> bool:
        """Whether the object at ``uri`` (s3:// or file://) exists."""
        ...

    def why_not_reusable(self, uri: str) -> str | None:
        """Why the model artifact at ``uri`` cannot be reused (None: it can): outside the store
        this backend writes to, missing, or unreadable. The registry may be shared more widely
        than the store (SageMaker's is per account), so a version can point at an artifact
        that is someone else's."""
        ...


class TrainingJobs(Protocol):
    """SageMaker training jobs, or local processes that honour the same contract."""

    def run(self, spec: TrainingSpec, on_log: LogCallback | None = None) -> TrainingResult:
        """Runs (or re-attaches to) the training job named ``spec.job_name`` and waits for it,
        streaming its log lines to ``on_log``. Raises ``TrainingJobFailed`` unless Completed."""
        ...

    def stop(self, name: str) -> bool:
        """Stops the training job if it is still running (from any process: the one waiting
        for it may be another thread, or gone). True when it was running."""
        ...

    def completed(self, name: str) -> TrainingResult | None:
        """A completed training job's result, None when it is not (or no longer) there."""
        ...


class Endpoints(Protocol):
    """Real-time endpoints: model, endpoint config and endpoint (one record locally)."""

    def deploy(self, spec: EndpointSpec, on_log: LogCallback | None = None) -> EndpointInfo:
        """Creates model, endpoint config and endpoint; returns once it is InService."""
        ...

    def describe(self, name: str) -> EndpointInfo | None:
        """The endpoint, or None when there is none of that name."""
        ...

    def list(self) -> list[EndpointInfo]:
        """Endpoints created by this pipeline (tagged managed-by=cifar10-pipeline)."""
        ...

    def delete(self, name: str) -> bool:
        """Deletes the endpoint with its config and model. Idempotent: True when something
        was deleted, False when there was nothing to delete."""
        ...

    def orphans(self) -> list[EndpointInfo]:
        """Pipeline-owned parts of endpoints that no longer exist: an endpoint config or a model
        left by a teardown or a deploy that stopped half-way (``status`` "Orphaned"). They are
        named like their endpoint, so ``delete(name)`` removes them. None on backends whose
        endpoints have no separate parts (local: the record holds them)."""
        ...

    def runtime_client(self, endpoint_name: str) -> Any:
        """A boto3 ``sagemaker-runtime`` client that reaches ``endpoint_name``."""
        ...

    def invoke(self, endpoint_name: str, body: bytes, content_type: str,
               accept: str = "application/json") -> Invocation:
        """InvokeEndpoint through boto3 (``invoke_through``), the same client code on every
        backend."""
        ...


class Registry(Protocol):
    """The model registry: SageMaker Model Registry (aws), a directory (local)."""

    def register(self, spec: ModelVersionSpec, decide: Decide) -> Registration:
        """Adds the next version to ``spec.group`` (created when missing), its status and
        reason ``decide(champion)``, called with the group's champion as it stands at that
        moment. Numbers increase and are never reused, also under concurrent registrations and
        after a record is lost. Locally the champion is read, the decision made and the version
        written under the group's lock, so two concurrent registrations are decided one after
        the other; SageMaker has no such lock (see ``AwsRegistry.register``)."""
        ...

    def versions(self, group: str) -> list[ModelVersion]:
        """The group's versions, oldest first (empty when the group does not exist)."""
        ...

    def set_status(self, group: str, version: int, status: str, reason: str) -> ModelVersion:
        """Approves or rejects a version by hand (``BackendError`` when there is none)."""
        ...

    def set_deployment(self, group: str, version: int, deployment: str | None) -> ModelVersion:
        """Records where the version stands on the serving endpoint (``ModelVersion.deployment``:
        "serving on NAME", "replaced by vN", "rolled back: REASON"); its status is unchanged."""
        ...


# -- serving: the long-lived endpoint that holds the champion -----------------------------------

ALL_AT_ONCE, CANARY, LINEAR = "all_at_once", "canary", "linear"
# Serving endpoint statuses, as DescribeEndpoint says them.
IN_SERVICE, UPDATING, ROLLING_BACK, UPDATE_ROLLBACK_FAILED = (
    "InService", "Updating", "RollingBack", "UpdateRollbackFailed")
# How a promotion ended (PromotionResult.outcome).
CREATED, PROMOTED, ROLLED_BACK, FAILED = "created", "promoted", "rolled_back", "failed"


@dataclass(frozen=True)
class TrafficShift:
    """How traffic moves to the new fleet, as SageMaker's BlueGreenUpdatePolicy says it:
    ``all_at_once``; ``canary`` (``percent`` of capacity, ≤ 50, for ``wait_seconds``, then the
    rest); ``linear`` (steps of ``percent``, 10-50, every ``wait_seconds``). Then all traffic
    bakes on the new fleet for ``baking_seconds`` (TerminationWaitInSeconds) before the old
    one stops; the whole update may take ``max_seconds`` (MaximumExecutionTimeoutInSeconds)."""

    strategy: str = CANARY
    percent: int = 10
    wait_seconds: int = 300
    baking_seconds: int = 300
    max_seconds: int = 3600


@dataclass(frozen=True)
class RollbackAlarms:
    """Thresholds that roll an update back, watched over each wait interval and the baking
    period: the new fleet's 5xx share of invocations, and its p99 model latency."""

    max_error_rate: float = 0.05
    max_p99_latency_ms: float = 2000.0


@dataclass(frozen=True)
class Autoscaling:
    """Target tracking on invocations per instance (Application Auto Scaling; aws only)."""

    min_instances: int = 1
    max_instances: int = 2
    invocations_per_instance: int = 1000


@dataclass(frozen=True)
class ServingSpec:
    """Put ``model_uri`` (``group`` version ``version``) on the serving endpoint ``name``:
    created at the first promotion, updated blue/green by ``shift`` after that."""

    name: str
    model_uri: str
    group: str
    version: int
    instance_type: str = "local"
    instance_count: int = 1
    shift: TrafficShift = field(default_factory=TrafficShift)
    alarms: RollbackAlarms = field(default_factory=RollbackAlarms)
    autoscaling: Autoscaling | None = None
    tags: dict[str, str] = field(default_factory=dict)  # managed_tags(..., kept=True) + SERVING


@dataclass(frozen=True)
class PromotionStep:
    """One moment of a promotion: what happened, the new fleet's share of traffic after it,
    and what the alarms saw over the interval that ended there (None: not measured)."""

    at: dt.datetime
    action: str  # e.g. "new fleet InService", "canary 10%", "linear 40%", "baked", "rolled back"
    new_share: float  # 0.0-1.0
    error_rate: float | None = None
    p99_latency_ms: float | None = None
    invocations: int | None = None
    note: str = ""


@dataclass(frozen=True)
class PromotionResult:
    """How a promotion ended: ``created`` (first promotion), ``promoted``, ``rolled_back``
    (the old model still serves; ``reason`` says which alarm, e.g. "5xx rate 0.31 > 0.05
    during canary") or ``failed`` (the old model still serves unless ``status`` says
    otherwise, e.g. UpdateRollbackFailed)."""

    endpoint: str
    outcome: str
    reason: str
    status: str  # the endpoint's status afterwards
    serving_version: int | None  # the registry version serving afterwards
    steps: list[PromotionStep] = field(default_factory=list)


@dataclass(frozen=True)
class ServingStatus:
    """DescribeEndpoint of a serving endpoint: status, what serves, the last deployment."""

    name: str
    status: str  # InService | Updating | RollingBack | UpdateRollbackFailed | Failed
    group: str | None
    version: int | None
    model_uri: str | None
    url: str | None = None  # local: the stable front URL
    last_deployment: str | None = None  # e.g. "promoted v4 (canary 10%, 2024-...)"
    extra: dict[str, Any] = field(default_factory=dict)


class Serving(Protocol):
    """The serving endpoint, updated as SageMaker's deployment guardrails update one."""

    def promote(self, spec: ServingSpec, on_log: LogCallback | None = None) -> PromotionResult:
        """Creates the endpoint (first promotion) or updates it blue/green, watching the
        alarms; returns once it is InService again, on either model. Never raises for a
        rollback: that is an outcome."""
        ...

    def describe(self, name: str) -> ServingStatus | None:
        """The serving endpoint, None when there is none."""
        ...

    def delete(self, name: str) -> bool:
        """Deletes the serving endpoint and everything it holds (both fleets, its alarms,
        its scaling policy). Missing: False."""
        ...


def invoke_through(runtime: Any, endpoint_name: str, body: bytes, content_type: str,
                   accept: str) -> Invocation:
    """InvokeEndpoint with ``runtime``, a boto3 ``sagemaker-runtime`` client: what every
    family's ``Endpoints.invoke`` sends, so the client path is the same code on each."""
    response = runtime.invoke_endpoint(EndpointName=endpoint_name, Body=body,
                                       ContentType=content_type, Accept=accept)
    return Invocation(body=response["Body"].read(), content_type=response.get("ContentType", ""))


class Backend:
    """One SageMaker-shaped engine: ``LocalBackend`` (default) or ``AwsBackend``. It only holds
    its collaborators; callers talk to them (``backend.jobs.run(spec)``), and what spans
    several of them is a plain function over the backend (``backends.cache``)."""

    name: str
    storage: Storage
    jobs: TrainingJobs
    endpoints: Endpoints
    registry: Registry
    serving: Serving

    def prepare(self) -> None:
        """Gets ready for a run's jobs and endpoints while its data downloads (the local
        backend starts its process launcher); nothing by default."""

    def apply_retention(self) -> list[str]:
        """Prunes what the backend keeps on this machine past its retention policy (old job
        directories and their artifacts, dead endpoints' directories, rotated logs, stale
        temporaries), never what a registry version that is Approved or pending, a kept or
        running endpoint, or a running job needs; one line per kind of thing removed.
        Nothing by default: SageMaker keeps nothing here (S3 lifecycle rules bound a bucket)."""
        return []
