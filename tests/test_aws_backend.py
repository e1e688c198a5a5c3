"""The AWS backend against moto's server (S3, IAM, STS, CloudWatch Logs, SageMaker control
plane), with botocore's Stubber where moto does not look at the request: configuration and
error messages, the S3 mirror, the training request ModelTrainer builds, re-attaching, logs and
metrics, hosting requests, deletion and listing."""

from __future__ import annotations

import datetime as dt
import itertools
import re

import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber

from backends.aws import AwsBackend
from backends.aws.errors import translate
from backends.aws.images import pytorch_image
from backends.aws.training import METRIC_DEFINITIONS
from backends.base import (
    BackendError,
    ConfigurationError,
    EndpointFailed,
    EndpointSpec,
    TrainingJobFailed,
    TrainingSpec,
    managed_tags,
)
from backends.settings import SOURCE_DIR
from flows.config import AwsSettings, PipelineConfig, get_backend
from tests.support.aws_fakes import (
    ACCOUNT,
    BUCKET,
    INFERENCE_IMAGE,
    JOB,
    REGION,
    ROLE_ARN,
    TRAINING_IMAGE,
    described_job,
    isolate_aws_environment,
)
from tests.support.pipeline import FAST_HYPERPARAMETERS

pytest_plugins = ["tests.support.aws_fixtures"]
pytestmark = pytest.mark.usefixtures("no_network")  # loopback only, for every test here

ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{JOB}"  # any valid ARN


def make_backend(**options) -> AwsBackend:
    settings = {"role_arn": ROLE_ARN, "bucket": BUCKET, "poll_seconds": 0.01, **options}
    return AwsBackend(**settings)


def training_spec(data_uri: str = f"s3://{BUCKET}/cifar10-pipeline/data/", **overrides):
    return TrainingSpec(**{
        "job_name": JOB, "data_uri": data_uri, "hyperparameters": dict(FAST_HYPERPARAMETERS),
        "instance_type": "ml.m5.xlarge", "max_runtime_seconds": 1800,
        "tags": managed_tags("prefect-flow-run/test"), **overrides})


def not_found(stubber: Stubber, method: str, message: str = "Requested resource not found.",
              **params) -> None:
    stubber.add_client_error(method, service_error_code="ValidationException",
                             service_message=message, http_status_code=400,
                             expected_params=params or None)


# -- configuration and errors ----------------------------------------------------------------


def test_building_the_backend_needs_no_aws(monkeypatch):
    isolate_aws_environment(monkeypatch)  # no region, no credentials, no role, no bucket
    backend = get_backend(PipelineConfig(backend="aws"))
    assert backend.name == "aws"
    assert backend.options.region is None and backend.options.role_arn is None
    assert backend.aws._session is None  # no boto3 session was even created
    assert get_backend(PipelineConfig(backend="aws", aws=AwsSettings(region=None))
                       ).options.prefix == "cifar10-pipeline"


def test_settings_come_from_the_environment(monkeypatch):
    isolate_aws_environment(monkeypatch)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("SAGEMAKER_ROLE_ARN", ROLE_ARN)
    monkeypatch.setenv("SAGEMAKER_BUCKET", "my-bucket")
    options = AwsBackend(prefix="/team/cifar/").options
    assert (options.region, options.role_arn, options.bucket, options.prefix) == (
        "eu-west-1", ROLE_ARN, "my-bucket", "team/cifar")
    monkeypatch.setenv("AWS_REGION", "us-west-2")  # AWS_REGION wins, as in the AWS CLI
    assert AwsBackend().options.region == "us-west-2"
    assert AwsBackend(region="ap-south-1").options.region == "ap-south-1"
    with pytest.raises(ConfigurationError, match="not an S3 bucket name"):
        AwsBackend(bucket="s3://my-bucket/data")
    with pytest.raises(ConfigurationError, match="only applies to managed spot"):
        AwsBackend(max_wait_minutes=30)
    # Spot is reachable from the flow's config.
    spot = get_backend(PipelineConfig(backend="aws", aws={"use_spot": True,
                                                          "max_wait_minutes": 90}))
    assert spot.options.use_spot and spot.options.max_wait_seconds(3600) == 5400


def test_missing_region_says_what_to_set(monkeypatch):
    isolate_aws_environment(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(ConfigurationError, match=r"no AWS region configured.*AWS_REGION"):
        AwsBackend().endpoints.list()
    # The CLI says it in one line, not with a traceback.
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["endpoints", "reap", "--backend", "aws",
                                      "--older-than", "1h"])
    assert result.exit_code == 1
    assert "error: no AWS region configured: pass --region" in result.output
    assert "Traceback" not in result.output


def test_missing_credentials_say_what_to_set(monkeypatch, no_network):
    isolate_aws_environment(monkeypatch)
    with pytest.raises(ConfigurationError, match=r"no AWS credentials found.*aws configure"):
        AwsBackend(region=REGION).endpoints.delete("anything")


def test_missing_or_malformed_role_fails_before_any_call(aws, sagemaker_calls):
    backend = make_backend(role_arn=None)
    with pytest.raises(ConfigurationError, match="SAGEMAKER_ROLE_ARN"):
        backend.jobs.run(training_spec())
    with pytest.raises(ConfigurationError, match="SAGEMAKER_ROLE_ARN"):
        backend.endpoints.deploy(EndpointSpec(name=JOB, model_uri=f"s3://{BUCKET}/m.tar.gz"))
    with pytest.raises(ConfigurationError, match="not an IAM role ARN"):
        make_backend(role_arn="cifar10-sagemaker").jobs.run(training_spec())
    assert sagemaker_calls.names() == []


def test_access_denied_names_the_denied_permission(aws, tmp_path):
    backend = make_backend()
    with Stubber(backend.aws.sagemaker) as stubber:
        stubber.add_client_error(
            "list_endpoints", service_error_code="AccessDeniedException", http_status_code=400,
            service_message=f"User: arn:aws:iam::{ACCOUNT}:user/ci is not authorized to perform:"
                            f" sagemaker:ListEndpoints on resource: arn:aws:sagemaker:{REGION}:"
                            f"{ACCOUNT}:endpoint/* because no identity-based policy allows it")
        with pytest.raises(BackendError, match="grant sagemaker:ListEndpoints to the caller"):
            backend.endpoints.list()
    # S3 does not name the action: the backend names the one behind the operation.
    with Stubber(backend.aws.s3) as stubber:
        stubber.add_client_error("list_objects_v2", service_error_code="AccessDenied",
                                 service_message="Access Denied", http_status_code=403)
        with pytest.raises(BackendError, match=r"grant s3:ListBucket \(likely\)"):
            backend.storage.upload(tmp_path)


def test_aws_errors_are_translated_into_actionable_messages():
    def client_error(code, message, operation="CreateModel"):
        return ClientError({"Error": {"Code": code, "Message": message}}, operation)

    passrole = translate(client_error(
        "AccessDeniedException", f"User: arn:aws:sts::{ACCOUNT}:assumed-role/ci/x is not "
        f"authorized to perform: iam:PassRole on resource: {ROLE_ARN}"), "creating model m")
    assert type(passrole) is ConfigurationError and "grant iam:PassRole" in str(passrole)
    expired = translate(client_error("ExpiredTokenException", "The security token included "
                                     "in the request is expired"), "listing endpoints")
    assert isinstance(expired, ConfigurationError) and "aws sso login" in str(expired)
    trust = translate(client_error("ValidationException", f"Could not assume role {ROLE_ARN}. "
                                   "Please ensure that the role exists and allows principal "
                                   "'sagemaker.amazonaws.com' to assume the role."), "x")
    assert isinstance(trust, ConfigurationError) and "trust policy" in str(trust)
    # CreateModel's message for an artifact the role cannot read names the role and
    # sts:AssumeRole too; the cause is S3 access (or a bucket in another region).
    model_data = translate(client_error(
        "ValidationException", f"Could not access model data at s3://{BUCKET}/m/model.tar.gz. "
        f"Please ensure that the role \"{ROLE_ARN}\" exists and that its trust relationship "
        "policy allows the action \"sts:AssumeRole\" for the service principal "
        "\"sagemaker.amazonaws.com\". Also ensure that the role has \"s3:GetObject\" "
        "permissions and that the object is located in us-east-1."), "creating model m")
    assert isinstance(model_data, ConfigurationError)
    assert "cannot read the model artifact" in str(model_data)
    assert "s3:GetObject" in str(model_data) and "region" in str(model_data)
    assert "cannot assume the execution role" not in str(model_data)
    quota = translate(client_error("ResourceLimitExceeded", "The account-level service limit "
                                   "'ml.p3.2xlarge for training job usage' is 0"), "x")
    assert "Service Quotas" in str(quota)


# -- upload ----------------------------------------------------------------------------------


def test_upload_mirrors_the_directory_and_skips_unchanged_files(aws, cifar_dir, tmp_path):
    import shutil

    data = tmp_path / "batches"
    shutil.copytree(cifar_dir, data)
    backend = make_backend()
    lines: list[str] = []
    uri = backend.storage.upload(data, on_log=lines.append)
    assert uri == f"s3://{BUCKET}/cifar10-pipeline/data/"
    files = sorted(p.name for p in data.iterdir())
    assert aws.keys(prefix="cifar10-pipeline/data/") == [f"cifar10-pipeline/data/{f}"
                                                         for f in files]
    assert f"uploaded {len(files)} files" in lines[0]
    head = aws.s3.head_object(Bucket=BUCKET, Key="cifar10-pipeline/data/test_batch")
    assert len(head["Metadata"]["sha256"]) == 64

    backend.storage.upload(data, on_log=lines.append)
    assert f"uploaded 0 files (0.0 MB), skipped {len(files)} unchanged, removed 0" in lines[1]

    (data / "test_batch").write_bytes(b"changed")
    (data / "batches.meta").unlink()
    backend.storage.upload(data, on_log=lines.append)
    assert f"uploaded 1 files (0.0 MB), skipped {len(files) - 2} unchanged, removed 1" \
        in lines[2]
    assert "cifar10-pipeline/data/batches.meta" not in aws.keys(prefix="cifar10-pipeline/")
    body = aws.s3.get_object(Bucket=BUCKET, Key="cifar10-pipeline/data/test_batch")["Body"]
    assert body.read() == b"changed"


def test_default_bucket_is_the_sagemaker_default_bucket(aws, cifar_dir):
    backend = make_backend(bucket=None)
    uri = backend.storage.upload(cifar_dir)
    default = f"sagemaker-{REGION}-{ACCOUNT}"  # created by the SDK session, named by account
    assert uri == f"s3://{default}/cifar10-pipeline/data/"
    assert aws.keys(bucket=default, prefix="cifar10-pipeline/data/")


# -- training --------------------------------------------------------------------------------


def test_metric_definitions_match_the_entry_scripts_metric_lines(trained_model):
    for definition in METRIC_DEFINITIONS:
        values = [m.group(1) for line in trained_model.log_lines
                  if (m := re.search(definition["Regex"], line))]
        assert values, f"{definition['Name']} never matches the training log"
        assert all(float(v) >= 0 for v in values)
    epochs = [line for line in trained_model.log_lines if "epoch=" in line]
    assert len(epochs) == FAST_HYPERPARAMETERS["epochs"]


def expected_training_request(spec: TrainingSpec, **overrides) -> dict:
    return {
        "TrainingJobName": spec.job_name,
        "RoleArn": ROLE_ARN,
        "AlgorithmSpecification": {
            "TrainingImage": TRAINING_IMAGE, "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
            # ModelTrainer's driver runs the entry script with the hyperparameters as --key value
            "ContainerEntrypoint": ["/bin/bash"], "ContainerArguments": ANY,
        },
        "HyperParameters": {"epochs": "2", "batch-size": "16", "lr": "0.02"},
        "InputDataConfig": [
            {"ChannelName": "training", "InputMode": "File", "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": spec.data_uri,
                "S3DataDistributionType": "FullyReplicated"}}},
            {"ChannelName": "code", "InputMode": "File", "DataSource": ANY},
            {"ChannelName": "sm_drivers", "InputMode": "File", "DataSource": ANY},
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/cifar10-pipeline/training-jobs",
                             "CompressionType": "GZIP"},
        "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1,
                           "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 1800},
        "Tags": [{"Key": k, "Value": v} for k, v in spec.tags.items()],
        **overrides,
    }


def test_create_training_job_request(aws):
    """moto stores a training job without looking at most of it (it even answers with
    MetricDefinitions of its own): the request is checked as sent."""
    backend = make_backend()
    spec = training_spec()
    with Stubber(backend.aws.sagemaker) as stubber:
        not_found(stubber, "describe_training_job", TrainingJobName=JOB)
        stubber.add_response("create_training_job", {"TrainingJobArn": ARN},
                             expected_params=expected_training_request(spec))
        stubber.add_response("describe_training_job", described_job(
            FinalMetricDataList=[{"MetricName": "test_accuracy", "Value": 0.61}],
            BillableTimeInSeconds=300), expected_params={"TrainingJobName": JOB})
        result = backend.jobs.run(spec)
        stubber.assert_no_pending_responses()
    # No output.tar.gz in S3: the metrics are the ones SageMaker scraped from the log.
    assert result.metrics == {"test_accuracy": 0.61}
    assert result.billable_seconds == 300
    assert result.model_uri.endswith(f"/training-jobs/{JOB}/output/model.tar.gz")
    # ModelTrainer uploaded the entry script (and its drivers) beside the job's output.
    keys = aws.keys(prefix=f"cifar10-pipeline/training-jobs/{JOB}/")
    code = [k.rsplit("/input/", 1)[1] for k in keys if "/input/code/" in k]
    assert code == [f"code/{p.name}" for p in sorted(SOURCE_DIR.glob("*.py"))]  # no __pycache__
    assert "code/train.py" in code and "code/inference.py" in code
    assert any(k.endswith("/input/sm_drivers/sm_train.sh") for k in keys)


def test_spot_training_request(aws):
    backend = make_backend(use_spot=True, max_wait_minutes=90)
    spec = training_spec(instance_count=2)
    expected = expected_training_request(
        spec, EnableManagedSpotTraining=True,
        StoppingCondition={"MaxRuntimeInSeconds": 1800, "MaxWaitTimeInSeconds": 5400},
        CheckpointConfig={"S3Uri": f"s3://{BUCKET}/cifar10-pipeline/training-jobs/{JOB}/"
                                   f"checkpoints", "LocalPath": "/opt/ml/checkpoints"},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 2,
                        "VolumeSizeInGB": 30})
    with Stubber(backend.aws.sagemaker) as stubber:
        not_found(stubber, "describe_training_job")
        stubber.add_response("create_training_job", {"TrainingJobArn": ARN}, expected)
        stubber.add_response("describe_training_job", described_job(
            BillableTimeInSeconds=120, TrainingTimeInSeconds=400,
            ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 2,
                            "VolumeSizeInGB": 30}))
        result = backend.jobs.run(spec)
    assert result.billable_seconds == 240  # spot-discounted seconds x 2 instances
    with pytest.raises(ConfigurationError, match="at least the training max runtime"):
        make_backend(use_spot=True, max_wait_minutes=10).jobs.run(spec)


def test_training_on_moto_streams_logs_reads_metrics_and_reattaches(
        aws, sagemaker_calls, sagemaker_stand_in, trained_model, cifar_dir):
    backend = make_backend()
    data_uri = backend.storage.upload(cifar_dir)
    lines: list[str] = []
    result = backend.jobs.run(training_spec(data_uri), on_log=lines.append)

    assert sagemaker_calls.names() == ["DescribeTrainingJob", "CreateTrainingJob",
                                       "DescribeTrainingJob"]
    assert sagemaker_stand_in.trained == [JOB]
    described = aws.sm.describe_training_job(TrainingJobName=JOB)
    assert described["AlgorithmSpecification"]["TrainingImage"] == TRAINING_IMAGE
    assert described["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == data_uri
    tags = aws.sm.list_tags(ResourceArn=described["TrainingJobArn"])["Tags"]
    assert {"Key": "managed-by", "Value": "cifar10-pipeline"} in tags
    assert result.model_uri == described["ModelArtifacts"]["S3ModelArtifacts"]
    assert result.metrics == trained_model.metrics  # metrics.json from output.tar.gz
    # The job's CloudWatch lines reached the callback, in order.
    streamed = [line for line in lines if line in trained_model.log_lines]
    assert streamed == trained_model.log_lines
    assert any(f"training job {JOB}: Completed" in line for line in lines)

    # A retried task re-attaches: no second job, the same result.
    again = backend.jobs.run(training_spec(data_uri), on_log=lines.append)
    assert sagemaker_calls.names().count("CreateTrainingJob") == 1
    assert again == result
    assert f"training job {JOB} already exists: re-attaching to it" in lines


def test_failed_job_raises_with_its_failure_reason(aws):
    backend = make_backend()
    reason = "AlgorithmError: ValueError: no CIFAR-10 batches in /opt/ml/input/data/training"
    with Stubber(backend.aws.sagemaker) as stubber:
        stubber.add_response("describe_training_job", described_job(
            "InProgress", ModelArtifacts={"S3ModelArtifacts": ""}))
        stubber.add_response("describe_training_job", described_job(
            "Failed", FailureReason=reason, ModelArtifacts={"S3ModelArtifacts": ""}))
        with pytest.raises(TrainingJobFailed) as failure:
            backend.jobs.run(training_spec())  # re-attaches to the running job, which fails
    assert failure.value.status == "Failed" and failure.value.reason == reason
    assert reason in str(failure.value)


def test_interrupt_stops_the_job_and_so_does_the_wait_bound(aws, monkeypatch):
    import backends.polling  # the backends' one wait loop

    backend = make_backend()
    in_progress = described_job("InProgress", ModelArtifacts={"S3ModelArtifacts": ""})

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(backends.polling, "sleep", interrupted)
    with Stubber(backend.aws.sagemaker) as stubber:
        stubber.add_response("describe_training_job", in_progress)
        stubber.add_response("describe_training_job", in_progress)
        stubber.add_response("stop_training_job", {}, {"TrainingJobName": JOB})
        with pytest.raises(KeyboardInterrupt):
            backend.jobs.run(training_spec())
        stubber.assert_no_pending_responses()

    # The wait is bounded; past the bound it gives up on the job, and stops it.
    bounded = make_backend(training_wait_slack_seconds=60)
    clock = itertools.count(0, 10_000)  # every reading is 10000 s after the one before
    monkeypatch.setattr(backends.polling, "monotonic", lambda: next(clock))
    monkeypatch.setattr(backends.polling, "sleep", lambda seconds: None)
    with Stubber(bounded.aws.sagemaker) as stubber:
        stubber.add_response("describe_training_job", in_progress)  # exists: re-attach
        stubber.add_response("describe_training_job", in_progress)  # still InProgress
        stubber.add_response("stop_training_job", {}, {"TrainingJobName": JOB})
        with pytest.raises(BackendError, match=r"still InProgress after \d+s, past its "
                                                r"stopping condition.*the job was stopped"):
            bounded.jobs.run(training_spec())
        stubber.assert_no_pending_responses()


# -- hosting ---------------------------------------------------------------------------------


def put_model(aws, key: str = f"cifar10-pipeline/training-jobs/{JOB}/output/model.tar.gz"):
    aws.s3.put_object(Bucket=BUCKET, Key=key, Body=b"model")
    return f"s3://{BUCKET}/{key}"


def test_create_model_endpoint_config_and_endpoint_requests(aws):
    backend = make_backend()
    spec = EndpointSpec(name=JOB, model_uri=put_model(aws), instance_type="ml.m5.large",
                        instance_count=2, tags=managed_tags("prefect-flow-run/test"))
    tags = [{"Key": k, "Value": ANY if k == "created-at" else v} for k, v in spec.tags.items()]
    with Stubber(backend.aws.sagemaker) as stubber:
        not_found(stubber, "describe_endpoint", f"Could not find endpoint \"{JOB}\".",
                  EndpointName=JOB)
        stubber.add_response("create_model", {"ModelArn": ARN}, {
            "ModelName": JOB, "ExecutionRoleArn": ROLE_ARN, "Tags": tags,
            "PrimaryContainer": {"Image": INFERENCE_IMAGE, "ModelDataUrl": spec.model_uri,
                                 "Environment": {  # the toolkit's default: code/inference.py
                                     "SAGEMAKER_REGION": REGION,
                                     "SAGEMAKER_CONTAINER_LOG_LEVEL": "20"}}})
        stubber.add_response("create_endpoint_config", {"EndpointConfigArn": ARN}, {
            "EndpointConfigName": JOB, "Tags": tags, "ProductionVariants": [{
                "VariantName": "AllTraffic", "ModelName": JOB, "InstanceType": "ml.m5.large",
                "InitialInstanceCount": 2, "InitialVariantWeight": 1.0}]})
        stubber.add_response("create_endpoint", {"EndpointArn": ARN}, {
            "EndpointName": JOB, "EndpointConfigName": JOB, "Tags": tags})
        stubber.add_response("describe_endpoint", {
            "EndpointName": JOB, "EndpointArn": ARN, "EndpointStatus": "InService",
            "CreationTime": dt.datetime.now(dt.UTC), "LastModifiedTime": dt.datetime.now(dt.UTC),
        }, {"EndpointName": JOB})
        info = backend.endpoints.deploy(spec)
        stubber.assert_no_pending_responses()
    assert info.status == "InService" and info.managed and info.instance_type == "ml.m5.large"
    # created-at is the endpoint's own creation time, not the flow run's start.
    assert dt.datetime.now(dt.UTC) - info.created < dt.timedelta(minutes=1)


def test_failed_endpoint_reports_the_reason_and_is_cleaned_up(aws):
    backend = make_backend()
    spec = EndpointSpec(name=JOB, model_uri=put_model(aws), instance_type="ml.m5.large")
    failed = {"EndpointName": JOB, "EndpointArn": ARN, "EndpointConfigName": JOB,
              "EndpointStatus": "Failed", "FailureReason": "The primary container for "
              "production variant AllTraffic did not pass the ping health check.",
              "CreationTime": dt.datetime.now(dt.UTC),
              "LastModifiedTime": dt.datetime.now(dt.UTC)}
    with Stubber(backend.aws.sagemaker) as stubber:
        not_found(stubber, "describe_endpoint", "Could not find endpoint")
        for method, key in (("create_model", "ModelArn"),
                            ("create_endpoint_config", "EndpointConfigArn"),
                            ("create_endpoint", "EndpointArn")):
            stubber.add_response(method, {key: ARN})
        stubber.add_response("describe_endpoint", failed)
        # Cleanup of what the deploy created: endpoint, config, model.
        stubber.add_response("describe_endpoint", failed)
        stubber.add_response("delete_endpoint", {}, {"EndpointName": JOB})
        stubber.add_response("describe_endpoint_config", {
            "EndpointConfigName": JOB, "EndpointConfigArn": ARN,
            "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": JOB}],
            "CreationTime": dt.datetime.now(dt.UTC)}, {"EndpointConfigName": JOB})
        stubber.add_response("delete_endpoint_config", {}, {"EndpointConfigName": JOB})
        stubber.add_response("delete_model", {}, {"ModelName": JOB})
        with pytest.raises(EndpointFailed, match="did not pass the ping health check"):
            backend.endpoints.deploy(spec)
        stubber.assert_no_pending_responses()


def test_deploy_refuses_a_missing_artifact_or_an_existing_endpoint(aws, sagemaker_calls):
    backend = make_backend()
    with pytest.raises(BackendError, match="does not exist"):
        backend.endpoints.deploy(EndpointSpec(name=JOB, model_uri=f"s3://{BUCKET}/nothing.tar.gz"))
    assert "CreateModel" not in sagemaker_calls.names()
    backend.endpoints.deploy(EndpointSpec(name=JOB, model_uri=put_model(aws),
                                          instance_type="ml.m5.large"))
    from backends.base import EndpointExists

    with pytest.raises(EndpointExists):
        backend.endpoints.deploy(EndpointSpec(name=JOB, model_uri=put_model(aws)))
    assert aws.sagemaker_resources() == {"endpoints": [JOB], "endpoint_configs": [JOB],
                                         "models": [JOB]}


def test_delete_is_idempotent_and_cleans_half_created_deploys(aws):
    backend = make_backend()
    backend.endpoints.deploy(EndpointSpec(name=JOB, model_uri=put_model(aws),
                                          instance_type="ml.m5.large", tags=managed_tags("t")))
    assert backend.endpoints.describe(JOB).status == "InService"
    assert backend.endpoints.delete(JOB) is True
    assert aws.sagemaker_resources() == {"endpoints": [], "endpoint_configs": [], "models": []}
    assert backend.endpoints.delete(JOB) is False
    assert backend.endpoints.describe(JOB) is None

    # A deploy that died after CreateEndpointConfig: no endpoint, but a config and a model.
    aws.sm.create_model(ModelName=JOB, ExecutionRoleArn=ROLE_ARN,
                        PrimaryContainer={"Image": INFERENCE_IMAGE})
    aws.sm.create_endpoint_config(EndpointConfigName=JOB, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": JOB, "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1}])
    assert backend.endpoints.delete(JOB) is True
    assert aws.sagemaker_resources() == {"endpoints": [], "endpoint_configs": [], "models": []}


def test_list_endpoints_returns_only_the_pipelines(aws):
    backend = make_backend()
    backend.endpoints.deploy(EndpointSpec(name="cifar10-mine", model_uri=put_model(aws),
                                          instance_type="ml.m5.large", tags=managed_tags("run-1")))
    backend.endpoints.deploy(EndpointSpec(name="someone-elses", model_uri=put_model(aws),
                                          instance_type="ml.m5.large", tags={"team": "other"}))
    listed = backend.endpoints.list()
    assert [e.name for e in listed] == ["cifar10-mine"]
    assert listed[0].tags["owner"] == "run-1" and listed[0].instance_type == "ml.m5.large"
    assert listed[0].status == "InService" and listed[0].created.tzinfo is not None


def test_stop_training_stops_only_a_running_job(aws):
    """A cancelled sweep stops its points' jobs: StopTrainingJob for an InProgress job (billing
    ends once it is Stopped), nothing for one that has ended or never was."""
    backend = make_backend()
    with Stubber(backend.aws.sagemaker) as stubber:
        stubber.add_response("describe_training_job", described_job("InProgress"),
                             expected_params={"TrainingJobName": JOB})
        stubber.add_response("stop_training_job", {}, expected_params={"TrainingJobName": JOB})
        stubber.add_response("describe_training_job", described_job("Completed"))
        not_found(stubber, "describe_training_job", TrainingJobName="cifar10-never-was")
        assert backend.jobs.stop(JOB) is True
        assert backend.jobs.stop(JOB) is False
        assert backend.jobs.stop("cifar10-never-was") is False
        stubber.assert_no_pending_responses()


@pytest.mark.parametrize(("instance_type", "flavour"), [
    ("ml.g5.xlarge", "gpu"), ("ml.g4dn.xlarge", "gpu"), ("ml.m5.large", "cpu")])
def test_a_gpu_instance_trains_in_the_gpu_image(instance_type, flavour):
    """The same entry script on a GPU training instance: SageMaker's GPU image (from the SDK's
    own table), where the script sees CUDA and --model airbench picks the airbench94 recipe."""
    image = pytorch_image("training", "us-east-1", "2.8", "py312", instance_type)
    assert image.endswith(f"/pytorch-training:2.8-{flavour}-py312")
