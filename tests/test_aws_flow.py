"""The whole flow on the AWS backend, offline: moto's server as AWS (S3, SageMaker control plane,
CloudWatch Logs), a real model artifact placed where moto's training job says it is, and the
local model server answering InvokeEndpoint through ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``.
Also: the reaper on AWS. Teardown under injected faults: test_faults.py."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from backends.aws import AwsBackend
from flows.config import AwsSettings
from flows.pipeline import cifar10_pipeline
from flows.run_context import resource_name
from flows.sweep import cifar10_sweep, point_job_name
from tasks.lib.summary import PRICES_PER_HOUR
from tests.support.aws_fakes import BUCKET, REGION, ROLE_ARN, TRAINING_IMAGE, MotoAccount
from tests.support.configs import aws_config, sweep_config
from tests.support.iam_policies import assert_allowed_by_caller_policy

pytest_plugins = ["tests.support.aws_fixtures"]
# loopback only, and a state directory of its own, for every test here
pytestmark = [pytest.mark.long_running, pytest.mark.usefixtures("no_network", "pipeline_home")]

NOTHING = {"endpoints": [], "endpoint_configs": [], "models": []}
# What one run asks of SageMaker, in order (the runtime's InvokeEndpoint included).
EXPECTED_CALLS = [
    "sagemaker:DescribeModelPackageGroup",  # fit's cache: no group yet, so nothing to reuse
    "sagemaker:DescribeTrainingJob",  # fit: is there a job of this run's name? (re-attach)
    "sagemaker:CreateTrainingJob",
    "sagemaker:DescribeTrainingJob",  # wait: Completed
    "sagemaker:DescribeEndpoint",  # deploy: the name is free
    "sagemaker:CreateModel",
    "sagemaker:CreateEndpointConfig",
    "sagemaker:CreateEndpoint",
    "sagemaker:DescribeEndpoint",  # wait: InService
    "sagemaker-runtime:InvokeEndpoint",  # smoke test: 100 images in one request
    "sagemaker:DescribeEndpoint",  # delete: which config?
    "sagemaker:DeleteEndpoint",
    "sagemaker:DescribeEndpointConfig",  # which model?
    "sagemaker:DeleteEndpointConfig",
    "sagemaker:DeleteModel",
    "sagemaker:DescribeModelPackageGroup",  # register: the group, created on first use
    "sagemaker:CreateModelPackageGroup",
    "sagemaker:CreateModelPackage",
    "sagemaker:UpdateModelPackage",  # the gate's decision with its reason
    "sagemaker:DescribeModelPackage",  # the version as registered
]


def calls_of(recorder) -> list[str]:
    return [f"{c.service}:{c.operation}" for c in recorder.calls]


def test_aws_flow_runs_every_stage_and_leaves_nothing_behind(
        prefect_harness, http_server, cifar_tarball, aws, sagemaker_calls, request_validator,
        sagemaker_stand_in, trained_model, cifar_dir):
    state = cifar10_pipeline(aws_config(http_server, cifar_tarball), return_state=True)
    assert state.is_completed(), state.message
    # Every request of the run (SageMaker, S3, CloudWatch Logs, the runtime) is one the real
    # APIs accept: lengths, enums and patterns included, which moto does not check.
    assert request_validator.violations == []
    assert {c.split(".")[0] for c in request_validator.checked} == {
        "sagemaker", "sagemaker-runtime", "s3", "logs"}
    summary = state.result()
    run_id = str(state.state_details.flow_run_id)
    name = resource_name(run_id)
    print("\nSageMaker calls made by the run, in order:\n  " + "\n  ".join(
        calls_of(sagemaker_calls)))

    assert summary.backend == "aws"
    assert list(summary.stages) == ["download", "preview", "upload", "fit", "deploy",
                                       "smoke_predict", "delete_endpoint", "register"]
    assert calls_of(sagemaker_calls) == EXPECTED_CALLS
    # Every call of the run, S3, CloudWatch Logs and the SDK's own included, is one the static
    # scan knows and the caller policy grants (test_iam_policies checks the calls no run made).
    assert_allowed_by_caller_policy(sagemaker_calls, request_validator)

    # upload: the dataset landed in S3 under the prefix.
    data_uri = f"s3://{BUCKET}/cifar10-pipeline/data/"
    assert summary.data.uri == data_uri
    assert aws.keys(prefix="cifar10-pipeline/data/") == sorted(
        f"cifar10-pipeline/data/{p.name}" for p in cifar_dir.iterdir())

    # fit: the job moto holds is the one the run asked for.
    job = aws.sm.describe_training_job(TrainingJobName=name)
    assert job["AlgorithmSpecification"]["TrainingImage"] == TRAINING_IMAGE
    assert job["HyperParameters"] == {"model": "tutorial", "epochs": "2", "batch-size": "16",
                                      "lr": "0.02", "seed": "0", "precision": "auto"}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in job["InputDataConfig"]}
    assert channels["training"] == data_uri and set(channels) == {"training", "code",
                                                                  "sm_drivers"}
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 30 * 60}
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    tags = {t["Key"]: t["Value"] for t in aws.sm.list_tags(ResourceArn=job["TrainingJobArn"])
            ["Tags"]}
    assert tags["managed-by"] == "cifar10-pipeline"
    assert tags["owner"] == f"prefect-flow-run/{run_id}"
    assert summary.training.job_name == name
    assert summary.training.model_uri == job["ModelArtifacts"]["S3ModelArtifacts"]
    assert summary.training.metrics == trained_model.metrics

    # deploy + smoke test: the endpoint was tagged, and really answered.
    endpoint_tags = sagemaker_calls.params("CreateEndpoint")[0]["Tags"]
    assert {"Key": "managed-by", "Value": "cifar10-pipeline"} in endpoint_tags
    assert {"Key": "owner", "Value": f"prefect-flow-run/{run_id}"} in endpoint_tags
    assert sagemaker_stand_in.served == [name]
    assert summary.smoke_test.images == 100
    assert summary.smoke_test.accuracy >= 0.5

    # teardown: nothing left in SageMaker, no model server running.
    assert aws.sagemaker_resources() == NOTHING
    assert sagemaker_stand_in.running() == []
    assert summary.endpoint.kept is False

    # cost: billable training seconds (moto reports none) and endpoint uptime, priced.
    uptime = summary.endpoint.uptime_seconds
    assert summary.training.billable_seconds == 0 and uptime > 0
    assert summary.cost.usd == round(uptime / 3600 * PRICES_PER_HOUR["ml.m5.large"], 4)
    assert "approximate" in summary.cost.note


def test_aws_sweep_trains_ordinary_tagged_jobs_and_hosts_only_the_winner(
        prefect_harness, http_server, cifar_tarball, aws, sagemaker_calls, request_validator,
        sagemaker_stand_in):
    config = sweep_config(aws_config(http_server, cifar_tarball), [0.02, 0.03], max_parallel=2)
    state = cifar10_sweep(config, return_state=True)
    assert state.is_completed(), state.message
    assert request_validator.violations == []
    assert_allowed_by_caller_policy(sagemaker_calls, request_validator)
    summary = state.result()
    run_id = summary.flow_run_id

    jobs = [aws.sm.describe_training_job(TrainingJobName=point_job_name(run_id, i))
            for i in (1, 2)]
    assert [j["HyperParameters"]["lr"] for j in jobs] == ["0.02", "0.03"]
    for job in jobs:
        tags = {t["Key"]: t["Value"] for t in
                aws.sm.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]}
        assert tags["managed-by"] == "cifar10-pipeline"
        assert tags["owner"] == f"prefect-flow-run/{run_id}"
        assert job["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert [p.status for p in summary.points] == ["Completed", "Completed"]
    assert sagemaker_stand_in.served == [resource_name(run_id)]  # the winner only
    assert len(sagemaker_calls.params("CreateEndpoint")) == 1
    assert aws.sagemaker_resources() == NOTHING
    # both points registered: the winner through the gate, the other rejected
    versions = AwsBackend(region=REGION, role_arn=ROLE_ARN, bucket=BUCKET
                          ).registry.versions("cifar10-pipeline")
    assert sorted(v.training_job for v in versions) == [j["TrainingJobName"] for j in jobs]
    # cost: every job's billable seconds (moto reports none) and the winner's endpoint
    uptime = summary.endpoint.uptime_seconds
    assert summary.cost.usd == round(uptime / 3600 * PRICES_PER_HOUR["ml.m5.large"], 4)


def make_endpoint(aws: MotoAccount, name: str, tags: dict[str, str]) -> None:
    """An endpoint with its own config and model, as any tool would create it."""
    as_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    aws.sm.create_model(ModelName=name, ExecutionRoleArn=ROLE_ARN, Tags=as_list,
                        PrimaryContainer={"Image": TRAINING_IMAGE})
    aws.sm.create_endpoint_config(EndpointConfigName=name, Tags=as_list, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": name, "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1}])
    aws.sm.create_endpoint(EndpointName=name, EndpointConfigName=name, Tags=as_list)


def test_reaper_on_aws_deletes_only_old_pipeline_owned_endpoints(prefect_harness, aws,
                                                                 sagemaker_calls):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.reaper import reap_endpoints_flow

    now = dt.datetime.now(dt.UTC)
    old = (now - dt.timedelta(hours=3)).isoformat(timespec="seconds")
    young = (now - dt.timedelta(minutes=10)).isoformat(timespec="seconds")
    owned = {"managed-by": "cifar10-pipeline", "owner": "prefect-flow-run/x"}
    make_endpoint(aws, "cifar10-old", {**owned, "created-at": old})
    make_endpoint(aws, "cifar10-young", {**owned, "created-at": young})
    make_endpoint(aws, "cifar10-untimed", owned)  # no created-at: CreationTime (now) counts
    make_endpoint(aws, "someone-elses-old", {"created-at": old})
    make_endpoint(aws, "other-tool-old", {"managed-by": "other-tool", "created-at": old})
    everything = aws.sagemaker_resources()

    runner = CliRunner()
    listed = runner.invoke(app, ["endpoints", "list", "--backend", "aws", "--region", REGION,
                                 "--json"])
    assert listed.exit_code == 0, listed.output
    assert sorted(e["name"] for e in json.loads(listed.output)) == [
        "cifar10-old", "cifar10-untimed", "cifar10-young"]

    dry = runner.invoke(app, ["endpoints", "reap", "--backend", "aws", "--region", REGION,
                              "--older-than", "1h", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete cifar10-old" in dry.output and "1 would delete, 2 younger" in dry.output
    assert aws.sagemaker_resources() == everything  # a dry run deletes nothing

    report = reap_endpoints_flow(backend="aws", older_than_minutes=60,
                                 aws=AwsSettings(region=REGION))
    assert report["deleted"] == ["cifar10-old"] and report["dry_run"] is False
    assert sorted(report["younger"]) == ["cifar10-untimed", "cifar10-young"]
    left = {k: sorted(v) for k, v in aws.sagemaker_resources().items()}
    survivors = sorted(["cifar10-young", "cifar10-untimed", "someone-elses-old",
                        "other-tool-old"])
    assert left == {"endpoints": survivors, "endpoint_configs": survivors, "models": survivors}
    assert sagemaker_calls.params("DeleteEndpoint") == [{"EndpointName": "cifar10-old"}]
    assert_allowed_by_caller_policy(sagemaker_calls)


def test_reaper_on_aws_deletes_configs_and_models_a_failed_teardown_left(aws, sagemaker_calls):
    """An endpoint config or model whose endpoint is gone (its teardown failed half-way, or a
    deploy was killed between its Create calls) is found by its own tags, with the same TTL
    and the same rule: never what the pipeline does not own."""
    from backends.reaper import reap_endpoints

    now = dt.datetime.now(dt.UTC)
    old = (now - dt.timedelta(hours=3)).isoformat(timespec="seconds")
    young = (now - dt.timedelta(minutes=10)).isoformat(timespec="seconds")
    owned = {"managed-by": "cifar10-pipeline", "owner": "prefect-flow-run/x"}
    make_endpoint(aws, "cifar10-whole", {**owned, "created-at": old})
    for name, tags in [("cifar10-orphan-old", {**owned, "created-at": old}),
                       ("cifar10-orphan-young", {**owned, "created-at": young}),
                       ("other-tool-orphan", {"managed-by": "other-tool", "created-at": old})]:
        make_endpoint(aws, name, tags)
        aws.sm.delete_endpoint(EndpointName=name)  # config and model stay
    make_endpoint(aws, "cifar10-model-only", {**owned, "created-at": old})
    aws.sm.delete_endpoint(EndpointName="cifar10-model-only")
    aws.sm.delete_endpoint_config(EndpointConfigName="cifar10-model-only")

    backend = AwsBackend(region=REGION, role_arn=ROLE_ARN, bucket=BUCKET)
    assert sorted(o.name for o in backend.endpoints.orphans()) == [
        "cifar10-model-only", "cifar10-orphan-old", "cifar10-orphan-young"]
    assert {o.status for o in backend.endpoints.orphans()} == {"Orphaned"}
    report = reap_endpoints(backend, dt.timedelta(hours=1))
    assert sorted(report.deleted) == ["cifar10-model-only", "cifar10-orphan-old", "cifar10-whole"]
    assert report.younger == ["cifar10-orphan-young"]
    left = {kind: sorted(names) for kind, names in aws.sagemaker_resources().items()}
    assert left == {"endpoints": [],
                    "endpoint_configs": ["cifar10-orphan-young", "other-tool-orphan"],
                    "models": ["cifar10-orphan-young", "other-tool-orphan"]}
    assert_allowed_by_caller_policy(sagemaker_calls)
