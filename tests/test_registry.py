"""The model registry: the promotion gate's decisions on both backends, versions numbered safely
under concurrent registrations, and the `models` commands. The training cache, which finds
earlier trainings through the registry, is tested through the flow in test_flow.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from backends.aws import AwsBackend
from backends.base import (
    APPROVED,
    PENDING,
    REJECTED,
    Backend,
    TrainingResult,
    managed_tags,
)
from backends.local import LocalBackend
from flows.cli import app
from tasks.lib.promotion_gate import GatePolicy, verdict
from tasks.lib.summary import SmokeTestResult
from tasks.registry import register_model
from tests.support.aws_fakes import BUCKET, ROLE_ARN
from tests.support.configs import candidate
from tests.support.pipeline import REPO

pytest_plugins = ["tests.support.aws_fixtures"]

GROUP = "cifar10-pipeline"
LINEAGE = {"data_url": "https://example.org/cifar-10-python.tar.gz", "data_md5": "0" * 32,
           "code_digest": "c" * 64, "hyperparameters": "epochs=2 lr=0.02",
           "flow_run_id": "run", "backend": "local", "instance_type": "local",
           "instance_count": "1"}


# Where each backend's test models "are" (never read): a URI of the backend's own kind, since
# SageMaker refuses a ModelDataUrl that is neither s3:// nor https://.
MODEL_URIS = {"local": "file:///nowhere/model.tar.gz",
              "aws": f"s3://{BUCKET}/cifar10-pipeline/nowhere/model.tar.gz"}


def trained(job: str, accuracy: float, model_uri: str = MODEL_URIS["local"]):
    return TrainingResult(job_name=job, status="Completed", model_uri=model_uri,
                          metrics={"test_accuracy": accuracy, "test_loss": 1.0},
                          billable_seconds=1, log_location="-")


def smoked(accuracy: float, floor: float = 0.4) -> SmokeTestResult:
    return SmokeTestResult(images=64, accuracy=accuracy, accuracy_floor=floor, per_class={},
                           requests=1, seconds=0.1)


def register(backend: Backend, job: str, accuracy: float, smoke: float = 0.6,
             auto_approve: bool = True):
    model = trained(job, accuracy, MODEL_URIS[backend.name])
    smoke_test = smoked(smoke)
    return register_model.fn(
        backend, candidate(GROUP, model, smoke_test, f"key-{job}", LINEAGE, "ml.m5.large",
                           managed_tags("pytest")),
        model, smoke_test, GatePolicy(tolerance=0.005, auto_approve=auto_approve))


def gate_scenarios(backend: Backend) -> None:
    """The promotion gate, version after version, on one backend."""
    first = register(backend, "job-1", 0.5590)
    assert (first.version, first.status, first.champion_before) == (1, APPROVED, None)
    assert first.reason.startswith("first version")
    better = register(backend, "job-2", 0.5700)
    assert (better.version, better.status, better.champion_before) == (2, APPROVED, 1)
    within = register(backend, "job-3", 0.5660)  # 0.566 >= 0.570 - 0.005
    assert (within.status, within.champion_before) == (APPROVED, 2)
    worse = register(backend, "job-4", 0.5410)
    assert worse.status == REJECTED and worse.champion_before == 3
    assert worse.reason == "0.5410 < champion v3 0.5660 - 0.005"
    failed = register(backend, "job-5", 0.9, smoke=0.3)
    assert failed.status == REJECTED and failed.reason.startswith("smoke test failed: 0.300")
    manual = register(backend, "job-6", 0.6, auto_approve=False)
    assert manual.status == PENDING and "awaiting manual approval" in manual.reason

    versions = backend.registry.versions(GROUP)
    assert [(v.version, v.status) for v in versions] == [
        (1, APPROVED), (2, APPROVED), (3, APPROVED), (4, REJECTED), (5, REJECTED), (6, PENDING)]
    v4 = versions[3]
    assert v4.training_job == "job-4" and v4.cache_key == "key-job-4"
    assert v4.metrics["test_accuracy"] == pytest.approx(0.541)
    assert v4.metrics["smoke_accuracy"] == pytest.approx(0.6)
    assert {k: v4.lineage[k] for k in LINEAGE} == LINEAGE
    # By hand: approve the pending one (the new champion), reject an approved one.
    assert backend.registry.set_status(GROUP, 6, APPROVED, "looked fine").status == APPROVED
    assert backend.registry.set_status(GROUP, 2, REJECTED, "bad on night images").reason == \
        "bad on night images"
    after = {v.version: v for v in backend.registry.versions(GROUP)}
    assert after[6].status == APPROVED and after[2].status == REJECTED
    assert after[6].lineage == versions[5].lineage  # the lineage survives the update


def test_the_gate_on_the_local_registry(tmp_path):
    gate_scenarios(LocalBackend(root=tmp_path))


def test_the_gate_on_sagemaker_model_registry(aws, no_network, request_validator):
    backend = AwsBackend(role_arn=ROLE_ARN, bucket=BUCKET, poll_seconds=0.01)
    gate_scenarios(backend)
    # Every request as strict as the real API (moto and botocore check less: map minimums,
    # patterns, lengths).
    assert request_validator.violations == []
    # The group carries the pipeline's tags; each version's metrics report is in S3.
    group = aws.sm.describe_model_package_group(ModelPackageGroupName=GROUP)
    tags = aws.sm.list_tags(ResourceArn=group["ModelPackageGroupArn"])["Tags"]
    assert {"Key": "managed-by", "Value": "cifar10-pipeline"} in tags
    described = aws.sm.describe_model_package(
        ModelPackageName=backend.registry.versions(GROUP)[0].arn)
    report = described["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    assert report.startswith(f"s3://{BUCKET}/cifar10-pipeline/registry/")
    assert described["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == \
        MODEL_URIS["aws"]


CONCURRENT = """
import sys
from backends.base import ModelVersionSpec
from backends.local import LocalBackend

backend = LocalBackend(root=sys.argv[1])
for i in range(5):
    backend.registry.register(ModelVersionSpec(
        group="cifar10-pipeline", model_uri="file:///m", training_job=f"{sys.argv[2]}-{i}",
        cache_key="k", metrics={}, lineage={}), lambda champion: ("Approved", "r"))
"""


def test_concurrent_registrations_get_distinct_consecutive_versions(tmp_path):
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path), f"p{n}"],
                                  cwd=REPO) for n in range(6)]
    assert [p.wait(timeout=120) for p in processes] == [0] * 6
    versions = LocalBackend(root=tmp_path).registry.versions(GROUP)
    assert [v.version for v in versions] == list(range(1, 31))
    assert len({v.training_job for v in versions}) == 30


def test_models_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_PIPELINE_HOME", str(tmp_path))
    backend = LocalBackend()
    register(backend, "job-1", 0.55)
    register(backend, "job-2", 0.50)
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert [(r["version"], r["status"], r["champion"]) for r in listed] == [
        (1, APPROVED, True), (2, REJECTED, False)]
    assert listed[1]["data_md5"] == "0" * 32 and listed[1]["training_job"] == "job-2"
    text = runner.invoke(app, ["models", "list"]).stdout
    assert any(line.startswith("*       1") for line in text.splitlines())
    [second] = [line for line in text.splitlines() if line.startswith("        2")]
    assert second.endswith(listed[1]["reason"]) and "< champion v1" in second  # the decision
    approved = runner.invoke(app, ["models", "approve", "2", "--reason", "night images"])
    assert approved.exit_code == 0 and "v2: Approved (night images)" in approved.stdout
    rejected = runner.invoke(app, ["models", "reject", "1"])
    assert "v1: Rejected (rejected by hand)" in rejected.stdout
    missing = runner.invoke(app, ["models", "approve", "9"])
    assert missing.exit_code == 1 and "has no version 9" in missing.output


def test_decisions_are_explained():
    assert verdict(0.5, True, 0.6, 0.4, None, 0.005, False) == (
        PENDING, "awaiting manual approval (the gate says approved: first version, smoke test "
                 "passed (0.600))")
