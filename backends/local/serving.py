"""Local serving endpoints: SageMaker's blue/green deployment guardrails on this machine.

A serving endpoint keeps one URL while the model behind it changes. That URL is a front
process, the router (``backends.local.router``), which takes SageMaker Runtime requests and
sends each to one of the fleets that hold a share of traffic (a weighted random choice per
request). A fleet is a local endpoint (``LocalEndpoints``: one model server process, whatever
the instance count says; the count is recorded) named ``<name>-v<version>-<4 hex>`` and tagged
managed, kept and serving, so neither the reaper nor retention touches it.

The first promotion starts a fleet and the router (outcome ``created``). Each later one starts
the new fleet, waits for its ``/ping``, then moves traffic as ``TrafficShift`` says (canary,
linear or all at once), then bakes at 100%, watching the new fleet's 5xx share and p99 latency
(measured by the router, per fleet) against ``RollbackAlarms`` over each wait interval and the
baking period. A breach, or the update running past ``max_seconds``, moves all traffic back to
the old fleet at once and stops the new one (``rolled_back``). After baking, the old fleet gets
no more requests, its requests in flight finish (the router reports them per fleet), and only
then do its processes stop: a request that started on a fleet finishes there.

Alarms judge what arrived, as CloudWatch alarms do: at the end of each interval, whatever the
new fleet answered in it (nothing: no breach); before the end, only once it has answered
``MIN_INVOCATIONS`` requests, so a load that reveals a bad model rolls it back early while one
early failure among a handful does not.

``<root>/<name>/`` holds ``record.json`` (status, what serves, the update in progress, the last
deployment: written by the promoting process under ``.lock``), ``routing.json`` (the fleets and
their weights: written by the promoting process, read by the router), ``router.json`` (the
router's pid and port: written by the router), ``router.log`` and ``router.out``. A promoting
process that dies mid-update leaves the record ``Updating`` and the lock free: the next
``describe`` or ``promote`` rolls the update back and says so.
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
import secrets
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import (
    ALL_AT_ONCE,
    CANARY,
    CREATED,
    FAILED,
    IN_SERVICE,
    KEPT_KEY,
    LINEAR,
    MANAGED_BY_KEY,
    MANAGED_BY_VALUE,
    OWNER_KEY,
    PROMOTED,
    ROLLED_BACK,
    ROLLING_BACK,
    SERVING_KEY,
    UPDATE_ROLLBACK_FAILED,
    UPDATING,
    BackendError,
    EndpointSpec,
    LogCallback,
    PromotionResult,
    PromotionStep,
    RollbackAlarms,
    ServingSpec,
    ServingStatus,
    TrafficShift,
    managed_tags,
)
from backends.files import UnreadableRecord, atomic_write_text, read_json_record
from backends.local import processes
from backends.local.endpoints import NAME_PATTERN, SERVER_THREADS, LocalEndpoints
from backends.local.launcher import launch
from backends.polling import poll

RECORD_FILE, ROUTING_FILE, ROUTER_FILE = "record.json", "routing.json", "router.json"
ROUTER_OUTPUT_FILE, ROUTER_LOG_FILE, LOCK_FILE = "router.out", "router.log", ".lock"
# The tag that names a fleet's serving endpoint (besides SERVING_KEY, which marks it).
SERVING_ENDPOINT_KEY = "serving-endpoint"
# The response header that says which registry version answered.
VERSION_HEADER = "x-cifar10-model-version"
CREATING, FAILED_STATUS, UNKNOWN = "Creating", "Failed", "Unknown"
# Invocations of the new fleet in an interval before its alarms may fire early (see above).
MIN_INVOCATIONS = 20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetRef:
    """A fleet: the local endpoint that serves one registry version."""

    fleet: str
    group: str
    version: int
    model_uri: str
    url: str


@dataclass
class ServingRecord:
    """``record.json``: a flat JSON object whose keys are these fields' names."""

    name: str
    status: str  # Creating | InService | Updating | RollingBack | UpdateRollbackFailed
    created: str
    tags: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # the router's: stable, its port reused when the router restarts
    current: FleetRef | None = None
    pending: FleetRef | None = None  # the fleet an update in progress brings
    retiring: list[str] = field(default_factory=list)  # fleets to stop once drained
    driver_pid: int | None = None  # the promoting process, while it promotes
    driver_start: str | None = None
    last_deployment: str | None = None
    last_outcome: str | None = None
    last_reason: str | None = None
    unknown: dict[str, Any] = field(default_factory=dict)  # a newer version's keys, kept

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServingRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("current", "pending"):
            if values.get(key) is not None:
                values[key] = FleetRef(**values[key])
        record = cls(**values, unknown={k: v for k, v in data.items() if k not in known})
        if not all(isinstance(v, str) for v in (record.name, record.status, record.created)) \
                or not isinstance(record.tags, dict) or not isinstance(record.retiring, list):
            raise ValueError("a field holds a value of the wrong kind")
        return record

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {**data.pop("unknown"), **data}


@dataclass(frozen=True)
class Window:
    """What the router saw of one fleet since an interval began."""

    invocations: int  # answered
    errors: int  # of them 5xx (a ModelError whose original status is 5xx included)
    p99_ms: float | None  # over the answered ones and the ages of those still in flight
    in_flight: int

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.invocations if self.invocations else None


@dataclass
class Promotion:
    """One update in progress."""

    spec: ServingSpec
    record: ServingRecord
    old: FleetRef
    new: FleetRef
    deadline: float  # time.monotonic() past which the update is rolled back
    emit: LogCallback
    steps: list[PromotionStep] = field(default_factory=list)
    window: Window | None = None  # the last one measured

    @property
    def url(self) -> str:
        return self.record.url or ""


def judge(window: Window, alarms: RollbackAlarms, phase: str, final: bool) -> str | None:
    """Why ``window`` breaches ``alarms``, None when it does not. Before
    an interval's end (``final``) only with ``MIN_INVOCATIONS`` requests seen."""
    samples = window.invocations + window.in_flight
    rate = window.error_rate
    if rate is not None and (final or window.invocations >= MIN_INVOCATIONS) \
            and rate > alarms.max_error_rate:
        return f"5xx rate {rate:.2f} > {alarms.max_error_rate:g} during {phase}"
    if window.p99_ms is not None and (final or samples >= MIN_INVOCATIONS) \
            and window.p99_ms > alarms.max_p99_latency_ms:
        return (f"p99 latency {window.p99_ms:.0f} ms > {alarms.max_p99_latency_ms:g} ms "
                f"during {phase}")
    return None


def traffic_plan(shift: TrafficShift) -> list[tuple[float, str, str]]:
    """(new fleet's share, what the shift is called, the phase watched after it) for each
    shift of a ``TrafficShift``; the last is 100%, watched as the baking period."""
    percent = shift.percent
    if shift.strategy == ALL_AT_ONCE:
        return [(1.0, "all traffic", "baking")]
    if shift.strategy == CANARY:
        return [(percent / 100, f"canary {percent}%", "canary"),
                (1.0, "all traffic", "baking")]
    steps = -(-100 // percent)  # ceil
    return [(min(1.0, k * percent / 100), f"linear {min(100, k * percent)}%",
             "baking" if k * percent >= 100 else f"linear step {k}")
            for k in range(1, steps + 1)]


def validate(spec: ServingSpec) -> None:
    """BackendError when the spec asks what SageMaker's guardrails refuse (times may be shorter
    than SageMaker's minimums here: tests and trials use seconds)."""
    shift = spec.shift
    if shift.strategy not in (ALL_AT_ONCE, CANARY, LINEAR):
        raise BackendError(f"unknown traffic shift {shift.strategy!r}: all_at_once, canary or "
                           f"linear")
    if shift.strategy == CANARY and not 1 <= shift.percent <= 50:
        raise BackendError(f"canary size {shift.percent}% is outside 1-50%")
    if shift.strategy == LINEAR and not 10 <= shift.percent <= 50:
        raise BackendError(f"linear step {shift.percent}% is outside 10-50%")
    if not (0 <= shift.wait_seconds <= 3600 and 0 <= shift.baking_seconds <= 3600
            and 0 < shift.max_seconds <= 28800):
        raise BackendError("wait and baking times must lie within 0-3600 s, max_seconds within "
                           "1-28800 s")
    if not NAME_PATTERN.match(spec.name):
        raise BackendError(f"invalid serving endpoint name {spec.name!r}")


def fleet_name(name: str, version: int) -> str:
    """``<name>-v<version>-<4 hex>``, the name cut to keep it within 63 characters."""
    suffix = f"-v{version}-{secrets.token_hex(2)}"
    return name[:63 - len(suffix)].rstrip("-") + suffix


def fleet_pattern(name: str) -> re.Pattern[str]:
    """The names ``fleet_name`` gives ``name``'s fleets (uncut names)."""
    return re.compile(rf"^{re.escape(name)}-v\d+-[0-9a-f]{{4}}$")


def serving_tags(spec: ServingSpec) -> dict[str, str]:
    """The spec's tags, with what keeps the endpoint and its fleets from reapers: managed,
    kept, serving, and which serving endpoint."""
    owner = spec.tags.get(OWNER_KEY, "serving")
    return {**managed_tags(owner, kept=True), **spec.tags, MANAGED_BY_KEY: MANAGED_BY_VALUE,
            KEPT_KEY: "true", SERVING_KEY: "true", SERVING_ENDPOINT_KEY: spec.name}


def router_get(url: str, path: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``path`` from the router as JSON (no proxy: it listens on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + path, timeout=timeout) as response:
        return json.loads(response.read())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp() -> str:
    return _now().isoformat(timespec="seconds")


def _step(action: str, share: float, window: Window | None = None,
          note: str = "") -> PromotionStep:
    return PromotionStep(
        at=_now(), action=action, new_share=share, note=note,
        error_rate=window.error_rate if window else None,
        p99_latency_ms=window.p99_ms if window else None,
        invocations=window.invocations if window else None)


class LocalServing:
    """Serving endpoints under ``root``, their fleets in ``endpoints``."""

    def __init__(self, root: Path, endpoints: LocalEndpoints, python: str = sys.executable,
                 poll_seconds: float = 0.1, drain_timeout_seconds: float = 60.0,
                 router_timeout_seconds: float = 120.0) -> None:
        self.root = Path(root)
        self.endpoints = endpoints
        self.python = python
        self.poll_seconds = poll_seconds
        self.drain_timeout_seconds = drain_timeout_seconds
        self.router_timeout_seconds = router_timeout_seconds

    # -- records ------------------------------------------------------------------------------

    def serving_dir(self, name: str) -> Path:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid serving endpoint name {name!r}: letters, digits and "
                             f"hyphens, at most 63 characters")
        return self.root / name

    def read_record(self, name: str) -> ServingRecord | None:
        """The record, None when there is none; ``UnreadableRecord`` when it is damaged."""
        path = self.serving_dir(name) / RECORD_FILE
        try:
            data = read_json_record(path)
        except FileNotFoundError:
            return None
        try:
            return ServingRecord.from_json(data)
        except (TypeError, ValueError, KeyError) as e:
            raise UnreadableRecord(path, f"{type(e).__name__}: {e}") from e

    def _write(self, record: ServingRecord) -> None:
        directory = self.serving_dir(record.name)
        if not directory.is_dir():  # deleted meanwhile: do not resurrect it
            raise FileNotFoundError(f"serving endpoint {record.name} was deleted")
        atomic_write_text(directory / RECORD_FILE, json.dumps(record.to_json(), indent=2))

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[bool]:
        """Tries the endpoint's promotion lock: True while held. The kernel frees it when its
        holder dies, so a free lock under an ``Updating`` record means the update was cut."""
        try:
            lock = open(self.serving_dir(name) / LOCK_FILE, "a")  # noqa: SIM115
        except FileNotFoundError:
            yield False
            return
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True

    # -- promote ------------------------------------------------------------------------------

    def promote(self, spec: ServingSpec, on_log: LogCallback | None = None) -> PromotionResult:
        """Creates the serving endpoint or updates it blue/green (see the module docstring).
        ``BackendError`` for a spec SageMaker would refuse; every other end is an outcome."""
        validate(spec)
        emit = on_log or (lambda line: None)
        self.serving_dir(spec.name).mkdir(parents=True, exist_ok=True)
        with self._lock(spec.name) as held:
            if not held:
                return self._busy(spec)
            try:
                record = self._recover(spec.name, emit)
            except UnreadableRecord as e:
                return PromotionResult(spec.name, FAILED, str(e), UNKNOWN, None)
            if record is None or record.current is None:
                return self._create(spec, emit)
            return self._update(spec, record, emit)

    def _busy(self, spec: ServingSpec) -> PromotionResult:
        """Another process (or thread) is promoting to this endpoint: SageMaker refuses an
        update of an endpoint that is updating, and so does this."""
        with contextlib.suppress(UnreadableRecord):
            if record := self.read_record(spec.name):
                return PromotionResult(
                    spec.name, FAILED, f"another promotion of {spec.name} is in progress "
                    f"(pid {record.driver_pid})", record.status,
                    record.current.version if record.current else None)
        return PromotionResult(spec.name, FAILED, f"another promotion of {spec.name} is in "
                               f"progress", UPDATING, None)

    def _create(self, spec: ServingSpec, emit: LogCallback) -> PromotionResult:
        """The first promotion: a fleet, the router, all traffic to the fleet."""
        record = ServingRecord(name=spec.name, status=CREATING, created=_stamp(),
                               tags=serving_tags(spec), driver_pid=os.getpid(),
                               driver_start=processes.start_time(os.getpid()))
        self._write(record)
        try:
            record.current = self._start_fleet(spec, emit)
            self._write(record)
            record.url = self._start_router(spec.name, None, emit)
            self._route(record, [(record.current, 1.0)])
        except BaseException as e:
            self._delete(spec.name)
            if not isinstance(e, Exception):
                raise
            emit(f"serving {spec.name}: creation failed: {e}")
            return PromotionResult(spec.name, FAILED, f"{type(e).__name__}: {e}",
                                   FAILED_STATUS, None)
        self._settle(record, CREATED, "", f"created with v{spec.version}")
        emit(f"serving {spec.name}: InService at {record.url} with v{spec.version}")
        return PromotionResult(spec.name, CREATED, "", IN_SERVICE, spec.version,
                               [_step("created", 1.0)])

    def _settle(self, record: ServingRecord, outcome: str, reason: str, what: str) -> None:
        """Records the end of a deployment: InService, nothing pending."""
        record.status, record.pending, record.retiring = IN_SERVICE, None, []
        record.driver_pid = record.driver_start = None
        record.last_outcome, record.last_reason = outcome, reason
        record.last_deployment = f"{what} ({_stamp()})"
        self._write(record)

    def _update(self, spec: ServingSpec, record: ServingRecord,
                emit: LogCallback) -> PromotionResult:
        old = record.current
        assert old is not None
        if (old.version, old.model_uri) == (spec.version, spec.model_uri) \
                and self._alive(old.fleet):
            return PromotionResult(spec.name, PROMOTED, f"v{spec.version} already serves",
                                   IN_SERVICE, spec.version)
        self._ensure_router(record, emit)
        record.status, record.driver_pid = UPDATING, os.getpid()
        record.driver_start = processes.start_time(os.getpid())
        record.pending = FleetRef(fleet_name(spec.name, spec.version), spec.group,
                                  spec.version, spec.model_uri, "")
        self._write(record)  # before the fleet starts: a crash from here on is recovered
        deadline = time.monotonic() + spec.shift.max_seconds
        try:
            new = self._start_fleet(spec, emit, record.pending.fleet)
        except Exception as e:
            self._stop_fleet(record.pending.fleet)
            reason = f"the new fleet did not start: {e}"
            self._settle(record, FAILED, reason, f"failed to deploy v{spec.version}: {reason}")
            return PromotionResult(spec.name, FAILED, reason, IN_SERVICE, old.version)
        record.pending = new
        self._write(record)
        promotion = Promotion(spec, record, old, new, deadline, emit,
                              [_step("new fleet InService", 0.0)])
        if not self._alive(old.fleet):
            return self._replace(promotion)
        return self._run(promotion)

    def _run(self, p: Promotion) -> PromotionResult:
        """Shifts, watches, and completes or rolls back."""
        try:
            reason = self._shift(p)
        except Exception as e:  # the router or a fleet stopped answering
            return self._roll_back(p, f"{type(e).__name__}: {e}", FAILED)
        except BaseException:  # interrupted (Ctrl-C, a cancelled run): the old model serves on
            self._roll_back(p, "the promotion was interrupted", FAILED)
            raise
        if reason:
            return self._roll_back(p, reason, ROLLED_BACK)
        return self._finish(p)

    def _shift(self, p: Promotion) -> str | None:
        """Moves traffic step by step, watching each step: the first breach, or None."""
        shift = p.spec.shift
        for share, action, phase in traffic_plan(shift):
            self._route(p.record, [(p.old, 1.0 - share), (p.new, share)])
            p.steps.append(_step(action, share))
            p.emit(f"serving {p.spec.name}: {action}: v{p.new.version} takes {share:.0%}")
            seconds = shift.baking_seconds if share >= 1.0 else shift.wait_seconds
            if reason := self._watch(p, phase, share, seconds):
                return reason
        return None

    def _watch(self, p: Promotion, phase: str, share: float, seconds: float) -> str | None:
        """Watches the new fleet for ``seconds`` (within the update's deadline): why its alarms
        fired, or None."""
        after = self._completed(p)
        end = min(time.monotonic() + seconds, p.deadline)
        while True:
            now = time.monotonic()
            final = now >= end
            p.window = self._window(p, after)
            if reason := judge(p.window, p.spec.alarms, phase, final):
                return reason
            if now >= p.deadline:
                return (f"the update ran past its {p.spec.shift.max_seconds} s limit "
                        f"(max_seconds) during {phase}")
            if final:
                break
            time.sleep(min(self.poll_seconds, end - now))
        p.steps.append(_step(f"watched {phase}", share, p.window))
        return None

    def _completed(self, p: Promotion) -> int:
        fleets = router_get(p.url, "/_router/stats")["fleets"]
        return int(fleets.get(p.new.fleet, {}).get("completed", 0))

    def _window(self, p: Promotion, after: int) -> Window:
        query = urllib.parse.urlencode({"fleet": p.new.fleet, "after": after})
        window = router_get(p.url, f"/_router/stats?{query}")["window"]
        return Window(int(window["invocations"]), int(window["errors"]), window["p99_ms"],
                      int(window["in_flight"]))

    def _finish(self, p: Promotion) -> PromotionResult:
        """Baked: the new fleet serves; the old one, drained, stops."""
        record = p.record
        record.current, record.pending, record.retiring = p.new, None, [p.old.fleet]
        self._write(record)  # a crash from here on finishes forward, never back
        started = time.monotonic()
        drained = self._drain(p.url, p.old.fleet)
        self._route(record, [(p.new, 1.0)])
        self._stop_fleet(p.old.fleet)
        note = (f"drained in {time.monotonic() - started:.1f} s" if drained else
                f"requests still in flight after {self.drain_timeout_seconds:g} s were cut")
        p.steps.append(_step("old fleet stopped", 1.0, note=note))
        self._settle(record, PROMOTED, "",
                     f"promoted v{p.new.version} ({self._strategy(p.spec)})")
        p.emit(f"serving {p.spec.name}: v{p.new.version} serves; v{p.old.version}'s fleet "
               f"{p.old.fleet} stopped ({note})")
        return PromotionResult(p.spec.name, PROMOTED, "", IN_SERVICE, p.new.version, p.steps)

    @staticmethod
    def _strategy(spec: ServingSpec) -> str:
        shift = spec.shift
        return shift.strategy if shift.strategy == ALL_AT_ONCE else \
            f"{shift.strategy} {shift.percent}%"

    def _replace(self, p: Promotion) -> PromotionResult:
        """The old fleet is not running: there is nothing to protect or roll back to, so all
        traffic moves at once."""
        self._route(p.record, [(p.new, 1.0)])
        self._stop_fleet(p.old.fleet)
        note = f"the old fleet {p.old.fleet} was not running: all traffic moved at once"
        p.steps.append(_step("all traffic", 1.0, note=note))
        p.record.current = p.new
        self._settle(p.record, PROMOTED, note, f"promoted v{p.new.version} ({note})")
        p.emit(f"serving {p.spec.name}: {note}")
        return PromotionResult(p.spec.name, PROMOTED, note, IN_SERVICE, p.new.version, p.steps)

    def _roll_back(self, p: Promotion, reason: str, outcome: str) -> PromotionResult:
        """All traffic back to the old fleet at once; the new one drains and stops."""
        p.emit(f"serving {p.spec.name}: rolling back v{p.new.version}: {reason}")
        record = p.record
        try:
            record.status = ROLLING_BACK
            self._write(record)
            self._route(record, [(p.old, 1.0), (p.new, 0.0)])
            p.steps.append(_step("rolled back", 0.0, p.window, note=reason))
            self._drain(p.url, p.new.fleet)
            self._route(record, [(p.old, 1.0)])
        except Exception as e:
            return self._rollback_failed(p, reason, e)
        finally:
            self._stop_fleet(p.new.fleet)
        self._settle(record, outcome, reason, f"rolled back v{p.new.version}: {reason}")
        return PromotionResult(p.spec.name, outcome, reason, IN_SERVICE, p.old.version,
                               p.steps)

    def _rollback_failed(self, p: Promotion, reason: str, error: Exception) -> PromotionResult:
        why = f"{reason}; the rollback failed too: {type(error).__name__}: {error}"
        p.emit(f"serving {p.spec.name}: {why}")
        p.record.status, p.record.pending = UPDATE_ROLLBACK_FAILED, None
        p.record.last_outcome, p.record.last_reason = FAILED, why
        p.record.last_deployment = f"rollback of v{p.new.version} failed ({_stamp()})"
        with contextlib.suppress(OSError):  # deleted meanwhile: nothing left to record
            self._write(p.record)
        return PromotionResult(p.spec.name, FAILED, why, UPDATE_ROLLBACK_FAILED,
                               p.old.version, p.steps)

    # -- fleets and the router ----------------------------------------------------------------

    def _start_fleet(self, spec: ServingSpec, emit: LogCallback,
                     name: str | None = None) -> FleetRef:
        name = name or fleet_name(spec.name, spec.version)
        info = self.endpoints.deploy(EndpointSpec(
            name=name, model_uri=spec.model_uri, instance_type=spec.instance_type,
            instance_count=spec.instance_count, tags=serving_tags(spec)), emit)
        return FleetRef(name, spec.group, spec.version, spec.model_uri, info.url or "")

    def _stop_fleet(self, name: str) -> None:
        self.endpoints.delete(name)

    def _alive(self, fleet: str) -> bool:
        info = self.endpoints.describe(fleet)
        return info is not None and info.status == IN_SERVICE

    def router_state(self, name: str) -> dict[str, Any] | None:
        """``router.json`` when its process is alive, else None."""
        try:
            state = read_json_record(self.serving_dir(name) / ROUTER_FILE)
        except (FileNotFoundError, UnreadableRecord):
            return None
        alive = processes.is_running(state.get("pid"), state.get("pid_start"))
        return state if alive else None

    def _ensure_router(self, record: ServingRecord, emit: LogCallback) -> None:
        """Restarts a router that died (a crash, a reboot), on its old port when it is free."""
        if self.router_state(record.name) is not None:
            return
        port = urllib.parse.urlsplit(record.url).port if record.url else None
        url = self._start_router(record.name, port, emit)
        if url != record.url:
            emit(f"serving {record.name}: the router moved from {record.url} to {url} (its "
                 f"port was taken)")
        record.url = url
        self._write(record)

    def _start_router(self, name: str, port: int | None, emit: LogCallback) -> str:
        """Starts the router, detached like a model server; returns its URL once it answers."""
        directory = self.serving_dir(name)
        (directory / ROUTER_FILE).unlink(missing_ok=True)
        argv = [self.python, "-m", "backends.local.router", "--name", name,
                "--dir", str(directory), *(["--port", str(port)] if port else [])]
        with open(directory / ROUTER_OUTPUT_FILE, "wb") as output:
            proc = launch(argv, output=output.fileno(), cwd=directory, die_with_parent=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **SERVER_THREADS})

        def check() -> str | None:
            state = self.router_state(name)
            if state is not None and state.get("pid") == proc.pid:
                return f"http://{state['host']}:{state['port']}"
            if proc.poll() is not None:
                raise BackendError(f"the router of {name} exited with {proc.poll()}: "
                                   f"{self._router_tail(name)}")
            return None

        url = poll(check, interval=0.05, timeout=self.router_timeout_seconds,
                   on_timeout=lambda s: BackendError(f"the router of {name} did not start in "
                                                     f"{s:.0f} s: {self._router_tail(name)}"))
        emit(f"serving {name}: router {proc.pid} at {url}")
        return url

    def _router_tail(self, name: str) -> str:
        texts = []
        for file in (ROUTER_OUTPUT_FILE, ROUTER_LOG_FILE):
            with contextlib.suppress(OSError):
                texts.extend((self.serving_dir(name) / file).read_text(
                    errors="replace").splitlines()[-10:])
        return "\n".join(texts[-10:])

    def _route(self, record: ServingRecord, weights: list[tuple[FleetRef, float]]) -> None:
        """Writes the routing (atomically) and waits until the router has loaded it: requests
        it routes from then on follow the new weights."""
        path = self.serving_dir(record.name) / ROUTING_FILE
        try:
            generation = int(read_json_record(path).get("generation", 0)) + 1
        except (FileNotFoundError, UnreadableRecord, TypeError, ValueError):
            generation = 1
        fleets = [{"name": ref.fleet, "url": ref.url, "version": ref.version, "weight": weight}
                  for ref, weight in weights]
        atomic_write_text(path, json.dumps({"generation": generation, "endpoint": record.name,
                                            "fleets": fleets}, indent=2))
        url = record.url or ""
        poll(lambda: True if router_get(url, "/_router/stats")["generation"] >= generation
             else None, interval=0.02, timeout=10,
             on_timeout=lambda s: BackendError(f"the router at {url} did not load routing "
                                               f"generation {generation} in {s:.0f} s"))

    def _drain(self, url: str, fleet: str) -> bool:
        """Waits until no request routed to ``fleet`` is in flight (the router routes it none
        by now); False when some still were after ``drain_timeout_seconds``."""
        deadline = time.monotonic() + self.drain_timeout_seconds
        while time.monotonic() < deadline:
            stats = router_get(url, "/_router/stats")["fleets"].get(fleet, {})
            if not stats.get("in_flight"):
                return True
            time.sleep(0.02)
        return False

    # -- recovery -----------------------------------------------------------------------------

    def _recover(self, name: str, emit: LogCallback) -> ServingRecord | None:
        """Under the promotion lock: finishes what a promoting process that died left (an
        update is rolled back, retiring fleets stop, a half-made endpoint goes). The record as
        it stands after, None when there is none."""
        record = self.read_record(name)
        if record is None or record.status == CREATING:
            if record is not None:
                emit(f"serving {name}: the process creating it (pid {record.driver_pid}) is "
                     f"gone; removing what it left")
                self._delete(name, keep_directory=True)  # its lock is held: keep that file
            return None
        if record.status in (UPDATING, ROLLING_BACK):
            self._recover_update(record, emit)
        for fleet in record.retiring:
            self._stop_fleet(fleet)
        if record.retiring:
            record.retiring = []
            self._write(record)
        return record

    def _recover_update(self, record: ServingRecord, emit: LogCallback) -> None:
        """Rolls back an update whose promoting process died (forward instead when only the
        new fleet still runs)."""
        old, new = record.current, record.pending
        assert old is not None  # an update always has a fleet to go back to
        reason = f"the promoting process (pid {record.driver_pid}) died mid-update"
        outcome, what = ROLLED_BACK, f"rolled back v{new.version if new else '?'}"
        if new is not None and not self._alive(old.fleet) and self._alive(new.fleet):
            old, new, outcome = new, old, PROMOTED  # only the new fleet is left: it serves
            what = f"promoted v{old.version} (its old fleet had stopped)"
        emit(f"serving {record.name}: {reason}: {what}")
        self._ensure_router(record, emit)
        self._route(record, [(old, 1.0)])
        if new is not None:
            self._stop_fleet(new.fleet)
        record.current = old
        self._settle(record, outcome, reason, f"{what}: {reason}")

    # -- describe and delete ------------------------------------------------------------------

    def describe(self, name: str) -> ServingStatus | None:
        """The serving endpoint, None when there is none; status Unknown (with a warning) when
        its record is damaged. An update whose promoting process died is rolled back first."""
        if not self.serving_dir(name).is_dir():
            return None
        try:
            record = self.read_record(name)
            if record is not None and record.status in (CREATING, UPDATING, ROLLING_BACK):
                record = self._recover_unlocked(name, record)
        except UnreadableRecord as e:
            log.warning("serving endpoint %s is in an unknown state: %s", name, e)
            return ServingStatus(name=name, status=UNKNOWN, group=None, version=None,
                                 model_uri=None, extra={"unreadable": str(e)})
        return self._status(record) if record is not None else None

    def _recover_unlocked(self, name: str, record: ServingRecord) -> ServingRecord | None:
        """Recovers a cut promotion when nobody holds the promotion lock (one that is running
        holds it: its record stays as it is). A recovery that fails is a warning: describe
        reports what the record says."""
        with self._lock(name) as held:
            if not held:
                return record
            try:
                return self._recover(name, lambda line: log.warning("%s", line))
            except (BackendError, OSError) as e:
                log.warning("serving endpoint %s: recovering its cut promotion failed: %s: %s",
                            name, type(e).__name__, e)
        return self.read_record(name)

    def _status(self, record: ServingRecord) -> ServingStatus:
        router = self.router_state(record.name)
        current = record.current
        status, problem = record.status, None
        if status == IN_SERVICE and router is None:
            status, problem = FAILED_STATUS, "the router process is gone: promote again"
        elif status == IN_SERVICE and current is not None and not self._alive(current.fleet):
            status, problem = FAILED_STATUS, (f"the model server of fleet {current.fleet} is "
                                              f"gone: promote again")
        fleets = {ref.fleet: {"version": ref.version, "url": ref.url,
                              "pid": self._fleet_pid(ref.fleet)}
                  for ref in (record.current, record.pending) if ref is not None}
        extra = {"fleets": fleets, "router_pid": router and router.get("pid"),
                 "pending_version": record.pending.version if record.pending else None,
                 "last_outcome": record.last_outcome, "last_reason": record.last_reason,
                 "problem": problem, "tags": record.tags,
                 "log": str(self.serving_dir(record.name) / ROUTER_LOG_FILE)}
        return ServingStatus(
            name=record.name, status=status, group=current and current.group,
            version=current and current.version, model_uri=current and current.model_uri,
            url=record.url, last_deployment=record.last_deployment, extra=extra)

    def _fleet_pid(self, fleet: str) -> int | None:
        info = self.endpoints.describe(fleet)
        return info.extra.get("pid") if info is not None else None

    def delete(self, name: str) -> bool:
        """Stops the router and every fleet, and removes the endpoint's directory. Missing:
        False. It does not wait for a promotion in progress: that one fails."""
        if not self.serving_dir(name).is_dir():
            return False
        self._delete(name)
        return True

    def _delete(self, name: str, keep_directory: bool = False) -> None:
        directory = self.serving_dir(name)
        try:
            record = self.read_record(name)
        except UnreadableRecord as e:
            log.warning("serving endpoint %s: %s; deleting it all the same", name, e)
            record = None
        if router := self.router_state(name):
            processes.terminate_group(router["pid"], router.get("pid_start"), grace_seconds=10)
        for fleet in self.fleets_of(name, record):
            self._stop_fleet(fleet)
        if keep_directory:
            for path in directory.iterdir():
                if path.name != LOCK_FILE:
                    path.unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory)

    def fleets_of(self, name: str, record: ServingRecord | None = None) -> list[str]:
        """The fleets the record names, and every local endpoint tagged as this endpoint's or
        named as its fleets are (one started a moment before its record said so)."""
        named = {ref.fleet for ref in (record.current, record.pending) if ref} if record else set()
        named |= set(record.retiring) if record else set()
        pattern = fleet_pattern(name)
        for endpoint in self.endpoints.records.names():
            if endpoint in named or pattern.match(endpoint):
                named.add(endpoint)
                continue
            with contextlib.suppress(ValueError, OSError):
                info = self.endpoints.describe(endpoint)
                if info is not None and info.tags.get(SERVING_ENDPOINT_KEY) == name:
                    named.add(endpoint)
        return sorted(named)

    def names(self) -> list[str]:
        """The serving endpoints that have a directory here."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_PATTERN.match(p.name))
