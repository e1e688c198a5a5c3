"""The local serving endpoint for real: a router process in front of fleets of model servers,
promoted blue/green under load from four boto3 sagemaker-runtime clients, as SageMaker's
deployment guardrails promote an endpoint: a good model takes over (canary), a failing one and
a slow one are rolled back on their alarms, and a promotion whose process dies is rolled back
by the next describe. The models are tiny handlers that tell who they are."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from backends.base import (
    CANARY,
    CREATED,
    FAILED,
    IN_SERVICE,
    KEPT_KEY,
    LINEAR,
    PROMOTED,
    ROLLED_BACK,
    SERVING_KEY,
    PromotionResult,
    RollbackAlarms,
    ServingSpec,
    ServingStatus,
    TrafficShift,
    managed_tags,
)
from backends.local import LocalBackend, processes
from backends.local.retention import RetentionPolicy, apply_retention
from backends.local.serving import ROUTING_FILE, VERSION_HEADER
from backends.polling import poll
from tests.support.serving_load import Answer, Load, invoke, make_model, runtime_client

pytestmark = pytest.mark.long_running

NAME = "cifar10-serving-test"
REPO = Path(__file__).resolve().parents[1]

def spec(version: int, model_uri: str, name: str = NAME, strategy: str = CANARY,
         percent: int = 10, wait: int = 3, baking: int = 1, max_seconds: int = 120,
         alarms: RollbackAlarms | None = None) -> ServingSpec:
    return ServingSpec(
        name=name, model_uri=model_uri, group="cifar10-test", version=version,
        shift=TrafficShift(strategy=strategy, percent=percent, wait_seconds=wait,
                           baking_seconds=baking, max_seconds=max_seconds),
        alarms=alarms or RollbackAlarms(max_error_rate=0.05, max_p99_latency_ms=2000),
        tags={**managed_tags("pytest", kept=True), SERVING_KEY: "true"})


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> LocalBackend:
    return LocalBackend(root=tmp_path_factory.mktemp("serving-backend"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("serving-models")
    return {"good-1": make_model(directory, "good-1"),
            "good-2": make_model(directory, "good-2"),
            "failing": make_model(directory, "failing", fail_every=10),
            "slow": make_model(directory, "slow", sleep=0.5)}


@dataclass(frozen=True)
class Created:
    """The first promotion, as it was right after it (later tests promote again)."""

    result: PromotionResult
    lines: list[str]
    status: ServingStatus
    fleet: str
    fleet_tags: dict[str, str]
    answer: Answer


@pytest.fixture(scope="module")
def serving(backend, models) -> Iterator[Created]:
    """The serving endpoint NAME, created with version 1 for this module's tests."""
    lines: list[str] = []
    result = backend.serving.promote(spec(1, models["good-1"]), on_log=lines.append)
    status = backend.serving.describe(NAME)
    fleet, _ = current_fleet(backend)
    yield Created(result, lines, status, fleet, backend.endpoints.describe(fleet).tags,
                  invoke(runtime_client(status.url), NAME))
    backend.serving.delete(NAME)


def step(result, action: str):
    return next(s for s in result.steps if s.action == action)


def current_fleet(backend) -> tuple[str, int]:
    """(name, server pid) of the fleet that serves NAME now."""
    status = backend.serving.describe(NAME)
    (fleet, info), = status.extra["fleets"].items()
    return fleet, info["pid"]


def test_first_promotion_creates_the_endpoint_with_kept_fleets(serving):
    result, status = serving.result, serving.status
    assert (result.outcome, result.status, result.serving_version) == (CREATED, IN_SERVICE, 1)
    assert (status.status, status.version, status.group) == (IN_SERVICE, 1, "cifar10-test")
    assert status.url.startswith("http://127.0.0.1:")
    assert status.last_deployment.startswith("created with v1")
    assert re.fullmatch(rf"{NAME}-v1-[0-9a-f]{{4}}", serving.fleet)
    tags = serving.fleet_tags
    assert tags[KEPT_KEY] == tags[SERVING_KEY] == "true"  # neither reaped nor pruned
    answer = serving.answer
    assert (answer.ok, answer.version, answer.body, answer.content_type) == (
        True, "1", {"model": "good-1"}, "application/json")
    assert any("InService" in line for line in serving.lines)


def test_canary_promotion_of_a_good_model_loses_nothing(backend, serving, models):
    before = backend.serving.describe(NAME)
    old_fleet, old_pid = current_fleet(backend)
    old = str(before.version)
    with Load(before.url, NAME) as load:
        result = backend.serving.promote(spec(2, models["good-2"], percent=10, wait=4))
        returned = time.time()
        time.sleep(0.5)
    assert result.outcome == PROMOTED, result.reason
    assert [a for a in load.answers if not a.ok] == []
    assert all(a.body == {"model": f"good-{a.version}"} and a.content_type == "application/json"
               for a in load.answers)
    ready = step(result, "new fleet InService").at
    shifted, watched = step(result, "canary 10%").at, step(result, "watched canary").at
    canary = [a for a in load.answers
              if a.started >= shifted.timestamp() and a.ended <= watched.timestamp()]
    share = sum(a.version == "2" for a in canary) / len(canary)
    # ±5 points is 4 sigma at 576 invocations; a slower machine sends fewer: 4 sigma then.
    tolerance = max(0.05, 4 * math.sqrt(0.1 * 0.9 / len(canary)))
    assert len(canary) >= 50 and abs(share - 0.10) <= tolerance, (len(canary), share)
    assert {a.version for a in load.answers if a.ended < ready.timestamp()} == {old}
    after = [a for a in load.answers if a.started > returned]
    assert after and {a.version for a in after} == {"2"}
    assert not processes.is_running(old_pid, None)
    assert backend.endpoints.describe(old_fleet) is None
    status = backend.serving.describe(NAME)
    assert (status.status, status.version, status.url) == (IN_SERVICE, 2, before.url)
    assert status.last_deployment.startswith("promoted v2 (canary 10%")


def test_a_failing_model_is_rolled_back_within_its_canary_interval(backend, serving, models):
    before = backend.serving.describe(NAME)
    with Load(before.url, NAME) as load:
        result = backend.serving.promote(spec(3, models["failing"], percent=20, wait=3))
        time.sleep(1.0)
    assert result.outcome == ROLLED_BACK, result.reason
    assert re.fullmatch(r"5xx rate \d\.\d\d > 0\.05 during canary", result.reason)
    ready = step(result, "new fleet InService").at
    shifted, rolled = step(result, "canary 20%").at, step(result, "rolled back").at
    assert (rolled - shifted).total_seconds() <= 3 + 0.5  # within the wait interval
    failures = [a for a in load.answers if not a.ok]
    assert failures, "the failing model never answered"
    assert {(a.version, a.code, a.original_status) for a in failures} == {("3", "ModelError", 500)}
    # Only requests in progress between the canary shift and the rollback met the new model.
    assert all(ready.timestamp() <= a.ended and a.started <= rolled.timestamp()
               for a in failures)
    after = [a for a in load.answers if a.started > rolled.timestamp()]
    assert after and all(a.ok for a in after)
    assert {a.version for a in after} == {str(before.version)}
    status = backend.serving.describe(NAME)
    assert (status.status, status.version) == (IN_SERVICE, before.version)
    assert status.last_deployment.startswith("rolled back v3: 5xx rate")
    assert backend.serving.fleets_of(NAME) == list(status.extra["fleets"])  # v3's is gone


def test_a_slow_model_is_rolled_back_on_latency(backend, serving, models):
    before = backend.serving.describe(NAME)
    with Load(before.url, NAME) as load:
        result = backend.serving.promote(spec(
            4, models["slow"], strategy=LINEAR, percent=20, wait=3,
            alarms=RollbackAlarms(max_error_rate=0.05, max_p99_latency_ms=300)))
        time.sleep(0.5)
    assert result.outcome == ROLLED_BACK, result.reason
    assert re.fullmatch(r"p99 latency \d+ ms > 300 ms during linear step 1", result.reason)
    assert [a for a in load.answers if not a.ok] == []
    rolled = step(result, "rolled back").at.timestamp()
    assert {a.version for a in load.answers if a.started > rolled} == {str(before.version)}
    assert backend.serving.describe(NAME).version == before.version


def test_the_router_refuses_what_a_model_server_refuses(backend, serving):
    url = backend.serving.describe(NAME).url
    client = runtime_client(url)
    with pytest.raises(ClientError) as err:
        client.invoke_endpoint(EndpointName="another-endpoint", Body=b"[0]",
                               ContentType="application/json")
    assert err.value.response["Error"]["Code"] == "ValidationError"
    request = urllib.request.Request(f"{url}/invocations", data=b"x" * (6 * 2**20 + 1),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=30)
    assert http_err.value.code == 413
    request = urllib.request.Request(f"{url}/invocations", data=b"[0]",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers[VERSION_HEADER] == str(backend.serving.describe(NAME).version)


def test_a_promotion_cut_short_is_rolled_back_by_the_next_describe(backend, models):
    name = "cifar10-serving-crash"
    assert backend.serving.promote(spec(1, models["good-1"], name=name)).outcome == CREATED
    url = backend.serving.describe(name).url
    promoter = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from backends.local import LocalBackend; "
        "from backends.base import ServingSpec, TrafficShift; "
        "LocalBackend(root=Path(sys.argv[1])).serving.promote(ServingSpec(name=sys.argv[2], "
        "model_uri=sys.argv[3], group='cifar10-test', version=2, "
        "shift=TrafficShift(percent=10, wait_seconds=600, max_seconds=1200)))"),
        str(backend.root), name, models["good-2"]], cwd=REPO)
    routing = backend.serving.serving_dir(name) / ROUTING_FILE
    try:
        poll(lambda: True if len(json.loads(routing.read_text())["fleets"]) == 2 else None,
             interval=0.1, timeout=120, on_timeout=lambda s: AssertionError("no canary"))
        pending = backend.serving.read_record(name).pending
    finally:
        os.kill(promoter.pid, signal.SIGKILL)
        promoter.wait()
    status = backend.serving.describe(name)
    assert (status.status, status.version, status.url) == (IN_SERVICE, 1, url)
    assert "rolled back v2: the promoting process" in status.last_deployment
    assert backend.endpoints.describe(pending.fleet) is None
    answer = invoke(runtime_client(url), name)
    assert answer.ok and answer.version == "1"
    router_pid = backend.serving.router_state(name)["pid"]
    (fleet_pid,) = [info["pid"] for info in status.extra["fleets"].values()]
    assert backend.serving.delete(name) is True
    assert not processes.is_running(router_pid, None) and not processes.is_running(fleet_pid, None)
    assert backend.serving.describe(name) is None and backend.serving.delete(name) is False


def test_a_damaged_record_is_a_warning_not_a_crash(backend, models, caplog):
    name = "cifar10-serving-damaged"
    directory = backend.serving.serving_dir(name)
    directory.mkdir(parents=True)
    (directory / "record.json").write_text('{"name": "cifar10-serving-dam')
    status = backend.serving.describe(name)
    assert status.status == "Unknown" and "move it aside" in status.extra["unreadable"]
    assert "unknown state" in caplog.text
    result = backend.serving.promote(spec(1, models["good-1"], name=name))
    assert result.outcome == FAILED and "unreadable record" in result.reason
    assert backend.serving.delete(name) is True and backend.serving.describe(name) is None


def test_retention_keeps_serving_fleets_even_dead_and_unreadable(backend, serving):
    fleets = backend.endpoints.records.root
    for name in (f"{NAME}-v99-abcd", "someone-else"):  # dead, damaged, long untouched
        (fleets / name).mkdir()
        (fleets / name / "record.json").write_text("{")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    report = apply_retention(RetentionPolicy(), backend.jobs, backend.endpoints,
                             backend.registry, backend.storage, now=later,
                             serving=backend.serving)
    assert report.endpoints == ["someone-else"]
    assert (fleets / f"{NAME}-v99-abcd").is_dir()
    backend.endpoints.delete(f"{NAME}-v99-abcd")
