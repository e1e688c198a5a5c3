"""The local backend: SageMaker's training and hosting contracts on this machine, with no AWS
account and no Docker. Training jobs are local processes, endpoints are local HTTP servers,
and S3 is a directory (``LocalStore``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from backends.base import Backend
from backends.local import launcher
from backends.local.endpoints import LocalEndpoints
from backends.local.registry import LocalRegistry
from backends.local.retention import RetentionPolicy, apply_retention
from backends.local.serving import LocalServing
from backends.local.store import LocalStore
from backends.local.training import LocalTrainingJobs
from backends.settings import SOURCE_DIR, state_dir
from model_src.contract import TRAINING_PROGRAM

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
    """The store, training jobs, endpoints, registry and serving endpoints under one state
    directory."""

    name = "local"

    def __init__(self, root: Path | None = None, python: str = sys.executable,
                 deploy_timeout_seconds: float = 120.0, concurrent_jobs: int = 1,
                 retention: RetentionPolicy | None = None) -> None:
        bypass_proxies_for_loopback()
        self.python = python
        self.retention = retention or RetentionPolicy()
        self.root = Path(root) if root else state_dir()
        self.storage = LocalStore(self.root / "store")
        self.jobs = LocalTrainingJobs(self.root / "jobs", self.storage, SOURCE_DIR,
                                      TRAINING_PROGRAM, python=python,
                                      concurrent_jobs=concurrent_jobs,
                                      retention=self.retention)
        self.endpoints = LocalEndpoints(self.root / "endpoints", python=python,
                                        deploy_timeout_seconds=deploy_timeout_seconds)
        self.registry = LocalRegistry(self.root / "registry")
        # The long-lived serving endpoints: a router in front of fleets that are endpoints.
        self.serving = LocalServing(self.root / "serving", self.endpoints, python=python)

    def prepare(self) -> None:
        launcher.prepare(self.python)

    def apply_retention(self) -> list[str]:
        return apply_retention(self.retention, self.jobs, self.endpoints, self.registry,
                               self.storage, serving=self.serving).lines()
