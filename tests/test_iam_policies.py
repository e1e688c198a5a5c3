"""The shipped IAM policies against the code. Every AWS operation that the product's code names
(found in its AST, so retry and error paths count as much as the happy path) and every call the
SageMaker SDK makes for it is allowed by docs/iam/caller-policy.json, as the fill command of
docs/aws.md writes it, in the aws, aws-cn and aws-us-gov partitions, on the resources the
pipeline touches; the policy grants nothing that nothing uses. The moto-backed runs in
test_aws_flow.py check the calls they really make against the same policy."""

from __future__ import annotations

import copy
import json
import re

import pytest

from backends.aws.config import AwsOptions
from backends.aws.errors import S3_ACTIONS
from tests.support.iam_policies import (
    CALLER_POLICY,
    CONTAINER_PACKAGES,
    EXECUTION_ROLE_POLICY,
    IAM_DIR,
    PARTITIONS,
    ROOT,
    SDK_CALLS_OPTIONAL,
    NamedCall,
    Request,
    Scan,
    caller_scan,
    check,
    filled,
    filled_text,
    iam_action,
    matching_statements,
    scan,
    sdk_calls,
)

PLACEHOLDERS = ("PARTITION", "ACCOUNT_ID", "REGION", "BUCKET", "PREFIX", "ROLE_NAME",
                "DLC_REGISTRY")
POLICIES = sorted(IAM_DIR.glob("*.json"))
# IAM's size limits (characters, whitespace not counted): a customer managed policy (the caller
# policy is one), a role's trust policy, a role's inline policies together.
SIZE_LIMITS = {"caller-policy.json": 6144, "execution-role-trust.json": 2048,
               "execution-role-policy.json": 10240}
# Calls no moto-backed run makes, but the code can: retries, error paths, the reaper, the CLI.
OFF_THE_HAPPY_PATH = {
    ("sagemaker", "DescribeModel"),  # a retried CreateModel that found its own model
    ("sagemaker", "StopTrainingJob"),  # an interrupted wait, `stop_training`
    ("sagemaker", "ListModelPackages"),  # the gate's champion, `models list`
    ("sagemaker", "ListTags"), ("sagemaker", "ListEndpoints"),  # the reaper
    ("sagemaker", "ListEndpointConfigs"), ("sagemaker", "ListModels"),  # the reaper's orphans
    ("s3", "AbortMultipartUpload"),  # a failed multipart upload
    ("s3", "DeleteObjects"),  # stale objects in the data prefix
    ("s3", "GetObject"),  # metrics.json from output.tar.gz
    ("logs", "DescribeLogStreams"), ("logs", "GetLogEvents"),  # a real job's log
}
PARTITION_NAMES = sorted(PARTITIONS)


@pytest.fixture(scope="module")
def named() -> Scan:
    return caller_scan()


def operations_of(calls: list[NamedCall]) -> set[tuple[str, str]]:
    return {(c.service, c.operation) for c in calls}


def report(calls: list[NamedCall], partition: str = "aws") -> str:
    """The table of what the code names and which statement allows it (printed with -s)."""
    v = PARTITIONS[partition]
    verdicts, _ = check(calls, filled(CALLER_POLICY, v), v)
    rows = sorted({(f"{c.service}.{c.operation}", r.action, c.where,
                    ", ".join(s) or "NOTHING") for c, r, s in
                   ((x.call, x.request, x.statements) for x in verdicts)})
    return "\n".join(" | ".join(row) for row in rows)


# -- the scan ---------------------------------------------------------------------------------


def test_the_scan_resolves_every_boto3_receiver_in_the_code(named):
    """Every attribute named like an operation is on a known client or on the project's own
    objects: a call on a client the scanner cannot identify fails here, not silently."""
    assert named.unresolved == []
    assert named.calls
    print("\n" + report(named.calls + sdk_calls()))


def test_the_scan_finds_the_calls_of_a_run_and_those_no_run_makes(named):
    from tests.test_aws_flow import EXPECTED_CALLS

    found = operations_of(named.calls)
    run = {tuple(c.split(":", 1)) for c in EXPECTED_CALLS}
    assert run <= found, run - found
    assert found >= OFF_THE_HAPPY_PATH, OFF_THE_HAPPY_PATH - found


def test_the_scan_reads_references_paginators_waiters_and_transfers():
    """The forms the code uses to name an operation, on a small module of its own."""
    session = (ROOT / "backends/aws/session.py").read_text()
    code = '''
class Thing:
    @property
    def sm(self):
        return self.aws.sagemaker

    def walk(self, operation):
        return self.sm.get_paginator(operation).paginate()

    def run(self, s3, logs):
        unless_missing("x", self.sm.describe_model, ModelName="m")
        self.walk("list_training_jobs")
        self.aws.sagemaker.get_waiter("endpoint_deleted").wait(EndpointName="e")
        s3.upload_file("f", "b", "k")
        logs.get_log_events(logGroupName="g", logStreamName="s")
        self.sm.create_model(ModelName="m", ExecutionRoleArn="r", Tags=[])
        runtime = self.aws.client("sagemaker-runtime")
        runtime.invoke_endpoint(EndpointName="e", Body=b"")
'''
    found = scan(sources={"backends/aws/session.py": session, "thing.py": code})
    assert found.unresolved == []
    by_operation = {(c.service, c.operation): c for c in found.calls if c.where.startswith("thing")}
    assert set(by_operation) >= {
        ("sagemaker", "DescribeModel"), ("sagemaker", "ListTrainingJobs"),
        ("sagemaker", "DescribeEndpoint"), ("s3", "PutObject"), ("s3", "AbortMultipartUpload"),
        ("logs", "GetLogEvents"), ("sagemaker", "CreateModel"),
        ("sagemaker-runtime", "InvokeEndpoint")}
    assert by_operation[("sagemaker", "DescribeModel")].how == "reference"
    create = by_operation[("sagemaker", "CreateModel")]
    assert create.tagged and create.passes_role


def test_a_call_on_a_client_the_scan_cannot_identify_fails_it():
    code = "def stop(client, name):\n    client.stop_training_job(TrainingJobName=name)\n"
    found = scan(sources={"backends/aws/mystery.py": code})
    assert len(found.unresolved) == 1
    assert found.unresolved[0].startswith("backends/aws/mystery.py:2: .stop_training_job")


# -- the caller policy ------------------------------------------------------------------------


@pytest.mark.parametrize("partition", PARTITION_NAMES)
def test_every_operation_the_code_names_is_allowed_by_the_caller_policy(named, partition):
    """Each operation (and what it implies: AddTags for a tagged Create, PassRole for a role)
    on the resources the pipeline names, against the policy as the docs' fill command writes
    it. A failure names the code's file:line and the missing action."""
    v = PARTITIONS[partition]
    _, problems = check(named.calls + sdk_calls(), filled(CALLER_POLICY, v), v)
    assert not problems, "\n".join(problems)


def test_the_caller_policy_grants_nothing_the_code_does_not_use(named):
    """Least privilege, the other way round: every action granted is one the code or the SDK
    asks for, and every statement allows at least one of the requests."""
    v = PARTITIONS["aws"]
    policy = filled(CALLER_POLICY, v)
    verdicts, _ = check(named.calls + sdk_calls(), policy, v)
    used_actions = {x.request.action for x in verdicts}
    used_statements = {s for x in verdicts for s in x.statements}
    granted = {a for s in policy["Statement"] for a in
               ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert granted - used_actions == set()
    assert {s["Sid"] for s in policy["Statement"]} - used_statements == set()


def test_removing_an_action_from_the_caller_policy_fails_the_check(named):
    """The check is live: the caller policy without sagemaker:DescribeModel (issue 24, defect
    4: the lookup after a retried CreateModel) names the lines that need it."""
    v = PARTITIONS["aws"]
    policy = copy.deepcopy(filled(CALLER_POLICY, v))
    for statement in policy["Statement"]:
        if isinstance(statement["Action"], list) and "sagemaker:DescribeModel" in \
                statement["Action"]:
            statement["Action"].remove("sagemaker:DescribeModel")
    _, problems = check(named.calls, policy, v)
    where = [c.where for c in named.calls if c.operation == "DescribeModel"]
    # hosting.py's lookup, and serving.py's reading of which model a fleet holds
    assert sorted({w.split(":")[0] for w in where}) == ["backends/aws/hosting.py",
                                                         "backends/aws/serving.py"]
    assert problems == [
        f"{w}: sagemaker.DescribeModel needs sagemaker:DescribeModel on arn:aws:sagemaker:"
        f"us-east-1:123456789012:model/cifar10-0123456789ab, which the policy does not allow"
        for w in where]


def test_a_call_added_without_its_action_fails_the_check():
    """The check is live the other way too: a module that calls ListTrainingJobs (granted to
    nobody) is named with its line and the action it needs."""
    sources = {p: (ROOT / p).read_text() for p in ("backends/aws/session.py",)}
    sources["backends/aws/mystery.py"] = (
        "class Jobs:\n"
        "    def all(self):\n"
        "        return self.aws.sagemaker.list_training_jobs(MaxResults=10)\n")
    found = scan(sources=sources)
    v = PARTITIONS["aws"]
    _, problems = check(found.calls, filled(CALLER_POLICY, v), v)
    assert problems == ["backends/aws/mystery.py:3: sagemaker.ListTrainingJobs needs "
                        "sagemaker:ListTrainingJobs on *, which the policy does not allow"]


# -- the serving endpoint (backends/aws/serving.py) -------------------------------------------

SERVING_CALLS = {
    ("sagemaker", "CreateEndpoint"), ("sagemaker", "UpdateEndpoint"),
    ("sagemaker", "DescribeModel"), ("sagemaker", "DeleteModel"),
    ("sagemaker", "DeleteEndpointConfig"), ("sagemaker", "ListModels"),
    ("sagemaker", "ListEndpointConfigs"),
    ("cloudwatch", "PutMetricAlarm"), ("cloudwatch", "DescribeAlarms"),
    ("cloudwatch", "DeleteAlarms"),
    ("application-autoscaling", "RegisterScalableTarget"),
    ("application-autoscaling", "DeregisterScalableTarget"),
    ("application-autoscaling", "DescribeScalableTargets"),
    ("application-autoscaling", "PutScalingPolicy"),
    ("application-autoscaling", "DescribeScalingPolicies"),
}


def test_the_scan_sees_the_serving_endpoints_calls(named):
    """What AwsServing names itself (hosting's helpers it reuses, CreateModel and
    CreateEndpointConfig among them, are scanned in hosting.py)."""
    found = {(c.service, c.operation) for c in named.calls
             if c.where.startswith("backends/aws/serving.py:")}
    assert found == SERVING_CALLS
    creates = [c for c in named.calls if c.where.startswith(("backends/aws/serving.py:",
                                                               "backends/aws/hosting.py:"))
               and c.operation.startswith("Create")]
    assert creates and all(c.tagged for c in creates)
    assert [c.passes_role for c in creates if c.operation == "CreateModel"] == [True]


@pytest.mark.parametrize("sid, needed", [
    ("ServingEndpointBlueGreenUpdates", "sagemaker.UpdateEndpoint needs sagemaker:UpdateEndpoint"),
    ("ServingRollbackAlarmsAndTheAutoscalingAlarms",
     "cloudwatch.PutMetricAlarm needs cloudwatch:PutMetricAlarm"),
    ("ServingAutoscalingTargetsHaveNoNamedArns",
     "application-autoscaling.DeregisterScalableTarget needs "
     "application-autoscaling:DeregisterScalableTarget on *"),
    # Application Auto Scaling creates its service-linked role on first use, as the caller...
    ("AutoscalingCreatesItsServiceLinkedRoleOnFirstUse",
     "application-autoscaling.RegisterScalableTarget needs iam:CreateServiceLinkedRole on "
     "arn:aws:iam::123456789012:role/aws-service-role/sagemaker.application-autoscaling."
     "amazonaws.com/AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint when "
     "{'iam:AWSServiceName': 'sagemaker.application-autoscaling.amazonaws.com'}"),
])
def test_each_serving_statement_is_needed_by_a_line_of_serving(named, sid, needed):
    """Without the statement, the check names a line of backends/aws/serving.py and what it
    needs (implied requests included: the service-linked role)."""
    v = PARTITIONS["aws"]
    policy = copy.deepcopy(filled(CALLER_POLICY, v))
    policy["Statement"] = [s for s in policy["Statement"] if s["Sid"] != sid]
    _, problems = check(named.calls, policy, v)
    assert any(p.startswith("backends/aws/serving.py:") and needed in p for p in problems), \
        "\n".join(problems)


@pytest.mark.parametrize("partition", PARTITION_NAMES)
def test_target_tracking_may_manage_its_own_alarms_on_the_pipelines_endpoints_only(partition):
    """PutScalingPolicy makes Application Auto Scaling check that the caller may put, read
    and delete the alarms a target-tracking policy owns (TargetTracking-endpoint/...); the
    grant covers those of cifar10- endpoints, not others'."""
    v = PARTITIONS[partition]
    policy = filled(CALLER_POLICY, v)
    alarm = f"arn:{v.partition}:cloudwatch:{v.region}:{v.account}:alarm:TargetTracking-endpoint"
    mine = f"{alarm}/cifar10-serving/variant/AllTraffic-AlarmHigh-1234"
    theirs = f"{alarm}/prod-fraud/variant/AllTraffic-AlarmHigh-1234"
    for action in ("cloudwatch:PutMetricAlarm", "cloudwatch:DeleteAlarms"):
        assert matching_statements(policy, Request(action, mine))
        assert not matching_statements(policy, Request(action, theirs))


@pytest.mark.parametrize("partition", PARTITION_NAMES)
def test_listing_model_versions_is_granted_on_every_resource(partition):
    """Issue 24, defect 11: ListModelPackages is authorised against "*" when it lists (IAM's
    data gives it an optional resource; AWS's AmazonSageMakerModelRegistryFullAccess grants it
    on "*"), so a grant on the group's ARN alone is refused."""
    v = PARTITIONS[partition]
    policy = filled(CALLER_POLICY, v)
    assert matching_statements(policy, Request("sagemaker:ListModelPackages", "*"))
    for action in ("sagemaker:ListEndpoints", "sagemaker:ListEndpointConfigs",
                   "sagemaker:ListModels"):
        assert matching_statements(policy, Request(action, "*")), action


def test_optional_sdk_permissions_are_documented():
    """What the SDK asks for only on an opt-in path, or survives being denied, is not in the
    policy but docs/aws.md says when to grant it."""
    docs = (ROOT / "docs/aws.md").read_text()
    for action in SDK_CALLS_OPTIONAL.values():
        assert action in docs, action


def test_s3_access_denied_hints_name_the_actions_the_policy_grants():
    """S3 says only "Access Denied"; the backend's hint names the action behind the operation
    (backends/aws/errors.py), the same one this check maps it to."""
    assert {op: iam_action("s3", op) for op in S3_ACTIONS} == S3_ACTIONS


# -- the training container -------------------------------------------------------------------


def test_the_code_shipped_to_the_containers_makes_no_aws_call_of_its_own():
    """model_src/ runs as the execution role: whatever it named would be checked against that
    policy. Today it names nothing (SageMaker itself reads the channels and writes the model)."""
    found = scan(CONTAINER_PACKAGES)
    v = PARTITIONS["aws"]
    _, problems = check(found.calls, filled(EXECUTION_ROLE_POLICY, v), v)
    assert found.unresolved == [] and problems == []
    assert found.calls == []


@pytest.mark.parametrize("partition", PARTITION_NAMES)
def test_the_execution_role_allows_what_sagemaker_does_with_it(partition):
    v = PARTITIONS[partition]
    policy = filled(EXECUTION_ROLE_POLICY, v)
    arn = f"arn:{v.partition}"
    data = f"{arn}:s3:::{v.bucket}/{v.prefix}/data/data_batch_1"
    model = f"{arn}:s3:::{v.bucket}/{v.prefix}/training-jobs/cifar10-x/output/model.tar.gz"
    logs = f"{arn}:logs:{v.region}:{v.account}:log-group:/aws/sagemaker/TrainingJobs"
    repository = f"{arn}:ecr:{v.region}:{v.dlc_registry}:repository/pytorch-training"
    requests = [
        Request("s3:ListBucket", f"{arn}:s3:::{v.bucket}", (("s3:prefix", f"{v.prefix}/data/"),)),
        Request("s3:GetObject", data), Request("s3:PutObject", model),
        Request("logs:CreateLogStream", f"{logs}:*"),
        Request("logs:PutLogEvents", f"{logs}:log-stream:cifar10-x/algo-1-1700000000"),
        Request("ecr:GetAuthorizationToken", "*"), Request("ecr:BatchGetImage", repository),
        Request("cloudwatch:PutMetricData", "*",
                (("cloudwatch:namespace", "/aws/sagemaker/TrainingJobs"),)),
        # Deployment guardrails read the rollback alarms as the endpoint's role.
        Request("cloudwatch:DescribeAlarms",
                f"{arn}:cloudwatch:{v.region}:{v.account}:alarm:cifar10-serving-5xx"),
    ]
    assert [r for r in requests if not matching_statements(policy, r)] == []
    # and nothing outside the pipeline's prefix
    assert not matching_statements(policy, Request(
        "s3:GetObject", f"{arn}:s3:::{v.bucket}/elsewhere/secret"))


# -- the fill command and partitions (issue 24, defect 10) ------------------------------------


@pytest.mark.parametrize("partition", PARTITION_NAMES)
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_the_docs_fill_command_writes_valid_policies_in_every_partition(policy, partition):
    """The fill() of docs/aws.md, run by bash, turns each policy into valid JSON with no
    placeholder left and every ARN in the partition and region it was given."""
    v = PARTITIONS[partition]
    text = filled_text(policy, v)
    document = json.loads(text)
    assert document["Version"] == "2012-10-17"
    left = [p for p in PLACEHOLDERS if re.search(rf"\b{p}\b", text)]
    assert left == []
    arns = re.findall(r'"(arn:[^"]*)"', text)
    assert arns or policy.name == "execution-role-trust.json"
    for arn in arns:
        _, arn_partition, service, region, account, resource = arn.split(":", 5)
        assert arn_partition == v.partition, arn
        assert resource, arn
        if service in ("s3", "iam"):  # global in their partition
            assert region == "" and account in ("", v.account), arn
        else:
            assert region == v.region and re.fullmatch(r"\d{12}", account), arn
    assert len(re.sub(r"\s", "", text)) <= SIZE_LIMITS[policy.name]


def test_the_unfilled_policies_name_no_partition():
    """Every ARN in the shipped policies takes the partition from the fill command."""
    for policy in POLICIES:
        arns = re.findall(r'"(arn:[^"]*)"', policy.read_text())
        assert all(a.startswith("arn:PARTITION:") for a in arns), policy.name


@pytest.mark.parametrize("partition", PARTITION_NAMES)
def test_the_role_arn_the_docs_build_is_accepted_in_every_partition(partition):
    docs = (ROOT / "docs/aws.md").read_text()
    assert "export SAGEMAKER_ROLE_ARN=arn:$PARTITION:iam::$ACCOUNT_ID:role/$ROLE_NAME" in docs
    role = f"arn:{partition}:iam::123456789012:role/cifar10-sagemaker"
    assert AwsOptions.from_settings(role_arn=role).require_role() == role
