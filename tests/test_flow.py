"""The whole flow on the local backend, on generated data served over loopback HTTP (the real
download code): every stage, the artifacts, guaranteed teardown, the cached download. Teardown
under injected faults (every stage after deploy starts): test_faults.py."""

from __future__ import annotations

import pytest

from backends.local import LocalBackend
from flows.pipeline import cifar10_pipeline, resource_name
from tests.support.pipeline import ARTIFACT_KEYS, artifacts_of, config_for


def assert_no_endpoint_left(run_id) -> None:
    backend = LocalBackend()
    assert backend.describe_endpoint(resource_name(str(run_id))) is None
    assert backend.list_endpoints() == []


@pytest.fixture(scope="module", autouse=True)
def own_state_dir(tmp_path_factory):
    """This module's runs start from an empty state directory: the first one must download
    (other modules may have left a verified copy in the session's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFAR10_PIPELINE_HOME", str(tmp_path_factory.mktemp("flow-state")))
        yield


@pytest.fixture(scope="module")
def first_run(prefect_harness, http_server, cifar_tarball, http_log):
    before = len(http_log)
    state = cifar10_pipeline(config_for(http_server, cifar_tarball), return_state=True)
    return state, http_log[before:]


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
        assert "](data:image/png;base64," in artifacts[key].data
    assert "model artifact" in artifacts["cifar10-run-summary"].data
    assert artifacts["cifar10-training-progress"].data == 100.0


def test_second_run_reuses_the_cached_download(first_run, prefect_harness, http_server,
                                               cifar_tarball, http_log):
    before = len(http_log)
    state = cifar10_pipeline(config_for(http_server, cifar_tarball), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().data.reused is True
    assert http_log[before:] == []  # no request reached the server


def test_accuracy_under_the_floor_fails_the_run(prefect_harness, http_server, cifar_tarball):
    from tasks.endpoint import AccuracyBelowFloor

    config = config_for(http_server, cifar_tarball,
                        training={"epochs": 1, "learning_rate": 1e-6})
    state = cifar10_pipeline(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(AccuracyBelowFloor, match=r"under the accuracy floor 0\.500"):
        state.result()
    assert_no_endpoint_left(state.state_details.flow_run_id)


def test_keep_endpoint_leaves_it_running(prefect_harness, http_server, cifar_tarball):
    config = config_for(http_server, cifar_tarball, endpoint={"keep": True})
    state = cifar10_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    backend = LocalBackend()
    try:
        assert summary.endpoint.kept is True
        info = backend.describe_endpoint(summary.endpoint.name)
        assert info.status == "InService"
        assert info.kept  # marked, so that the reaper leaves it alone
    finally:
        backend.delete_endpoint(summary.endpoint.name)


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
