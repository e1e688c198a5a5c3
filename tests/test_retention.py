"""Bounded disk on the local backend: training channels linked (or copied, then deleted), a
finished job's inputs removed, training logs rotated, unreadable job records survived, stale
temporaries cleared, and retention pruning old jobs without ever touching what a registry
version, an endpoint or a running job needs.

The training jobs here run a probe entry script (no torch training): it reports what its
channel looks like from inside the job, prints as many lines as asked and exits as asked.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backends.base import (
    APPROVED,
    PENDING,
    REJECTED,
    BackendError,
    ModelVersionSpec,
    TrainingJobFailed,
    TrainingSpec,
    managed_tags,
)
from backends.cache import cached_training
from backends.local import LocalBackend, processes
from backends.local.endpoints import EndpointRecord
from backends.local.retention import (
    BoundedLog,
    RetentionPolicy,
    apply_retention,
    owned_temp_prefix,
)
from backends.local.store import path_from_uri
from backends.local.training import JobRecord, LocalTrainingJobs

PROBE = '''
import json, os, sys
from pathlib import Path

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
channel = Path(os.environ["SM_CHANNEL_TRAINING"])
seen = {f.relative_to(channel).as_posix(): {"ino": f.stat().st_ino, "nlink": f.stat().st_nlink,
                                            "mode": f.stat().st_mode}
        for f in sorted(channel.rglob("*")) if f.is_file()}
out = Path(os.environ["SM_OUTPUT_DATA_DIR"])
(out / "channel.json").write_text(json.dumps(seen))
for i in range(int(args.get("--lines", "0"))):
    print(f"line {i:05d} " + "x" * 40)
Path(os.environ["SM_MODEL_DIR"], "model.pth").write_bytes(b"weights")
(out / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5}))
sys.exit(int(args.get("--exit", "0")))
'''
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def probe_source(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("probe-source")
    (source / "probe.py").write_text(PROBE)
    return source


def probe_backend(root: Path, source: Path, **policy) -> LocalBackend:
    """A local backend whose training jobs run the probe."""
    backend = LocalBackend(root=root, retention=RetentionPolicy(**policy))
    backend.jobs = LocalTrainingJobs(root / "jobs", backend.storage, source, "probe.py",
                                     retention=backend.retention)
    return backend


@pytest.fixture
def backend(tmp_path, probe_source) -> LocalBackend:
    return probe_backend(tmp_path / "state", probe_source)


def run_probe(backend: LocalBackend, data_uri: str, name: str, **args):
    spec = TrainingSpec(job_name=name, data_uri=data_uri,
                        hyperparameters={k.replace("_", "-"): v for k, v in args.items()})
    return backend.jobs.run(spec)


def channel_seen(backend: LocalBackend, name: str) -> dict:
    """What the probe saw of its channel, from inside the job."""
    path = backend.jobs.job_dir(name) / "algo-1" / "output" / "data" / "channel.json"
    return json.loads(path.read_text())


def assert_inputs_released(backend: LocalBackend, name: str) -> None:
    job_dir = backend.jobs.job_dir(name)
    for sub in ("algo-1/input/data", "algo-1/code", "algo-1/model", "checkpoints"):
        assert not (job_dir / sub).exists(), sub
    assert (job_dir / "job.json").is_file() and (job_dir / "training.log").is_file()


# -- the training channel ---------------------------------------------------------------------

def test_channel_is_hard_linked_read_only_and_unlinked_when_the_job_ends(backend, cifar_dir):
    data_uri = backend.storage.upload(cifar_dir)
    store_data = path_from_uri(data_uri)
    before = {p.name: p.read_bytes() for p in store_data.iterdir() if p.is_file()}
    run_probe(backend, data_uri, "job-linked")

    seen = channel_seen(backend, "job-linked")
    assert set(seen) == {p.name for p in store_data.iterdir()} - {".manifest.json"}
    for name, inside in seen.items():
        store_file = (store_data / name).stat()
        assert inside["ino"] == store_file.st_ino, name  # the store's file, not a copy
        assert inside["nlink"] >= 2, name
        # Read-only: a stray write by a script fails instead of changing the store.
        assert not inside["mode"] & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), name
        assert store_file.st_nlink == 1, name  # the job's link is gone
    assert_inputs_released(backend, "job-linked")
    assert {p.name: p.read_bytes() for p in store_data.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("exit_code", [0, 3])
def test_channel_is_copied_where_links_fail_and_the_copy_is_deleted(backend, cifar_dir,
                                                                    monkeypatch, exit_code):
    """Another filesystem (EXDEV): the files are copied, and the copies go when the job
    ends, whether it completed or failed."""
    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    data_uri = backend.storage.upload(cifar_dir)
    store_data = path_from_uri(data_uri)
    name = f"job-copied-{exit_code}"
    if exit_code:
        with pytest.raises(TrainingJobFailed):
            run_probe(backend, data_uri, name, exit=exit_code)
    else:
        run_probe(backend, data_uri, name)

    for file, inside in channel_seen(backend, name).items():
        assert inside["ino"] != (store_data / file).stat().st_ino, file
        assert inside["nlink"] == 1, file
    assert_inputs_released(backend, name)
    assert backend.jobs.describe(name).status == ("Failed" if exit_code else "Completed")


def test_a_job_that_cannot_be_set_up_is_failed_and_leaves_no_channel(backend, cifar_dir,
                                                                    monkeypatch):
    """A full disk while the job is set up: the job is recorded Failed (not InProgress under
    a live runner, forever) and its channel goes all the same."""
    from backends.local import training

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.shutil, "copytree", no_space)  # the code copy
    with pytest.raises(OSError, match="No space"):
        run_probe(backend, backend.storage.upload(cifar_dir), "job-no-space")
    record = backend.jobs.describe("job-no-space")
    assert record.status == "Failed" and "No space left" in record.failure_reason
    assert not (backend.jobs.job_dir("job-no-space") / "algo-1" / "input" / "data").exists()


# -- logs -------------------------------------------------------------------------------------

def test_training_log_rotates_at_its_size_limit(tmp_path, probe_source, cifar_dir):
    backend = probe_backend(tmp_path / "state", probe_source, log_max_bytes=4096,
                            log_backups=2)
    run_probe(backend, backend.storage.upload(cifar_dir), "job-chatty", lines=400)  # ~20 kB
    log = backend.jobs.job_dir("job-chatty") / "training.log"
    parts = [log, log.with_name("training.log.1"), log.with_name("training.log.2")]
    assert all(p.is_file() and p.stat().st_size <= 4096 for p in parts)
    assert not log.with_name("training.log.3").exists()
    assert log.read_text().splitlines()[-1].startswith("line 00399 ")  # the newest lines
    assert parts[1].read_text().splitlines()[-1] < log.read_text().splitlines()[0]


def test_a_log_without_backups_starts_over_and_never_passes_its_limit(tmp_path):
    log = BoundedLog(tmp_path / "x.log", max_bytes=100, backups=0)
    for i in range(50):
        log.write(f"line {i}\n")
        assert (tmp_path / "x.log").stat().st_size <= 100
    log.write("y" * 500 + "\n")  # one line longer than the limit is cut
    log.close()
    assert (tmp_path / "x.log").stat().st_size <= 100
    assert [p.name for p in tmp_path.iterdir()] == ["x.log"]


# -- unreadable job records -------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled", "a list", "missing keys",
                                    "wrong kind"])
def test_an_unreadable_job_record_is_skipped_and_the_next_run_trains(backend, cifar_dir,
                                                                     caplog, damage):
    data_uri = backend.storage.upload(cifar_dir)
    result = run_probe(backend, data_uri, "job-damaged")
    # Rejected, so that retention may remove it below (an Approved version's job stays).
    backend.registry.register(ModelVersionSpec(
        group="cifar10-test", model_uri=result.model_uri, training_job="job-damaged",
        cache_key="key-1", metrics={"test_accuracy": 0.5}, lineage={}),
        lambda champion: (REJECTED, "test"))
    assert cached_training(backend, "cifar10-test", "key-1") is not None
    record = backend.jobs.job_dir("job-damaged") / "job.json"
    text = record.read_text()
    record.write_text({
        "empty": "", "truncated": text[:len(text) // 2], "garbled": "{\x00\x13 not json",
        "a list": "[1, 2]", "missing keys": json.dumps({"name": "job-damaged"}),
        "wrong kind": json.dumps({**json.loads(text), "runner": 7}),
    }[damage])

    with caplog.at_level(logging.WARNING, logger="backends.local.training"):
        assert backend.jobs.describe("job-damaged") is None
        assert backend.jobs.completed("job-damaged") is None
        # The cache lookup finds no usable job, instead of failing the run's fit.
        assert cached_training(backend, "cifar10-test", "key-1") is None
    assert str(record) in caplog.text and "Delete" in caplog.text
    # The same name cannot run again over the remains, and says what to do...
    with pytest.raises(BackendError, match=r"no readable job\.json.*Delete that directory"):
        run_probe(backend, data_uri, "job-damaged")
    # ... and the next run, under its own name, trains.
    assert run_probe(backend, data_uri, "job-next").status == "Completed"
    # Retention clears the damaged job once it is past the limits.
    report = apply_retention(RetentionPolicy(keep_jobs=1, max_age_days=None), backend.jobs,
                             backend.endpoints, backend.registry, backend.storage,
                             now=dt.datetime.now(dt.UTC) + DAY)
    assert "job-damaged" in report.jobs and backend.jobs.describe("job-next") is not None


# -- retention --------------------------------------------------------------------------------

def finished_job(backend: LocalBackend, name: str, age: dt.timedelta, status: str = "Completed",
                 runner: dict | None = None, leftovers: bool = False) -> str:
    """A job record (and its model in the store) created ``age`` ago, as a run leaves it."""
    job_dir = backend.jobs.job_dir(name)
    (job_dir / "algo-1" / "output" / "data").mkdir(parents=True)
    (job_dir / "training.log").write_text("epoch=1;\n")
    if leftovers:  # what a killed runner leaves
        (job_dir / "algo-1" / "input" / "data" / "training").mkdir(parents=True)
        (job_dir / "algo-1" / "input" / "data" / "training" / "data_batch_1").write_bytes(b"x")
    model = job_dir / "model.tar.gz"
    model.write_bytes(b"model " + name.encode())
    model_uri = backend.storage.put_file(model, f"training-jobs/{name}/output/model.tar.gz")
    model.unlink()
    created = dt.datetime.now(dt.UTC) - age
    backend.jobs._save(JobRecord(
        name=name, status=status, secondary_status=status, hyperparameters={},
        data_uri="file:///data", instance_type="local", instance_count=1,
        max_runtime_seconds=60, tags={}, created=created.isoformat(),
        model_uri=model_uri, runner=runner or {}))
    return model_uri


def register(backend: LocalBackend, name: str, model_uri: str, status: str) -> None:
    backend.registry.register(ModelVersionSpec(
        group="cifar10-test", model_uri=model_uri, training_job=name, cache_key=name,
        metrics={"test_accuracy": 0.5}, lineage={}), lambda champion: (status, "test"))


def endpoint_record(backend: LocalBackend, name: str, model_uri: str, kept: bool = False,
                    server: subprocess.Popen | None = None, age: dt.timedelta = DAY) -> None:
    created = dt.datetime.now(dt.UTC) - age
    backend.endpoints.records.create(EndpointRecord(
        name=name, status="InService", created=created.isoformat(), model_uri=model_uri,
        model_path="", tags=managed_tags("pytest", created=created, kept=kept),
        pid=server.pid if server else None,
        pid_start=processes.start_time(server.pid) if server else None))
    directory = backend.endpoints.records.endpoint_dir(name)
    (directory / "server.log").write_text("served\n")
    for path in (directory, *directory.iterdir()):
        os.utime(path, (created.timestamp(), created.timestamp()))


@pytest.fixture
def live_process():
    """A process that stands for a running model server or another run's process."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_retention_prunes_old_jobs_but_never_what_is_still_needed(backend, live_process):
    old = 10 * DAY
    live = {"pid": live_process.pid, "start": processes.start_time(live_process.pid)}
    uris = {name: finished_job(backend, name, old) for name in (
        "job-approved", "job-pending", "job-rejected", "job-kept-endpoint",
        "job-running-endpoint", "job-dead-endpoint", "job-plain")}
    finished_job(backend, "job-in-progress", old, status="InProgress", runner=live)
    finished_job(backend, "job-other-run", old, runner=live)  # its run may still register it
    uris["job-newest"] = finished_job(backend, "job-newest", dt.timedelta(), leftovers=True)
    register(backend, "job-approved", uris["job-approved"], APPROVED)
    register(backend, "job-pending", uris["job-pending"], PENDING)
    register(backend, "job-rejected", uris["job-rejected"], REJECTED)
    endpoint_record(backend, "ep-kept", uris["job-kept-endpoint"], kept=True)
    endpoint_record(backend, "ep-running", uris["job-running-endpoint"], server=live_process)
    endpoint_record(backend, "ep-dead", uris["job-dead-endpoint"], age=2 * DAY)
    endpoint_record(backend, "ep-just-died", uris["job-newest"], age=dt.timedelta(minutes=5))

    report = apply_retention(RetentionPolicy(keep_jobs=1, max_age_days=7), backend.jobs,
                             backend.endpoints, backend.registry, backend.storage)

    assert sorted(report.jobs) == ["job-dead-endpoint", "job-plain", "job-rejected"]
    assert report.endpoints == ["ep-dead"]
    assert set(report.protected) == {"job-approved", "job-pending", "job-kept-endpoint",
                                     "job-running-endpoint", "job-in-progress", "job-other-run"}
    for name, uri in uris.items():
        gone = name in report.jobs
        assert backend.storage.exists(uri) is not gone, name
        assert backend.jobs.job_dir(name).exists() is not gone, name
    assert backend.jobs.describe("job-in-progress").status == "InProgress"
    assert [e.name for e in backend.endpoints.list()] == ["ep-just-died", "ep-kept",
                                                          "ep-running"]
    assert live_process.poll() is None  # a live server's process is never signalled
    # The rejected version keeps its record; the cache lookup no longer offers its model.
    statuses = [v.status for v in backend.registry.versions("cifar10-test")]
    assert statuses == [APPROVED, PENDING, REJECTED]
    assert cached_training(backend, "cifar10-test", "job-rejected") is None
    assert cached_training(backend, "cifar10-test", "job-approved") is not None
    # A kept job's leftover channel (its runner was killed) goes; its record stays.
    assert report.inputs_released == ["job-newest"]
    assert_inputs_released(backend, "job-newest")
    assert any(line.startswith("removed 3 job directories") for line in report.lines())


def test_retention_prunes_no_job_while_a_registry_record_is_unreadable(backend):
    """An unreadable version may be an Approved one: no job goes until it is mended."""
    old = 10 * DAY
    uris = {name: finished_job(backend, name, old) for name in ("job-approved", "job-plain")}
    register(backend, "job-approved", uris["job-approved"], APPROVED)
    damaged = backend.registry.group_dir("cifar10-test") / "v1.json"
    damaged.write_text('{"group": "cifar10-te')  # truncated by a power loss

    report = apply_retention(RetentionPolicy(keep_jobs=0, max_age_days=1), backend.jobs,
                             backend.endpoints, backend.registry, backend.storage)

    assert report.jobs == []
    assert all(backend.storage.exists(uri) for uri in uris.values())
    assert any(str(damaged) in line and "move them aside" in line for line in report.lines())
    damaged.unlink()  # once it is dealt with, the next pass prunes again
    again = apply_retention(RetentionPolicy(keep_jobs=0, max_age_days=1), backend.jobs,
                            backend.endpoints, backend.registry, backend.storage)
    assert sorted(again.jobs) == ["job-approved", "job-plain"]


def test_retention_prunes_rotated_logs_past_the_backups_kept(backend):
    finished_job(backend, "job-logs", dt.timedelta())
    job_dir = backend.jobs.job_dir("job-logs")
    for name in ("training.log", "training.log.1", "training.log.2", "training.log.3"):
        (job_dir / name).write_text("log\n")
    report = apply_retention(RetentionPolicy(log_backups=1), backend.jobs, backend.endpoints,
                             backend.registry, backend.storage)
    assert sorted(report.logs) == ["job-logs/training.log.2", "job-logs/training.log.3"]
    assert sorted(p.name for p in job_dir.glob("training.log*")) == ["training.log",
                                                                      "training.log.1"]


def test_stale_temporaries_are_cleared_and_live_or_fresh_ones_kept(backend):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jobs_root = backend.jobs.jobs_root
    jobs_root.mkdir(parents=True)
    group = backend.registry.root / "cifar10-test"
    group.mkdir(parents=True)
    hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).timestamp()
    paths = {
        "dead owner, old": jobs_root / f".tmp-package-{dead.pid}-1-abc",
        "dead owner, fresh": jobs_root / f".tmp-package-{dead.pid}-1-def",
        "live owner, old": jobs_root / f"{owned_temp_prefix('package')}ghi",
        "old part": group / ".v1.json.x1y2.part",
        "fresh part": group / ".v2.json.x3y4.part",
    }
    for label, path in paths.items():
        if path.name.endswith(".part"):
            path.write_text("half")
        else:
            path.mkdir()
            (path / "model.tar.gz").write_bytes(b"half")
        if "old" in label:
            os.utime(path, (hour_ago, hour_ago))

    report = apply_retention(RetentionPolicy(), backend.jobs, backend.endpoints,
                             backend.registry, backend.storage)

    removed = {label for label, path in paths.items() if not path.exists()}
    assert removed == {"dead owner, old", "old part"}
    assert len(report.temporaries) == 2


def test_packaging_happens_under_the_jobs_root_not_in_tmp(backend, monkeypatch, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pth").write_bytes(b"weights")
    staged: list[Path] = []
    monkeypatch.setattr(backend.storage, "put_file",
                        lambda src, key: staged.append(Path(src)) or "file:///x")
    backend.jobs.jobs_root.mkdir(parents=True)
    backend.jobs._package_model(model_dir, "job-packed")
    assert staged[0].parent.parent == backend.jobs.jobs_root
    assert staged[0].parent.name.startswith(owned_temp_prefix("package"))
    assert not staged[0].parent.exists()  # removed once packed


def test_the_config_carries_the_retention_policy_to_the_local_backend(pipeline_home):
    from flows.config import PipelineConfig, get_backend

    defaults = PipelineConfig().retention
    assert (defaults.keep_jobs, defaults.max_age_days) == (10, 14)
    assert (defaults.log_max_bytes, defaults.log_backups) == (10_000_000, 1)
    backend = get_backend(PipelineConfig(retention={"keep_jobs": 3, "log_max_bytes": 8192}))
    assert backend.retention == RetentionPolicy(keep_jobs=3, max_age_days=14,
                                                log_max_bytes=8192, log_backups=1)
    assert backend.jobs.retention is backend.retention
    with pytest.raises(ValueError):
        PipelineConfig(retention={"keep_job": 3})  # a misspelt setting is an error
