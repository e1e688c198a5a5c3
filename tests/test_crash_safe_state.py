"""Crash-safe state: durable atomic writes, readers that survive a damaged record (registry
versions, endpoint records), a reaper that goes on past a failure, version numbers that are
never reused, a promotion gate decided under the registry's lock, and cached models that are
not registered twice."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backends.base import (
    APPROVED,
    REJECTED,
    Backend,
    BackendError,
    TrainingResult,
    managed_tags,
)
from backends.cache import cached_training
from backends.files import atomic_copy, atomic_write_text
from backends.local import LocalBackend
from backends.local.endpoints import EndpointRecord, LocalEndpoints
from backends.reaper import reap_endpoints
from flows.cli import app
from tasks import registry as registry_task
from tasks.lib.promotion_gate import GatePolicy
from tasks.lib.summary import SmokeTestResult
from tasks.registry import register_model
from tests.support.configs import candidate

GROUP = "cifar10-pipeline"
LINEAGE = {"data_md5": "0" * 32, "code_digest": "c" * 64, "flow_run_id": "run"}
# What a crash or a power loss leaves of a record: nothing, half of it, noise, the wrong shape.
DAMAGE = {
    "empty": lambda text: "",
    "truncated": lambda text: text[: len(text) // 2],
    "garbled": lambda text: "\x00\x00garbage{",
    "missing-keys": lambda text: json.dumps({"name": "x"}),
    "not-an-object": lambda text: "[1, 2]",
}


def damage(path: Path, kind: str) -> None:
    path.write_text(DAMAGE[kind](path.read_text()))


def trained(job: str, accuracy: float, cached_from: str | None = None,
            model_uri: str | None = None) -> TrainingResult:
    return TrainingResult(job_name=job, status="Completed",
                          model_uri=model_uri or f"file:///models/{cached_from or job}.tar.gz",
                          metrics={"test_accuracy": accuracy, "test_loss": 1.0},
                          billable_seconds=1, log_location="-", cached_from=cached_from)


def smoked(accuracy: float = 0.6) -> SmokeTestResult:
    return SmokeTestResult(images=64, accuracy=accuracy, accuracy_floor=0.4, per_class={},
                           requests=1, seconds=0.1)


def register(backend: Backend, training: TrainingResult, smoke: SmokeTestResult | None = None,
             group: str = GROUP, cache_key: str | None = None):
    """The registry stage as the flow calls it (its function, without a Prefect run)."""
    smoke = smoke or smoked()
    return register_model.fn(
        backend, candidate(group, training, smoke, cache_key or f"key-{training.job_name}",
                           LINEAGE, tags=managed_tags("pytest")),
        training, smoke, GatePolicy(tolerance=0.005))


def version_file(root: Path, version: int, group: str = GROUP) -> Path:
    return root / "registry" / group / f"v{version}.json"


# -- durable writes ---------------------------------------------------------------------------

@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:
    """Every os.fsync, as "file" or "dir", with whether the destination existed at the time."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def test_atomic_writes_fsync_the_file_then_its_directory(tmp_path, fsyncs):
    atomic_write_text(tmp_path / "record.json", "{}")
    assert fsyncs == ["file", "dir"]
    (tmp_path / "src").write_bytes(b"x" * 1000)
    atomic_copy(tmp_path / "src", tmp_path / "sub" / "copy")
    assert fsyncs == ["file", "dir", "file", "dir"]
    assert (tmp_path / "sub" / "copy").read_bytes() == b"x" * 1000
    assert not [p for p in tmp_path.rglob("*.part")]  # no temporary file left


def test_registry_writes_are_durable(tmp_path, fsyncs):
    register(LocalBackend(root=tmp_path), trained("job-1", 0.5))
    assert fsyncs.count("file") >= 1 and fsyncs.count("dir") >= 1
    assert fsyncs.count("file") == fsyncs.count("dir")  # each file write with its directory


# -- the registry survives a damaged version ----------------------------------------------

@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_version_is_skipped_and_the_next_registration_works(tmp_path, kind, caplog,
                                                                      monkeypatch):
    backend = LocalBackend(root=tmp_path)
    register(backend, trained("job-1", 0.50))
    register(backend, trained("job-2", 0.51))
    damage(version_file(tmp_path, 2), kind)

    with caplog.at_level(logging.WARNING):
        assert [v.version for v in backend.registry.versions(GROUP)] == [1]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(version_file(tmp_path, 2)) in warning and "move it aside or delete it" in warning
    # The training cache lookup of the next run's fit task goes through the same reader.
    assert cached_training(backend, GROUP, "key-job-1") is None  # its job is gone: no error
    # The next run registers, measured against the readable champion, with a new number.
    third = register(backend, trained("job-3", 0.52))
    assert (third.version, third.status, third.champion_before) == (3, APPROVED, 1)
    # A hand decision on the damaged version says what is wrong and what to do.
    with pytest.raises(BackendError, match=r"unreadable.*move it aside or delete it"):
        backend.registry.set_status(GROUP, 2, APPROVED, "by hand")
    # And `models list` lists the rest.
    monkeypatch.setenv("CIFAR10_PIPELINE_HOME", str(tmp_path))
    listed = CliRunner().invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [row["version"] for row in json.loads(listed.stdout)] == [1, 3]


def test_the_cache_lookup_survives_a_damaged_version(local_backend, session_training):
    """A cached training is still found beside a damaged version (the real model artifact and
    training job of the session)."""
    group = "crash-safe-cache"
    register(local_backend, trained(session_training.job_name, 0.5,
                                    model_uri=session_training.model_uri), group=group,
             cache_key="the-key")
    register(local_backend, trained("other-job", 0.4), group=group)
    damage(version_file(local_backend.root, 2, group), "truncated")
    cached = cached_training(local_backend, group, "the-key")
    assert cached is not None and cached.model_uri == session_training.model_uri


@pytest.mark.parametrize("loss", ["deleted", "truncated"])
def test_version_numbers_are_never_reused(tmp_path, loss):
    backend = LocalBackend(root=tmp_path)
    for job in ("job-1", "job-2", "job-3"):
        register(backend, trained(job, 0.5))
    newest = version_file(tmp_path, 3)
    if loss == "deleted":
        newest.unlink()
    else:
        damage(newest, "truncated")
    assert register(backend, trained("job-4", 0.5)).version == 4
    newest = version_file(tmp_path, 4)
    newest.unlink()  # and again, with the mark alone to remember it
    assert register(backend, trained("job-5", 0.5)).version == 5


# -- the gate decides under the registry's lock -------------------------------------------

def test_two_concurrent_registrations_are_decided_one_after_the_other(tmp_path, monkeypatch):
    """Run A (0.60) and run B (0.55, worse than A by more than the tolerance) register at the
    same time, both better than the champion v1 (0.50). A decides first and takes its time:
    B must wait and be measured against A, not against v1."""
    register(LocalBackend(root=tmp_path), trained("job-1", 0.50))
    a_deciding = threading.Event()
    real_verdict = registry_task.verdict

    def slow_verdict(test_accuracy, *args, **kwargs):
        if test_accuracy == 0.60:
            a_deciding.set()
            time.sleep(0.5)  # a slow moment between reading the champion and writing
        return real_verdict(test_accuracy, *args, **kwargs)

    monkeypatch.setattr(registry_task, "verdict", slow_verdict)
    results = {}

    def run(name: str, accuracy: float) -> None:
        if name == "B":
            assert a_deciding.wait(30)
        results[name] = register(LocalBackend(root=tmp_path), trained(f"job-{name}", accuracy))

    threads = [threading.Thread(target=run, args=a) for a in (("A", 0.60), ("B", 0.55))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    a, b = results["A"], results["B"]
    assert (a.status, b.status) == (APPROVED, REJECTED)  # not both approved against v1
    assert (a.version, a.status, a.champion_before) == (2, APPROVED, 1)
    assert (b.version, b.status, b.champion_before) == (3, REJECTED, 2)
    assert b.reason == "0.5500 < champion v2 0.6000 - 0.005"


# -- cached models are not registered twice ----------------------------------------------

def test_a_cached_model_already_registered_is_not_registered_again(tmp_path):
    backend = LocalBackend(root=tmp_path)
    first = register(backend, trained("job-1", 0.55))
    again = register(backend, trained("job-2", 0.55, cached_from="job-1"))
    assert [v.version for v in backend.registry.versions(GROUP)] == [1]
    assert (again.version, again.status, again.reused) == (1, first.status, True)
    assert "v1" in again.line() and "already registered" in again.line()
    # Not cached (a new training that happens to write the same path): registered.
    assert register(backend, trained("job-1", 0.55)).version == 2


def test_a_cached_sweep_point_first_hosted_now_is_registered_for_the_gate(tmp_path):
    """A sweep point another point beat was registered without a smoke test; cached and
    hosted now (the winner of a new sweep), it is registered again so that the gate decides."""
    backend = LocalBackend(root=tmp_path)
    first = trained("job-1", 0.55)
    register_model.fn(backend, candidate(GROUP, first, None, "k", LINEAGE), first, None,
                      passed_over="point 2 was better")
    point = trained("job-2", 0.55, cached_from="job-1")
    passed_over_again = register_model.fn(backend, candidate(GROUP, point, None, "k", LINEAGE),
                                          point, None)
    assert passed_over_again.version == 1 and passed_over_again.reused
    hosted = register(backend, point)
    assert (hosted.version, hosted.status, hosted.reused) == (2, APPROVED, False)


# -- endpoint records ------------------------------------------------------------------------

def make_record(backend: LocalBackend, name: str, kept: bool = False,
                hours_old: float = 3) -> Path:
    """An endpoint record as deploy writes it (no server behind it)."""
    created = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours_old)
    backend.endpoints.records.create(EndpointRecord(
        name=name, status="InService", created=created.isoformat(),
        model_uri="file:///m.tar.gz", model_path="/m.tar.gz",
        tags=managed_tags("pytest", created, kept=kept)))
    return backend.endpoints.records.endpoint_dir(name) / "record.json"


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_endpoint_record_is_listed_and_reaped(tmp_path, kind, monkeypatch, caplog):
    backend = LocalBackend(root=tmp_path)
    make_record(backend, "cifar10-good")
    bad = make_record(backend, "cifar10-bad")
    damage(bad, kind)

    with caplog.at_level(logging.WARNING):
        listed = {e.name: e.status for e in backend.endpoints.list()}
    assert listed == {"cifar10-good": "InService", "cifar10-bad": "Unknown"}
    assert str(bad) in caplog.text and "move it aside or delete it" in caplog.text
    monkeypatch.setenv("CIFAR10_PIPELINE_HOME", str(tmp_path))
    shown = CliRunner().invoke(app, ["endpoints", "list", "--json"])
    assert shown.exit_code == 0, shown.output
    assert sorted(row["name"] for row in json.loads(shown.stdout)) == [
        "cifar10-bad", "cifar10-good"]

    # Its TTL counts from the damage (the record's last write): not reaped at once...
    report = reap_endpoints(backend, dt.timedelta(hours=1))
    assert (report.deleted, report.younger, report.errors) == (["cifar10-good"],
                                                              ["cifar10-bad"], [])
    # ...but once it is old enough.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    assert reap_endpoints(backend, dt.timedelta(hours=1), now=later).deleted == ["cifar10-bad"]
    assert not (tmp_path / "endpoints" / "cifar10-bad").exists()


def test_a_damaged_endpoint_record_can_be_deleted_by_name(tmp_path, monkeypatch):
    backend = LocalBackend(root=tmp_path)
    damage(make_record(backend, "cifar10-bad"), "empty")
    monkeypatch.setenv("CIFAR10_PIPELINE_HOME", str(tmp_path))
    deleted = CliRunner().invoke(app, ["endpoints", "delete", "cifar10-bad"])
    assert deleted.exit_code == 0 and "cifar10-bad: deleted" in deleted.stdout
    assert backend.endpoints.describe("cifar10-bad") is None
    assert not (tmp_path / "endpoints" / "cifar10-bad").exists()


def test_a_damaged_record_that_still_shows_kept_is_not_reaped(tmp_path):
    backend = LocalBackend(root=tmp_path)
    record = make_record(backend, "cifar10-kept", kept=True)
    text = record.read_text()
    record.write_text(text[: text.index('"kept"') + len('"kept": "true"')])  # cut after it
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    report = reap_endpoints(backend, dt.timedelta(hours=1), now=later)
    assert (report.deleted, report.kept_by_user) == ([], ["cifar10-kept"])


# -- the reaper goes on past a failure ---------------------------------------------------

def test_the_reaper_goes_on_past_an_endpoint_it_cannot_delete(tmp_path, monkeypatch):
    backend = LocalBackend(root=tmp_path)
    for name in ("cifar10-a", "cifar10-stuck", "cifar10-z"):
        make_record(backend, name)
    real_delete = LocalEndpoints.delete

    def delete(self, name: str) -> bool:
        if name == "cifar10-stuck":
            raise BackendError("endpoint cifar10-stuck is Updating")
        return real_delete(self, name)

    monkeypatch.setattr(LocalEndpoints, "delete", delete)
    report = reap_endpoints(backend, dt.timedelta(hours=1))
    assert report.deleted == ["cifar10-a", "cifar10-z"]
    assert report.errors == ["cifar10-stuck: BackendError: endpoint cifar10-stuck is Updating"]

    make_record(backend, "cifar10-b")
    monkeypatch.setenv("CIFAR10_PIPELINE_HOME", str(tmp_path))
    reaped = CliRunner().invoke(app, ["endpoints", "reap", "--older-than", "1h"])
    assert reaped.exit_code == 1
    assert "deleted cifar10-b" in reaped.stdout
    assert "could not delete cifar10-stuck: BackendError" in reaped.stderr

    from flows.reaper import ReapIncomplete, reap_endpoints_flow

    make_record(backend, "cifar10-c")
    with pytest.raises(ReapIncomplete, match="cifar10-stuck"):
        reap_endpoints_flow.fn(backend="local", older_than_minutes=60)
    assert {e.name for e in backend.endpoints.list()} == {"cifar10-stuck"}


def test_endpoint_record_updates_from_two_processes_lose_nothing(tmp_path):
    """The deploying process and the server process both update an endpoint's record
    (read-modify-write): under the record's lock, no update undoes another."""
    from backends.local.endpoints import EndpointRecords

    records = EndpointRecords(tmp_path / "endpoints")
    records.create(EndpointRecord(name="ep", status="Creating", created=dt.datetime.now(
        dt.UTC).isoformat()))
    writers, rounds = 4, 25

    def writer(index: int) -> None:
        for round_ in range(rounds):
            records.update("ep", **{f"writer-{index}-{round_}": True})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = records.read("ep")
    assert record is not None
    written = {key for key in record.to_json() if key.startswith("writer-")}
    assert len(written) == writers * rounds, f"{writers * rounds - len(written)} updates lost"
