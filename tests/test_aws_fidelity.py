"""How real SageMaker, S3 and CloudWatch behave where moto does not: an endpoint still Creating
refuses deletion, a retried Create finds what its lost first attempt made, DeleteObjects reports
per-key failures in a 200, log reads time out and get throttled, the SDK's IAM probe denies the
bucket. Each is injected at botocore's level (its event hooks) under the backend's own code,
against moto's server."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from backends.aws import AwsBackend
from backends.aws.hosting import EndpointNotDeletable
from backends.aws.logs import LOG_GROUP, TrainingLogTail
from backends.base import BackendError, EndpointSpec, TrainingSpec, managed_tags
from backends.reaper import reap_endpoints
from flows.config import PipelineConfig
from tests.support.aws_fakes import BUCKET, INFERENCE_IMAGE, ROLE_ARN
from tests.support.pipeline import FAST_HYPERPARAMETERS

pytest_plugins = ["tests.support.aws_fixtures"]
pytestmark = pytest.mark.usefixtures("no_network")

NAME = "cifar10-0123456789ab"


def backend(**options) -> AwsBackend:
    return AwsBackend(**{"role_arn": ROLE_ARN, "bucket": BUCKET, "poll_seconds": 0.01,
                         **options})


def put_model(aws) -> str:
    key = f"cifar10-pipeline/training-jobs/{NAME}/output/model.tar.gz"
    aws.s3.put_object(Bucket=BUCKET, Key=key, Body=b"model")
    return f"s3://{BUCKET}/{key}"


def deployed(aws, name: str = NAME, **tags: Any) -> AwsBackend:
    b = backend()
    b.endpoints.deploy(EndpointSpec(name=name, model_uri=put_model(aws),
                                    instance_type="ml.m5.large",
                                    tags=managed_tags("prefect-flow-run/test", **tags)))
    return b


def client_error(operation: str, code: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


# -- 1. an endpoint still Creating cannot be deleted yet -------------------------------------


def creating_for(polls: int | None):
    """DescribeEndpoint says Creating for the first ``polls`` answers (None: always), and
    DeleteEndpoint is refused meanwhile, as SageMaker refuses it."""
    answers = itertools.count()
    state = {"creating": True}

    def describe(parsed, **kwargs):
        if "EndpointStatus" in parsed:
            state["creating"] = polls is None or next(answers) < polls
            if state["creating"]:
                parsed["EndpointStatus"] = "Creating"

    def delete(params, **kwargs):
        if state["creating"]:
            raise client_error("DeleteEndpoint", "ValidationException",
                               f"Cannot update in-progress endpoint \"{params['EndpointName']}\".")

    def attach(session):
        session.events.register("after-call.sagemaker.DescribeEndpoint", describe)
        session.events.register("provide-client-params.sagemaker.DeleteEndpoint", delete)

    return attach


def test_delete_waits_while_the_endpoint_is_creating_then_deletes_everything(aws, on_new_sessions):
    deployed(aws)
    on_new_sessions(creating_for(3))
    assert backend().endpoints.delete(NAME) is True
    assert aws.sagemaker_resources() == {"endpoints": [], "endpoint_configs": [], "models": []}


def test_an_endpoint_that_stays_creating_is_reported_and_its_parts_still_go(aws, on_new_sessions):
    deployed(aws)
    on_new_sessions(creating_for(None))
    with pytest.raises(EndpointNotDeletable, match=rf"endpoint {NAME} cannot be deleted: it is "
                       r"still Creating after \d+s.*billed.*endpoints delete"):
        backend(delete_wait_seconds=0.2).endpoints.delete(NAME)
    # The endpoint config and the model were deleted all the same.
    assert aws.sagemaker_resources() == {"endpoints": [NAME], "endpoint_configs": [],
                                         "models": []}


# -- 2. endpoints the user chose to keep are never reaped -------------------------------------


def test_the_reaper_leaves_kept_endpoints_and_delete_still_deletes_them(aws):
    b = deployed(aws, kept=True)
    deployed(aws, name="cifar10-notkept0000")
    [kept] = [e for e in b.endpoints.list() if e.name == NAME]
    assert kept.kept and kept.tags["kept"] == "true"
    report = reap_endpoints(b, dt.timedelta(0))
    assert report.deleted == ["cifar10-notkept0000"] and report.kept_by_user == [NAME]
    assert b.endpoints.describe(NAME).status == "InService"
    assert b.endpoints.delete(NAME) is True  # an explicit delete is the way to remove it
    assert aws.sagemaker_resources()["endpoints"] == []


# -- 3. a retried Create finds what its first attempt created ---------------------------------


def first_attempt_lost(operation: str, aws):
    """The first ``operation`` call reaches SageMaker (it creates the resource) but its answer
    is lost; botocore's retry then gets "Cannot create already existing ..."."""
    calls = itertools.count()
    create = {"CreateModel": aws.sm.create_model,
              "CreateEndpointConfig": aws.sm.create_endpoint_config,
              "CreateEndpoint": aws.sm.create_endpoint}[operation]

    def lost(params, **kwargs):
        if next(calls) == 0:
            create(**params)
            kind = {"CreateModel": "model", "CreateEndpointConfig": "endpoint configuration",
                    "CreateEndpoint": "endpoint"}[operation]
            raise client_error(operation, "ValidationException",
                               f"Cannot create already existing {kind} \"arn:...:{kind}/x\".")

    return lambda session: session.events.register(
        f"provide-client-params.sagemaker.{operation}", lost)


@pytest.mark.parametrize("operation", ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"])
def test_a_retried_create_of_our_own_resource_is_success(aws, on_new_sessions, operation):
    on_new_sessions(first_attempt_lost(operation, aws))
    info = deployed(aws).endpoints.describe(NAME)
    assert info is not None and info.status == "InService"
    assert aws.sagemaker_resources() == {"endpoints": [NAME], "endpoint_configs": [NAME],
                                         "models": [NAME]}


def test_an_existing_resource_of_someone_else_is_still_an_error(aws):
    aws.sm.create_model(ModelName=NAME, ExecutionRoleArn=ROLE_ARN,
                        PrimaryContainer={"Image": INFERENCE_IMAGE})  # untagged: not ours

    def already(params, **kwargs):
        raise client_error("CreateModel", "ValidationException",
                           "Cannot create already existing model \"arn:...\".")

    b = backend()
    b.aws.sagemaker.meta.events.register("provide-client-params.sagemaker.CreateModel", already)
    with pytest.raises(BackendError, match="already existing model"):
        b.endpoints.deploy(EndpointSpec(name=NAME, model_uri=put_model(aws),
                                        tags=managed_tags("t")))


# -- 4. DeleteObjects answers 200 and lists what it did not delete -----------------------------


def test_stale_objects_that_were_not_deleted_fail_the_upload(aws, cifar_dir, tmp_path,
                                                             on_new_sessions):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    b = backend()
    b.storage.upload(data)
    (data / "data_batch_2").unlink()  # now stale in S3

    def partly(parsed, **kwargs):
        parsed["Errors"] = [{"Key": "cifar10-pipeline/data/data_batch_2", "Code": "AccessDenied",
                             "Message": "Access Denied"}]

    on_new_sessions(lambda session: session.events.register(
        "after-call.s3.DeleteObjects", partly))
    with pytest.raises(BackendError, match=r"could not delete 1 stale object.*data_batch_2 "
                                           r"\(AccessDenied.*trained on"):
        backend().storage.upload(data)


# -- 5. the orphan scan reads only the pipeline's names' tags ---------------------------------


def test_listing_narrows_by_name_before_reading_tags(aws, sagemaker_calls):
    for i in range(3):  # someone else's models and configs in the same account
        aws.sm.create_model(ModelName=f"team-model-{i}", ExecutionRoleArn=ROLE_ARN,
                            PrimaryContainer={"Image": INFERENCE_IMAGE})
    b = deployed(aws)
    b.endpoints.delete(NAME)
    aws.sm.create_model(ModelName="cifar10-orphan000000", ExecutionRoleArn=ROLE_ARN,
                        PrimaryContainer={"Image": INFERENCE_IMAGE},
                        Tags=[{"Key": k, "Value": v} for k, v in managed_tags("t").items()])
    sagemaker_calls.calls.clear()
    assert [o.name for o in b.endpoints.orphans()] == ["cifar10-orphan000000"]
    for operation in ("ListEndpoints", "ListEndpointConfigs", "ListModels"):
        assert sagemaker_calls.params(operation)
        assert all(p.get("NameContains") == "cifar10-" for p in sagemaker_calls.params(operation))
    tagged = [p["ResourceArn"] for p in sagemaker_calls.params("ListTags")]
    assert tagged and all("cifar10-" in arn for arn in tagged)


# -- 6. following the logs never fails the training task --------------------------------------


class FlakyLogs:
    """CloudWatch Logs answering from a list of lines, failing the calls it is told to."""

    def __init__(self, lines: list[str], failures: dict[int, Exception]) -> None:
        self.lines, self.failures, self.calls = lines, failures, 0

    def _call(self) -> None:
        self.calls += 1
        if self.calls in self.failures:
            raise self.failures[self.calls]

    def get_paginator(self, name):
        logs = self

        class Paginator:
            def paginate(self, **kwargs):
                logs._call()
                return [{"logStreams": [{"logStreamName": "job/algo-1-1700000000"}]}]

        return Paginator()

    def get_log_events(self, **kwargs):
        self._call()
        start = int(kwargs.get("nextToken") or 0)
        page = self.lines[start:start + 2]
        return {"events": [{"message": m} for m in page],
                "nextForwardToken": str(start + len(page))}


def test_log_errors_back_off_and_resume_without_losing_or_repeating_lines():
    lines = [f"line {i}" for i in range(10)]
    throttled = client_error("GetLogEvents", "ThrottlingException", "Rate exceeded")
    timeout = ReadTimeoutError(endpoint_url="https://logs")
    logs = FlakyLogs(lines, {3: throttled, 4: throttled, 8: timeout,
                             9: EndpointConnectionError(endpoint_url="https://logs")})
    emitted: list[str] = []
    tail = TrainingLogTail(logs, "job", emitted.append)
    for _ in range(40):
        tail.poll()  # never raises
    tail.poll(final=True)
    assert [line for line in emitted if line.startswith("line")] == lines
    assert not tail.disabled
    assert any("did not answer" in line for line in emitted)


def test_a_missing_logs_permission_stops_following_but_not_the_job():
    denied = client_error("GetLogEvents", "AccessDeniedException",
                          f"not authorized to perform: logs:GetLogEvents on {LOG_GROUP}")
    emitted: list[str] = []
    tail = TrainingLogTail(FlakyLogs(["a"], {1: denied}), "job", emitted.append)
    assert tail.poll() == 0 and tail.disabled
    assert "logs:GetLogEvents" in emitted[0]


# -- 7. the training code is staged under the job's own prefix ---------------------------------


def test_code_is_staged_under_the_pipeline_prefix_even_when_iam_says_no(aws, on_new_sessions):
    """The least-privilege role may write only under the prefix: the SDK's IAM probe says
    "denied" for the bucket, and the SDK would then stage under a doubled prefix."""
    probes = []

    def denied(**kwargs):
        probes.append(kwargs)
        return AWSResponse("https://iam", 200, {}, None), {"EvaluationResults": [
            {"EvalActionName": "s3:PutObject", "EvalDecision": "implicitDeny"}]}

    on_new_sessions(lambda session: session.events.register(
        "before-call.iam.SimulatePrincipalPolicy", denied))
    spec = TrainingSpec(job_name=NAME, data_uri=f"s3://{BUCKET}/cifar10-pipeline/data/",
                        hyperparameters=dict(FAST_HYPERPARAMETERS),
                        instance_type="ml.m5.xlarge", tags=managed_tags("t"))
    request = backend().jobs.build_request(spec)
    code = [c for c in request["InputDataConfig"] if c["ChannelName"] in ("code", "sm_drivers")]
    uris = [c["DataSource"]["S3DataSource"]["S3Uri"] for c in code]
    assert len(uris) == 2, request["InputDataConfig"]
    root = f"s3://{BUCKET}/cifar10-pipeline/training-jobs/{NAME}/"
    assert all(u.startswith(root) and u.count("training-jobs") == 1 for u in uris), uris
    assert all(key.count("training-jobs") == 1
               for key in aws.keys(prefix="cifar10-pipeline/"))
    assert probes == []  # the probe is not even asked


# -- 8. Graviton instance types are refused up front ----------------------------------------------


def test_graviton_instance_types_are_refused_with_the_way_out(aws):
    with pytest.raises(ValueError, match=r"ml\.c7g\.large is a Graviton \(arm64\).*ml\.m5"):
        PipelineConfig.model_validate({"backend": "aws",
                                       "endpoint": {"instance_type": "ml.c7g.large"}})
    PipelineConfig.model_validate({"backend": "local",  # ignored by the local backend
                                   "endpoint": {"instance_type": "ml.c7g.large"}})
    with pytest.raises(BackendError, match="Graviton"):
        backend().endpoints.deploy(EndpointSpec(name=NAME, model_uri=put_model(aws),
                                                instance_type="ml.m7g.xlarge",
                                                tags=managed_tags("t")))
    assert aws.sagemaker_resources()["models"] == []
