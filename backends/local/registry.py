"""The local model registry: SageMaker Model Registry's records as files.

``<registry>/<group>/v<version>.json`` holds one version. A registration happens under an
exclusive lock on ``<group>/.lock``: the champion is read, the promotion gate decides and the
version is written, so two runs registering at once are decided one after the other, get
consecutive numbers and lose nothing. ``<group>/.last-version`` is the highest number ever
given: a version number is never reused, even after its record is deleted. Every write replaces
a whole file atomically and durably; an unreadable record is skipped with a warning. A version's
place on the serving endpoint (``deployment``) is a field of its record; records written before
it existed read as never promoted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from backends.base import (
    MODEL_GROUP_PATTERN,
    BackendError,
    Decide,
    ModelVersion,
    ModelVersionSpec,
    Registration,
    champion,
)
from backends.files import (
    RECORD_ERRORS,
    atomic_write_text,
    read_json_record,
    warn_unreadable,
)

log = logging.getLogger(__name__)

GROUP_NAME = re.compile(MODEL_GROUP_PATTERN)
VERSION_FILE = re.compile(r"^v(\d+)\.json$")
HIGH_WATER = ".last-version"  # the highest version number ever given in the group


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

    def register(self, spec: ModelVersionSpec, decide: Decide) -> Registration:
        with self._locked(spec.group) as directory:
            before = champion(self._read_all(directory))
            status, reason = decide(before)
            version = self._next_number(directory)
            # The high-water mark first: a crash before the record is written skips a number,
            # which is harmless; the other order could give the number out twice.
            atomic_write_text(directory / HIGH_WATER, f"{version}\n")
            record = ModelVersion(
                group=spec.group, version=version, status=status, reason=reason,
                created=dt.datetime.now(dt.UTC), model_uri=spec.model_uri,
                training_job=spec.training_job, cache_key=spec.cache_key,
                metrics=dict(spec.metrics), lineage=dict(spec.lineage))
            self._write(directory, record)
        return Registration(version=record, champion_before=before)

    def versions(self, group: str) -> list[ModelVersion]:
        """The readable versions, oldest first; each unreadable one is skipped with a
        warning (one damaged file must not stop listings, the cache lookup or the gate)."""
        directory = self.group_dir(group)
        if not directory.is_dir():
            return []
        return self._read_all(directory)

    def set_status(self, group: str, version: int, status: str, reason: str) -> ModelVersion:
        return self._update(group, version, status=status, reason=reason)

    def set_deployment(self, group: str, version: int, deployment: str | None) -> ModelVersion:
        return self._update(group, version, deployment=deployment)

    def _update(self, group: str, version: int, **changes: str | None) -> ModelVersion:
        """Rewrites one version's record with ``changes``, under the group's lock (so that a
        registration or another update never loses this one), whole and durably."""
        with self._locked(group) as directory:
            path = directory / f"v{version}.json"
            if not path.is_file():
                raise BackendError(f"model {group} has no version {version}")
            try:
                current = self._read(path)
            except RECORD_ERRORS as e:
                raise BackendError(f"model {group} version {version} cannot be updated: its "
                                   f"record {path} is unreadable ({e}); move it aside or "
                                   f"delete it") from e
            record = dataclasses.replace(current, **changes)
            self._write(directory, record)
        return record

    def unreadable(self, group: str) -> list[Path]:
        """The group's version records that cannot be read (what ``versions`` skips)."""
        directory = self.group_dir(group)
        if not directory.is_dir():
            return []
        damaged = []
        for number in sorted(self._numbers(directory)):
            path = directory / f"v{number}.json"
            try:
                self._read(path)
            except RECORD_ERRORS:
                damaged.append(path)
        return damaged

    def _read_all(self, directory: Path) -> list[ModelVersion]:
        versions = []
        for number in sorted(self._numbers(directory)):
            path = directory / f"v{number}.json"
            try:
                versions.append(self._read(path))
            except RECORD_ERRORS as e:
                warn_unreadable(log, path, e)
        return versions

    def _next_number(self, directory: Path) -> int:
        """One more than any number given before: the high-water mark, and every record file
        present, readable or not (an unreadable one still holds its number)."""
        return max(self._high_water(directory), *self._numbers(directory), 0) + 1

    @staticmethod
    def _high_water(directory: Path) -> int:
        path = directory / HIGH_WATER
        try:
            return int(path.read_text().strip())
        except FileNotFoundError:
            return 0  # a group registered before the mark existed: the files tell
        except (OSError, ValueError) as e:
            # The record files still bound it from below; a damaged mark is rewritten by the
            # next registration.
            warn_unreadable(log, path, e)
            return 0

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
        data = read_json_record(path)
        version = ModelVersion(**{**data, "created": dt.datetime.fromisoformat(data["created"])})
        if not isinstance(version.metrics, dict) or not isinstance(version.lineage, dict):
            raise TypeError("metrics and lineage must be JSON objects")
        if not isinstance(version.deployment, str | None):
            raise TypeError("deployment must be a string or null")
        return version
