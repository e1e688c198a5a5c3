"""The serving endpoint on SageMaker: the registry's champion behind one long-lived endpoint,
replaced blue/green with SageMaker's deployment guardrails.

- The first promotion creates a model, an endpoint config (one variant, ``AllTraffic``) and
  the endpoint, the way ``hosting`` deploys one (same image, role, artifact, container
  environment, the same idempotent Create calls and the same bounded wait).
- Each later promotion creates a new model and endpoint config (a *fleet*), then
  ``UpdateEndpoint`` with a ``BlueGreenUpdatePolicy`` (all at once, canary or linear traffic
  shifting, a baking period, a time bound) and ``AutoRollbackConfiguration`` naming two
  CloudWatch alarms this module creates and keeps: the 5xx share of invocations and the p99
  model latency. SageMaker shifts the traffic and rolls back by itself when an alarm fires;
  this module watches ``DescribeEndpoint`` through ``Updating`` / ``RollingBack`` until the
  endpoint is ``InService`` again (or ``UpdateRollbackFailed``), tells from its
  ``EndpointConfigName`` which fleet serves, and deletes the other one.
- Target-tracking autoscaling (Application Auto Scaling), when asked for, is deregistered
  before an update (AWS's procedure for endpoints that scale: the update is refused when it
  changes a scaled variant's instance type, and scaling is blocked while it runs) and registered
  again afterwards on whichever fleet serves, with the settings that fleet had.

Models and configs are named ``{endpoint}-v{version}-{UTC time}`` and tagged with the model
group and version they hold: which version serves is read from the serving config's tags.
Every part carries ``kept=true`` and ``serving=true``: the reaper never takes any of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from backends.aws.config import AwsOptions
from backends.aws.errors import aws_errors, error_code, unless_missing
from backends.aws.hosting import AwsEndpoints
from backends.aws.s3 import object_exists
from backends.aws.session import AwsSession
from backends.base import (
    ALL_AT_ONCE,
    CANARY,
    CREATED,
    CREATED_KEY,
    FAILED,
    IN_SERVICE,
    KEPT_KEY,
    LINEAR,
    MANAGED_BY_KEY,
    MANAGED_BY_VALUE,
    OWNER_KEY,
    PROMOTED,
    ROLLED_BACK,
    ROLLING_BACK,
    SERVING_KEY,
    UPDATE_ROLLBACK_FAILED,
    VARIANT,
    Autoscaling,
    BackendError,
    ConfigurationError,
    LogCallback,
    PromotionResult,
    PromotionStep,
    ServingSpec,
    ServingStatus,
    TrafficShift,
)
from backends.polling import poll

# Tags on each fleet's model and endpoint config: what it holds and whose it is.
GROUP_KEY, VERSION_KEY, ENDPOINT_KEY = "model-group", "model-version", "serving-endpoint"
STAMP = "%Y%m%d%H%M%S"
NAME_LIMIT = 63  # SageMaker's limit on model, endpoint config and endpoint names
ROUTING_TYPES = {ALL_AT_ONCE: "ALL_AT_ONCE", CANARY: "CANARY", LINEAR: "LINEAR"}
# The API's limits (UpdateEndpoint's DeploymentConfig), checked before any call.
WAIT_RANGE, TIMEOUT_RANGE = (0, 3600), (600, 28800)
PERCENT_RANGE = {CANARY: (1, 50), LINEAR: (10, 50)}
# SageMaker publishes endpoint metrics every minute; each alarm judges one such minute.
ALARM_PERIOD = 60
NAMESPACE = "AWS/SageMaker"
SCALING = {"ServiceNamespace": "sagemaker",
           "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}
SCALING_METRIC = "SageMakerVariantInvocationsPerInstance"
# Endpoint states in which a promotion must not start an update.
BUSY = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}
BROKEN = {"Failed", "OutOfService", UPDATE_ROLLBACK_FAILED}


def check_spec(spec: ServingSpec) -> None:
    """The spec against SageMaker's limits, so that a wrong value is a clear error before
    anything is created (UpdateEndpoint would refuse it only after a new fleet exists)."""
    shift, problems = spec.shift, []
    if shift.strategy not in ROUTING_TYPES:
        problems.append(f"strategy {shift.strategy!r} is not one of {', '.join(ROUTING_TYPES)}")
    low, high = PERCENT_RANGE.get(shift.strategy, (0, 100))
    if not low <= shift.percent <= high:
        problems.append(f"{shift.strategy} steps must be {low}-{high}% of capacity (SageMaker's "
                        f"{'CanarySize' if shift.strategy == CANARY else 'LinearStepSize'} "
                        f"limit); got {shift.percent}%")
    for label, value in (("wait_seconds", shift.wait_seconds),
                         ("baking_seconds", shift.baking_seconds)):
        if not WAIT_RANGE[0] <= value <= WAIT_RANGE[1]:
            problems.append(f"{label} must be 0-3600 (WaitIntervalInSeconds, "
                            f"TerminationWaitInSeconds); got {value}")
    if not TIMEOUT_RANGE[0] <= shift.max_seconds <= TIMEOUT_RANGE[1]:
        problems.append(f"max_seconds must be 600-28800 (MaximumExecutionTimeoutInSeconds); "
                        f"got {shift.max_seconds}")
    elif not problems and planned_seconds(shift) >= shift.max_seconds:
        problems.append(f"the {shift.strategy} shift waits {planned_seconds(shift)} s in all "
                        f"(intervals and baking), not less than max_seconds "
                        f"({shift.max_seconds}): SageMaker would time it out and roll back")
    problems += _sizing_problems(spec)
    if problems:
        raise ConfigurationError(f"serving endpoint {spec.name}: " + "; ".join(problems))


def _sizing_problems(spec: ServingSpec) -> list[str]:
    problems = []
    if not spec.model_uri.startswith("s3://"):
        problems.append(f"the aws backend serves models from S3; got {spec.model_uri}")
    if not 0 <= spec.alarms.max_error_rate <= 1:
        problems.append(f"max_error_rate is a share of invocations, in [0, 1]; got "
                        f"{spec.alarms.max_error_rate}")
    if spec.alarms.max_p99_latency_ms <= 0:
        problems.append("max_p99_latency_ms must be positive")
    if spec.instance_count < 1:
        problems.append(f"instance_count must be at least 1; got {spec.instance_count}")
    scaling = spec.autoscaling
    if scaling and not (1 <= scaling.min_instances <= scaling.max_instances
                        and scaling.invocations_per_instance > 0):
        problems.append(f"autoscaling needs 1 <= min_instances <= max_instances and a "
                        f"positive invocations_per_instance; got {scaling}")
    example = fleet_name(spec.name, spec.version, dt.datetime.now(dt.UTC))
    if not re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", spec.name) or len(example) > NAME_LIMIT:
        problems.append(f"{spec.name!r} must be letters, digits and hyphens, short enough "
                        f"that its models' names (e.g. {example}) stay within {NAME_LIMIT} "
                        f"characters")
    return problems


def planned_seconds(shift: TrafficShift) -> int:
    """How long the shift waits by design: one interval per traffic step but the last, then
    the baking period."""
    steps = {ALL_AT_ONCE: 1, CANARY: 2}.get(shift.strategy) or math.ceil(100 / shift.percent)
    return (steps - 1) * shift.wait_seconds + shift.baking_seconds


def fleet_name(endpoint: str, version: int, at: dt.datetime) -> str:
    """The name of a fleet's model and endpoint config: new for every promotion, so a retry
    or a rolled-back version promoted again never collides with what an earlier one left."""
    return f"{endpoint}-v{version}-{at.astimezone(dt.UTC).strftime(STAMP)}"


def alarm_names(endpoint: str) -> list[str]:
    return [f"{endpoint}-5xx", f"{endpoint}-p99-latency"]


def alarm_requests(spec: ServingSpec) -> list[dict[str, Any]]:
    """PutMetricAlarm requests for the rollback alarms, on the endpoint's one variant (both
    fleets report under it during an update, so the alarms see the new fleet's share).

    - ``{endpoint}-5xx``: metric math ``Invocation5XXErrors / Invocations`` over one minute
      above ``max_error_rate`` (a share, as the spec says it, not a count: a count would trip
      on busy minutes and miss quiet ones);
    - ``{endpoint}-p99-latency``: the ``p99`` of ``ModelLatency`` (reported in microseconds)
      over one minute above ``max_p99_latency_ms`` × 1000.

    A minute without invocations is not breaching: no traffic is no evidence."""
    five_xx, latency = alarm_names(spec.name)
    dimensions = [{"Name": "EndpointName", "Value": spec.name},
                  {"Name": "VariantName", "Value": VARIANT}]

    def summed(metric_id: str, metric: str) -> dict[str, Any]:
        return {"Id": metric_id, "ReturnData": False, "MetricStat": {
            "Metric": {"Namespace": NAMESPACE, "MetricName": metric, "Dimensions": dimensions},
            "Period": ALARM_PERIOD, "Stat": "Sum"}}

    common = {"EvaluationPeriods": 1, "DatapointsToAlarm": 1,
              "ComparisonOperator": "GreaterThanThreshold", "TreatMissingData": "notBreaching"}
    rate, p99 = spec.alarms.max_error_rate, spec.alarms.max_p99_latency_ms
    return [
        {"AlarmName": five_xx, **common, "Threshold": float(rate),
         "AlarmDescription": f"5xx rate > {rate:g} of invocations on {spec.name} (rolls back "
                             f"a promotion)",
         "Metrics": [summed("errors", "Invocation5XXErrors"),
                     summed("invocations", "Invocations"),
                     {"Id": "rate", "Label": "5xx rate", "ReturnData": True,
                      "Expression": "IF(invocations > 0, FILL(errors, 0) / invocations, 0)"}]},
        {"AlarmName": latency, **common, "Threshold": float(p99) * 1000.0,
         "AlarmDescription": f"p99 model latency > {p99:g} ms on {spec.name} (rolls back a "
                             f"promotion)",
         "Namespace": NAMESPACE, "MetricName": "ModelLatency", "Dimensions": dimensions,
         "ExtendedStatistic": "p99", "Period": ALARM_PERIOD},
    ]


def deployment_config(shift: TrafficShift, alarms: list[str]) -> dict[str, Any]:
    """UpdateEndpoint's DeploymentConfig for ``shift``, rolled back by ``alarms``."""
    routing: dict[str, Any] = {"Type": ROUTING_TYPES[shift.strategy],
                               "WaitIntervalInSeconds": shift.wait_seconds}
    size = {"Type": "CAPACITY_PERCENT", "Value": shift.percent}
    if shift.strategy == CANARY:
        routing["CanarySize"] = size
    elif shift.strategy == LINEAR:
        routing["LinearStepSize"] = size
    return {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing,
                                      "TerminationWaitInSeconds": shift.baking_seconds,
                                      "MaximumExecutionTimeoutInSeconds": shift.max_seconds},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in alarms]}}


def describe_shift(shift: TrafficShift) -> str:
    return {CANARY: f"canary {shift.percent}%", LINEAR: f"linear {shift.percent}% steps"}.get(
        shift.strategy, "all at once")


def scaling_resource(endpoint: str) -> str:
    return f"endpoint/{endpoint}/variant/{VARIANT}"


@dataclass(frozen=True)
class Fleet:
    """One model and its endpoint config (named alike), and the registry version it holds."""

    name: str
    group: str | None = None
    version: int | None = None
    model_uri: str | None = None
    instance_type: str | None = None


@dataclass
class StageTracker:
    """Turns DescribeEndpoint answers during an update into ``PromotionStep``s. SageMaker
    reports stages (the new fleet Creating, ActivatingTraffic, Baking), not traffic shares:
    the share of a step is the one the strategy plans after that many traffic shifts."""

    shift: TrafficShift
    now: Callable[[], dt.datetime]
    steps: list[PromotionStep] = field(default_factory=list)
    shifts: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)
    last_stage: str = "the update"
    activating: bool = False

    def share(self) -> float:
        if self.shift.strategy == ALL_AT_ONCE or self.shifts == 0:
            return float(self.shifts > 0)
        if self.shift.strategy == CANARY:
            return self.shift.percent / 100 if self.shifts == 1 else 1.0
        return min(1.0, self.shifts * self.shift.percent / 100)

    def observe(self, described: dict[str, Any]) -> list[PromotionStep]:
        """The steps that this answer shows for the first time."""
        if described["EndpointStatus"] == ROLLING_BACK:
            return self._add(("RollingBack", ""), "rolling back", 0.0, "")
        pending = described.get("PendingDeploymentSummary") or {}
        found: list[PromotionStep] = []
        for variant in pending.get("ProductionVariants") or []:
            for state in variant.get("VariantStatus") or []:
                key = (state.get("Status", ""), str(state.get("StartTime", "")))
                if key in self.seen:
                    continue
                # A Baking stage not seen to start with ActivatingTraffic (a poll fell
                # between them) still follows a traffic shift.
                if key[0] == "ActivatingTraffic" or (key[0] == "Baking" and not self.activating):
                    self.shifts += 1
                self.activating = key[0] == "ActivatingTraffic"
                found += self._add(key, self._action(key[0]), self.share(),
                                   state.get("StatusMessage", ""))
        return found

    def _action(self, stage: str) -> str:
        share = self.share()
        if stage in ("ActivatingTraffic", "Baking") and share < 1.0:
            what = "canary" if self.shift.strategy == CANARY else "linear"
            self.last_stage = f"{what} {share:.0%}"
            return self.last_stage if stage == "ActivatingTraffic" else \
                f"watching {self.last_stage}"
        if stage in ("ActivatingTraffic", "Baking"):
            self.last_stage = "baking" if stage == "Baking" else "all traffic on the new fleet"
            return self.last_stage
        return f"new fleet {stage}"

    def _add(self, key: tuple[str, str], action: str, share: float,
             note: str) -> list[PromotionStep]:
        if key in self.seen:
            return []
        self.seen.add(key)
        step = PromotionStep(at=self.now(), action=action, new_share=share, note=note)
        self.steps.append(step)
        return [step]


class AwsServing:
    """``Serving`` on SageMaker (see the module's docstring)."""

    def __init__(self, aws: AwsSession, options: AwsOptions, endpoints: AwsEndpoints,
                 now: Callable[[], dt.datetime] | None = None) -> None:
        self.aws = aws
        self.options = options
        self.endpoints = endpoints  # hosting's Create, wait and delete helpers
        self.now = now or (lambda: dt.datetime.now(dt.UTC))

    @property
    def sm(self) -> Any:
        return self.aws.sagemaker

    @property
    def cloudwatch(self) -> Any:
        return self.aws.cloudwatch

    @property
    def app_autoscaling(self) -> Any:
        return self.aws.app_autoscaling

    # -- promote -----------------------------------------------------------------------------

    def promote(self, spec: ServingSpec, on_log: LogCallback | None = None) -> PromotionResult:
        """Creates the endpoint (first promotion) or updates it blue/green. A limit broken,
        a missing artifact or role is an error before any change; a rollback, a failed
        rollback or an endpoint that cannot be updated now is an outcome."""
        emit = on_log or (lambda line: None)
        check_spec(spec)
        role = self.options.require_role()
        described = self.endpoints._describe_endpoint(spec.name)
        if described is None:
            return self._create(spec, role, emit)
        refusal = self._refusal(spec, described)
        if refusal is not None:
            return refusal
        serving = self._fleet(described.get("EndpointConfigName"))
        if (serving.group, serving.version, serving.model_uri) == \
                (spec.group, spec.version, spec.model_uri):
            return PromotionResult(spec.name, PROMOTED, f"v{spec.version} already serves on "
                                   f"{spec.name}: nothing to do", IN_SERVICE, spec.version)
        return self._update(spec, role, described, serving, emit)

    def _refusal(self, spec: ServingSpec, described: dict[str, Any]) -> PromotionResult | None:
        """Why the existing endpoint cannot be updated now, as a failed outcome (nothing
        changed); an endpoint that is not the pipeline's serving endpoint is an error."""
        tags = self.endpoints._tags(described["EndpointArn"]) or {}
        if tags.get(MANAGED_BY_KEY) != MANAGED_BY_VALUE or tags.get(SERVING_KEY) != "true":
            raise BackendError(f"endpoint {spec.name} exists and is not this pipeline's serving "
                               f"endpoint (no {SERVING_KEY}=true tag): pick another name")
        status = described["EndpointStatus"]
        if status == IN_SERVICE:
            return None
        if status == UPDATE_ROLLBACK_FAILED:
            reason = needs_a_person(spec.name, described)
        elif status in BUSY:
            reason = (f"endpoint {spec.name} is {status}: another update is under way; "
                      f"promote again once it is InService")
        else:
            reason = (f"endpoint {spec.name} is {status} "
                      f"({described.get('FailureReason') or 'no reason given'}): delete it "
                      f"(`cifar10-pipeline serving delete --backend aws --name "
                      f"{spec.name}`) and promote again")
        serving = self._fleet(described.get("EndpointConfigName"))
        return PromotionResult(spec.name, FAILED, reason, status,
                               serving.version if status in BUSY else None)

    def _create(self, spec: ServingSpec, role: str, emit: LogCallback) -> PromotionResult:
        """The first promotion: alarms (first, so that a missing CloudWatch permission fails
        before anything bills), the fleet, the endpoint, the wait, then autoscaling. A failure
        deletes what this call created before the error is raised."""
        self._require_artifact(spec.model_uri)
        self._put_alarms(spec)
        fleet: Fleet | None = None
        try:
            fleet = self._create_fleet(spec, role, spec.instance_count)
            self.endpoints._create("endpoint", spec.name, spec.tags.get(OWNER_KEY, ""),
                                   self.sm.create_endpoint, EndpointName=spec.name,
                                   EndpointConfigName=fleet.name, Tags=self._tags(spec))
            emit(f"serving endpoint {spec.name}: creating v{spec.version} "
                 f"({spec.instance_count} x {spec.instance_type})")
            self.endpoints._wait_in_service(spec.name, emit)
        except BaseException:
            made = fleet
            for undo in (lambda: self._drop_endpoint(spec.name),
                         lambda: made is not None and self._remove_fleet(made),
                         lambda: self._drop_alarms(spec.name)):
                with contextlib.suppress(Exception):  # keep the original error
                    undo()
            raise
        notes = self._restore_scaling(spec.name, spec.autoscaling)
        step = PromotionStep(at=self.now(), action="created", new_share=1.0)
        return PromotionResult(spec.name, CREATED, f"v{spec.version} serves on {spec.name}"
                               + notes, IN_SERVICE, spec.version, [step])

    def _update(self, spec: ServingSpec, role: str, described: dict[str, Any], old: Fleet,
                emit: LogCallback) -> PromotionResult:
        """A blue/green update to a new fleet, watched to its end; the losing fleet is
        deleted and autoscaling is registered again on the winner."""
        self._require_artifact(spec.model_uri)
        alarms = self._put_alarms(spec)
        scaled = self._pause_scaling(spec.name)
        new: Fleet | None = None
        try:
            new = self._create_fleet(spec, role, self._new_fleet_size(spec, described, scaled))
            with aws_errors(f"updating endpoint {spec.name} to {new.name}"):
                self.sm.update_endpoint(EndpointName=spec.name, EndpointConfigName=new.name,
                                        DeploymentConfig=deployment_config(spec.shift, alarms))
        except BaseException:
            # Nothing changed on the endpoint: it serves the old fleet, scaled as before.
            with contextlib.suppress(Exception):  # keep the original error
                if new is not None:
                    self._remove_fleet(new)
            self._restore_scaling(spec.name, scaled)
            raise
        emit(f"serving endpoint {spec.name}: v{old.version} -> v{spec.version}, "
             f"{describe_shift(spec.shift)}, rollback alarms {', '.join(alarms)}")
        result = self._watch(spec, new, old, alarms, emit)
        if result.outcome == PROMOTED:
            notes = self._cleanup(old) + self._restore_scaling(spec.name, spec.autoscaling)
        elif result.outcome == ROLLED_BACK:
            notes = self._cleanup(new) + self._restore_scaling(spec.name, scaled)
        else:
            notes = ""  # both fleets stay: the endpoint may hold either, or both
        emit(f"serving endpoint {spec.name}: {result.outcome}: {result.reason}{notes}")
        return PromotionResult(result.endpoint, result.outcome, result.reason + notes,
                               result.status, result.serving_version, result.steps)

    def _new_fleet_size(self, spec: ServingSpec, described: dict[str, Any],
                        scaled: Autoscaling | None) -> int:
        """The new fleet's instances: the spec's, but with autoscaling no fewer than serve
        now (scaling is off during the update, so the new fleet must carry today's traffic),
        within the autoscaling bounds."""
        scaling = spec.autoscaling or scaled
        if scaling is None:
            return spec.instance_count
        now = max((v.get("CurrentInstanceCount") or 0
                   for v in described.get("ProductionVariants") or []), default=0)
        return min(max(spec.instance_count, now, scaling.min_instances), scaling.max_instances)

    # -- the wait ------------------------------------------------------------------------------

    def _watch(self, spec: ServingSpec, new: Fleet, old: Fleet, alarms: list[str],
               emit: LogCallback) -> PromotionResult:
        """Polls DescribeEndpoint until the update ends: InService on the new fleet
        (promoted) or the old one (rolled back), UpdateRollbackFailed or Failed (failed), or
        past SageMaker's own time bound plus the deploy timeout (failed, still running)."""
        tracker = StageTracker(spec.shift, self.now)
        why: list[str] = []  # the rollback's reason, read while the alarm still fires
        last: dict[str, Any] = {"EndpointStatus": "Updating"}

        def check() -> dict[str, Any] | None:
            described = self.endpoints._describe_endpoint(spec.name)
            if described is None:
                raise BackendError(f"serving endpoint {spec.name} was deleted during the update")
            last.update(described)
            for step in tracker.observe(described):
                emit(f"serving endpoint {spec.name}: {step.action}"
                     + (f" ({step.note})" if step.note else ""))
            status = described["EndpointStatus"]
            if status == ROLLING_BACK and not why:
                why.append(self._rollback_reason(alarms, tracker.last_stage, described))
            return described if status in {IN_SERVICE, "Failed", UPDATE_ROLLBACK_FAILED} \
                else None

        try:
            final = poll(check, interval=self.options.poll_seconds,
                         timeout=spec.shift.max_seconds + self.options.deploy_timeout_seconds,
                         on_timeout=lambda waited: StillUpdating(waited))
        except StillUpdating as e:
            return PromotionResult(
                spec.name, FAILED, f"still {last['EndpointStatus']} after {e.waited:.0f}s; "
                f"SageMaker goes on with it: see `cifar10-pipeline serving status "
                f"--backend aws --name {spec.name}` (fleets {old.name}, {new.name} are kept)",
                last["EndpointStatus"], None, tracker.steps)
        return self._ending(spec, final, new, old, alarms, tracker, why)

    def _ending(self, spec: ServingSpec, final: dict[str, Any], new: Fleet, old: Fleet,
                alarms: list[str], tracker: StageTracker, why: list[str]) -> PromotionResult:
        status, serving = final["EndpointStatus"], final.get("EndpointConfigName")
        steps = tracker.steps
        if status == IN_SERVICE and serving == new.name:
            steps.append(PromotionStep(at=self.now(), action="promoted", new_share=1.0))
            return PromotionResult(spec.name, PROMOTED, f"v{spec.version} serves on "
                                   f"{spec.name} ({describe_shift(spec.shift)})", status,
                                   spec.version, steps)
        if status == IN_SERVICE and serving == old.name:
            reason = why[0] if why else self._rollback_reason(alarms, tracker.last_stage, final)
            steps.append(PromotionStep(at=self.now(), action="rolled back", new_share=0.0,
                                       note=reason))
            return PromotionResult(spec.name, ROLLED_BACK, reason, status, old.version, steps)
        if status == UPDATE_ROLLBACK_FAILED:
            return PromotionResult(spec.name, FAILED, needs_a_person(spec.name, final),
                                   status, None, steps)
        return PromotionResult(
            spec.name, FAILED, f"endpoint {spec.name} ended {status} on config {serving} "
            f"({final.get('FailureReason') or 'no reason given'}); fleets {old.name} and "
            f"{new.name} are kept", status, old.version if serving == old.name else None, steps)

    def _rollback_reason(self, alarms: list[str], stage: str, described: dict[str, Any]) -> str:
        """The alarms in ALARM, with what they watch and CloudWatch's reason; else SageMaker's
        FailureReason (a new fleet that failed its health check, the time bound)."""
        with aws_errors(f"reading the rollback alarms {', '.join(alarms)}"):
            found = self.cloudwatch.describe_alarms(AlarmNames=alarms).get("MetricAlarms", [])
        # The state is checked here: a filter on StateValue alongside AlarmNames is not
        # honoured by every implementation of the API.
        firing = [a for a in found if a.get("StateValue") == "ALARM"]
        if firing:
            return "; ".join(f"alarm {a['AlarmName']} ({a.get('AlarmDescription', '')}) during "
                             f"{stage}: {a.get('StateReason', '')}" for a in firing)
        failure = described.get("FailureReason")
        return (f"SageMaker rolled the update back during {stage}: "
                + (failure or f"no alarm of {', '.join(alarms)} is in ALARM now (see their "
                              f"history in CloudWatch)"))

    # -- fleets, alarms, scaling ---------------------------------------------------------------

    def _tags(self, spec: ServingSpec, **extra: str) -> list[dict[str, str]]:
        """The spec's tags, marked kept and serving whatever the caller passed: no reaper
        may take any part of the serving endpoint."""
        tags = {**spec.tags, KEPT_KEY: "true", SERVING_KEY: "true",
                CREATED_KEY: self.now().astimezone(dt.UTC).isoformat(timespec="seconds"),
                **extra}
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def _require_artifact(self, model_uri: str) -> None:
        if not object_exists(self.aws.s3, model_uri):
            raise BackendError(f"model artifact {model_uri} does not exist")

    def _create_fleet(self, spec: ServingSpec, role: str, count: int) -> Fleet:
        """A model and an endpoint config for ``spec``, as hosting creates them."""
        fleet = Fleet(fleet_name(spec.name, spec.version, self.now()), spec.group,
                      spec.version, spec.model_uri, spec.instance_type)
        tags = self._tags(spec, **{GROUP_KEY: spec.group, VERSION_KEY: str(spec.version),
                                   ENDPOINT_KEY: spec.name})
        owner = spec.tags.get(OWNER_KEY, "")
        try:
            self.endpoints.create_model_and_config(fleet.name, spec.model_uri,
                                                   spec.instance_type, count, role, tags, owner)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error
                self._remove_fleet(fleet)
            raise
        return fleet

    def _fleet(self, config_name: str | None) -> Fleet:
        """The fleet behind an endpoint config: its tags say the version, its model the
        artifact. Unknown parts are None (a config deleted by hand, a foreign one)."""
        if not config_name:
            return Fleet("")
        config = self.endpoints._describe_config(config_name)
        if config is None:
            return Fleet(config_name)
        tags = self.endpoints._tags(config["EndpointConfigArn"]) or {}
        variants = config.get("ProductionVariants") or [{}]
        model_name = variants[0].get("ModelName")
        model = unless_missing(f"describing model {model_name}", self.sm.describe_model,
                               ModelName=model_name) if model_name else None
        version = tags.get(VERSION_KEY, "")
        return Fleet(config_name, tags.get(GROUP_KEY), int(version) if version.isdigit()
                     else None, ((model or {}).get("PrimaryContainer") or {}).get(
                         "ModelDataUrl"), variants[0].get("InstanceType"))

    def _remove_fleet(self, fleet: Fleet) -> bool:
        """Deletes the fleet's endpoint config and model (idempotent); True if any was there."""
        config = self.endpoints._delete("endpoint config", fleet.name,
                                        self.sm.delete_endpoint_config,
                                        EndpointConfigName=fleet.name)
        model = self.endpoints._delete("model", fleet.name, self.sm.delete_model,
                                       ModelName=fleet.name)
        return config or model

    def _cleanup(self, fleet: Fleet) -> str:
        """Deletes the fleet that lost; a failure is a note on the outcome, not an error
        (the endpoint serves; an endpoint config and a model cost nothing)."""
        try:
            self._remove_fleet(fleet)
        except Exception as e:
            return f" (could not delete {fleet.name}: {e})"
        return ""

    def _put_alarms(self, spec: ServingSpec) -> list[str]:
        """Creates or updates the rollback alarms with the spec's thresholds."""
        for request in alarm_requests(spec):
            with aws_errors(f"putting the CloudWatch alarm {request['AlarmName']}"):
                self.cloudwatch.put_metric_alarm(**request)
        return alarm_names(spec.name)

    def _pause_scaling(self, endpoint: str) -> Autoscaling | None:
        """Deregisters the variant from autoscaling before an update (AWS's procedure; it
        also deletes the scaling policy) and returns its settings, None when it had none."""
        resource = scaling_resource(endpoint)
        with aws_errors(f"reading the autoscaling of {resource}"):
            targets = self.app_autoscaling.describe_scalable_targets(
                ResourceIds=[resource], **SCALING).get("ScalableTargets", [])
            policies = self.app_autoscaling.describe_scaling_policies(
                ResourceId=resource, **SCALING).get("ScalingPolicies", [])
        if not targets:
            return None
        tracking = [p["TargetTrackingScalingPolicyConfiguration"]["TargetValue"]
                    for p in policies if p.get("TargetTrackingScalingPolicyConfiguration")]
        settings = Autoscaling(min_instances=targets[0]["MinCapacity"],
                               max_instances=targets[0]["MaxCapacity"],
                               invocations_per_instance=int(tracking[0]) if tracking else
                               Autoscaling.invocations_per_instance)
        self._deregister(endpoint)
        return settings

    def _deregister(self, endpoint: str) -> bool:
        resource = scaling_resource(endpoint)
        with aws_errors(f"deregistering {resource} from autoscaling"):
            try:
                self.app_autoscaling.deregister_scalable_target(ResourceId=resource, **SCALING)
            except ClientError as e:
                if error_code(e) == "ObjectNotFoundException" or \
                        "no scalable target" in str(e).lower():
                    return False
                raise
        return True

    def _restore_scaling(self, endpoint: str, scaling: Autoscaling | None) -> str:
        """Registers the variant for target tracking on invocations per instance (per
        minute); a failure is a note on the outcome: the endpoint serves, unscaled."""
        if scaling is None:
            return ""
        resource = scaling_resource(endpoint)
        try:
            with aws_errors(f"registering {resource} for autoscaling"):
                self.app_autoscaling.register_scalable_target(
                    ResourceId=resource, MinCapacity=scaling.min_instances,
                    MaxCapacity=scaling.max_instances, **SCALING)
                self.app_autoscaling.put_scaling_policy(
                    PolicyName=f"{endpoint}-invocations", ResourceId=resource,
                    PolicyType="TargetTrackingScaling", **SCALING,
                    TargetTrackingScalingPolicyConfiguration={
                        "TargetValue": float(scaling.invocations_per_instance),
                        "PredefinedMetricSpecification": {
                            "PredefinedMetricType": SCALING_METRIC}})
        except BackendError as e:
            return f" (autoscaling not registered: {e})"
        return ""

    # -- describe and delete -------------------------------------------------------------------

    def describe(self, name: str) -> ServingStatus | None:
        described = self.endpoints._describe_endpoint(name)
        if described is None:
            return None
        fleet = self._fleet(described.get("EndpointConfigName"))
        pending = (described.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
        variants = described.get("ProductionVariants") or [{}]
        return ServingStatus(
            name=name, status=described["EndpointStatus"], group=fleet.group,
            version=fleet.version, model_uri=fleet.model_uri, url=None,
            last_deployment=last_deployment(described, fleet),
            extra={"arn": described["EndpointArn"], "endpoint_config": fleet.name,
                   "instance_type": fleet.instance_type,
                   "instance_count": variants[0].get("CurrentInstanceCount"),
                   "pending_config": pending, "alarms": alarm_names(name),
                   "failure_reason": described.get("FailureReason")})

    def delete(self, name: str) -> bool:
        """Autoscaling, the alarms, the endpoint with its serving config and model (waiting,
        bounded, while it is busy), then any other fleet of this endpoint (one an update was
        moving to, one a killed promotion left). Every part is tried; the first failure is
        raised after."""
        deleted, failures = False, []
        for step in (lambda: self._deregister(name), lambda: self._drop_alarms(name),
                     lambda: self._drop_endpoint(name), lambda: self._drop_fleets(name)):
            try:
                deleted |= bool(step())
            except Exception as e:  # the other parts still go
                failures.append(e)
        if failures:
            for other in failures[1:]:
                failures[0].add_note(f"also: {other}")
            raise failures[0]
        return deleted

    def _drop_alarms(self, name: str) -> bool:
        alarms = alarm_names(name)
        with aws_errors(f"deleting the CloudWatch alarms {', '.join(alarms)}"):
            found = [a["AlarmName"] for a in self.cloudwatch.describe_alarms(
                AlarmNames=alarms).get("MetricAlarms", []) if a["AlarmName"] in alarms]
            if found:  # DeleteAlarms refuses names that do not exist
                self.cloudwatch.delete_alarms(AlarmNames=found)
        return bool(found)

    def _drop_endpoint(self, name: str) -> bool:
        """DeleteEndpoint, waiting (bounded) while it is busy, as hosting deletes one; its
        configs and models are this endpoint's fleets, which ``_drop_fleets`` finds."""
        described = self.endpoints._describe_endpoint(name)
        return described is not None and self.endpoints._delete_endpoint(name, described)

    def _drop_fleets(self, name: str) -> bool:
        """The endpoint configs and models named ``{name}-v...`` and tagged as this
        endpoint's: the serving fleet, one an update was moving to, one a killed promotion
        left behind."""
        names = (self._fleets_in("list_endpoint_configs", "EndpointConfigs",
                                 "EndpointConfigName", "EndpointConfigArn", name)
                 | self._fleets_in("list_models", "Models", "ModelName", "ModelArn", name))
        return any([self._remove_fleet(Fleet(n)) for n in sorted(names)])

    def _fleets_in(self, operation: str, key: str, name_key: str, arn_key: str,
                   endpoint: str) -> set[str]:
        prefix = f"{endpoint}-v"
        with aws_errors(f"listing the fleets of {endpoint}"):
            pages = self.sm.get_paginator(operation).paginate(NameContains=prefix)
            items = [i for page in pages for i in page.get(key, [])
                     if i[name_key].startswith(prefix)]
        return {i[name_key] for i in items
                if (self.endpoints._tags(i[arn_key]) or {}).get(ENDPOINT_KEY) == endpoint}


class StillUpdating(Exception):
    def __init__(self, waited: float) -> None:
        super().__init__(f"still updating after {waited:.0f}s")
        self.waited = waited


def needs_a_person(name: str, described: dict[str, Any]) -> str:
    failure = described.get("FailureReason") or "no reason given"
    return (f"endpoint {name} is UpdateRollbackFailed: SageMaker could not roll the update "
            f"back, and the endpoint may serve either model or both. It needs a person: look "
            f"at it in the SageMaker console ({failure}), then update it to the config that "
            f"should serve (`aws sagemaker update-endpoint --endpoint-name {name} "
            f"--endpoint-config-name CONFIG`) or delete it (`cifar10-pipeline serving delete "
            f"--backend aws --name {name}`). Nothing was deleted.")


def last_deployment(described: dict[str, Any], fleet: Fleet) -> str | None:
    """"v4 (canary 10%, 2026-12-02T06:00:00+00:00)" from the endpoint's LastDeploymentConfig
    (absent until the first update) and its last change."""
    if fleet.version is None:
        return None
    policy = ((described.get("LastDeploymentConfig") or {}).get("BlueGreenUpdatePolicy") or {})
    routing = policy.get("TrafficRoutingConfiguration") or {}
    size = (routing.get("CanarySize") or routing.get("LinearStepSize") or {}).get("Value")
    how = {"CANARY": f"canary {size}%", "LINEAR": f"linear {size}% steps",
           "ALL_AT_ONCE": "all at once"}.get(routing.get("Type", ""), "created")
    when = described.get("LastModifiedTime")
    stamp = when.astimezone(dt.UTC).isoformat(timespec="seconds") if when else "unknown time"
    return f"v{fleet.version} ({how}, {stamp})"
