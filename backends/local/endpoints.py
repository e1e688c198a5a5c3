"""Local endpoints: one model-server process per endpoint, tracked by records on disk so that
any process can list, describe or delete them.

``<endpoints>/<name>/`` holds ``record.json`` (name, pid, port, model URI, tags, created,
status), ``server.log`` and the extracted ``model/``. The server process is started in a session
of its own: like a real endpoint it outlives the task (and the flow) that deployed it, until it
is deleted. Endpoints whose deployer died are found later by the reaper. A record that cannot be
read (empty after a power loss, garbled) is reported with a warning as an endpoint in an
unknown state, which ``delete`` and the reaper can still remove.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import (
    CREATED_KEY,
    KEPT_KEY,
    MANAGED_BY_KEY,
    MANAGED_BY_VALUE,
    BackendError,
    EndpointExists,
    EndpointFailed,
    EndpointInfo,
    EndpointSpec,
    Invocation,
    LogCallback,
    invoke_through,
)
from backends.files import (
    RECORD_ERRORS,
    UnreadableRecord,
    atomic_write_text,
    read_json_record,
    unreadable_message,
)
from backends.local import processes
from backends.local.launcher import Launched, launch
from backends.local.store import path_from_uri
from backends.polling import poll
from model_src.contract import NAME_PATTERN as SAGEMAKER_NAME_PATTERN

# One math thread per request, requests in parallel: small batches spend more time waking
# OpenMP threads than computing, and spinning threads starve a busy machine (the usual
# model-server set-up: TorchServe, for one, runs single-threaded workers side by side).
SERVER_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The server's stdout and stderr until its own logging starts (see backends.local.server).
RAW_OUTPUT_FILE = "server.out"

NAME_PATTERN = re.compile(SAGEMAKER_NAME_PATTERN)  # SageMaker's endpoint names
UNKNOWN = "Unknown"  # the status of an endpoint whose record cannot be read

log = logging.getLogger(__name__)


@dataclass
class EndpointRecord:
    """What DescribeEndpoint would say, persisted as ``record.json``: a flat JSON object whose
    keys are these fields' names (the format records had as plain dicts, so either reads the
    other's)."""

    name: str
    status: str  # Creating | InService | Failed
    created: str  # ISO-8601
    model_uri: str | None = None
    model_path: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    instance_type: str = "local"
    instance_count: int = 1
    tags: dict[str, str] = field(default_factory=dict)
    pid: int | None = None  # the server process, and its start time (a pid can be reused)
    pid_start: str | None = None
    host: str | None = None
    port: int | None = None
    failure_reason: str | None = None
    # Keys this version does not know (a newer version's, written by its server process, which
    # outlives an upgrade): kept, and written back with the record, never dropped.
    unknown: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EndpointRecord:
        """The record in record.json's object; TypeError or ValueError when it is not one (a
        field missing, or of the wrong kind)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        record = cls(**{k: v for k, v in data.items() if k in known},
                     unknown={k: v for k, v in data.items() if k not in known})
        if not all(isinstance(v, str) for v in (record.name, record.status, record.created)) \
                or not isinstance(record.tags, dict) or not isinstance(record.environment, dict):
            raise ValueError("a field holds a value of the wrong kind")
        return record

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {**data.pop("unknown"), **data}

    def update(self, **changes: Any) -> None:
        """Sets fields by name; names this version does not know go to ``unknown``."""
        for key, value in changes.items():
            if key != "unknown" and hasattr(self, key):
                setattr(self, key, value)
            else:
                self.unknown[key] = value


class EndpointRecords:
    """The on-disk records. Every write replaces the whole file atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def endpoint_dir(self, name: str) -> Path:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid endpoint name {name!r}: letters, digits and hyphens, "
                             f"at most 63 characters")
        return self.root / name

    def record_path(self, name: str) -> Path:
        return self.endpoint_dir(name) / "record.json"

    def read(self, name: str) -> EndpointRecord | None:
        """The record, None when there is none; ``UnreadableRecord`` when it is damaged (a
        field missing or of the wrong kind included)."""
        path = self.record_path(name)
        try:
            data = read_json_record(path)
        except FileNotFoundError:
            return None
        try:
            return EndpointRecord.from_json(data)
        except (TypeError, ValueError) as e:
            raise UnreadableRecord(path, f"{type(e).__name__}: {e}") from e

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/record.json")
                      if NAME_PATTERN.match(p.parent.name))

    def create(self, record: EndpointRecord) -> None:
        """Creates the endpoint's directory and record; fails if the name is taken."""
        directory = self.endpoint_dir(record.name)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir()
        except FileExistsError:
            raise EndpointExists(record.name) from None
        self.write(record)

    def write(self, record: EndpointRecord) -> None:
        directory = self.endpoint_dir(record.name)
        if not directory.is_dir():  # deleted meanwhile: do not resurrect it
            raise FileNotFoundError(f"endpoint {record.name} was deleted")
        atomic_write_text(directory / "record.json", json.dumps(record.to_json(), indent=2))

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Holds the endpoint's lock: the deploying process and the server process both update
        the record, and a read-modify-write by one must not undo the other's."""
        try:
            lock = open(self.endpoint_dir(name) / ".lock", "a")  # noqa: SIM115
        except FileNotFoundError:
            raise FileNotFoundError(f"endpoint {name} was deleted") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def update(self, name: str, **changes: Any) -> None:
        with self.locked(name):
            record = self.read(name)
            if record is None:
                raise FileNotFoundError(f"endpoint {name} was deleted")
            record.update(**changes)
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
        self.records.create(EndpointRecord(
            name=spec.name, status="Creating", created=created.isoformat(),
            model_uri=spec.model_uri, model_path=str(model_path),
            environment=dict(spec.environment), instance_type=spec.instance_type,
            instance_count=spec.instance_count, tags=dict(spec.tags),
        ))
        directory = self.records.endpoint_dir(spec.name)
        # The server logs to server.log itself (rotated, rate-limited); this file takes only
        # what it writes before its logging starts and fatal-error dumps, anew each start.
        with open(directory / RAW_OUTPUT_FILE, "wb") as log:
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
            record = self.records.read(name)
            status = record.status if record else None
            if status == "Failed" or proc.poll() is not None:
                time.sleep(0.2)  # let the log flush
                reason = (record and record.failure_reason) or f"server exited with {proc.poll()}"
                raise EndpointFailed(name, f"{reason}\n{self._log_tail(name)}")
            if record is not None and status == "InService" and _ping(record):
                return self._info(record)
            return None

        return poll(check, interval=0.1, timeout=self.deploy_timeout_seconds,
                    on_timeout=lambda elapsed: EndpointFailed(
                        name, f"not InService after {elapsed:.0f}s\n{self._log_tail(name)}"))

    def _log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines of the server's log, after any raw output (a crash before its
        logging started). Only the files' ends are read: the log may be megabytes."""
        directory = self.records.endpoint_dir(name)
        tails = []
        for file in (RAW_OUTPUT_FILE, "server.log"):
            try:
                with open(directory / file, "rb") as f:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                    text = f.read().decode(errors="replace")
            except FileNotFoundError:
                continue
            tails.extend(text.splitlines()[-lines:])
        return "\n".join(tails[-lines:])

    def describe(self, name: str) -> EndpointInfo | None:
        """The endpoint, None when there is none; status Unknown when its record is damaged."""
        self.records.endpoint_dir(name)  # an invalid name is the caller's error, not damage
        try:
            record = self.records.read(name)
            return self._info(record) if record else None
        except RECORD_ERRORS as e:
            return self._unreadable(name, e)

    def list(self) -> list[EndpointInfo]:
        """The endpoints this pipeline created (tagged managed-by): all of them, as ``all``
        lists them, since every deploy through the pipeline tags its endpoint."""
        return [info for info in self.all() if info.managed]

    def all(self) -> list[EndpointInfo]:
        """Every endpoint; one whose record is damaged is listed as Unknown, with a warning,
        so that one bad file neither stops the listing nor hides the endpoint from the reaper."""
        return [info for name in self.records.names() if (info := self.describe(name))]

    def orphans(self) -> list[EndpointInfo]:
        """None: an endpoint's model and config live in its record, deleted with it."""
        return []

    def delete(self, name: str) -> bool:
        """Stops the server (freeing its port) and removes the record. Missing: False."""
        directory = self.records.endpoint_dir(name)
        try:
            record = self.records.read(name)
        except UnreadableRecord as e:
            # Without the record there is no pid to stop: the directory is removed all the
            # same, since an endpoint nobody can describe, invoke or stop is only debris. A
            # record is damaged by a crash or power loss, which its server did not outlive.
            log.warning("endpoint %s: %s; deleting its directory (a server it may still run "
                        "is not stopped)", name, e)
            record = EndpointRecord(name=name, status=UNKNOWN, created="")
        if record is None:
            if directory.exists():  # a half-created endpoint
                shutil.rmtree(directory, ignore_errors=True)
                return True
            return False
        if record.pid:
            # Not under the lock: a server that records its own end while it stops would
            # wait for it.
            processes.terminate_group(record.pid, record.pid_start, grace_seconds=10)
        with contextlib.suppress(FileNotFoundError), self.records.locked(name):
            shutil.rmtree(directory, ignore_errors=True)  # never under a half-done update
        return True

    def _unreadable(self, name: str, error: BaseException) -> EndpointInfo | None:
        """An endpoint whose record cannot be read: status Unknown, created when the record
        was last written (so the reaper's TTL counts from the damage, giving its owner time to
        see the warning), tagged as the pipeline's (this directory is the local backend's own),
        and kept when the damaged text still shows the kept tag. None when it vanished."""
        path = self.records.record_path(name)
        try:
            modified = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
            raw = path.read_bytes()
        except FileNotFoundError:
            return None  # deleted meanwhile
        except OSError:
            modified, raw = dt.datetime.now(dt.UTC), b""
        message = unreadable_message(path, error)
        log.warning("endpoint %s is in an unknown state: %s", name, message)
        kept = re.search(rb'"%s"\s*:\s*"true"' % KEPT_KEY.encode(), raw) is not None
        tags = {MANAGED_BY_KEY: MANAGED_BY_VALUE, CREATED_KEY: modified.isoformat(),
                **({KEPT_KEY: "true"} if kept else {})}
        return EndpointInfo(name=name, status=UNKNOWN, created=modified, tags=tags,
                            extra={"unreadable": message, "record": str(path),
                                   "log": str(self.records.endpoint_dir(name) / "server.log")})

    def _info(self, record: EndpointRecord) -> EndpointInfo:
        status = record.status
        alive = processes.is_running(record.pid, record.pid_start)
        if status in ("InService", "Creating") and record.pid and not alive:
            status = "Failed"  # the server died (crash, reboot, kill)
        url = f"http://{record.host}:{record.port}" if record.port else None
        return EndpointInfo(
            name=record.name, status=status, created=dt.datetime.fromisoformat(record.created),
            tags=record.tags, instance_type=record.instance_type, url=url,
            extra={"pid": record.pid, "model_uri": record.model_uri,
                   "failure_reason": record.failure_reason,
                   "log": str(self.records.endpoint_dir(record.name) / "server.log")},
        )

    def runtime_client(self, endpoint_name: str) -> Any:
        """boto3's own sagemaker-runtime client, pointed at the endpoint's server. Requests are
        unsigned: the local server checks no credentials."""
        info = self.describe(endpoint_name)
        if info is None or info.url is None:
            raise BackendError(f"endpoint {endpoint_name} does not exist")
        if info.status != "InService":
            raise BackendError(f"endpoint {endpoint_name} is {info.status}, not InService")
        # Imported here: the model server process imports this module and never needs boto3.
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        return boto3.client(
            "sagemaker-runtime", endpoint_url=info.url,
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            config=Config(signature_version=UNSIGNED, retries={"max_attempts": 2}),
        )

    def invoke(self, endpoint_name: str, body: bytes, content_type: str,
               accept: str = "application/json") -> Invocation:
        return invoke_through(self.runtime_client(endpoint_name), endpoint_name, body,
                              content_type, accept)


def _ping(record: EndpointRecord) -> bool:
    try:
        url = f"http://{record.host}:{record.port}/ping"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
