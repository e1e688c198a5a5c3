"""A SageMaker training job's life beyond the happy path, offline: faults while the backend
waits for a job (re-attach, or stop it and say so: never a job billing with nobody watching),
quota refusals (wait for room, or say it is the account's quota and how to raise it), jobs that
Failed or were Stopped (the flow run trains again under the next free name), and the SDK's
role validation (never on, also when a sweep builds its trainers at once).

SageMaker's answers are scripted at botocore's ``before-call`` event, on every session the
backend makes (a renewed session included); what is not scripted goes to moto's server."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import EndpointConnectionError

from backends.aws import AwsBackend
from backends.base import (
    BackendError,
    ConfigurationError,
    QuotaExceeded,
    TrainingSpec,
    managed_tags,
)
from backends.job_names import MAX_NAME_LENGTH, retry_name
from flows.pipeline import cifar10_pipeline
from flows.run_context import resource_name
from flows.sweep import cifar10_sweep, point_job_name
from tests.support.aws_fakes import ACCOUNT, BUCKET, JOB, REGION, ROLE_ARN, described_job
from tests.support.configs import aws_config, sweep_config
from tests.support.pipeline import FAST_HYPERPARAMETERS

pytest_plugins = ["tests.support.aws_fixtures"]
pytestmark = pytest.mark.usefixtures("no_network")

JOB_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{JOB}"
URL = f"https://api.sagemaker.{REGION}.amazonaws.com"
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's TrainingJobName
GONE = "gone"  # a scripted "Requested resource not found."
PASS = None  # a scripted "let moto answer"


# -- scripting SageMaker -----------------------------------------------------------------------


class AwsError(Exception):
    """A scripted error answer: botocore raises it as the ClientError AWS's would become."""

    def __init__(self, code: str, message: str = "", status: int = 400) -> None:
        super().__init__(code)
        self.code, self.message, self.status = code, message or code, status


Script = Callable[[str, dict[str, Any], int], Any]  # (operation, request, nth call) -> answer


class ScriptedSageMaker:
    """Answers SageMaker calls from ``script(operation, request, n)`` (n: that operation's
    count so far for that job, from 0): a dict is the response, an ``AwsError`` or GONE an
    error response, another exception is raised as botocore would raise it (connection
    errors), PASS lets moto answer."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.sessions = 0
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def attach(self, session: Any) -> None:
        with self._lock:
            self.sessions += 1
        session.events.register("before-call.sagemaker", self._answer)

    def _answer(self, model, params, **kwargs):
        request = json.loads(params.get("body") or b"{}")
        key = (model.name, request.get("TrainingJobName", ""))
        with self._lock:
            self.calls.append((model.name, request))
            n = self._counts[key]
            self._counts[key] += 1
        answer = self.script(model.name, request, n)
        if answer is PASS:
            return None
        if answer == GONE:
            answer = AwsError("ValidationException", "Requested resource not found.")
        if isinstance(answer, AwsError):
            return AWSResponse(URL, answer.status, {}, None), {
                "Error": {"Code": answer.code, "Message": answer.message},
                "ResponseMetadata": {"HTTPStatusCode": answer.status}}
        if isinstance(answer, BaseException):
            raise answer
        return AWSResponse(URL, 200, {}, None), answer

    def named(self, operation: str) -> list[dict[str, Any]]:
        return [request for name, request in self.calls if name == operation]


@pytest.fixture
def scripted(on_new_sessions) -> Callable[[Script], ScriptedSageMaker]:
    def install(script: Script) -> ScriptedSageMaker:
        fake = ScriptedSageMaker(script)
        on_new_sessions(fake.attach)
        return fake
    return install


def described(status: str, name: str = JOB, **extra: Any) -> dict[str, Any]:
    """A job's answer with the final metric that the flow reads."""
    return described_job(status, name, **{
        "FinalMetricDataList": [{"MetricName": "test_accuracy", "Value": 0.6}], **extra})


def describing(answers: list[Any], stop: Any = None) -> Script:
    """DescribeTrainingJob answers ``answers`` in turn (the last one repeats); StopTrainingJob
    answers ``stop`` (default: success; moto has no StopTrainingJob)."""
    def script(operation: str, request: dict[str, Any], n: int) -> Any:
        if operation == "DescribeTrainingJob":
            return answers[min(n, len(answers) - 1)]
        if operation == "StopTrainingJob":
            return {} if stop is None else stop
        return PASS
    return script


def make_backend(**options: Any) -> AwsBackend:
    return AwsBackend(**{"role_arn": ROLE_ARN, "bucket": BUCKET, "poll_seconds": 0.01,
                         **options})


def spec(name: str = JOB, **overrides: Any) -> TrainingSpec:
    return TrainingSpec(**{
        "job_name": name, "data_uri": f"s3://{BUCKET}/cifar10-pipeline/data/",
        "hyperparameters": dict(FAST_HYPERPARAMETERS), "instance_type": "ml.m5.xlarge",
        "max_runtime_seconds": 1800, "tags": managed_tags("prefect-flow-run/test"),
        **overrides})


def throttled() -> AwsError:
    return AwsError("ThrottlingException", "Rate exceeded")


def denied(action: str = "sagemaker:DescribeTrainingJob") -> AwsError:
    return AwsError("AccessDeniedException", f"User: arn:aws:iam::{ACCOUNT}:user/ci is not "
                                             f"authorized to perform: {action} on resource: x")


def quota_refusal(limit: int, used: int, delta: int = 1) -> AwsError:
    return AwsError("ResourceLimitExceeded", f"The account-level service limit 'ml.m5.xlarge "
                                             f"for training job usage' is {limit} Instances, with "
                                             f"current utilization of {used} Instances and a "
                                             f"request delta of {delta} Instances. Please use AWS "
                                             f"Service Quotas to request an increase for this "
                                             f"quota.")


# -- 1. faults while waiting: re-attach, or stop the job and say so --------------------------


def test_transient_faults_while_waiting_reattach_and_the_job_completes(aws, scripted):
    """Throttling past botocore's retries, a lost connection and a 503 are asked about again
    (growing pauses), and the job is followed to its end: nothing is stopped."""
    fake = scripted(describing([
        described("InProgress"),  # exists: re-attach
        throttled(), EndpointConnectionError(endpoint_url=URL),
        AwsError("ServiceUnavailable", "try later", status=503),
        described("InProgress"), described("Completed")]))
    lines: list[str] = []
    result = make_backend().jobs.run(spec(), on_log=lines.append)
    assert result.job_name == JOB and result.status == "Completed"
    assert fake.named("StopTrainingJob") == []
    assert sum("re-attaching in" in line for line in lines) == 3, lines


def test_expired_credentials_while_waiting_get_a_fresh_session(aws, scripted):
    fake = scripted(describing([
        described("InProgress"), AwsError("ExpiredTokenException", "The security token "
                                                                    "included in the request "
                                                                    "is expired"),
        described("Completed")]))
    lines: list[str] = []
    result = make_backend().jobs.run(spec(), on_log=lines.append)
    assert result.status == "Completed"
    assert fake.sessions == 2  # the credential chain was read again
    assert any("with a fresh AWS session" in line for line in lines), lines
    assert fake.named("StopTrainingJob") == []


@pytest.mark.parametrize(("fault", "error", "message"), [
    (throttled(), BackendError, r"6 AWS faults in a row while following it"),
    (denied(), ConfigurationError, r"grant sagemaker:DescribeTrainingJob"),
], ids=["faults-that-last", "permission-taken-away"])
def test_giving_up_on_a_job_stops_it_and_says_so(aws, scripted, fault, error, message):
    """Whatever makes the backend give up on a job (transient faults past the re-attach
    attempts, or an error that asking again would not cure), the job is stopped: a failed
    run, or a sweep point marked Failed, leaves nothing billing."""
    fake = scripted(describing([described("InProgress"), fault]))
    with pytest.raises(error, match=message) as failure:
        make_backend().jobs.run(spec())
    assert "the job was stopped so it stops billing" in str(failure.value)
    assert fake.named("StopTrainingJob") == [{"TrainingJobName": JOB}]


def test_a_job_that_cannot_be_stopped_either_is_reported_as_still_billing(aws, scripted):
    fake = scripted(describing([described("InProgress"), denied()],
                               stop=EndpointConnectionError(endpoint_url=URL)))
    with pytest.raises(ConfigurationError) as failure:
        make_backend().jobs.run(spec())
    said = str(failure.value)
    assert "may still be running and billing" in said
    assert f"aws sagemaker stop-training-job --training-job-name {JOB}" in said
    assert len(fake.named("StopTrainingJob")) == 1


# -- 7. the account's quota: wait for room, or say whose limit it is -------------------------


def creating(refusals: list[AwsError]) -> Script:
    """CreateTrainingJob is refused with ``refusals`` in turn, then succeeds; the job is
    absent until created, then Completed."""
    created: list[str] = []

    def script(operation: str, request: dict[str, Any], n: int) -> Any:
        if operation == "CreateTrainingJob":
            if n < len(refusals):
                return refusals[n]
            created.append(request["TrainingJobName"])
            return {"TrainingJobArn": JOB_ARN}
        if operation == "DescribeTrainingJob":
            return described("Completed") if created else GONE
        return PASS
    return script


def test_a_quota_refusal_waits_for_room_then_trains(aws, scripted):
    """The quota is in use by other jobs (1 of 1 instance): asking again once one ends works."""
    fake = scripted(creating([quota_refusal(1, 1), quota_refusal(1, 1)]))
    lines: list[str] = []
    result = make_backend().jobs.run(spec(), on_log=lines.append)
    assert result.status == "Completed" and result.quota_wait_seconds > 0
    assert len(fake.named("CreateTrainingJob")) == 3
    assert sum("quota is in use" in line for line in lines) == 2, lines


def test_a_job_the_quota_can_never_fit_fails_at_once_saying_how_to_raise_it(aws, scripted):
    fake = scripted(creating([quota_refusal(0, 0)] * 5))
    with pytest.raises(QuotaExceeded) as failure:
        make_backend().jobs.run(spec())
    said = str(failure.value)
    assert "waiting cannot help" in said
    assert "the AWS account's SageMaker quota 'ml.m5.xlarge for training job usage'" in said
    assert "service-quotas request-service-quota-increase --service-code sagemaker" in said
    assert len(fake.named("CreateTrainingJob")) == 1


def test_waiting_for_the_quota_has_a_deadline(aws, scripted):
    fake = scripted(creating([quota_refusal(2, 2)] * 1000))
    started = time.monotonic()
    with pytest.raises(QuotaExceeded, match=r"waited \d+s for other jobs to make room "
                                            r"\(quota_wait_seconds 1\)") as failure:
        make_backend(quota_wait_seconds=1.0, poll_seconds=0.05).jobs.run(spec())
    assert time.monotonic() - started < 10
    assert 0 < failure.value.waited_seconds <= 1.0
    assert len(fake.named("CreateTrainingJob")) > 2


# -- 8. a job that Failed or was Stopped: train again under the next free name ----------------


def test_job_names_of_a_chain_stay_within_sagemakers_limit_and_pattern():
    assert retry_name(JOB, 0) == JOB and retry_name(JOB, 1) == f"{JOB}-r1"
    for name in ("a" * 63, "b" * 60 + "-cd", "x"):
        for retry in (1, 9, 10, 99):
            chained = retry_name(name, retry)
            assert len(chained) <= MAX_NAME_LENGTH and NAME_PATTERN.match(chained), chained
            assert chained.endswith(f"-r{retry}")
            assert chained == retry_name(name, retry)  # the same every time: re-attachable
    assert len({retry_name("a" * 63, retry) for retry in range(100)}) == 100


def test_a_failed_or_stopped_job_trains_again_under_the_next_free_name(aws, scripted):
    """SageMaker never reuses a job name: after the run's job Failed and its retry's was
    Stopped, the next retry creates {name}-r2, resuming from the chain's spot checkpoints;
    stopping the run's training stops that job."""
    jobs = {JOB: "Failed", f"{JOB}-r1": "Stopped"}

    def script(operation: str, request: dict[str, Any], n: int) -> Any:
        name = request.get("TrainingJobName")
        if operation == "DescribeTrainingJob":
            return described(jobs[name], name) if name in jobs else GONE
        if operation == "CreateTrainingJob":
            jobs[name] = "Completed"
            return {"TrainingJobArn": JOB_ARN}
        if operation == "StopTrainingJob":
            return {}
        return PASS

    fake = scripted(script)
    lines: list[str] = []
    backend = make_backend(use_spot=True)
    result = backend.jobs.run(spec(), on_log=lines.append)
    created = fake.named("CreateTrainingJob")
    assert [r["TrainingJobName"] for r in created] == [f"{JOB}-r2"]
    assert created[0]["CheckpointConfig"]["S3Uri"] == (
        f"s3://{BUCKET}/cifar10-pipeline/training-jobs/{JOB}/checkpoints")
    assert result.job_name == f"{JOB}-r2" and result.status == "Completed"
    assert any(f"training again as {JOB}-r2" in line for line in lines), lines

    # A retry now re-attaches to the completed job, and a stop reaches a running one.
    assert backend.jobs.run(spec()).job_name == f"{JOB}-r2"
    assert len(fake.named("CreateTrainingJob")) == 1
    jobs[f"{JOB}-r2"] = "InProgress"
    assert backend.jobs.stop(JOB) is True
    assert fake.named("StopTrainingJob") == [{"TrainingJobName": f"{JOB}-r2"}]


def test_a_flow_run_whose_job_failed_trains_hosts_and_registers_under_the_next_name(
        prefect_harness, pipeline_home, http_server, cifar_tarball, aws, sagemaker_stand_in,
        scripted):
    """The run's own name is taken by a Failed job (as after a spot-capacity failure, when
    the flow run is retried): the run trains as {name}-r1, and the endpoint (the run's name),
    the summary and the registry all follow."""
    def script(operation: str, request: dict[str, Any], n: int) -> Any:
        name = request.get("TrainingJobName", "")
        if operation == "DescribeTrainingJob" and re.fullmatch(r"cifar10-[0-9a-f]{12}", name):
            return described("Failed", name, FailureReason="CapacityError: Unable to "
                                                           "provision requested ML compute "
                                                           "capacity.")
        return PASS

    scripted(script)
    state = cifar10_pipeline(aws_config(http_server, cifar_tarball), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    name = resource_name(summary.flow_run_id)
    assert summary.training.job_name == f"{name}-r1"
    assert sagemaker_stand_in.trained == [f"{name}-r1"]
    assert summary.endpoint.name == name and sagemaker_stand_in.served == [name]
    versions = make_backend().registry.versions("cifar10-pipeline")
    assert [v.training_job for v in versions] == [f"{name}-r1"]


# -- 1 and 7 in a sweep: a quota refusal waits, a point given up on leaves nothing running ----


def test_a_sweep_waits_for_the_quota_and_stops_the_job_of_a_point_it_gives_up_on(
        prefect_harness, pipeline_home, http_server, cifar_tarball, aws, sagemaker_stand_in,
        scripted, monkeypatch):
    import backends.aws.training

    monkeypatch.setattr(backends.aws.training, "sleep", lambda seconds: time.sleep(0.01))

    def script(operation: str, request: dict[str, Any], n: int) -> Any:
        name = request.get("TrainingJobName", "")
        if operation == "CreateTrainingJob" and name.endswith("-p1") and n == 0:
            return quota_refusal(2, 2)  # the other point and someone else's job hold it
        if operation == "DescribeTrainingJob" and name.endswith("-p2") and n > 0:
            return denied()  # the point's wait fails for good once its job exists
        if operation == "StopTrainingJob":
            return {}
        return PASS

    fake = scripted(script)
    config = sweep_config(aws_config(http_server, cifar_tarball), [0.02, 0.03], max_parallel=2)
    state = cifar10_sweep(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    first, second = summary.points
    assert first.status == "Completed" and first.quota_wait_seconds > 0
    assert second.status == "Failed"
    assert "the job was stopped so it stops billing" in second.error
    stopped = point_job_name(summary.flow_run_id, 2)
    assert {"TrainingJobName": stopped} in fake.named("StopTrainingJob")
    note = summary.quota_note or ""
    assert ("quota for ml.m5.xlarge training instances, not max_parallel, was the limit: "
            "point 1 waited") in note
    assert summary.quota_note in summary.text() and summary.quota_note in summary.markdown()


# -- 5. the SDK's role validation: never on, also when a sweep builds trainers at once ---------


def test_the_validate_role_option_is_gone():
    """The SDK's simulation demands ec2:* network and cloudwatch:PutMetricData on * of the
    role, which the documented least-privilege role does not grant: the option could only
    fail, so it is gone, and an old setting says so at once."""
    with pytest.raises(TypeError, match="validate_role"):
        AwsBackend(role_arn=ROLE_ARN, validate_role=True)


def test_concurrent_trainer_builds_never_let_the_sdk_validate_the_role(aws, monkeypatch):
    """Two points build their ModelTrainers at once. The SDK reads SAGEMAKER_VALIDATE_ROLE
    from the process environment when it resolves the role; the first build must not restore
    the variable while the second is still reading it (which made the SDK simulate the
    role's policy, and reject it)."""
    import sagemaker.train.defaults

    first_inside, second_inside, first_done = (threading.Event() for _ in range(3))
    seen: dict[str, str | None] = {}

    def resolve(provided_role=None, role_type="training", sagemaker_session=None, **kwargs):
        me = threading.current_thread().name
        if me == "first":
            first_inside.set()
            second_inside.wait(timeout=2)  # let the second build start, if it can
        else:
            second_inside.set()
            first_done.wait(timeout=2)  # let the first build finish, if it can
        seen[me] = os.environ.get("SAGEMAKER_VALIDATE_ROLE")
        return provided_role

    monkeypatch.setattr(sagemaker.train.defaults, "resolve_and_validate_role", resolve)
    backend = make_backend()
    failures: list[BaseException] = []

    def build(name: str, done: threading.Event | None) -> None:
        try:
            backend.jobs.build_request(spec(f"{JOB}-{name}"))
        except BaseException as e:
            failures.append(e)
        finally:
            if done:
                done.set()

    first = threading.Thread(target=build, args=("first", first_done), name="first")
    second = threading.Thread(target=build, args=("second", None), name="second")
    first.start()
    assert first_inside.wait(timeout=60)
    second.start()
    first.join(timeout=120)
    second.join(timeout=120)
    assert failures == []
    assert seen == {"first": "false", "second": "false"}
    assert "SAGEMAKER_VALIDATE_ROLE" not in os.environ  # restored as it was
