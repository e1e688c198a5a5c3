"""The whole flow on the local backend, on generated data served over loopback HTTP (the real
download code): every stage, the artifacts, guaranteed teardown, the cached download, and the
training cache (a run reuses an earlier run's training only when nothing that made it changed).
Teardown under injected faults (every stage after deploy starts): test_faults.py; the
registry's promotion gate: test_registry.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backends.base import APPROVED
from backends.local import LocalBackend
from backends.local.store import path_from_uri
from flows.pipeline import cifar10_pipeline
from flows.run_context import resource_name
from tests.support.configs import local_config
from tests.support.pipeline import ARTIFACT_KEYS, REPO, artifacts_of

# This module's runs share one empty state directory (and so a registry and its training
# cache): the first one must download and train.
pytestmark = [pytest.mark.long_running, pytest.mark.usefixtures("module_pipeline_home")]

GROUP = "cifar10-pipeline"


def assert_no_endpoint_left(run_id) -> None:
    backend = LocalBackend()
    assert backend.endpoints.describe(resource_name(str(run_id))) is None
    assert backend.endpoints.list() == []


def jobs(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "jobs").iterdir())


def run(http_server, cifar_tarball, **overrides):
    state = cifar10_pipeline(local_config(http_server, cifar_tarball, **overrides),
                             return_state=True)
    assert state.is_completed(), state.message
    return state.result()


@pytest.fixture(scope="module")
def first_and_second_run(module_pipeline_home, prefect_harness, http_server, cifar_tarball,
                         http_log):
    """The first run, and the same run again right after it: in one fixture, because the
    module's other tests download other data and delete trained models in any order, and
    none of them may come between the two. ((first state, its HTTP requests), (second state,
    its HTTP requests, the training jobs before it and after it))."""
    before = len(http_log)
    first = cifar10_pipeline(local_config(http_server, cifar_tarball), return_state=True)
    first_requests = http_log[before:]
    trained_jobs = jobs(module_pipeline_home)
    before = len(http_log)
    second = cifar10_pipeline(local_config(http_server, cifar_tarball), return_state=True)
    return ((first, first_requests),
            (second, http_log[before:], trained_jobs, jobs(module_pipeline_home)))


@pytest.fixture(scope="module")
def first_run(first_and_second_run):
    return first_and_second_run[0]


@pytest.fixture(scope="module")
def second_run(first_and_second_run):
    return first_and_second_run[1]


def test_flow_runs_every_stage_and_tears_down(first_run):
    state, requests = first_run
    assert state.is_completed(), state.message
    summary = state.result()
    assert list(summary.stages) == ["download", "preview", "upload", "fit", "deploy",
                                       "smoke_predict", "delete_endpoint", "register"]
    assert requests == ["/cifar-10-python.tar.gz"]  # downloaded once, over HTTP
    assert summary.data.reused is False
    assert summary.training.metrics["test_accuracy"] > 0.5
    assert summary.training.model_uri.endswith("output/model.tar.gz")
    assert summary.smoke_test.images == 100
    assert summary.smoke_test.accuracy >= 0.5
    assert summary.endpoint.url.startswith("http://127.0.0.1:")
    assert summary.endpoint.kept is False
    assert summary.cost.usd == 0.0
    assert_no_endpoint_left(state.state_details.flow_run_id)


def test_flow_publishes_its_artifacts(first_run):
    state, _ = first_run
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert set(artifacts) >= ARTIFACT_KEYS
    for key in ("cifar10-preview", "cifar10-predictions"):
        assert "](data:image/jpeg;base64," in artifacts[key].data
    assert "model artifact" in artifacts["cifar10-run-summary"].data
    assert artifacts["cifar10-training-progress"].data == 100.0


def test_second_run_reuses_the_cached_download(second_run):
    state, requests, _, _ = second_run
    assert state.is_completed(), state.message
    assert state.result().data.reused is True
    assert requests == []  # no request reached the server


# -- the training cache ---------------------------------------------------------------------


def test_an_unchanged_run_reuses_the_training(first_run, second_run):
    first, (state, _, trained_jobs, jobs_after) = first_run[0].result(), second_run
    assert first.training.cached_from is None and first.training.billable_seconds > 0
    again = state.result()
    assert again.training.cached_from == first.training.job_name
    assert again.training.model_uri == first.training.model_uri
    assert again.training.billable_seconds == 0
    assert jobs_after == trained_jobs  # no new training job
    # The same model, already registered: named, not registered again.
    assert (again.registry.version, again.registry.reused) == (first.registry.version, True)
    assert again.registry.status == first.registry.status == APPROVED
    assert [v.version for v in LocalBackend().registry.versions(GROUP)
            if v.training_job == first.training.job_name] == [first.registry.version]
    assert "cached from job" in again.text() and "not registered again" in again.text()


@pytest.mark.parametrize("change", ["hyperparameter", "no-cache"])
def test_a_changed_or_uncached_run_trains_anew(change, first_run, module_pipeline_home,
                                               http_server, cifar_tarball):
    before = jobs(module_pipeline_home)
    overrides = {"training": {"epochs": 2, "learning_rate": 0.021, "batch_size": 16}} \
        if change == "hyperparameter" else \
        {"training": {"epochs": 2, "learning_rate": 0.02, "batch_size": 16, "cache": False}}
    summary = run(http_server, cifar_tarball, **overrides)
    assert summary.training.cached_from is None
    assert len(jobs(module_pipeline_home)) == len(before) + 1


def test_a_byte_of_model_src_trains_anew(first_run, http_server, cifar_tarball, tmp_path,
                                         monkeypatch):
    import flows.run_context

    changed = tmp_path / "model_src"
    shutil.copytree(REPO / "model_src", changed)
    with open(changed / "contract.py", "a") as f:
        f.write("\n")
    monkeypatch.setattr(flows.run_context, "SOURCE_DIR", changed)
    assert run(http_server, cifar_tarball).training.cached_from is None


def test_other_data_trains_anew(first_run, http_server, http_root):
    from bench.generated_data import make_cifar_tarball

    md5 = make_cifar_tarball(http_root / "other-cifar-10.tar.gz", seed=7)
    summary = run(http_server, ("other-cifar-10.tar.gz", md5))
    assert summary.data.md5 == md5 and summary.training.cached_from is None


def test_accuracy_under_the_floor_fails_the_run(first_run, http_server, cifar_tarball):
    from tasks.endpoint import AccuracyBelowFloor

    config = local_config(http_server, cifar_tarball,
                        training={"epochs": 1, "learning_rate": 1e-6})
    state = cifar10_pipeline(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(AccuracyBelowFloor, match=r"under the accuracy floor 0\.500"):
        state.result()
    assert_no_endpoint_left(state.state_details.flow_run_id)


def test_keep_endpoint_leaves_it_running(first_run, http_server, cifar_tarball):
    config = local_config(http_server, cifar_tarball, endpoint={"keep": True})
    state = cifar10_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    backend = LocalBackend()
    try:
        assert summary.endpoint.kept is True
        info = backend.endpoints.describe(summary.endpoint.name)
        assert info.status == "InService"
        assert info.kept  # marked, so that the reaper leaves it alone
    finally:
        backend.endpoints.delete(summary.endpoint.name)


def test_a_deleted_artifact_trains_anew(second_run, http_server, cifar_tarball):
    """Last here: it deletes the model the other runs were cached from."""
    cached = second_run[0].result()
    assert cached.training.cached_from is not None
    # Every model trained with this key is gone (an older identical one would be reused).
    versions = LocalBackend().registry.versions(GROUP)
    key = next(v.cache_key for v in versions if v.version == cached.registry.version)
    for version in versions:
        if version.cache_key == key:
            path_from_uri(version.model_uri).unlink(missing_ok=True)
    summary = run(http_server, cifar_tarball)
    assert summary.training.cached_from is None


def test_the_orchestrating_process_never_imports_torch():
    """The flow, its tasks, the CLI and the deployments import only model_src's torch-free
    module: torch (seconds to import) loads in training jobs and model servers only."""
    import subprocess
    import sys

    probe = ("import sys, flows.pipeline, flows.cli, flows.reaper, deployments.serve; "
             "assert 'torch' not in sys.modules, sorted(m for m in sys.modules "
             "if m.startswith('torch'))[:5]")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
