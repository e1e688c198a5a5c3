"""The sweep flow on the local backend, on generated data served over loopback HTTP: points
train concurrently (their training windows overlap), a failing point is reported without failing
the sweep, only the winner is hosted and its endpoint deleted, every completed point is
registered. Cancellation mid-sweep: test_faults_live.py."""

from __future__ import annotations

import datetime as dt

import pytest
from typer.testing import CliRunner

from backends.base import APPROVED, REJECTED
from backends.local import LocalBackend
from backends.local.endpoints import LocalEndpoints
from backends.local.training import LocalTrainingJobs
from flows.config import MAX_SWEEP_POINTS, SweepConfig
from flows.sweep import SweepFailed, cifar10_sweep, point_job_name
from tasks.lib.summary import PRICES_PER_HOUR, EndpointSummary, TrainingSummary, estimate_cost
from tests.support.configs import local_config, sweep_config
from tests.support.pipeline import artifacts_of

FAILING_LR = 0.0375  # the point whose training job the tests make fail


# The sweeps share one state directory (a registry and a training cache).
pytestmark = pytest.mark.usefixtures("module_pipeline_home")


@pytest.fixture(scope="module")
def swept(module_pipeline_home, prefect_harness, http_server, cifar_tarball):
    """A 3-point sweep, two at once, whose second point's training job fails; it records
    every endpoint the backend was asked to create."""
    deployed: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        train, deploy = LocalTrainingJobs.run, LocalEndpoints.deploy

        def failing_train(self, spec, on_log=None):
            if spec.hyperparameters["lr"] == FAILING_LR:
                raise RuntimeError("injected: the instance was lost")
            return train(self, spec, on_log)

        def recorded_deploy(self, spec, on_log=None):
            deployed.append(spec.name)
            return deploy(self, spec, on_log)

        mp.setattr(LocalTrainingJobs, "run", failing_train)
        mp.setattr(LocalEndpoints, "deploy", recorded_deploy)
        config = sweep_config(local_config(http_server, cifar_tarball),
                              [0.02, FAILING_LR, 0.03], max_parallel=2)
        state = cifar10_sweep(config, return_state=True)
    return state, deployed


def test_points_train_concurrently_and_only_the_winner_is_hosted(swept):
    state, deployed = swept
    assert state.is_completed(), state.message
    summary = state.result()
    run_id = summary.flow_run_id
    assert summary.max_parallel == 2
    assert [p.values for p in summary.points] == [
        {"learning_rate": 0.02}, {"learning_rate": FAILING_LR}, {"learning_rate": 0.03}]
    assert [p.job_name for p in summary.points] == [point_job_name(run_id, i)
                                                    for i in (1, 2, 3)]
    assert [p.status for p in summary.points] == ["Completed", "Failed", "Completed"]

    # points 1 and 2 started together (at most 2 at once); the third started once one of
    # them was done; the two trainings that ran ran at the same time as the failed one
    first, _, third = summary.points
    window = {p.index: (dt.datetime.fromisoformat(p.started), dt.datetime.fromisoformat(p.ended))
              for p in summary.points}
    assert max(window[1][0], window[2][0]) < min(window[1][1], window[2][1])
    assert window[3][0] >= min(window[1][1], window[2][1])

    # the winner: the best test accuracy of the completed points, the only one hosted
    completed = [first, third]
    best = max(completed, key=lambda p: p.test_accuracy)
    assert [p.winner for p in summary.points].count(True) == 1 and best.winner
    assert deployed == [summary.endpoint.name]
    assert summary.smoke_test.accuracy >= 0.5
    assert LocalBackend().endpoints.describe(summary.endpoint.name) is None  # deleted
    assert LocalBackend().endpoints.list() == []
    assert list(summary.stages) == ["download", "upload", "fit", "deploy", "smoke_predict",
                                    "delete_endpoint", "register"]
    assert summary.cost.usd == 0.0


def test_a_failed_point_is_reported_not_fatal(swept):
    summary = swept[0].result()
    failed = summary.points[1]
    assert "injected: the instance was lost" in failed.error
    assert failed.test_accuracy is None and failed.training is None
    assert failed.registry is None
    rows = summary.rows()
    assert rows[1]["status"] == "Failed" and "instance was lost" in rows[1]["error"]
    assert "1 failed" in summary.text()


def test_every_completed_point_is_registered_the_winner_through_the_gate(swept):
    summary = swept[0].result()
    winner, loser = summary.winner, next(p for p in summary.points
                                         if p.training and not p.winner)
    assert winner.registry.status == APPROVED
    assert loser.registry.status == REJECTED
    assert winner.registry.version < loser.registry.version  # registered first
    assert f"< the winner's {winner.test_accuracy:.4f}" in loser.registry.reason
    versions = {v.version: v for v in LocalBackend().registry.versions("cifar10-pipeline")}
    assert versions[winner.registry.version].metrics["smoke_accuracy"] == \
        summary.smoke_test.accuracy
    assert "smoke_accuracy" not in versions[loser.registry.version].metrics


def test_the_sweep_publishes_its_table_and_plot(swept):
    state, _ = swept
    summary = state.result()
    artifacts = artifacts_of(state.state_details.flow_run_id)
    table = artifacts["cifar10-sweep-points"]
    assert table.type == "table"
    rows = [row for row in __import__("json").loads(table.data)]
    assert [row["point"] for row in rows] == [1, 2, 3]
    assert [row["status"].endswith("(winner)") for row in rows] == \
        [p.winner for p in summary.points]
    assert "](data:image/png;base64," in artifacts["cifar10-sweep-summary"].data


def test_a_sweep_whose_points_all_fail_fails_without_an_endpoint(prefect_harness, http_server,
                                                                 cifar_tarball, monkeypatch):
    def lost(self, spec, on_log=None):
        raise RuntimeError("injected: no capacity")

    monkeypatch.setattr(LocalTrainingJobs, "run", lost)
    monkeypatch.setattr(LocalEndpoints, "deploy", lambda *a, **k: pytest.fail("deployed"))
    # (learning rates no other test trained: a completed training would be reused instead)
    state = cifar10_sweep(sweep_config(local_config(http_server, cifar_tarball),
                                       [0.011, 0.012]), return_state=True)
    assert state.is_failed()
    with pytest.raises(SweepFailed, match=r"all 2 points failed.*no capacity"):
        state.result()


# --- the config and the command line --------------------------------------------------------

def test_the_grid_is_every_combination_and_checked():
    config = SweepConfig.model_validate({"grid": {"learning_rate": [0.01, 0.02],
                                                  "epochs": [1, 2, 3]}})
    points = config.points()
    assert len(points) == 6
    assert {(p.learning_rate, p.epochs) for p in points} == {
        (lr, e) for lr in (0.01, 0.02) for e in (1, 2, 3)}
    assert config.parallel_jobs(usable_cpus=16) == 6  # never more than there are points
    assert config.parallel_jobs(usable_cpus=2) == 2  # local: one per core
    with pytest.raises(ValueError, match="lists a value twice"):
        SweepConfig.model_validate({"grid": {"learning_rate": [0.01, 0.01]}})
    with pytest.raises(ValueError, match=f"at most {MAX_SWEEP_POINTS}"):
        SweepConfig.model_validate({"grid": {"seed": list(range(MAX_SWEEP_POINTS + 1))}})
    with pytest.raises(ValueError, match="greater than 0"):
        SweepConfig.model_validate({"grid": {"learning_rate": [0.0]}})
    aws = SweepConfig.model_validate({"base": {"backend": "aws"},
                                      "grid": {"seed": list(range(10))}})
    assert aws.parallel_jobs(usable_cpus=2) == 4


def test_the_command_line_builds_the_sweep(monkeypatch):
    import flows.cli

    ran = {}
    monkeypatch.setattr(flows.cli, "_run_flow",
                        lambda flow, config, as_json: ran.update(config=config, json=as_json))
    result = CliRunner().invoke(flows.cli.app, [
        "sweep", "--lr", "0.02,0.05", "--epochs", "1,2", "--max-parallel", "2", "--json",
        "--data-url", "file:///data/cifar.tar.gz", "--data-md5", "none"])
    assert result.exit_code == 0, result.output
    config = ran["config"]
    assert ran["json"] is True and config.max_parallel == 2
    assert config.grid.swept() == {"learning_rate": [0.02, 0.05], "epochs": [1.0, 2.0]}
    assert config.base.data.url == "file:///data/cifar.tar.gz" and config.base.data.md5 is None

    bad = CliRunner().invoke(flows.cli.app, ["sweep", "--lr", "0.02,fast"])
    assert bad.exit_code == 2 and "comma-separated list of float" in bad.output


def test_the_sweep_totals_every_jobs_cost():
    trainings = [TrainingSummary(job_name=f"j{i}", model_uri="s3://b/m", billable_seconds=s,
                                 instance_type="ml.m5.xlarge", instance_count=1, metrics={})
                 for i, s in enumerate((3600, 1800))]
    endpoint = EndpointSummary(name="e", url=None, instance_type="ml.m5.large",
                               instance_count=1, kept=False, uptime_seconds=360)
    cost = estimate_cost("aws", trainings, endpoint)
    assert cost.usd == round(1.5 * PRICES_PER_HOUR["ml.m5.xlarge"]
                             + 0.1 * PRICES_PER_HOUR["ml.m5.large"], 4)
    assert estimate_cost("local", trainings, endpoint).usd == 0.0


def test_a_sweep_on_aws_warns_when_it_may_outrun_the_accounts_quota():
    """max_parallel x instance_count is measured against what new accounts' SageMaker quotas
    usually allow; the summary later says whether the quota was the limit."""
    from flows.sweep import quota_warning
    from tasks.lib.summary import SweepPoint, quota_note

    def sweep(backend: str, instances: int) -> SweepConfig:
        return SweepConfig.model_validate({
            "base": {"backend": backend, "training": {"instance_count": instances,
                                                      "instance_type": "ml.g5.xlarge"}},
            "grid": {"seed": list(range(8))}})

    assert quota_warning(sweep("aws", 1), parallel=4) is None  # within the usual quotas
    warning = quota_warning(sweep("aws", 2), parallel=4)
    assert warning and "up to 8 ml.g5.xlarge training instances at once (4 jobs x 2)" in warning
    assert "'ml.g5.xlarge for training job usage'" in warning and "Service Quotas" in warning
    assert quota_warning(sweep("local", 2), parallel=8) is None  # this machine: no quota

    points = [SweepPoint(index=i, values={}, hyperparameters={}, job_name=f"j{i}",
                         status=status, quota_wait_seconds=wait, quota_refused=refused)
              for i, status, wait, refused in ((1, "Completed", 0.0, False),
                                               (2, "Completed", 120.0, False),
                                               (3, "Failed", 3600.0, True))]
    assert quota_note(points[:1], "ml.g5.xlarge") is None
    note = quota_note(points, "ml.g5.xlarge")
    assert note and "point 2 waited 120s in all" in note and "point 3 failed" in note
