"""The local backend: SageMaker's training and hosting contracts on this machine, with no AWS
account and no Docker. Training jobs are local processes, endpoints are local HTTP servers,
and S3 is a directory (``LocalStore``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from backends.base import (
    Backend,
    BackendError,
    Decide,
    EndpointInfo,
    EndpointSpec,
    LogCallback,
    ModelVersion,
    ModelVersionSpec,
    Registration,
    TrainingResult,
    TrainingSpec,
)
from backends.local import launcher
from backends.local.endpoints import LocalEndpoints
from backends.local.registry import LocalRegistry
from backends.local.retention import RetentionPolicy, apply_retention
from backends.local.store import LocalStore, path_from_uri
from backends.local.training import LocalTrainingJobs
from backends.settings import SOURCE_DIR, state_dir
from model_src.cifar import TRAINING_PROGRAM

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def bypass_proxies_for_loopback() -> None:
    """Adds the loopback hosts to ``no_proxy``/``NO_PROXY``: local endpoints (and Prefect's
    temporary server) listen there, and an ``http_proxy`` from the environment without such an
    entry, as on many corporate machines, would send their requests to the proxy instead."""
    for key in ("no_proxy", "NO_PROXY"):
        hosts = [h.strip() for h in os.environ.get(key, "").split(",") if h.strip()]
        if "*" not in hosts and (missing := [h for h in LOOPBACK_HOSTS if h not in hosts]):
            os.environ[key] = ",".join(hosts + missing)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, root: Path | None = None, python: str = sys.executable,
                 deploy_timeout_seconds: float = 120.0, concurrent_jobs: int = 1,
                 retention: RetentionPolicy | None = None) -> None:
        bypass_proxies_for_loopback()
        self.python = python
        self.retention = retention or RetentionPolicy()
        self.root = Path(root) if root else state_dir()
        self.store = LocalStore(self.root / "store")
        self.jobs = LocalTrainingJobs(self.root / "jobs", self.store, SOURCE_DIR,
                                      TRAINING_PROGRAM, python=python,
                                      concurrent_jobs=concurrent_jobs,
                                      retention=self.retention)
        self.endpoints = LocalEndpoints(self.root / "endpoints", python=python,
                                        deploy_timeout_seconds=deploy_timeout_seconds)
        self.registry = LocalRegistry(self.root / "registry")

    def prepare(self) -> None:
        launcher.prepare(self.python)

    def apply_retention(self) -> list[str]:
        return apply_retention(self.retention, self.jobs, self.endpoints, self.registry,
                               self.store).lines()

    def upload_data(self, local_dir: Path, on_log: LogCallback | None = None) -> str:
        report = self.store.upload_dir(Path(local_dir), "data")
        if on_log:
            on_log(report.summary())
        return report.uri

    def train(self, spec: TrainingSpec, on_log: LogCallback | None = None) -> TrainingResult:
        return self.jobs.run(spec, on_log)

    def stop_training(self, job_name: str) -> bool:
        return self.jobs.stop(job_name)

    def deploy(self, spec: EndpointSpec, on_log: LogCallback | None = None) -> EndpointInfo:
        return self.endpoints.deploy(spec, on_log)

    def describe_endpoint(self, name: str) -> EndpointInfo | None:
        return self.endpoints.describe(name)

    def list_endpoints(self) -> list[EndpointInfo]:
        return [e for e in self.endpoints.list() if e.managed]

    def delete_endpoint(self, name: str) -> bool:
        return self.endpoints.delete(name)

    def register_model(self, spec: ModelVersionSpec, decide: Decide) -> Registration:
        return self.registry.register(spec, decide)

    def list_model_versions(self, group: str) -> list[ModelVersion]:
        return self.registry.versions(group)

    def set_model_status(self, group: str, version: int, status: str,
                         reason: str) -> ModelVersion:
        return self.registry.set_status(group, version, status, reason)

    def artifact_exists(self, uri: str) -> bool:
        return uri.startswith("file://") and path_from_uri(uri).is_file()

    def why_not_reusable(self, uri: str) -> str | None:
        """Only artifacts in this backend's store are reused: a file elsewhere (another state
        directory's, one a registry record points at by hand) may change or vanish under us,
        and retention, which keeps what the registry needs, only looks after the store."""
        if not uri.startswith("file://"):
            return "it is not a file:// URI"
        path = path_from_uri(uri).resolve()
        if not path.is_relative_to(self.store.root):
            return f"it is outside this backend's store ({self.store.root})"
        return None if path.is_file() else "it does not exist"

    def training_result(self, job_name: str) -> TrainingResult | None:
        record = self.jobs.describe(job_name)
        if record is None or record.status != "Completed":
            return None
        return self.jobs.result(record)

    def runtime_client(self, endpoint_name: str) -> Any:
        """boto3's own sagemaker-runtime client, pointed at the endpoint's server. Requests are
        unsigned: the local server checks no credentials."""
        info = self.describe_endpoint(endpoint_name)
        if info is None or info.url is None:
            raise BackendError(f"endpoint {endpoint_name} does not exist")
        if info.status != "InService":
            raise BackendError(f"endpoint {endpoint_name} is {info.status}, not InService")
        # Imported here: the model server process imports this package and never needs boto3.
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        return boto3.client(
            "sagemaker-runtime", endpoint_url=info.url,
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            config=Config(signature_version=UNSIGNED, retries={"max_attempts": 2}),
        )
