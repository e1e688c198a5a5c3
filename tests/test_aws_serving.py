"""The serving endpoint on SageMaker (backends/aws/serving.py): first promotion, blue/green
promotions by each traffic-shifting strategy, rollbacks, failed rollbacks, autoscaling around an
update, the API's limits, describe and delete.

moto's server plays S3, the SageMaker control plane, CloudWatch and Application Auto Scaling.
moto has no UpdateEndpoint and its endpoints never update: ``Guardrails`` below is that part of
SageMaker, hooked on the backend's boto3 sessions (botocore events, as in test_aws_fidelity):
it answers UpdateEndpoint after checking what AWS checks, and plays the endpoint's life during a
blue/green update through DescribeEndpoint (Updating with the new fleet's stages, RollingBack,
UpdateRollbackFailed), firing the rollback alarm in moto's CloudWatch when it rolls back. Every
request, UpdateEndpoint's included, is checked against botocore's service models."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
import regex
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from backends.aws import AwsBackend
from backends.base import (
    SERVING_KEY,
    Autoscaling,
    BackendError,
    ConfigurationError,
    EndpointFailed,
    EndpointSpec,
    RollbackAlarms,
    ServingSpec,
    TrafficShift,
    managed_tags,
)
from tests.support import aws_validation
from tests.support.aws_fakes import ACCOUNT, BUCKET, INFERENCE_IMAGE, REGION, ROLE_ARN
from tests.support.aws_validation import SERVICES, RequestValidator
from tests.support.iam_policies import assert_allowed_by_caller_policy

pytest_plugins = ["tests.support.aws_fixtures"]
pytestmark = pytest.mark.usefixtures("no_network")

NAME = "cifar10-serving"
GROUP = "cifar10-pipeline"
RESOURCE = f"endpoint/{NAME}/variant/AllTraffic"
ALARMS = [f"{NAME}-5xx", f"{NAME}-p99-latency"]
FIRED = ("Threshold Crossed: 1 datapoint [0.31 (02/12/26 06:00:00)] was greater than the "
         "threshold (0.02).")


# -- what moto lacks ------------------------------------------------------------------------


# One answer of DescribeEndpoint during an update: EndpointStatus, the new fleet's stage (None:
# no update pending), and whether the stage is a new one although named like the one before
# (a Baking after a Baking: the ActivatingTraffic between them fell between two polls).
Answer = tuple[str, str | None, bool]


@dataclass
class Update:
    old: str  # the endpoint config serving before
    new: str
    answers: deque  # of Answer, one per DescribeEndpoint
    ends_on: str  # the config serving afterwards: "new" or "old"
    stage: tuple[str, int] | None = None  # the stage reported last, and its start (minutes)


@dataclass
class Guardrails:
    """SageMaker's blue/green update where moto has none. ``script``: what DescribeEndpoint
    says after the next UpdateEndpoint; ``ends_on``: which config serves when it is over."""

    aws: Any
    script: list[Answer] = field(default_factory=list)
    ends_on: str = "new"
    refuse_update: str | None = None  # UpdateEndpoint answers ValidationException with it
    updates: list[dict[str, Any]] = field(default_factory=list)  # UpdateEndpoint requests
    scaled_at_update: list[bool] = field(default_factory=list)
    describes_while_updating: int = 0
    instance_count: int | None = None  # CurrentInstanceCount, as autoscaling left it
    status: dict[str, str] = field(default_factory=dict)  # a status that stays
    serving: dict[str, str] = field(default_factory=dict)  # the config each endpoint serves
    last_deployment: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, Update] = field(default_factory=dict)
    minutes: Any = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, session) -> None:
        session.events.register("before-call.sagemaker.UpdateEndpoint", self.update_endpoint)
        session.events.register("after-call.sagemaker.DescribeEndpoint", self.describe_endpoint)

    def update_endpoint(self, params, **kwargs):
        request = json.loads(params["body"])
        if self.refuse_update:
            raise ClientError({"Error": {"Code": "ValidationException",
                                         "Message": self.refuse_update}}, "UpdateEndpoint")
        name, config = request["EndpointName"], request["EndpointConfigName"]
        old = self.serving.get(name) or self.aws.sm.describe_endpoint(
            EndpointName=name)["EndpointConfigName"]
        # What AWS checks: the config exists, and keeps the variant's name (blue/green).
        variants = [self.aws.sm.describe_endpoint_config(EndpointConfigName=c)
                    ["ProductionVariants"][0]["VariantName"] for c in (old, config)]
        if variants[0] != variants[1]:
            raise ClientError({"Error": {"Code": "ValidationException", "Message":
                               "variant names must match"}}, "UpdateEndpoint")
        targets = self.aws.session.client("application-autoscaling").describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[f"endpoint/{name}/variant/AllTraffic"])
        self.scaled_at_update.append(bool(targets["ScalableTargets"]))
        self.updates.append(request)
        self.pending[name] = Update(old, config, deque(self.script), self.ends_on)
        arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{name}"
        return AWSResponse(None, 200, {}, None), {"EndpointArn": arn}

    def describe_endpoint(self, parsed, **kwargs):
        name = parsed.get("EndpointName")
        if name is None:
            return
        update = self.pending.get(name)
        if update is not None:
            self._play(name, update, parsed)
        parsed["EndpointConfigName"] = self.serving.get(name, parsed["EndpointConfigName"])
        parsed["EndpointStatus"] = self.status.get(name, parsed["EndpointStatus"])
        if name in self.last_deployment:
            parsed["LastDeploymentConfig"] = self.last_deployment[name]
        if self.instance_count is not None:
            parsed["ProductionVariants"][0]["CurrentInstanceCount"] = self.instance_count

    def _play(self, name: str, update: Update, parsed: dict[str, Any]) -> None:
        with self.lock:
            self.describes_while_updating += 1
            status, stage, fresh = update.answers.popleft()
            if not update.answers:
                del self.pending[name]
                self.serving[name] = update.new if update.ends_on == "new" else update.old
                if status != "InService":
                    self.status[name] = status
                elif update.ends_on == "new":
                    self.last_deployment[name] = self.updates[-1]["DeploymentConfig"]
        parsed["EndpointStatus"] = status
        if stage is not None:
            if update.stage is None or update.stage[0] != stage or fresh:
                update.stage = (stage, next(self.minutes))
            started = dt.datetime(2026, 12, 2, 6, tzinfo=dt.UTC) + dt.timedelta(
                minutes=update.stage[1])
            parsed["PendingDeploymentSummary"] = {
                "EndpointConfigName": update.new, "StartTime": started,
                "ProductionVariants": [{"VariantName": "AllTraffic", "VariantStatus": [
                    {"Status": stage, "StartTime": started, "StatusMessage": ""}]}]}
        if status == "RollingBack":
            self.aws.session.client("cloudwatch").set_alarm_state(
                AlarmName=ALARMS[0], StateValue="ALARM", StateReason=FIRED)
        if status == "UpdateRollbackFailed":
            parsed["FailureReason"] = "The old fleet failed its health check."


def stages(names: list[str]) -> list[Answer]:
    """Updating through the new fleet's stages; ``Baking*`` is a new Baking right after
    another."""
    return [("Updating", n.rstrip("*"), n.endswith("*")) for n in names]


def end(status: str) -> Answer:
    return (status, None, False)


@dataclass
class Call:
    service: str
    operation: str
    params: dict[str, Any]


class AllCalls:
    """Every call of the backend's sessions, any service, in order, with its parameters."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def attach(self, session) -> None:
        session.events.register("before-parameter-build", self._record)

    def _record(self, model, params, **kwargs) -> None:
        self.calls.append(Call(model.service_model.service_name, model.name, dict(params)))

    def names(self) -> list[str]:
        return [c.operation for c in self.calls]

    def params(self, operation: str) -> list[dict[str, Any]]:
        return [c.params for c in self.calls if c.operation == operation]

    def index(self, operation: str, last: bool = False) -> int:
        names = self.names()
        return len(names) - 1 - names[::-1].index(operation) if last else names.index(operation)


class EveryServiceValidator(RequestValidator):
    """The house validator, on CloudWatch and Application Auto Scaling too (event names use
    botocore's service ids; the records keep boto3's service names)."""

    def attach(self, session) -> None:
        for event, service in (*((s, s) for s in SERVICES), ("cloudwatch", "cloudwatch"),
                               ("application-auto-scaling", "application-autoscaling")):
            session.events.register(f"before-parameter-build.{event}", self._check(service))


class JavaPatterns:
    """``regex`` for the validator, reading AWS's Java-style patterns: Application Auto
    Scaling's model writes U+10000-U+10FFFF as UTF-16 surrogate pairs
    (``\\uD800\\uDC00-\\uDBFF\\uDFFF``), which ``regex`` takes for a backwards range."""

    SURROGATES = r"\uD800\uDC00-\uDBFF\uDFFF"

    @staticmethod
    def search(pattern: str, value: str) -> Any:
        return regex.search(pattern.replace(JavaPatterns.SURROGATES, r"\U00010000-\U0010FFFF"),
                            value)


@dataclass
class World:
    aws: Any
    fake: Guardrails
    calls: AllCalls
    validator: EveryServiceValidator

    @property
    def cloudwatch(self) -> Any:
        return self.aws.session.client("cloudwatch")

    @property
    def scaling(self) -> Any:
        return self.aws.session.client("application-autoscaling")

    def alarms(self) -> dict[str, dict[str, Any]]:
        return {a["AlarmName"]: a for a in self.cloudwatch.describe_alarms()["MetricAlarms"]}

    def targets(self) -> list[dict[str, Any]]:
        return self.scaling.describe_scalable_targets(ServiceNamespace="sagemaker")[
            "ScalableTargets"]

    def policies(self) -> list[dict[str, Any]]:
        return self.scaling.describe_scaling_policies(ServiceNamespace="sagemaker")[
            "ScalingPolicies"]

    def tags(self, arn: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self.aws.sm.list_tags(ResourceArn=arn)["Tags"]}


@pytest.fixture
def world(aws, on_new_sessions, monkeypatch):
    fake, calls, validator = Guardrails(aws), AllCalls(), EveryServiceValidator()
    monkeypatch.setattr(aws_validation, "regex", JavaPatterns)

    def attach(session) -> None:
        for part in (calls, validator, fake):
            part.attach(session)

    on_new_sessions(attach)
    yield World(aws, fake, calls, validator)
    assert validator.violations == []
    # The code's own CloudWatch and autoscaling requests carry no Tags: the IAM check
    # (tests/support/iam_policies.py) counts tagging for them only when a call says Tags=.
    assert not [c for c in calls.calls if c.service != "sagemaker" and "Tags" in c.params]


def backend() -> AwsBackend:
    return AwsBackend(role_arn=ROLE_ARN, bucket=BUCKET, poll_seconds=0.01)


def put_model(aws, version: int) -> str:
    key = f"cifar10-pipeline/training-jobs/cifar10-run{version}/output/model.tar.gz"
    aws.s3.put_object(Bucket=BUCKET, Key=key, Body=b"model")
    return f"s3://{BUCKET}/{key}"


def spec(aws, version: int, **overrides) -> ServingSpec:
    return ServingSpec(**{
        "name": NAME, "model_uri": put_model(aws, version), "group": GROUP, "version": version,
        "instance_type": "ml.m5.large", "instance_count": 1,
        "shift": TrafficShift("canary", 10, 120, 300, 1800),
        "tags": {**managed_tags(f"prefect-flow-run/run-{version}", kept=True),
                 SERVING_KEY: "true"}, **overrides})


def fleets(world: World) -> dict[str, list[str]]:
    resources = world.aws.sagemaker_resources()
    return {"configs": sorted(resources["endpoint_configs"]), "models": sorted(resources["models"])}


def serving_config(world: World) -> str:
    return backend().serving.describe(NAME).extra["endpoint_config"]


# -- the first promotion --------------------------------------------------------------------


def test_the_first_promotion_creates_the_endpoint_with_its_alarms(world):
    first = spec(world.aws, 1)
    result = backend().serving.promote(first)
    assert (result.outcome, result.status, result.serving_version) == ("created", "InService", 1)
    [config] = fleets(world)["configs"]
    assert config.startswith(f"{NAME}-v1-") and fleets(world)["models"] == [config]
    [model] = world.calls.params("CreateModel")
    assert model["ExecutionRoleArn"] == ROLE_ARN
    assert model["PrimaryContainer"] == {  # as hosting's deploy makes it
        "Image": INFERENCE_IMAGE, "ModelDataUrl": first.model_uri,
        "Environment": {"SAGEMAKER_REGION": REGION, "SAGEMAKER_CONTAINER_LOG_LEVEL": "20"}}
    [variant] = world.calls.params("CreateEndpointConfig")[0]["ProductionVariants"]
    assert variant == {"VariantName": "AllTraffic", "ModelName": config,
                       "InstanceType": "ml.m5.large", "InitialInstanceCount": 1,
                       "InitialVariantWeight": 1.0}
    described = world.aws.sm.describe_endpoint_config(EndpointConfigName=config)
    tags = world.tags(described["EndpointConfigArn"])
    assert {k: tags[k] for k in ("model-group", "model-version", "serving-endpoint", "kept",
                                 "serving", "managed-by")} == {
        "model-group": GROUP, "model-version": "1", "serving-endpoint": NAME, "kept": "true",
        "serving": "true", "managed-by": "cifar10-pipeline"}
    endpoint = world.aws.sm.describe_endpoint(EndpointName=NAME)
    assert world.tags(endpoint["EndpointArn"])["serving"] == "true"
    assert sorted(world.alarms()) == ALARMS
    assert "UpdateEndpoint" not in world.calls.names()
    status = backend().serving.describe(NAME)
    assert (status.status, status.group, status.version, status.model_uri) == (
        "InService", GROUP, 1, first.model_uri)
    assert status.last_deployment.startswith("v1 (created, ")
    assert_allowed_by_caller_policy(world.validator)


def test_a_first_promotion_that_fails_leaves_nothing(world):
    world.fake.status[NAME] = "Failed"
    with pytest.raises(EndpointFailed):
        backend().serving.promote(spec(world.aws, 1))
    assert world.aws.sagemaker_resources() == {"endpoints": [], "endpoint_configs": [],
                                               "models": []}
    assert world.alarms() == {}


# -- blue/green promotions ------------------------------------------------------------------

# Each strategy: the spec's shift, the DeploymentConfig it must send, the stages SageMaker
# reports (the same stage on consecutive answers is one), and the steps they make.
STRATEGIES = {
    "all_at_once": (
        TrafficShift("all_at_once", 10, 0, 600, 1200),
        {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0},
        ["Creating", "Creating", "ActivatingTraffic", "Baking", "Baking"],
        [("new fleet Creating", 0.0), ("all traffic on the new fleet", 1.0), ("baking", 1.0)],
        "baking", "all at once"),
    "canary": (
        TrafficShift("canary", 10, 120, 300, 1800),
        {"Type": "CANARY", "WaitIntervalInSeconds": 120,
         "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}},
        ["Creating", "ActivatingTraffic", "Baking", "Baking", "ActivatingTraffic", "Baking"],
        [("new fleet Creating", 0.0), ("canary 10%", 0.1), ("watching canary 10%", 0.1),
         ("all traffic on the new fleet", 1.0), ("baking", 1.0)],
        "canary 10%", "canary 10%"),
    "linear": (
        # Three steps of 40%; one ActivatingTraffic falls between two polls (a Baking
        # follows a Baking): the step is still counted.
        TrafficShift("linear", 40, 60, 300, 900),
        {"Type": "LINEAR", "WaitIntervalInSeconds": 60,
         "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 40}},
        ["Creating", "ActivatingTraffic", "Baking", "Baking*", "ActivatingTraffic", "Baking"],
        [("new fleet Creating", 0.0), ("linear 40%", 0.4), ("watching linear 40%", 0.4),
         ("watching linear 80%", 0.8), ("all traffic on the new fleet", 1.0), ("baking", 1.0)],
        "linear 40%", "linear 40% steps"),
}


def expected_deployment(routing: dict[str, Any], shift: TrafficShift) -> dict[str, Any]:
    return {"BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": shift.baking_seconds,
        "MaximumExecutionTimeoutInSeconds": shift.max_seconds},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in ALARMS]}}


def promoted_v1(world: World) -> str:
    assert backend().serving.promote(spec(world.aws, 1)).outcome == "created"
    return serving_config(world)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_promotion_shifts_traffic_by_its_strategy_and_deletes_the_old_fleet(world, strategy):
    shift, routing, names, steps, _, how = STRATEGIES[strategy]
    old = promoted_v1(world)
    world.fake.script = [*stages(names), end("InService")]
    lines: list[str] = []
    second = spec(world.aws, 2, shift=shift,
                  alarms=RollbackAlarms(max_error_rate=0.02, max_p99_latency_ms=750))
    result = backend().serving.promote(second, lines.append)
    assert (result.outcome, result.status, result.serving_version) == ("promoted", "InService", 2)
    [update] = world.fake.updates
    assert update["DeploymentConfig"] == expected_deployment(routing, shift)
    new = update["EndpointConfigName"]
    assert new.startswith(f"{NAME}-v2-") and new != old
    # The wait went through every answer of Updating, and only then ended.
    assert world.fake.describes_while_updating == len(world.fake.script)
    assert [(s.action, round(s.new_share, 2)) for s in result.steps] == \
        [*steps, ("promoted", 1.0)]
    assert any("promoted" in line for line in lines)
    # The replaced fleet is gone; the new one serves.
    assert fleets(world) == {"configs": [new], "models": [new]}
    status = backend().serving.describe(NAME)
    assert (status.version, status.model_uri, status.extra["endpoint_config"]) == (
        2, second.model_uri, new)
    assert status.last_deployment.startswith(f"v2 ({how}, ")
    check_alarms(world, max_error_rate=0.02, p99_microseconds=750_000.0)


def check_alarms(world: World, max_error_rate: float, p99_microseconds: float) -> None:
    """The alarms as sent (the last PutMetricAlarm of each) and as CloudWatch holds them."""
    sent = {p["AlarmName"]: p for p in world.calls.params("PutMetricAlarm")}
    dimensions = [{"Name": "EndpointName", "Value": NAME}, {"Name": "VariantName",
                                                             "Value": "AllTraffic"}]

    def summed(metric_id, metric):
        return {"Id": metric_id, "ReturnData": False, "MetricStat": {
            "Metric": {"Namespace": "AWS/SageMaker", "MetricName": metric,
                       "Dimensions": dimensions}, "Period": 60, "Stat": "Sum"}}

    five_xx, latency = sent[ALARMS[0]], sent[ALARMS[1]]
    assert five_xx["Metrics"] == [
        summed("errors", "Invocation5XXErrors"), summed("invocations", "Invocations"),
        {"Id": "rate", "Label": "5xx rate", "ReturnData": True,
         "Expression": "IF(invocations > 0, FILL(errors, 0) / invocations, 0)"}]
    assert (five_xx["Threshold"], five_xx["ComparisonOperator"], five_xx["EvaluationPeriods"],
            five_xx["TreatMissingData"]) == (max_error_rate, "GreaterThanThreshold", 1,
                                             "notBreaching")
    assert {k: latency[k] for k in ("Namespace", "MetricName", "Dimensions", "ExtendedStatistic",
                                    "Period", "Threshold", "ComparisonOperator")} == {
        "Namespace": "AWS/SageMaker", "MetricName": "ModelLatency", "Dimensions": dimensions,
        "ExtendedStatistic": "p99", "Period": 60, "Threshold": p99_microseconds,
        "ComparisonOperator": "GreaterThanThreshold"}
    held = world.alarms()
    assert sorted(held) == ALARMS
    assert held[ALARMS[0]]["Threshold"] == max_error_rate
    assert held[ALARMS[1]]["Threshold"] == p99_microseconds
    assert {(d["Name"], d["Value"]) for d in held[ALARMS[1]]["Dimensions"]} == {
        ("EndpointName", NAME), ("VariantName", "AllTraffic")}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_an_alarm_rolls_the_promotion_back_and_the_new_fleet_goes(world, strategy):
    shift, routing, names, _, stage, _ = STRATEGIES[strategy]
    old = promoted_v1(world)
    # The update gets as far as its first traffic shift and the watch after it.
    upto = names.index("ActivatingTraffic") + 2
    world.fake.script = [*stages(names[:upto]), end("RollingBack"), end("RollingBack"),
                         end("InService")]
    world.fake.ends_on = "old"
    result = backend().serving.promote(spec(world.aws, 2, shift=shift))
    assert (result.outcome, result.status, result.serving_version) == (
        "rolled_back", "InService", 1)
    assert world.fake.updates[0]["DeploymentConfig"] == expected_deployment(routing, shift)
    assert result.reason.startswith(f"alarm {NAME}-5xx (5xx rate > 0.05 of invocations")
    assert f"during {stage}: {FIRED}" in result.reason
    assert [s.action for s in result.steps][-2:] == ["rolling back", "rolled back"]
    # The new fleet is deleted; the old one serves, untouched.
    assert fleets(world) == {"configs": [old], "models": [old]}
    assert backend().serving.describe(NAME).version == 1


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_failed_rollback_is_a_failure_for_a_person_and_keeps_both_fleets(world, strategy):
    shift, _, names, _, _, _ = STRATEGIES[strategy]
    old = promoted_v1(world)
    world.fake.script = [*stages(names[:3]), end("RollingBack"), end("UpdateRollbackFailed")]
    world.fake.ends_on = "old"
    result = backend().serving.promote(spec(world.aws, 2, shift=shift))
    assert (result.outcome, result.status, result.serving_version) == (
        "failed", "UpdateRollbackFailed", None)
    assert "UpdateRollbackFailed" in result.reason and "needs a person" in result.reason
    assert "The old fleet failed its health check." in result.reason
    new = world.fake.updates[0]["EndpointConfigName"]
    assert fleets(world) == {"configs": sorted([old, new]), "models": sorted([old, new])}
    # The next promotion changes nothing and says why.
    again = backend().serving.promote(spec(world.aws, 3, shift=shift))
    assert (again.outcome, again.status) == ("failed", "UpdateRollbackFailed")
    assert "needs a person" in again.reason and len(world.fake.updates) == 1


def test_an_endpoint_mid_update_is_not_updated_again(world):
    promoted_v1(world)
    world.fake.status[NAME] = "Updating"
    made = len(world.calls.calls)
    result = backend().serving.promote(spec(world.aws, 2))
    assert (result.outcome, result.status, result.serving_version) == ("failed", "Updating", 1)
    assert "another update is under way" in result.reason
    later = {c.operation for c in world.calls.calls[made:]}
    assert not later & {"CreateModel", "CreateEndpointConfig", "UpdateEndpoint",
                        "PutMetricAlarm", "DeregisterScalableTarget"}


def test_promoting_what_already_serves_changes_nothing(world):
    first = spec(world.aws, 1)
    backend().serving.promote(first)
    made = len(world.calls.calls)
    result = backend().serving.promote(first)
    assert (result.outcome, result.serving_version) == ("promoted", 1)
    assert "already serves" in result.reason
    assert not {c.operation for c in world.calls.calls[made:]} & {
        "CreateModel", "UpdateEndpoint", "PutMetricAlarm"}


def test_an_endpoint_that_is_not_the_serving_endpoint_is_refused(world):
    smoke = backend()
    smoke.endpoints.deploy(EndpointSpec(name=NAME, model_uri=put_model(world.aws, 1),
                                        instance_type="ml.m5.large", tags=managed_tags("run")))
    with pytest.raises(BackendError, match="not this pipeline's serving endpoint"):
        backend().serving.promote(spec(world.aws, 2))
    assert "UpdateEndpoint" not in world.calls.names()


# -- autoscaling --------------------------------------------------------------------------


def scaling_of(world: World) -> tuple[int, int, float]:
    [target] = world.targets()
    [policy] = world.policies()
    assert target["ResourceId"] == RESOURCE and policy["ResourceId"] == RESOURCE
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}
    assert policy["PolicyType"] == "TargetTrackingScaling"
    return target["MinCapacity"], target["MaxCapacity"], tracking["TargetValue"]


def test_autoscaling_is_deregistered_for_an_update_and_registered_on_what_serves(world):
    serving = backend().serving
    serving.promote(spec(world.aws, 1, autoscaling=Autoscaling(1, 3, 500)))
    assert world.targets()[0]["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    assert scaling_of(world) == (1, 3, 500.0)

    # Autoscaling has grown the fleet to 2; v2 asks for 1 instance, at least 2, at most 4.
    world.fake.instance_count = 2
    world.fake.script = [*stages(["Creating", "ActivatingTraffic"]), end("InService")]
    result = serving.promote(spec(world.aws, 2, autoscaling=Autoscaling(2, 4, 800)))
    assert result.outcome == "promoted"
    calls = world.calls
    assert calls.index("DeregisterScalableTarget") < calls.index("UpdateEndpoint") < \
        calls.index("RegisterScalableTarget", last=True)
    assert world.fake.scaled_at_update == [False]  # not registered while it updated
    # The new fleet starts as large as the one it replaces, within the new bounds.
    assert calls.params("CreateEndpointConfig")[-1]["ProductionVariants"][0][
        "InitialInstanceCount"] == 2
    assert scaling_of(world) == (2, 4, 800.0)

    # A rolled-back update gets the settings of the fleet that still serves back.
    world.fake.script = [*stages(["Creating"]), end("RollingBack"), end("InService")]
    world.fake.ends_on = "old"
    result = serving.promote(spec(world.aws, 3, autoscaling=Autoscaling(1, 6, 900)))
    assert result.outcome == "rolled_back"
    assert world.fake.scaled_at_update == [False, False]
    assert scaling_of(world) == (2, 4, 800.0)
    assert_allowed_by_caller_policy(world.validator)


def test_a_failed_update_request_restores_autoscaling_and_deletes_the_new_fleet(world):
    serving = backend().serving
    serving.promote(spec(world.aws, 1, autoscaling=Autoscaling(1, 3, 500)))
    old = serving_config(world)
    world.fake.refuse_update = "Cannot update in-progress endpoint"
    with pytest.raises(BackendError, match="Cannot update in-progress endpoint"):
        backend().serving.promote(spec(world.aws, 2))
    assert fleets(world) == {"configs": [old], "models": [old]}
    assert scaling_of(world) == (1, 3, 500.0)


# -- the API's limits -----------------------------------------------------------------------


@pytest.mark.parametrize("shift, message", [
    (TrafficShift("canary", 51, 60, 60, 900), "canary steps must be 1-50%"),
    (TrafficShift("linear", 9, 60, 60, 900), "linear steps must be 10-50%"),
    (TrafficShift("linear", 51, 60, 60, 900), "linear steps must be 10-50%"),
    (TrafficShift("canary", 10, 3601, 60, 7200), "wait_seconds must be 0-3600"),
    (TrafficShift("canary", 10, 60, -1, 900), "baking_seconds must be 0-3600"),
    (TrafficShift("canary", 10, 60, 60, 599), "max_seconds must be 600-28800"),
    (TrafficShift("canary", 10, 60, 60, 28801), "max_seconds must be 600-28800"),
    (TrafficShift("blue", 10, 60, 60, 900), "strategy 'blue' is not one of"),
    (TrafficShift("linear", 10, 300, 600, 3300), "waits 3300 s in all"),
])
def test_limits_are_refused_before_any_call(world, shift, message):
    with pytest.raises(ConfigurationError, match=message):
        backend().serving.promote(spec(world.aws, 1, shift=shift))
    assert world.calls.calls == []


def test_other_settings_are_checked_before_any_call(world):
    for overrides, message in (
            ({"alarms": RollbackAlarms(max_error_rate=5)}, "max_error_rate is a share"),
            ({"autoscaling": Autoscaling(3, 2, 100)}, "min_instances <= max_instances"),
            ({"name": "cifar10-" + "x" * 50}, "stay within 63 characters"),
            ({"model_uri": "file:///tmp/model.tar.gz"}, "serves models from S3")):
        with pytest.raises(ConfigurationError, match=message):
            backend().serving.promote(spec(world.aws, 1, **overrides))
    assert world.calls.calls == []


# -- describe and delete --------------------------------------------------------------------


def test_delete_removes_the_endpoint_its_fleets_alarms_and_scaling(world):
    serving = backend().serving
    serving.promote(spec(world.aws, 1, autoscaling=Autoscaling(1, 2, 100)))
    sm = world.aws.sm
    # A fleet a killed promotion left (tagged as this endpoint's), and a stranger's model.
    leftover = f"{NAME}-v9-20260101000000"
    sm.create_model(ModelName=leftover, ExecutionRoleArn=ROLE_ARN,
                    PrimaryContainer={"Image": INFERENCE_IMAGE},
                    Tags=[{"Key": "serving-endpoint", "Value": NAME}])
    sm.create_endpoint_config(EndpointConfigName=leftover, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": leftover, "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1}], Tags=[{"Key": "serving-endpoint", "Value": NAME}])
    sm.create_model(ModelName=f"{NAME}-v8-someone-else", ExecutionRoleArn=ROLE_ARN,
                    PrimaryContainer={"Image": INFERENCE_IMAGE})
    assert serving.delete(NAME) is True
    assert world.aws.sagemaker_resources() == {
        "endpoints": [], "endpoint_configs": [], "models": [f"{NAME}-v8-someone-else"]}
    assert world.alarms() == {} and world.targets() == []
    assert serving.delete(NAME) is False
    assert serving.describe(NAME) is None
    assert_allowed_by_caller_policy(world.validator)
