"""The local model registry: SageMaker Model Registry's records as files.

``<registry>/<group>/v<version>.json`` holds one version; versions are numbered under an
exclusive lock on ``<group>/.lock``, so two runs registering at once get consecutive numbers and
lose nothing. Every write replaces a whole file atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import re
from collections.abc import Iterator
from pathlib import Path

from backends.base import MODEL_GROUP_PATTERN, BackendError, ModelVersion, ModelVersionSpec
from backends.files import atomic_write_text

GROUP_NAME = re.compile(MODEL_GROUP_PATTERN)
VERSION_FILE = re.compile(r"^v(\d+)\.json$")


class LocalRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def group_dir(self, group: str) -> Path:
        if not GROUP_NAME.match(group):
            raise ValueError(f"invalid model package group name {group!r}: letters, digits "
                             f"and hyphens, at most 63 characters")
        return self.root / group

    @contextlib.contextmanager
    def _locked(self, group: str) -> Iterator[Path]:
        directory = self.group_dir(group)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield directory
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def register(self, spec: ModelVersionSpec) -> ModelVersion:
        with self._locked(spec.group) as directory:
            version = max(self._numbers(directory), default=0) + 1
            record = ModelVersion(
                group=spec.group, version=version, status=spec.status, reason=spec.reason,
                created=dt.datetime.now(dt.UTC), model_uri=spec.model_uri,
                training_job=spec.training_job, cache_key=spec.cache_key,
                metrics=dict(spec.metrics), lineage=dict(spec.lineage))
            self._write(directory, record)
        return record

    def versions(self, group: str) -> list[ModelVersion]:
        directory = self.group_dir(group)
        if not directory.is_dir():
            return []
        return [self._read(directory / f"v{n}.json") for n in sorted(self._numbers(directory))]

    def set_status(self, group: str, version: int, status: str, reason: str) -> ModelVersion:
        with self._locked(group) as directory:
            path = directory / f"v{version}.json"
            if not path.is_file():
                raise BackendError(f"model {group} has no version {version}")
            record = dataclasses.replace(self._read(path), status=status, reason=reason)
            self._write(directory, record)
        return record

    @staticmethod
    def _numbers(directory: Path) -> list[int]:
        return [int(m.group(1)) for p in directory.iterdir()
                if (m := VERSION_FILE.match(p.name))]

    @staticmethod
    def _write(directory: Path, record: ModelVersion) -> None:
        data = {**dataclasses.asdict(record), "created": record.created.isoformat()}
        atomic_write_text(directory / f"v{record.version}.json", json.dumps(data, indent=2))

    @staticmethod
    def _read(path: Path) -> ModelVersion:
        data = json.loads(path.read_text())
        return ModelVersion(**{**data, "created": dt.datetime.fromisoformat(data["created"])})
