"""Promotion to the serving endpoint, the orchestration part: the config's guardrail limits, the
registry's deployment notes on both backends, the promote task's decisions (what goes, what
the registry records after a promotion, a rollback or a failure), the cifar10-promote flow,
the pipeline's promote stage (a rollback fails the run once the summary is published), the
`serving` commands, `models list`'s column, and the reaper leaving the serving endpoint alone.

The serving endpoint itself is a fake here (``FakeServing``: what ``backend.serving`` promises,
with outcomes chosen by the test); the last test runs the real local one end to end."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from backends.aws import AwsBackend
from backends.base import (
    APPROVED,
    CREATED,
    FAILED,
    KEPT_KEY,
    PENDING,
    PROMOTED,
    REJECTED,
    ROLLED_BACK,
    SERVING_KEY,
    BackendError,
    EndpointFailed,
    EndpointInfo,
    ModelVersionSpec,
    PromotionResult,
    PromotionStep,
    ServingSpec,
    ServingStatus,
    TrainingResult,
    managed_tags,
)
from backends.local import LocalBackend
from backends.reaper import reap_endpoints
from flows.cli import app
from flows.config import PipelineConfig
from tasks.lib.promotion import PromotionRefused, rollback_target
from tasks.lib.promotion_gate import GatePolicy
from tasks.lib.summary import NOT_PROMOTED, SmokeTestResult
from tasks.promotion import PromotionNotCompleted, promote_model
from tasks.registry import register_model
from tests.support.aws_fakes import BUCKET, ROLE_ARN
from tests.support.configs import candidate, local_config, sweep_config
from tests.support.pipeline import artifacts_of
from tests.support.serving_load import Load, make_model

pytest_plugins = ["tests.support.aws_fixtures"]

GROUP = "cifar10-pipeline"
ENDPOINT = "cifar10-serving"
OWNER = "pytest"
runner = CliRunner()


class FakeServing:
    """``backend.serving`` as the contract says it behaves: ``outcomes`` are what the next
    promotions do ("ok": the new version serves; "rollback": the alarms refuse it, the old one
    still serves; "error": the backend raises), "ok" when the list is empty."""

    def __init__(self, outcomes: list[str] | None = None) -> None:
        self.outcomes = list(outcomes or [])
        self.requests: list[ServingSpec] = []
        self.status: ServingStatus | None = None
        self.deleted: list[str] = []

    def promote(self, spec: ServingSpec, on_log=None) -> PromotionResult:
        self.requests.append(spec)
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "error":
            raise EndpointFailed(spec.name, "the new fleet never answered /ping")
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        steps = [PromotionStep(at=start, action="new fleet InService", new_share=0.0),
                 PromotionStep(at=start + dt.timedelta(seconds=30), action="canary 10%",
                               new_share=0.1, error_rate=0.0, p99_latency_ms=12.0,
                               invocations=40)]
        if outcome == "rollback":
            steps.append(PromotionStep(at=start + dt.timedelta(seconds=60), action="rolled back",
                                       new_share=0.0, error_rate=0.31, p99_latency_ms=15.0,
                                       invocations=45))
            return PromotionResult(endpoint=spec.name, outcome=ROLLED_BACK,
                                   reason="5xx rate 0.31 > 0.05 during canary",
                                   status="InService", steps=steps,
                                   serving_version=self.status.version if self.status else None)
        first = self.status is None
        self.status = ServingStatus(name=spec.name, status="InService", group=spec.group,
                                    version=spec.version, model_uri=spec.model_uri,
                                    url="http://127.0.0.1:1", last_deployment="fake")
        steps.append(PromotionStep(at=start + dt.timedelta(seconds=90), action="baked",
                                   new_share=1.0, error_rate=0.0, p99_latency_ms=11.0))
        return PromotionResult(endpoint=spec.name, outcome=CREATED if first else PROMOTED,
                               reason="", status="InService", serving_version=spec.version,
                               steps=steps)

    def describe(self, name: str) -> ServingStatus | None:
        return self.status if self.status and self.status.name == name else None

    def delete(self, name: str) -> bool:
        self.deleted.append(name)
        found, self.status = self.status is not None, None
        return found


def add_version(backend, status: str = APPROVED, accuracy: float = 0.6) -> int:
    """A version registered straight into the registry, its decision given."""
    job = f"job-{len(backend.registry.versions(GROUP)) + 1}"
    spec = ModelVersionSpec(group=GROUP, model_uri=f"file:///models/{job}/model.tar.gz",
                            training_job=job, cache_key=job,
                            metrics={"test_accuracy": accuracy}, lineage={})
    return backend.registry.register(spec, lambda before: (status, f"{status} by the test"))\
        .version.version


def fake_backend(root, outcomes: list[str] | None = None) -> LocalBackend:
    backend = LocalBackend(root=root)
    backend.serving = FakeServing(outcomes)
    return backend


def plan(**serving: Any):
    return PipelineConfig.model_validate({"serving": serving}).serving_plan()


def promote(backend, version: int | None = None, auto: bool = False, **serving: Any):
    return promote_model.fn(backend, GROUP, plan(**serving), OWNER, version=version, auto=auto)


def notes(backend) -> dict[int, str | None]:
    return {v.version: v.deployment for v in backend.registry.versions(GROUP)}


# -- the config ---------------------------------------------------------------------------------


def test_serving_is_off_by_default_and_its_plan_follows_the_config():
    config = PipelineConfig()
    assert config.serving.enabled is False
    default = config.serving_plan()
    assert (default.endpoint, default.instance_type, default.autoscaling) == (
        ENDPOINT, "local", None)
    assert (default.shift.strategy, default.shift.percent) == ("canary", 10)
    aws = PipelineConfig.model_validate({"backend": "aws", "serving": {
        "strategy": "linear", "percent": 25, "wait_seconds": 60, "baking_seconds": 120,
        "max_seconds": 900, "max_error_rate": 0.01, "max_p99_latency_ms": 250,
        "instance_type": "ml.c5.xlarge", "instance_count": 2,
        "autoscaling": {"min_instances": 2, "max_instances": 4,
                        "invocations_per_instance": 500}}}).serving_plan()
    assert aws.instance_type == "ml.c5.xlarge" and aws.instance_count == 2
    assert (aws.shift.strategy, aws.shift.percent, aws.shift.wait_seconds,
            aws.shift.baking_seconds, aws.shift.max_seconds) == ("linear", 25, 60, 120, 900)
    assert (aws.alarms.max_error_rate, aws.alarms.max_p99_latency_ms) == (0.01, 250)
    assert (aws.autoscaling.min_instances, aws.autoscaling.max_instances,
            aws.autoscaling.invocations_per_instance) == (2, 4, 500)
    assert aws.describe_shift() == "linear 25% steps"


@pytest.mark.parametrize("serving, message", [
    ({"strategy": "canary", "percent": 60}, "serving.percent"),
    ({"strategy": "linear", "percent": 5}, "a linear step of 5% is below the 10%"),
    ({"wait_seconds": 3601}, "serving.wait_seconds"),
    ({"baking_seconds": -1}, "serving.baking_seconds"),
    ({"max_seconds": 599}, "serving.max_seconds"),
    ({"max_seconds": 30000}, "serving.max_seconds"),
    ({"strategy": "linear", "percent": 10, "wait_seconds": 300, "max_seconds": 3000},
     "the waits add up to 3000 s"),
    ({"endpoint_name": "not_a_name"}, "serving.endpoint_name"),
    ({"strategy": "blue-green"}, "serving.strategy"),
    ({"autoscaling": {"min_instances": 3, "max_instances": 2}},
     "min_instances 3 is more than max_instances 2"),
    ({"instance_type": "ml.m7g.large"}, "Graviton"),
])
def test_the_guardrail_limits_are_refused_clearly(serving, message):
    backend = "aws" if "instance_type" in serving else "local"
    with pytest.raises(ValidationError) as refused:
        PipelineConfig.model_validate({"backend": backend, "serving": serving})
    text = "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                     for e in refused.value.errors())
    assert message in text, text


def test_the_limits_themselves_are_allowed():
    for serving in ({"strategy": "canary", "percent": 50}, {"strategy": "linear", "percent": 10,
                    "wait_seconds": 300, "baking_seconds": 0, "max_seconds": 2800},
                    {"strategy": "all_at_once", "wait_seconds": 3600, "baking_seconds": 3600,
                     "max_seconds": 28800}):
        PipelineConfig.model_validate({"serving": serving})


# -- the registries: where a version stands -------------------------------------------------------


def test_the_local_registry_records_the_deployment(tmp_path):
    backend = LocalBackend(root=tmp_path)
    first, second = add_version(backend), add_version(backend, REJECTED)
    updated = backend.registry.set_deployment(GROUP, first, f"serving on {ENDPOINT}")
    assert (updated.deployment, updated.status) == (f"serving on {ENDPOINT}", APPROVED)
    assert notes(backend) == {first: f"serving on {ENDPOINT}", second: None}
    # The status survives the note, and the note survives a status change.
    backend.registry.set_status(GROUP, first, REJECTED, "bad on night images")
    assert notes(backend)[first] == f"serving on {ENDPOINT}"
    assert backend.registry.set_deployment(GROUP, first, None).deployment is None
    with pytest.raises(BackendError, match="has no version 9"):
        backend.registry.set_deployment(GROUP, 9, "serving on x")
    # A record written before the field existed reads as never promoted.
    record = tmp_path / "registry" / GROUP / f"v{second}.json"
    data = json.loads(record.read_text())
    del data["deployment"]
    record.write_text(json.dumps(data))
    assert notes(backend)[second] is None


def test_sagemaker_model_registry_records_the_deployment_as_metadata(aws, no_network,
                                                                     request_validator):
    backend = AwsBackend(role_arn=ROLE_ARN, bucket=BUCKET, poll_seconds=0.01)
    model = TrainingResult(job_name="job-1", status="Completed",
                           model_uri=f"s3://{BUCKET}/cifar10-pipeline/nowhere/model.tar.gz",
                           metrics={"test_accuracy": 0.6, "test_loss": 1.0},
                           billable_seconds=1, log_location="-")
    smoke = SmokeTestResult(images=64, accuracy=0.6, accuracy_floor=0.4, per_class={},
                            requests=1, seconds=0.1)
    lineage = {"data_md5": "0" * 32, "flow_run_id": "run"}
    registered = register_model.fn(
        backend, candidate(GROUP, model, smoke, "key", lineage, "ml.m5.large",
                           managed_tags("pytest")), model, smoke, GatePolicy())
    [before] = backend.registry.versions(GROUP)
    assert before.deployment is None
    reason = "rolled back: 5xx rate 0.31 > 0.05 during canary"
    updated = backend.registry.set_deployment(GROUP, registered.version, reason)
    # The metadata's characters: what the API does not allow becomes "_".
    assert updated.deployment == "rolled back: 5xx rate 0.31 _ 0.05 during canary"
    [after] = backend.registry.versions(GROUP)
    assert (after.status, after.reason) == (before.status, before.reason)
    assert after.lineage == before.lineage and after.metrics == before.metrics
    assert "deployment" not in after.lineage
    backend.registry.set_deployment(GROUP, registered.version, f"serving on {ENDPOINT}")
    assert backend.registry.versions(GROUP)[0].deployment == f"serving on {ENDPOINT}"
    assert backend.registry.set_deployment(GROUP, registered.version, None).deployment is None
    with pytest.raises(BackendError, match="has no version 7"):
        backend.registry.set_deployment(GROUP, 7, "serving on x")
    assert request_validator.violations == []


# -- the promote task ---------------------------------------------------------------------------


def test_promotions_move_the_notes_with_the_endpoint(tmp_path):
    backend = fake_backend(tmp_path, ["ok", "ok", "rollback"])
    v1, v2, v3 = add_version(backend), add_version(backend), add_version(backend)

    first = promote(backend, v1)
    assert (first.outcome, first.serving_version, first.serving_before) == (CREATED, v1, None)
    [spec] = backend.serving.requests
    assert (spec.name, spec.group, spec.version) == (ENDPOINT, GROUP, v1)
    assert spec.model_uri == backend.registry.versions(GROUP)[0].model_uri
    assert spec.tags[SERVING_KEY] == "true" and spec.tags[KEPT_KEY] == "true"
    assert spec.tags["managed-by"] == "cifar10-pipeline" and spec.tags["owner"] == OWNER
    assert notes(backend) == {v1: f"serving on {ENDPOINT}", v2: None, v3: None}

    second = promote(backend, v2, strategy="linear", percent=20)
    assert (second.outcome, second.serving_before, second.shift) == (
        PROMOTED, v1, "linear 20% steps")
    assert backend.serving.requests[-1].shift.strategy == "linear"
    assert notes(backend) == {v1: "replaced by v2", v2: f"serving on {ENDPOINT}", v3: None}

    third = promote(backend, v3)
    assert (third.outcome, third.ok, third.serving_version) == (ROLLED_BACK, False, v2)
    assert "ROLLED BACK" in third.line() and "5xx rate 0.31 > 0.05" in third.line()
    assert [s.action for s in third.steps][-1] == "rolled back"
    assert notes(backend) == {v1: "replaced by v2", v2: f"serving on {ENDPOINT}",
                              v3: "rolled back: 5xx rate 0.31 > 0.05 during canary"}


def test_a_backend_error_is_a_failed_promotion_and_the_old_version_keeps_serving(tmp_path):
    backend = fake_backend(tmp_path, ["ok", "error"])
    v1, v2 = add_version(backend), add_version(backend)
    promote(backend, v1)
    failed = promote(backend, v2)
    assert (failed.outcome, failed.ok, failed.serving_version) == (FAILED, False, v1)
    assert "EndpointFailed" in failed.reason and "never answered /ping" in failed.reason
    assert notes(backend)[v1] == f"serving on {ENDPOINT}"
    assert notes(backend)[v2].startswith("promotion failed: EndpointFailed")


@pytest.mark.parametrize("setup, why", [
    ("rejected", "v2 is Rejected (Rejected by the test)"),
    ("pending", "v2 is PendingManualApproval"),
    ("not champion", "v2 is approved but v3 is the champion"),
    ("serving", "v2 already serves on cifar10-serving"),
    ("rolled back", "v2 was rolled back: 5xx rate"),
])
def test_the_pipeline_promotes_only_a_new_champion(tmp_path, setup, why):
    backend = fake_backend(tmp_path, ["ok", "rollback"] if setup == "rolled back" else None)
    v1 = add_version(backend)
    promote(backend, v1)
    status = {"rejected": REJECTED, "pending": PENDING}.get(setup, APPROVED)
    v2 = add_version(backend, status)
    if setup == "not champion":
        add_version(backend)
    if setup in ("serving", "rolled back"):
        promote(backend, v2)
    asked = len(backend.serving.requests)
    skipped = promote(backend, v2, auto=True)
    assert (skipped.outcome, skipped.ok) == (NOT_PROMOTED, True)
    assert why in skipped.reason and skipped.line().startswith("not promoted: ")
    assert len(backend.serving.requests) == asked  # nothing was asked of the endpoint


def test_the_pipeline_promotes_a_new_champion(tmp_path):
    backend = fake_backend(tmp_path)
    v1 = add_version(backend)
    assert promote(backend, v1, auto=True).outcome == CREATED
    v2 = add_version(backend)
    assert promote(backend, v2, auto=True).outcome == PROMOTED
    assert notes(backend) == {v1: "replaced by v2", v2: f"serving on {ENDPOINT}"}


def test_by_hand_any_approved_version_and_nothing_else(tmp_path):
    backend = fake_backend(tmp_path)
    v1, v2, v3 = add_version(backend), add_version(backend), add_version(backend, REJECTED)
    assert promote(backend).version == v2  # no version: the champion
    with pytest.raises(PromotionRefused, match=rf"v{v3} is Rejected .*models approve {v3}"):
        promote(backend, v3)
    with pytest.raises(PromotionRefused, match="has no version 9 \\(versions: v1, v2, v3\\)"):
        promote(backend, 9)
    # An older approved version put back: the one it replaces is marked rolled back.
    back = promote(backend, v1)
    assert (back.outcome, back.serving_before) == (PROMOTED, v2)
    assert notes(backend) == {v1: f"serving on {ENDPOINT}",
                              v2: "rolled back: v1 promoted back in its place", v3: None}
    again = promote(backend, v1)
    assert again.outcome == NOT_PROMOTED and "already serves" in again.reason
    with pytest.raises(PromotionRefused, match="no Approved version"):
        promote_model.fn(fake_backend(tmp_path / "empty"), GROUP, plan(), OWNER)


def test_a_promotion_that_did_not_complete_is_an_error_prefect_can_store():
    import pickle

    from tasks.lib.summary import PromotionSummary
    from tasks.promotion import PromotionNotCompleted

    summary = PromotionSummary(endpoint=ENDPOINT, group=GROUP, version=2, outcome=ROLLED_BACK,
                               reason="5xx rate 0.31 > 0.05 during canary", shift="canary 10%",
                               status="InService", serving_version=1, serving_before=1)
    error = pickle.loads(pickle.dumps(PromotionNotCompleted(summary.line(), summary)))
    assert str(error) == summary.line() and error.summary == summary
    assert summary.line() == ("promotion of cifar10-pipeline v2 to cifar10-serving ROLLED BACK "
                              "(canary 10%): 5xx rate 0.31 > 0.05 during canary; v1 serves; "
                              "the endpoint is InService")


def test_the_rollback_target(tmp_path):
    backend = fake_backend(tmp_path)
    v1, v2, v3, v4 = (add_version(backend) for _ in range(4))
    for version in (v1, v3, v4):  # v2 was never promoted
        promote(backend, version)
    versions = backend.registry.versions(GROUP)
    target, why = rollback_target(versions, v4)
    assert (target.version, why) == (v3, "the version v4 replaced")
    backend.registry.set_status(GROUP, v3, REJECTED, "bad after all")
    target, why = rollback_target(backend.registry.versions(GROUP), v4)
    assert target.version == v2 and why.startswith("the newest Approved version before v4")
    assert rollback_target(versions, v1) is None


# -- the flows ----------------------------------------------------------------------------------


@pytest.fixture
def faked(monkeypatch, pipeline_home) -> Iterator[FakeServing]:
    """Every backend the flows and commands build locally gets one ``FakeServing``."""
    # Imported before anything is patched: a module first imported while flows.config's
    # function is patched would keep the patched one for good.
    import flows.config
    import flows.pipeline
    import flows.promote
    import flows.sweep

    serving = FakeServing()
    real = flows.config.get_backend

    def get_backend(config, concurrent_jobs=1):
        backend = real(config, concurrent_jobs)
        backend.serving = serving
        return backend

    for where in ("flows.config", "flows.promote", "flows.pipeline", "flows.sweep"):
        monkeypatch.setattr(f"{where}.get_backend", get_backend)
    yield serving


def faked_local(serving: FakeServing) -> LocalBackend:
    """The backend in ``pipeline_home``, as the flows and commands build it under ``faked``."""
    backend = LocalBackend()
    backend.serving = serving
    return backend


def test_the_promote_flow_publishes_its_steps_and_fails_on_a_rollback(prefect_harness, faked):
    from flows.promote import cifar10_promote

    backend = LocalBackend()
    v1, v2 = add_version(backend), add_version(backend)
    faked.outcomes = ["ok", "rollback"]
    state = cifar10_promote(version=v1, config=PipelineConfig(), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome == CREATED
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert "](data:image/png;base64," in artifacts["cifar10-promotion"].data
    assert [row["action"] for row in json.loads(artifacts["cifar10-promotion-steps"].data)] == [
        "new fleet InService", "canary 10%", "baked"]

    state = cifar10_promote(config=PipelineConfig(), return_state=True)  # the champion: v2
    assert state.is_failed()
    assert "v2 to cifar10-serving ROLLED BACK" in state.message
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert "**promotion of cifar10-pipeline v2" in artifacts["cifar10-promotion"].data
    assert notes(backend)[v2].startswith("rolled back: 5xx rate")

    refused = cifar10_promote(version=v2 + 5, config=PipelineConfig(), return_state=True)
    assert refused.is_failed() and f"has no version {v2 + 5}" in refused.message


@pytest.mark.long_running
def test_the_pipeline_promotes_its_champion_and_fails_after_reporting_a_rollback(
        prefect_harness, faked, http_server, cifar_tarball):
    from flows.pipeline import cifar10_pipeline

    serving = {"enabled": True, "strategy": "all_at_once"}
    config = local_config(http_server, cifar_tarball, serving=serving)
    state = cifar10_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert list(summary.stages)[-2:] == ["register", "promote"]
    assert summary.promotion.outcome == CREATED and summary.promotion.version == 1
    assert "serving         cifar10-pipeline v1 created on cifar10-serving" in summary.text()

    # Trained anew (the same recipe: approved as good as the champion), refused by the alarms.
    faked.outcomes = ["rollback"]
    again = local_config(http_server, cifar_tarball, serving=serving,
                         training={**config.training.model_dump(), "cache": False})
    state = cifar10_pipeline(again, return_state=True)
    assert state.is_failed()
    assert "promotion of cifar10-pipeline v2 to cifar10-serving ROLLED BACK" in state.message
    run_id = state.state_details.flow_run_id
    artifacts = artifacts_of(run_id)
    assert "**promotion of cifar10-pipeline v2" in artifacts["cifar10-run-summary"].data
    assert "cifar10-promotion" in artifacts and "cifar10-model-lineage" in artifacts
    assert notes(LocalBackend()) == {1: f"serving on {ENDPOINT}",
                                     2: "rolled back: 5xx rate 0.31 > 0.05 during canary"}


def test_the_promote_deployment_and_the_nightly_switch():
    from deployments.automations import NOTIFY_FLOWS
    from deployments.definitions import promote_deployment
    from deployments.serve import nightly_parameters, parse_args

    deployment = promote_deployment()
    assert (deployment.name, deployment.flow_name) == ("manual", "cifar10-promote")
    assert not deployment.schedules  # a person promotes
    assert deployment.parameters == {"version": None,
                                     "config": PipelineConfig().model_dump(mode="json")}
    assert deployment.entrypoint == "flows.promote.cifar10_promote"
    assert "cifar10-promote" in NOTIFY_FLOWS  # a rolled-back promotion reaches someone
    # The nightly run promotes only when asked to: `make serve SERVE_ARGS=--serving`.
    assert nightly_parameters(parse_args([]).serving) is None
    on = nightly_parameters(parse_args(["--serving"]).serving)["config"]
    default = PipelineConfig().model_dump(mode="json")
    assert on == {**default, "serving": {**default["serving"], "enabled": True}}


@pytest.mark.long_running
def test_a_sweep_promotes_its_winner(prefect_harness, faked, http_server, cifar_tarball):
    from flows.sweep import cifar10_sweep

    base = local_config(http_server, cifar_tarball,
                        serving={"enabled": True, "strategy": "all_at_once"})
    state = cifar10_sweep(sweep_config(base, [0.02], max_parallel=1), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    winner = summary.winner
    assert (summary.promotion.outcome, summary.promotion.version) == (
        CREATED, winner.registry.version)
    assert faked.requests[-1].model_uri == winner.training.model_uri
    assert "serving         cifar10-pipeline v1 created on cifar10-serving" in summary.text()
    assert list(summary.stages)[-1] == "promote"


# -- the command line ---------------------------------------------------------------------------


def test_serving_status_and_models_list(faked):
    backend = faked_local(faked)
    assert "no serving endpoint cifar10-serving" in runner.invoke(app, ["serving",
                                                                        "status"]).stdout
    assert json.loads(runner.invoke(app, ["serving", "status", "--json"]).stdout) is None
    faked.outcomes = ["ok", "rollback"]
    v1, v2 = add_version(backend), add_version(backend)
    promote(backend, v1)
    promote(backend, v2)
    text = runner.invoke(app, ["serving", "status"]).stdout
    assert text.startswith("cifar10-serving  InService  cifar10-pipeline v1 (Approved)")
    shown = json.loads(runner.invoke(app, ["serving", "status", "--json"]).stdout)
    assert (shown["version"], shown["registry"]["deployment"]) == (
        v1, f"serving on {ENDPOINT}")

    listed = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert [(r["version"], r["serving"]) for r in listed] == [(v1, "serving"),
                                                              (v2, "rolled back")]
    assert listed[1]["deployment"].startswith("rolled back: 5xx rate 0.31")
    lines = runner.invoke(app, ["models", "list"]).stdout.splitlines()
    assert "serving" in lines[0]
    assert " serving " in lines[1] and " rolled back " in lines[2]


def test_serving_promote_and_rollback_commands(prefect_harness, faked):
    backend = faked_local(faked)
    v1, v2 = add_version(backend), add_version(backend)
    promoted = runner.invoke(app, ["serving", "promote", str(v1), "--strategy", "linear",
                                   "--percent", "50", "--json"])
    assert promoted.exit_code == 0, promoted.output
    assert json.loads(promoted.stdout.splitlines()[-1])["outcome"] == CREATED
    assert faked.requests[-1].shift.percent == 50
    result = runner.invoke(app, ["serving", "promote", str(v2)])
    assert result.exit_code == 0, result.output
    assert "cifar10-pipeline v2 promoted on cifar10-serving (canary 10%, replacing v1)" in \
        result.stdout

    rolled = runner.invoke(app, ["serving", "rollback"])
    assert rolled.exit_code == 0, rolled.output
    assert "rolling cifar10-serving back from v2 to v1 (the version v2 replaced)" in \
        rolled.output
    assert faked.requests[-1].shift.strategy == "all_at_once"
    assert notes(backend) == {v1: f"serving on {ENDPOINT}",
                              v2: "rolled back: v1 promoted back in its place"}
    nothing = runner.invoke(app, ["serving", "rollback"])
    assert nothing.exit_code == 1 and "no Approved version older than v1" in nothing.output

    refused = runner.invoke(app, ["serving", "promote", "1", "--percent", "70"])
    assert refused.exit_code == 2 and "serving.percent" in refused.output
    assert "cifar10-serving: deleted" in runner.invoke(app, ["serving", "delete"]).stdout
    assert faked.deleted == [ENDPOINT] and notes(backend)[v1] is None


# -- the reaper ---------------------------------------------------------------------------------


class ListedEndpoints:
    """``backend.endpoints`` with a fixed listing, recording deletes."""

    def __init__(self, listed: list[EndpointInfo], orphans: list[EndpointInfo]) -> None:
        self.listed, self.orphaned, self.deleted = listed, orphans, []

    def list(self) -> list[EndpointInfo]:
        return self.listed

    def orphans(self) -> list[EndpointInfo]:
        return self.orphaned

    def delete(self, name: str) -> bool:
        self.deleted.append(name)
        return True


def test_the_reaper_never_touches_the_serving_endpoint():
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    serving = {**managed_tags("pytest", created=old), SERVING_KEY: "true"}

    def info(name: str, tags: dict[str, str], status: str = "InService") -> EndpointInfo:
        return EndpointInfo(name=name, status=status, created=old, tags=tags)

    endpoints = ListedEndpoints(
        [info("cifar10-serving", {**serving, KEPT_KEY: "true"}),
         info("cifar10-serving-v2-ab12", serving),  # a fleet, even one not marked kept
         info("cifar10-0123456789ab", managed_tags("pytest", created=old))],
        [info("cifar10-serving-v1", serving, "Orphaned")])  # an update's config or model
    backend = type("Backend", (), {"endpoints": endpoints})()
    report = reap_endpoints(backend, dt.timedelta(hours=1))
    assert endpoints.deleted == report.deleted == ["cifar10-0123456789ab"]
    assert report.serving == ["cifar10-serving", "cifar10-serving-v2-ab12", "cifar10-serving-v1"]
    assert report.kept_by_user == []


# -- end to end, on the real local serving endpoint ----------------------------------------------


def npy_zeros() -> bytes:
    """One blank image as an application/x-npy body."""
    import io

    import numpy as np

    body = io.BytesIO()
    np.save(body, np.zeros((1, 3, 32, 32), dtype=np.float32))
    return body.getvalue()


def invoke_serving(url: str) -> bytes:
    """One image through the serving endpoint's stable URL, as any SageMaker client sends it."""

    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    from backends.base import invoke_through

    runtime = boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                           config=Config(signature_version=UNSIGNED))
    return invoke_through(runtime, ENDPOINT, npy_zeros(), "application/x-npy",
                          "application/json").body


@pytest.mark.long_running
def test_promotions_on_the_local_serving_endpoint(prefect_harness, pipeline_home, model_uri,
                                                  tmp_path):
    """The cifar10-promote flow against the real local serving endpoint (router and fleets):
    the first promotion creates it, the next moves traffic to v2 as a canary; the URL stays,
    and the registry follows. A third version that fails most invocations, promoted under
    load, is rolled back: the registry marks it so, the run fails, and v2 still answers."""
    from flows.promote import cifar10_promote

    backend = LocalBackend()

    def register(job: str, uri: str) -> None:
        backend.registry.register(ModelVersionSpec(
            group=GROUP, model_uri=uri, training_job=job, cache_key=job,
            metrics={"test_accuracy": 0.6}, lineage={}), lambda before: (APPROVED, "test"))

    register("job-1", model_uri)
    register("job-2", model_uri)
    config = PipelineConfig.model_validate({"serving": {
        "strategy": "canary", "percent": 50, "wait_seconds": 1, "baking_seconds": 1,
        "max_seconds": 600}})
    try:
        first = cifar10_promote(version=1, config=config)
        assert (first.outcome, first.serving_version) == (CREATED, 1), first.reason
        created = backend.serving.describe(ENDPOINT)
        assert (created.status, created.version) == ("InService", 1)
        assert len(json.loads(invoke_serving(created.url))[0]) == 10  # logits of 10 classes

        second = cifar10_promote(config=config)  # the champion: v2
        assert (second.outcome, second.serving_before) == (PROMOTED, 1), second.reason
        assert any(step.action.startswith("canary 50%") for step in second.steps)
        now = backend.serving.describe(ENDPOINT)
        assert (now.status, now.version, now.url) == ("InService", 2, created.url)
        assert len(json.loads(invoke_serving(now.url))[0]) == 10
        assert notes(backend) == {1: "replaced by v2", 2: f"serving on {ENDPOINT}"}
        shown = json.loads(runner.invoke(app, ["serving", "status", "--json"]).stdout)
        assert (shown["version"], shown["url"]) == (2, created.url)

        register("job-3", make_model(tmp_path, "failing", fail_every=10))
        with Load(now.url, ENDPOINT, body=npy_zeros(), content_type="application/x-npy"
                  ) as load, pytest.raises(PromotionNotCompleted) as raised:
            cifar10_promote(config=config)  # the champion now: v3
        assert raised.value.summary.outcome == ROLLED_BACK
        assert notes(backend)[3].startswith("rolled back: 5xx rate ")
        assert notes(backend)[2] == f"serving on {ENDPOINT}"
        rolled_back = backend.serving.describe(ENDPOINT)
        assert (rolled_back.status, rolled_back.version) == ("InService", 2)
        assert {a.version for a in load.answers if not a.ok} == {"3"}
        assert len(json.loads(invoke_serving(now.url))[0]) == 10  # v2 answers
    finally:
        backend.serving.delete(ENDPOINT)
    assert backend.serving.describe(ENDPOINT) is None
