"""Local endpoints: one model-server process per endpoint, tracked by records on disk so that
any process can list, describe or delete them.

``<endpoints>/<name>/`` holds ``record.json`` (name, pid, port, model URI, tags, created,
status), ``server.log`` and the extracted ``model/``. The server process is started in a session
of its own: like a real endpoint it outlives the task (and the flow) that deployed it, until it
is deleted. Endpoints whose deployer died are found later by the reaper.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from backends.base import (
    BackendError,
    EndpointExists,
    EndpointFailed,
    EndpointInfo,
    EndpointSpec,
    LogCallback,
)
from backends.files import atomic_write_text
from backends.local import processes
from backends.local.launcher import Launched, launch
from backends.local.store import path_from_uri
from backends.polling import poll

# One math thread per request, requests in parallel: small batches spend more time waking
# OpenMP threads than computing, and spinning threads starve a busy machine (the usual
# model-server set-up: TorchServe, for one, runs single-threaded workers side by side).
SERVER_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's endpoint names


class EndpointRecords:
    """The on-disk records. Every write replaces the whole file atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def endpoint_dir(self, name: str) -> Path:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid endpoint name {name!r}: letters, digits and hyphens, "
                             f"at most 63 characters")
        return self.root / name

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.endpoint_dir(name) / "record.json").read_text())
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/record.json"))

    def create(self, record: dict[str, Any]) -> None:
        """Creates the endpoint's directory and record; fails if the name is taken."""
        directory = self.endpoint_dir(record["name"])
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir()
        except FileExistsError:
            raise EndpointExists(record["name"]) from None
        self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        directory = self.endpoint_dir(record["name"])
        if not directory.is_dir():  # deleted meanwhile: do not resurrect it
            raise FileNotFoundError(f"endpoint {record['name']} was deleted")
        atomic_write_text(directory / "record.json", json.dumps(record, indent=2))

    def update(self, name: str, **changes: Any) -> None:
        record = self.read(name)
        if record is None:
            raise FileNotFoundError(f"endpoint {name} was deleted")
        record.update(changes)
        self.write(record)

    def mark_in_service(self, name: str, host: str, port: int) -> None:
        self.update(name, status="InService", host=host, port=port,
                    pid=os.getpid(), pid_start=processes.start_time(os.getpid()))

    def mark_failed(self, name: str, reason: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile: nothing to mark
            self.update(name, status="Failed", failure_reason=reason)


class LocalEndpoints:
    def __init__(self, root: Path, python: str = sys.executable,
                 deploy_timeout_seconds: float = 120.0) -> None:
        self.records = EndpointRecords(root)
        self.python = python
        self.deploy_timeout_seconds = deploy_timeout_seconds

    def deploy(self, spec: EndpointSpec, on_log: LogCallback | None = None) -> EndpointInfo:
        emit = on_log or (lambda line: None)
        model_path = path_from_uri(spec.model_uri)
        if not model_path.is_file():
            raise BackendError(f"model artifact {spec.model_uri} does not exist")
        created = dt.datetime.now(dt.UTC)
        self.records.create({
            "name": spec.name, "status": "Creating", "model_uri": spec.model_uri,
            "model_path": str(model_path), "environment": dict(spec.environment),
            "instance_type": spec.instance_type, "instance_count": spec.instance_count,
            "tags": dict(spec.tags), "created": created.isoformat(), "pid": None,
            "pid_start": None, "host": None, "port": None, "failure_reason": None,
        })
        directory = self.records.endpoint_dir(spec.name)
        with open(directory / "server.log", "ab") as log:
            proc = launch(
                [self.python, "-m", "backends.local.server", "--name", spec.name,
                 "--root", str(self.records.root)],
                output=log.fileno(), cwd=directory, die_with_parent=False,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **SERVER_THREADS},
            )
        self.records.update(spec.name, pid=proc.pid, pid_start=processes.start_time(proc.pid))
        emit(f"endpoint {spec.name}: server process {proc.pid} loading {spec.model_uri}")
        try:
            info = self._wait_in_service(spec.name, proc)
        except BaseException:
            self.delete(spec.name)
            raise
        emit(f"endpoint {spec.name}: InService at {info.url}")
        return info

    def _wait_in_service(self, name: str, proc: Launched) -> EndpointInfo:
        def check() -> EndpointInfo | None:
            record = self.records.read(name) or {}
            if record.get("status") == "Failed" or proc.poll() is not None:
                time.sleep(0.2)  # let the log flush
                reason = record.get("failure_reason") or f"server exited with {proc.poll()}"
                raise EndpointFailed(name, f"{reason}\n{self._log_tail(name)}")
            if record.get("status") == "InService" and _ping(record):
                return self._info(record)
            return None

        return poll(check, interval=0.1, timeout=self.deploy_timeout_seconds,
                    on_timeout=lambda elapsed: EndpointFailed(
                        name, f"not InService after {elapsed:.0f}s\n{self._log_tail(name)}"))

    def _log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.records.endpoint_dir(name) / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def describe(self, name: str) -> EndpointInfo | None:
        record = self.records.read(name)
        return self._info(record) if record else None

    def list(self) -> list[EndpointInfo]:
        infos = []
        for name in self.records.names():
            record = self.records.read(name)
            if record:
                infos.append(self._info(record))
        return infos

    def delete(self, name: str) -> bool:
        """Stops the server (freeing its port) and removes the record. Missing: False."""
        record = self.records.read(name)
        directory = self.records.endpoint_dir(name)
        if record is None:
            if directory.exists():  # a half-created endpoint
                shutil.rmtree(directory, ignore_errors=True)
                return True
            return False
        if record.get("pid"):
            processes.terminate_group(record["pid"], record.get("pid_start"), grace_seconds=10)
        shutil.rmtree(directory, ignore_errors=True)
        return True

    def _info(self, record: dict[str, Any]) -> EndpointInfo:
        status = record["status"]
        alive = processes.is_running(record.get("pid"), record.get("pid_start"))
        if status in ("InService", "Creating") and record.get("pid") and not alive:
            status = "Failed"  # the server died (crash, reboot, kill)
        url = f"http://{record['host']}:{record['port']}" if record.get("port") else None
        return EndpointInfo(
            name=record["name"], status=status,
            created=dt.datetime.fromisoformat(record["created"]), tags=record.get("tags", {}),
            instance_type=record.get("instance_type", "local"), url=url,
            extra={"pid": record.get("pid"), "model_uri": record.get("model_uri"),
                   "failure_reason": record.get("failure_reason"),
                   "log": str(self.records.endpoint_dir(record["name"]) / "server.log")},
        )


def _ping(record: dict[str, Any]) -> bool:
    try:
        url = f"http://{record['host']}:{record['port']}/ping"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
