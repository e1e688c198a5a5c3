"""Local training jobs: the entry script in an /opt/ml-style job directory with the SageMaker
environment, for real (processes, logs, failures, max runtime, two hosts)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from backends.base import TrainingJobFailed, TrainingSpec
from backends.local import LocalBackend
from backends.local.store import path_from_uri

pytestmark = pytest.mark.long_running

FAST = {"epochs": 2, "batch-size": 16, "lr": 0.02}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return LocalBackend(root=tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def data_uri(backend, cifar_dir):
    return backend.storage.upload(cifar_dir)


@pytest.fixture(scope="module")
def completed(backend, data_uri):
    lines: list[str] = []
    spec = TrainingSpec(job_name="job-ok", data_uri=data_uri, hyperparameters=FAST,
                        tags={"managed-by": "cifar10-pipeline"})
    return backend.jobs.run(spec, on_log=lines.append), lines


def test_job_completes_with_packaged_model(backend, completed):
    result, lines = completed
    assert result.status == "Completed"
    with tarfile.open(path_from_uri(result.model_uri)) as tar:
        names = set(tar.getnames())
    assert {"model.pth", "model_meta.json", "code/inference.py", "code/contract.py",
            "code/networks.py"} <= names
    assert result.model_uri.endswith("training-jobs/job-ok/output/model.tar.gz")
    assert result.metrics["test_accuracy"] > 0.5
    assert [h["epoch"] for h in result.metrics["history"]] == [1, 2]
    assert result.billable_seconds >= 1
    # The log reached the callback line by line, and the log file.
    assert any(line.startswith("epoch=2;") for line in lines)
    assert "epoch=2;" in Path(result.log_location).read_text()


def test_job_directory_has_the_sagemaker_layout(backend, completed):
    host = backend.jobs.job_dir("job-ok") / "algo-1"
    config = host / "input" / "config"
    assert json.loads((config / "hyperparameters.json").read_text()) == {
        "epochs": "2", "batch-size": "16", "lr": "0.02"}
    assert json.loads((config / "resourceconfig.json").read_text())["hosts"] == ["algo-1"]
    assert "training" in json.loads((config / "inputdataconfig.json").read_text())
    assert (host / "output" / "data" / "metrics.json").is_file()
    # Once the job has ended, what it no longer needs is gone: the channel, the code copy, the
    # model directory (now model.tar.gz) and the job's checkpoint directory (one per job, as
    # SageMaker gives a spot job's; tests/test_retention.py looks at the channel mid-job).
    assert not any((host / sub).exists() for sub in ("input/data", "code", "model"))
    assert not (host.parent / "checkpoints").exists()


def test_job_is_described_from_another_process(backend, completed):
    code = (
        "import json, sys; from backends.local import LocalBackend; "
        "r = LocalBackend(root=sys.argv[1]).jobs.describe('job-ok'); "
        "print(json.dumps([r.status, r.model_uri, r.hyperparameters]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(backend.root)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    status, model_uri, hps = json.loads(out)
    assert status == "Completed" and model_uri == completed[0].model_uri
    assert hps["epochs"] == "2"


def test_same_job_name_reattaches_instead_of_training_again(backend, data_uri, completed):
    lines: list[str] = []
    spec = TrainingSpec(job_name="job-ok", data_uri=data_uri, hyperparameters=FAST)
    again = backend.jobs.run(spec, on_log=lines.append)
    assert again == completed[0]
    assert lines == []


def test_failed_job_reports_the_scripts_reason(backend, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "data_batch_1").write_bytes(b"garbage")
    (broken / "test_batch").write_bytes(b"garbage")
    uri = backend.storage.upload_dir(broken, "broken-data").uri
    with pytest.raises(TrainingJobFailed) as err:
        backend.jobs.run(TrainingSpec(job_name="job-broken", data_uri=uri, hyperparameters=FAST))
    assert err.value.status == "Failed"
    assert "not a CIFAR-10 python batch file" in err.value.reason
    record = backend.jobs.describe("job-broken")
    assert record.status == "Failed" and "not a CIFAR-10" in record.failure_reason
    assert record.model_uri is None


def test_job_over_its_max_runtime_is_stopped(backend, data_uri):
    from backends.local import processes

    spec = TrainingSpec(job_name="job-slow", data_uri=data_uri, max_runtime_seconds=2,
                        hyperparameters={"epochs": 10000, "batch-size": 16})
    with pytest.raises(TrainingJobFailed) as err:
        backend.jobs.run(spec)
    assert err.value.status == "Stopped"
    assert "MaxRuntimeExceeded" in err.value.reason
    record = backend.jobs.describe("job-slow")
    assert record.status == "Stopped"
    assert not any(processes.is_running(p["pid"], p["start"]) for p in record.processes)


def test_a_running_job_is_stopped_on_request(backend, data_uri):
    """StopTrainingJob from anywhere (a cancelled sweep stops jobs other threads wait for):
    its hosts end, the job is Stopped, and the waiting caller hears so."""
    import threading

    from backends.local import processes

    spec = TrainingSpec(job_name="job-stop-me", data_uri=data_uri,
                        hyperparameters={"epochs": 10000, "batch-size": 16})
    outcome: list[BaseException] = []
    lines: list[str] = []

    def wait_for_it() -> None:
        try:
            backend.jobs.run(spec, on_log=lines.append)
        except BaseException as e:
            outcome.append(e)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    live_deadline = time.monotonic() + 120
    while not any(line.startswith("epoch=1;") for line in list(lines)):
        assert time.monotonic() < live_deadline, lines[-5:]
        time.sleep(0.1)
    assert backend.jobs.stop("job-stop-me") is True
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    [error] = outcome
    assert isinstance(error, TrainingJobFailed) and error.status == "Stopped"
    record = backend.jobs.describe("job-stop-me")
    assert record.status == "Stopped" and "stopped on request" in record.failure_reason
    assert not any(processes.is_running(p["pid"], p["start"]) for p in record.processes)
    assert backend.jobs.stop("job-stop-me") is False  # already ended
    assert backend.jobs.stop("job-never-was") is False


def test_two_hosts_train_data_parallel(backend, data_uri):
    lines: list[str] = []
    spec = TrainingSpec(job_name="job-two-hosts", data_uri=data_uri, instance_count=2,
                        hyperparameters={**FAST, "seed": 5})
    result = backend.jobs.run(spec, on_log=lines.append)
    assert result.status == "Completed"
    assert any(line.startswith("[algo-2] ") for line in lines)
    job_dir = backend.jobs.job_dir("job-two-hosts")
    metrics = [json.loads((job_dir / h / "output/data/metrics.json").read_text())
               for h in ("algo-1", "algo-2")]
    assert [m["rank"] for m in metrics] == [0, 1]
    assert metrics[0]["weights_sha256"] == metrics[1]["weights_sha256"]
    assert metrics[0]["samples_per_epoch"] == 250  # half of the 500 images each
    assert result.billable_seconds >= 2  # two instances are billed


def test_missing_channel_is_a_clear_error(backend, tmp_path):
    from backends.base import BackendError

    with pytest.raises(BackendError, match="does not exist"):
        backend.jobs.run(TrainingSpec(job_name="job-nodata", data_uri=(tmp_path / "x").as_uri(),
                                      hyperparameters=FAST))


def test_a_failed_or_stopped_job_trains_again_under_the_next_free_name(backend, data_uri):
    """As on SageMaker, which never reuses a job name: a retried flow run whose job Failed,
    and whose retry's job was Stopped, trains as {name}-r2 instead of failing at once; then
    it re-attaches to that one."""
    from backends.local.training import JobRecord

    spec = TrainingSpec(job_name="job-retried", data_uri=data_uri, hyperparameters=FAST)
    for name, status in (("job-retried", "Failed"), ("job-retried-r1", "Stopped")):
        backend.jobs.job_dir(name).mkdir(parents=True)
        (backend.jobs.job_dir(name) / "job.json").write_text(json.dumps(vars(JobRecord(
            name=name, status=status, secondary_status=status, hyperparameters={},
            data_uri=data_uri, instance_type="local", instance_count=1,
            max_runtime_seconds=60, tags={}, created="2026-01-01T00:00:00+00:00",
            failure_reason="CapacityError: injected"))))
    lines: list[str] = []
    result = backend.jobs.run(spec, on_log=lines.append)
    assert result.job_name == "job-retried-r2" and result.status == "Completed"
    assert "training job job-retried: earlier attempts failed or were stopped: training " \
           "again as job-retried-r2" in lines
    assert backend.jobs.run(spec) == result  # re-attached: nothing trains again
    assert backend.jobs.stop("job-retried") is False  # nothing of the chain runs
