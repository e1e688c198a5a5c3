"""Retention for the local backend: what it keeps on this machine, and for how long, so that a
nightly run stays within its disk for months.

- **Jobs**: the newest ``keep_jobs`` training jobs and those younger than ``max_age_days`` keep
  their directory (``jobs/<name>``: record, log, metrics) and their artifacts in the store
  (``store/training-jobs/<name>/``); older ones go. A finished job already holds no data: its
  channel links (or copies), code copy, model directory and checkpoints went when it ended
  (``LocalTrainingJobs.release_inputs``); what a killed runner left of them goes here.
- **Never removed**, whatever the limits: a job (directory and artifacts) that an Approved or
  PendingManualApproval registry version names, that a kept endpoint or a running one serves,
  that is still InProgress, or whose runner process (another than this one) is still alive,
  since that flow may still deploy or register its model. A Rejected version keeps its record
  when its artifact goes: the cache lookup checks that the artifact exists.
- **Endpoints**: the directory of an endpoint whose server is gone (a crash, a reboot, a kill)
  and that the user did not keep, once nothing has touched it for ``DEAD_ENDPOINT_GRACE`` (time
  to read its server.log). Live endpoints and kept ones are never touched here (the reaper and
  ``endpoints delete`` are the ways to remove those). Nor are a serving endpoint's fleets,
  whatever their state (``serving delete`` removes them), nor its directory under ``serving/``.
- **Logs**: a training log rotates at ``log_max_bytes`` and keeps ``log_backups`` older parts
  (``BoundedLog``); parts past that number, left by a larger setting, go.
- **Temporaries**: what a kill left half-written: this backend's temporary directories
  (``.tmp-<kind>-<pid>-<start>-*``, see ``owned_temp_prefix``) whose owner process is gone, and
  atomic writes' ``.<name>.*.part`` files, once older than ``STALE_AFTER``.

Run by ``LocalBackend.apply_retention`` at the start of every pipeline run and sweep.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from backends.base import APPROVED, PENDING
from backends.files import RECORD_ERRORS
from backends.local import processes
from backends.local.store import path_from_uri

if TYPE_CHECKING:  # the training module imports this one (BoundedLog)
    from backends.local.endpoints import LocalEndpoints
    from backends.local.registry import LocalRegistry
    from backends.local.serving import LocalServing
    from backends.local.store import LocalStore
    from backends.local.training import JobRecord, LocalTrainingJobs

MB = 1_000_000
# A temporary file or directory this old whose owner is gone is debris: an atomic write or a
# model's packaging takes seconds, never an hour.
STALE_AFTER = dt.timedelta(hours=1)
# A dead endpoint's directory (record, server.log, extracted model) stays this long after its
# last write: time to read why it died, the morning after a nightly run.
DEAD_ENDPOINT_GRACE = dt.timedelta(days=1)
STORE_JOBS_PREFIX = "training-jobs"  # store/training-jobs/<job>/output/model.tar.gz
TEMP_NAME = re.compile(r"^\.tmp-[a-z]+-(?P<pid>\d+)-(?P<start>[^-]+)-")
LOG_BACKUP = re.compile(r"^training\.log\.(?P<n>\d+)$")


@dataclass(frozen=True)
class RetentionPolicy:
    """The limits (``flows.config.RetentionSettings`` documents the defaults). ``None``: no
    limit of that kind."""

    keep_jobs: int | None = 10
    max_age_days: float | None = 14
    log_max_bytes: int = 10 * MB
    log_backups: int = 1


@dataclass
class RetentionReport:
    """What one pass removed, and what it kept only because something needs it."""

    jobs: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    inputs_released: list[str] = field(default_factory=list)
    protected: dict[str, str] = field(default_factory=dict)  # job past the limits → why kept
    skipped: list[str] = field(default_factory=list)  # steps not taken, and why
    freed_bytes: int = 0

    def lines(self) -> list[str]:
        """One line per kind of thing removed or protected (nothing: no lines)."""
        kinds = [("job directories and their artifacts", self.jobs),
                 ("dead endpoint directories", self.endpoints),
                 ("stale temporaries", self.temporaries),
                 ("rotated logs past the backups kept", self.logs),
                 ("leftover channel data of ended jobs", self.inputs_released)]
        lines = [f"removed {len(items)} {label}: {', '.join(items)}"
                 for label, items in kinds if items]
        if self.protected:
            lines.append("kept past the limits: " + ", ".join(
                f"{name} ({why})" for name, why in sorted(self.protected.items())))
        if lines:
            lines.append(f"freed {self.freed_bytes / MB:.1f} MB")
        return lines + self.skipped


# -- bounded logs -----------------------------------------------------------------------------

class BoundedLog:
    """A log file that never grows past ``max_bytes``: when the next line would cross it, the
    file rotates (``x.log`` → ``x.log.1`` → ... → ``x.log.<backups>``, the oldest dropped), as
    logging's RotatingFileHandler does; with no backups it starts over (RotatingFileHandler
    would never rotate). At most ``max_bytes * (backups + 1)`` bytes in all; a single line longer
    than ``max_bytes`` is cut. Each line is one unbuffered write: readers see whole lines."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = Path(path), max(1, max_bytes), max(0, backups)
        self._file: BinaryIO = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self._size = os.fstat(self._file.fileno()).st_size

    def write(self, text: str) -> None:
        data = text.encode("utf-8", errors="replace")
        if len(data) > self.max_bytes:
            data = data[:self.max_bytes - 1] + b"\n"
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._file.write(data)
        self._size += len(data)

    def close(self) -> None:
        self._file.close()

    def backup(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def _rotate(self) -> None:
        self._file.close()
        if self.backups:
            for number in range(self.backups - 1, 0, -1):
                if self.backup(number).exists():
                    os.replace(self.backup(number), self.backup(number + 1))
            os.replace(self.path, self.backup(1))
        self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 (truncates)
        self._size = 0


# -- temporaries ------------------------------------------------------------------------------

def owned_temp_prefix(kind: str) -> str:
    """The name prefix of a temporary directory this process makes under the state directory:
    its pid and kernel start time say whose it is, so that a later run can tell a killed
    owner's leftovers from a live one's work (``clear_stale_temporaries``)."""
    pid = os.getpid()
    return f".tmp-{kind}-{pid}-{processes.start_time(pid) or 'unknown'}-"


def clear_stale_temporaries(roots: Iterable[Path], report: RetentionReport,
                            now: dt.datetime) -> None:
    """Removes, under ``roots``, this backend's temporary directories whose owner is gone and
    atomic writes' ``.part`` files, both only once older than ``STALE_AFTER``."""
    for root in roots:
        if not root.is_dir():
            continue
        for path in list(root.rglob(".*")):  # listed first: removing while walking confuses it
            stale_dir = path.name.startswith(".tmp-") and path.is_dir() and not _owner_alive(path)
            stale_part = path.name.endswith(".part") and path.is_file()
            if (stale_dir or stale_part) and _older_than(path, now - STALE_AFTER):
                report.freed_bytes += _remove(path)
                report.temporaries.append(str(path.relative_to(root.parent)))


def _owner_alive(path: Path) -> bool:
    match = TEMP_NAME.match(path.name)
    if match is None:
        return False  # not one of ours as named today: its age alone decides
    start = match["start"]
    return processes.is_running(int(match["pid"]), None if start == "unknown" else start)


# -- what must stay ---------------------------------------------------------------------------

def protected_jobs(jobs: LocalTrainingJobs, registry: LocalRegistry, store: LocalStore,
                   endpoint_models: dict[str, str]) -> dict[str, str]:
    """Job name → why it must stay: an Approved or Pending version names it (its job's record
    and metrics are what the cache lookup returns), or an endpoint that stays serves its
    model (``endpoint_models``: model URI → which endpoint)."""
    needed: dict[str, str] = {}
    for group in _groups(registry):
        for version in registry.versions(group):
            if version.status in (APPROVED, PENDING):
                why = f"{group} v{version.version} is {version.status}"
                needed.setdefault(version.training_job, why)
                if job := _job_of_artifact(store, version.model_uri):
                    needed.setdefault(job, why)
    for uri, endpoint in endpoint_models.items():
        if job := _job_of_artifact(store, uri):
            needed.setdefault(job, f"endpoint {endpoint} serves its model")
    return needed


def _groups(registry: LocalRegistry) -> list[str]:
    if not registry.root.is_dir():
        return []
    names = []
    for path in sorted(registry.root.iterdir()):
        with contextlib.suppress(ValueError):  # not a group's directory
            if path.is_dir() and registry.group_dir(path.name):
                names.append(path.name)
    return names


def _job_of_artifact(store: LocalStore, uri: str | None) -> str | None:
    """The training job whose store prefix holds ``uri``, if any."""
    if not uri or not uri.startswith("file://"):
        return None
    try:
        parts = path_from_uri(uri).resolve().relative_to(store.root).parts
    except ValueError:
        return None
    return parts[1] if len(parts) > 2 and parts[0] == STORE_JOBS_PREFIX else None


# -- endpoints --------------------------------------------------------------------------------

def serving_fleets(serving: LocalServing | None) -> dict[str, str | None]:
    """Every serving endpoint's fleets (→ the model URI its record names, None when unknown):
    never pruned, even with a damaged record or a stopped server."""
    fleets: dict[str, str | None] = {}
    for name in serving.names() if serving is not None else []:
        try:
            record = serving.read_record(name)
        except RECORD_ERRORS:
            record = None  # its fleets are still found by their names and tags
        uris = {ref.fleet: ref.model_uri for ref in (record.current, record.pending) if ref} \
            if record else {}
        for fleet in serving.fleets_of(name, record):
            fleets[fleet] = uris.get(fleet)
    return fleets


def prune_dead_endpoints(endpoints: LocalEndpoints, report: RetentionReport,
                         now: dt.datetime,
                         protected: dict[str, str | None] | None = None) -> dict[str, str]:
    """Removes the directories of endpoints whose server is gone, not kept, untouched for
    ``DEAD_ENDPOINT_GRACE``, and not among ``protected`` (serving fleets → their model URI).
    Returns the model URIs of the endpoints that stay (→ name)."""
    root = endpoints.records.root
    protected = protected or {}
    staying: dict[str, str] = {uri: name for name, uri in protected.items() if uri}
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        name = directory.name
        try:
            endpoints.records.endpoint_dir(name)
        except ValueError:
            continue  # not an endpoint's directory
        info = _describe_endpoint(endpoints, name)
        kept = (info is not None and info.kept) or name in protected
        if kept or _server_alive(endpoints, name) \
                or not _older_than(directory, now - DEAD_ENDPOINT_GRACE, deep=True):
            if info is not None and (model_uri := info.extra.get("model_uri")):
                staying[model_uri] = name
            continue
        size = _size(directory)
        if endpoints.delete(name):
            report.freed_bytes += size
            report.endpoints.append(name)
    return staying


def _describe_endpoint(endpoints: LocalEndpoints, name: str):  # -> EndpointInfo | None
    try:
        return endpoints.describe(name)
    except RECORD_ERRORS:  # a damaged record: neither kept nor serving, as far as anyone knows
        return None


def _server_alive(endpoints: LocalEndpoints, name: str) -> bool:
    try:
        record = endpoints.records.read(name)
    except RECORD_ERRORS:
        return False  # a damaged record comes from a crash its server did not outlive
    return record is not None and processes.is_running(record.pid, record.pid_start)


# -- jobs -------------------------------------------------------------------------------------

def prune_jobs(policy: RetentionPolicy, jobs: LocalTrainingJobs, store: LocalStore,
               needed: dict[str, str], report: RetentionReport, now: dt.datetime) -> None:
    """Removes the job directories and store artifacts past ``keep_jobs`` or ``max_age_days``
    that nothing needs, and what a killed runner left of the channel data of jobs that stay."""
    records = {name: jobs.describe(name) for name in _job_names(jobs, store)}
    ages = {name: now - _created(name, record, jobs, store) for name, record in records.items()}
    newest = sorted(ages, key=lambda name: ages[name])
    keep = set(newest if policy.keep_jobs is None else newest[:policy.keep_jobs])
    max_age = None if policy.max_age_days is None else dt.timedelta(days=policy.max_age_days)
    for name in newest:
        record = records[name]
        past_limits = name not in keep or (max_age is not None and ages[name] > max_age)
        busy = _busy(record, ages[name])
        if busy is None and record is not None and (not past_limits or name in needed) \
                and jobs.release_inputs(name):
            report.inputs_released.append(name)
        if not past_limits:
            continue
        if why := busy or needed.get(name):
            report.protected[name] = why
            continue
        for path in (jobs.jobs_root / name, store.path(f"{STORE_JOBS_PREFIX}/{name}")):
            report.freed_bytes += _remove(path)
        report.jobs.append(name)


def _busy(record: JobRecord | None, age: dt.timedelta) -> str | None:
    """Why a job is in use now, or None."""
    if record is None:  # no readable record: it may be one being created this instant
        return "no readable job.json yet" if age < STALE_AFTER else None
    if record.status == "InProgress":
        return "InProgress"
    runner = record.runner
    if runner.get("pid") != os.getpid() and processes.is_running(runner.get("pid"),
                                                                  runner.get("start")):
        return "the run that trained it is still going"
    return None


def _job_names(jobs: LocalTrainingJobs, store: LocalStore) -> set[str]:
    """Every job with a directory or store artifacts."""
    return _subdirectories(jobs.jobs_root) | _subdirectories(store.path(STORE_JOBS_PREFIX))


def _created(name: str, record: JobRecord | None, jobs: LocalTrainingJobs,
             store: LocalStore) -> dt.datetime:
    """When the job was created, as its record says; without one, when its directory (or its
    store prefix) last changed."""
    with contextlib.suppress(ValueError, TypeError):
        if record is not None:
            created = dt.datetime.fromisoformat(record.created)
            return created if created.tzinfo else created.replace(tzinfo=dt.UTC)
    directory = jobs.jobs_root / name
    if not directory.is_dir():
        directory = store.path(f"{STORE_JOBS_PREFIX}/{name}")
    return dt.datetime.fromtimestamp(directory.stat().st_mtime, dt.UTC)


def _subdirectories(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


# -- logs -------------------------------------------------------------------------------------

def prune_log_backups(jobs_root: Path, backups: int, report: RetentionReport) -> None:
    """Removes rotated training logs numbered past ``backups``."""
    if not jobs_root.is_dir():
        return
    for path in jobs_root.glob("*/training.log.*"):
        match = LOG_BACKUP.match(path.name)
        if match and int(match["n"]) > backups:
            report.freed_bytes += _remove(path)
            report.logs.append(str(path.relative_to(jobs_root)))


# -- the pass ---------------------------------------------------------------------------------

def apply_retention(policy: RetentionPolicy, jobs: LocalTrainingJobs,
                    endpoints: LocalEndpoints, registry: LocalRegistry, store: LocalStore,
                    now: dt.datetime | None = None,
                    serving: LocalServing | None = None) -> RetentionReport:
    """One retention pass over the local backend's state (see the module's docstring)."""
    now = now or dt.datetime.now(dt.UTC)
    report = RetentionReport()
    clear_stale_temporaries([jobs.jobs_root, store.root, endpoints.records.root,
                             registry.root], report, now)
    staying = prune_dead_endpoints(endpoints, report, now, serving_fleets(serving))
    if damaged := [path for group in _groups(registry) for path in registry.unreadable(group)]:
        # An unreadable version may be an Approved one: which job it needs is unknown, so no
        # job goes until its record is mended or removed.
        report.skipped.append(f"no job pruned: {len(damaged)} unreadable registry record(s) "
                              f"({', '.join(map(str, damaged))}) may name a model that must "
                              f"stay; move them aside or delete them")
    else:
        prune_jobs(policy, jobs, store, protected_jobs(jobs, registry, store, staying),
                   report, now)
    prune_log_backups(jobs.jobs_root, policy.log_backups, report)
    return report


# -- files ------------------------------------------------------------------------------------

def _older_than(path: Path, moment: dt.datetime, deep: bool = False) -> bool:
    """Whether ``path`` (with ``deep``, anything directly in it too) last changed before."""
    try:
        paths = [path, *(path.iterdir() if deep and path.is_dir() else [])]
        latest = max(p.lstat().st_mtime for p in paths)
    except FileNotFoundError:
        return False  # gone meanwhile: nothing to do
    return latest < moment.timestamp()


def _size(path: Path) -> int:
    """Bytes that removing ``path`` frees: hard links to files that stay elsewhere free none."""
    if path.is_file() or path.is_symlink():
        info = path.lstat()
        return info.st_size if info.st_nlink == 1 else 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(os.path.join(root, name))
                total += info.st_size if info.st_nlink == 1 else 0
    return total


def _remove(path: Path) -> int:
    """Removes a file or directory tree (gone already: fine); returns the bytes freed."""
    if not path.exists() and not path.is_symlink():
        return 0
    size = _size(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return size

