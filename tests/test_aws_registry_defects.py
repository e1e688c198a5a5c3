"""The training cache and the model registry where real AWS differs from moto (issue 24,
defects 2, 3, 6 and 9): S3 answers 403 for an object the caller may not read (missing ones
too, without s3:ListBucket), the account-wide registry points at other buckets and prefixes,
a second CreateModelPackageGroup is refused as "already exists", a cached model is registered
again under its original job, and UpdateModelPackage refuses an empty metadata map. Faults are
injected at botocore's level (its event hooks) under the backend's own code, against moto."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

import backends.aws.registry
from backends.aws import AwsBackend
from backends.base import (
    APPROVED,
    REJECTED,
    BackendError,
    ModelVersionSpec,
    managed_tags,
)
from backends.cache import cached_training
from backends.local import LocalBackend
from backends.local.training import JobRecord
from tests.support.aws_fakes import ACCOUNT, BUCKET, REGION, ROLE_ARN

pytest_plugins = ["tests.support.aws_fixtures"]

GROUP = "cifar10-pipeline"
KEY = "the-cache-key"
PREFIX = "cifar10-pipeline"  # the backend's default prefix
OTHER_BUCKET = "a-colleagues-bucket"


def aws_backend(**options: Any) -> AwsBackend:
    return AwsBackend(**{"role_arn": ROLE_ARN, "bucket": BUCKET, "poll_seconds": 0.01,
                         **options})


def spec(job: str, model_uri: str, accuracy: float = 0.5, cache_key: str = KEY,
         run: str = "run-1") -> ModelVersionSpec:
    return ModelVersionSpec(group=GROUP, model_uri=model_uri, training_job=job,
                            cache_key=cache_key, metrics={"test_accuracy": accuracy},
                            lineage={"flow_run_id": run}, instance_type="ml.m5.large",
                            tags=managed_tags("pytest"))


def approve(champion: object) -> tuple[str, str]:
    return APPROVED, "test"


def client_error(operation: str, code: str, message: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def completed_job(aws, name: str, output_path: str) -> str:
    """A completed moto training job whose model.tar.gz is where DescribeTrainingJob says."""
    aws.sm.create_training_job(
        TrainingJobName=name, RoleArn=ROLE_ARN,
        AlgorithmSpecification={"TrainingImage": "image", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": output_path},
        ResourceConfig={"InstanceType": "ml.m5.large", "InstanceCount": 1,
                        "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 600})
    uri = aws.sm.describe_training_job(TrainingJobName=name)["ModelArtifacts"][
        "S3ModelArtifacts"]
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    aws.s3.put_object(Bucket=bucket, Key=key, Body=b"model")
    return uri


class HeadRecorder:
    """Every S3 HeadObject the backend makes; those on ``refused`` keys answer 403, as S3
    does when the caller may not read the object (or, without s3:ListBucket, it is missing)."""

    def __init__(self, refused: set[str] = frozenset()) -> None:
        self.heads: list[str] = []
        self.refused = refused

    def attach(self, session: Any) -> None:
        session.events.register("provide-client-params.s3.HeadObject", self._head)

    def _head(self, params: dict[str, Any], **kwargs: Any) -> None:
        uri = f"s3://{params['Bucket']}/{params['Key']}"
        self.heads.append(uri)
        if uri in self.refused:
            raise client_error("HeadObject", "403", "Forbidden", status=403)


# -- 2. the cache lookup passes over what it may not or should not read -------------------------


def test_a_cached_model_that_s3_refuses_is_passed_over_not_a_failed_run(
        aws, no_network, on_new_sessions, caplog):
    """A 403 on the newest candidate's HEAD used to be a ConfigurationError that failed the run
    before training; now that candidate is logged and passed over, and the next one is used."""
    training_jobs = f"s3://{BUCKET}/{PREFIX}/training-jobs"
    older = completed_job(aws, "cifar10-older", training_jobs)
    refused = completed_job(aws, "cifar10-refused", training_jobs)
    heads = HeadRecorder(refused={refused})
    on_new_sessions(heads.attach)
    backend = aws_backend()
    backend.registry.register(spec("cifar10-older", older), approve)
    backend.registry.register(spec("cifar10-refused", refused), approve)

    with caplog.at_level(logging.INFO, logger="backends.cache"):
        cached = cached_training(backend, GROUP, KEY)
    assert cached is not None and cached.job_name == "cifar10-older"
    assert heads.heads == [refused, older]
    assert f"v2 (job cifar10-refused) has this cache key, but its model {refused} is not " \
           f"reusable: S3 refused" in caplog.text and "403" in caplog.text
    # The task's logger gets the same line through on_log.
    lines: list[str] = []
    assert cached_training(backend, GROUP, KEY, on_log=lines.append) == cached
    assert len(lines) == 1 and "cifar10-refused" in lines[0] and "passed over" in lines[0]

    # With nothing else to reuse, the lookup finds nothing: the run trains.
    heads.refused = {refused, older}
    assert cached_training(backend, GROUP, KEY) is None


@pytest.mark.parametrize("where", ["another bucket", "another prefix"])
def test_the_cache_reuses_only_models_under_this_backends_bucket_and_prefix(
        aws, no_network, on_new_sessions, caplog, where):
    """The cache key names neither bucket nor prefix, and the registry group is the
    account's: a version trained under another configuration, or by a colleague, is not
    reused (and not even asked about: the caller's policy covers BUCKET/PREFIX/* only)."""
    aws.s3.create_bucket(Bucket=OTHER_BUCKET)
    output = {"another bucket": f"s3://{OTHER_BUCKET}/{PREFIX}/training-jobs",
              "another prefix": f"s3://{BUCKET}/{PREFIX}-old/training-jobs"}[where]
    theirs = completed_job(aws, "cifar10-theirs", output)
    heads = HeadRecorder()
    on_new_sessions(heads.attach)
    backend = aws_backend()
    backend.registry.register(spec("cifar10-theirs", theirs), approve)

    with caplog.at_level(logging.INFO, logger="backends.cache"):
        assert cached_training(backend, GROUP, KEY) is None
    assert heads.heads == []
    assert f"its model {theirs} is not reusable: it is outside this backend's bucket and " \
           f"prefix (s3://{BUCKET}/{PREFIX}/)" in caplog.text


def test_a_local_model_outside_the_store_is_not_reused(tmp_path, caplog):
    backend = LocalBackend(root=tmp_path / "state")
    inside = local_job(backend, "job-inside", tmp_path / "staging")
    outside = local_job(backend, "job-outside", tmp_path / "elsewhere", in_store=False)
    backend.registry.register(spec("job-inside", inside), approve)
    backend.registry.register(spec("job-outside", outside), approve)

    with caplog.at_level(logging.INFO, logger="backends.cache"):
        cached = cached_training(backend, GROUP, KEY)
    assert cached is not None and cached.job_name == "job-inside"
    assert f"its model {outside} is not reusable: it is outside this backend's store" \
           in caplog.text
    assert backend.storage.why_not_reusable(inside) is None
    assert backend.storage.why_not_reusable("s3://bucket/model.tar.gz") == "it is not a file:// URI"


def local_job(backend: LocalBackend, name: str, where: Path, in_store: bool = True) -> str:
    """A completed local job record whose model is in the store or, ``in_store`` False, in a
    file outside it (a record pointing at another state directory's model)."""
    where.mkdir(parents=True, exist_ok=True)
    model = where / f"{name}.tar.gz"
    model.write_bytes(b"model " + name.encode())
    uri = (backend.storage.put_file(model, f"training-jobs/{name}/output/model.tar.gz")
           if in_store else model.resolve().as_uri())
    backend.jobs.job_dir(name).mkdir(parents=True, exist_ok=True)
    backend.jobs._save(JobRecord(
        name=name, status="Completed", secondary_status="Completed", hyperparameters={},
        data_uri="file:///data", instance_type="local", instance_count=1,
        max_runtime_seconds=60, tags={}, created=dt.datetime.now(dt.UTC).isoformat(),
        model_uri=uri))
    return uri


# -- 3. CreateModelPackageGroup: a second creator is told "already exists" ---------------------

# What SageMaker answers a CreateModelPackageGroup for a group that exists (ValidationException
# with the group's ARN), and ResourceInUse, the modelled code the SDK checks first.
GROUP_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package-group/{GROUP}"
ALREADY_EXISTS = {
    "ValidationException": f"Model Package Group already exists: {GROUP_ARN}",
    "ResourceInUse": f"Resource Already Exists: ModelPackageGroup {GROUP} already exists.",
}


def created_meanwhile(aws, code: str, message: str, really: bool = True) -> Callable:
    """Another run creates the group between our describe and our create (``really`` False:
    SageMaker says so, but the group is not there), so our create is refused. A botocore retry
    of our own create whose answer was lost gets the same answer."""
    def create(params: dict[str, Any], **kwargs: Any) -> None:
        if really:
            aws.sm.create_model_package_group(ModelPackageGroupName=params[
                "ModelPackageGroupName"], ModelPackageGroupDescription="the other run's")
        raise client_error("CreateModelPackageGroup", code, message)

    return lambda session: session.events.register(
        "provide-client-params.sagemaker.CreateModelPackageGroup", create)


@pytest.mark.parametrize("code", sorted(ALREADY_EXISTS))
def test_a_group_created_meanwhile_is_used_and_the_model_registered(
        aws, no_network, on_new_sessions, code):
    aws.s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/m/model.tar.gz", Body=b"model")
    on_new_sessions(created_meanwhile(aws, code, ALREADY_EXISTS[code]))
    backend = aws_backend()

    registration = backend.registry.register(
        spec("cifar10-job", f"s3://{BUCKET}/{PREFIX}/m/model.tar.gz"), approve)

    assert (registration.version.version, registration.version.status) == (1, APPROVED)
    assert [v.training_job for v in backend.registry.versions(GROUP)] == ["cifar10-job"]


def test_already_exists_without_a_group_and_other_refusals_are_still_errors(
        aws, no_network, on_new_sessions):
    on_new_sessions(created_meanwhile(aws, "ValidationException",
                                      ALREADY_EXISTS["ValidationException"], really=False))
    with pytest.raises(BackendError, match=r"creating model package group.*already exists"):
        aws_backend().registry.ensure_group(GROUP, {})


def test_a_refused_group_creation_for_another_reason_is_an_error(
        aws, no_network, on_new_sessions):
    on_new_sessions(created_meanwhile(aws, "ResourceLimitExceeded",
                                      "The account-level service limit has been exceeded"))
    with pytest.raises(BackendError, match="service limit"):
        aws_backend().registry.ensure_group(GROUP, {})


# -- 6. every registration has its own model-quality report ----------------------------------


def report_of(aws, arn: str) -> tuple[str, dict[str, Any]]:
    described = aws.sm.describe_model_package(ModelPackageName=arn)
    uri = described["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return uri, json.loads(aws.s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_a_cached_models_new_version_leaves_the_earlier_versions_report_alone(aws, no_network):
    """A cached model is registered again under its original job (a later run's smoke test):
    the earlier version's registered statistics must not change."""
    backend = aws_backend()
    model = f"s3://{BUCKET}/{PREFIX}/training-jobs/cifar10-job/output/model.tar.gz"
    first = backend.registry.register(spec("cifar10-job", model, 0.51, run="run-1"), approve)
    second = backend.registry.register(spec("cifar10-job", model, 0.49, run="run-2"),
                                       lambda champion: (REJECTED, "test"))

    first_uri, first_report = report_of(aws, first.version.arn)
    second_uri, second_report = report_of(aws, second.version.arn)
    assert first_uri != second_uri
    assert first_uri.startswith(f"s3://{BUCKET}/{PREFIX}/registry/{GROUP}/cifar10-job/")
    assert (first_report["metrics"], first_report["lineage"]) == (
        {"test_accuracy": 0.51}, {"flow_run_id": "run-1"})
    assert (second_report["metrics"], second_report["lineage"]) == (
        {"test_accuracy": 0.49}, {"flow_run_id": "run-2"})


@pytest.fixture
def report_ids(monkeypatch) -> Iterator[list[str]]:
    """The ids the registry draws for its reports, in order (they are random otherwise)."""
    ids: list[str] = []
    monkeypatch.setattr(backends.aws.registry, "new_report_id", lambda: ids.pop(0))
    yield ids


def test_a_report_key_that_is_taken_is_never_overwritten(aws, no_network, report_ids):
    """S3 itself refuses the overwrite (If-None-Match): a taken key, however it came about
    (a retried write that landed, a clash), makes the registry draw another."""
    backend = aws_backend()
    model = f"s3://{BUCKET}/{PREFIX}/training-jobs/cifar10-job/output/model.tar.gz"
    report_ids += ["clash", "clash", "fresh"]
    first = backend.registry.register(spec("cifar10-job", model, 0.51), approve)
    second = backend.registry.register(spec("cifar10-job", model, 0.49), approve)

    first_uri, first_report = report_of(aws, first.version.arn)
    second_uri, second_report = report_of(aws, second.version.arn)
    assert first_uri.endswith("/clash/metrics.json") and second_uri.endswith("/fresh/metrics.json")
    assert first_report["metrics"] == {"test_accuracy": 0.51}
    assert second_report["metrics"] == {"test_accuracy": 0.49}
    report_ids += ["clash", "clash", "clash"]
    with pytest.raises(BackendError, match="every key tried was taken"):
        backend.registry.register(spec("cifar10-job", model, 0.3), approve)


# -- 9. an approval by hand of a version registered outside the pipeline ---------------------


def test_approving_a_version_without_metadata_sends_no_empty_map(
        aws, no_network, request_validator, sagemaker_calls):
    """A version someone registered by hand has no CustomerMetadataProperties; the API
    refuses an empty map (min 1), which botocore does not check and moto accepts."""
    aws.sm.create_model_package_group(ModelPackageGroupName=GROUP)
    aws.sm.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={
            "Containers": [{"Image": "image", "ModelDataUrl": f"s3://{BUCKET}/by-hand.tar.gz"}],
            "SupportedContentTypes": ["application/json"],
            "SupportedResponseMIMETypes": ["application/json"]})
    backend = aws_backend()

    approved = backend.registry.set_status(GROUP, 1, APPROVED, "checked by hand")

    assert (approved.status, approved.reason) == (APPROVED, "checked by hand")
    [update] = sagemaker_calls.params("UpdateModelPackage")
    assert "CustomerMetadataProperties" not in update
    assert request_validator.violations == []


def test_request_validation_catches_an_empty_map():
    """The suite's request validator checks map minimums (botocore does not), so an empty
    map in any request fails the AWS tests that use it."""
    import boto3
    from botocore.stub import Stubber

    from tests.support.aws_validation import RequestValidator

    session = boto3.Session(region_name=REGION, aws_access_key_id="x",
                            aws_secret_access_key="x")
    validator = RequestValidator()
    validator.attach(session)
    client = session.client("sagemaker")
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/1"
    with Stubber(client) as stubber:
        stubber.add_response("update_model_package", {"ModelPackageArn": arn})
        client.update_model_package(ModelPackageArn=arn, ModelApprovalStatus=APPROVED,
                                    CustomerMetadataProperties={})
    assert validator.violations == [
        "sagemaker.UpdateModelPackage.CustomerMetadataProperties: 0 entries, under the "
        "minimum 1"]
