"""Which AWS operations the product's code names, the IAM actions they need, and whether the
shipped policies (docs/iam/*.json, filled by the fill command in docs/aws.md) allow them.

The operations are found in the code itself, not in what a test happened to call: every
attribute of a boto3 client (a call, or a bound method handed to a helper such as
``unless_missing(..., s3.head_object)``), ``get_paginator("op")`` (its argument followed through
a helper's parameter when it is not a literal), ``get_waiter("name")`` (the operation the waiter
polls) and the S3 transfer methods (the operations the transfer manager makes, its abort on
failure included). A receiver is a client when the code says so: a ``client("svc")`` call, or a
name that one of the code's own properties/functions/assignments resolves to a client (the
session's ``sagemaker``, ``s3``, ``logs``, ``runtime`` properties; ``sm``; ``runtime_client``).
An operation-named attribute on a receiver that is neither a client nor one of the project's
own objects is reported as unresolved, so a call cannot slip past unseen.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import botocore.session
from botocore import xform_name

ROOT = Path(__file__).resolve().parents[2]
IAM_DIR = ROOT / "docs/iam"
CALLER_POLICY = IAM_DIR / "caller-policy.json"
EXECUTION_ROLE_POLICY = IAM_DIR / "execution-role-policy.json"
# Everything here runs as the caller (the flow's process, the CLI, a worker).
CALLER_PACKAGES = ("backends", "flows", "tasks", "deployments")
# Shipped into the training and inference containers: runs as the execution role.
CONTAINER_PACKAGES = ("model_src",)
# Services a receiver may resolve to besides those the code creates clients for: their
# operation names make an unresolved receiver suspicious (others may add them later).
WATCHED_SERVICES = ("sagemaker", "sagemaker-runtime", "s3", "logs", "sts", "cloudwatch",
                    "application-autoscaling", "iam")
# Client attributes that are not operations and make no call by themselves.
CLIENT_PLUMBING = {"meta", "exceptions", "close", "can_paginate", "get_paginator",
                   "get_waiter", "waiter_names", "generate_presigned_url",
                   "generate_presigned_post"}

# boto3's S3 transfer methods (s3transfer) and the operations they make. A failed multipart
# upload is aborted (AbortMultipartUpload): an error path, and an action of its own in IAM.
S3_TRANSFERS = {
    "upload_file": ("PutObject", "CreateMultipartUpload", "UploadPart",
                    "CompleteMultipartUpload", "AbortMultipartUpload"),
    "upload_fileobj": ("PutObject", "CreateMultipartUpload", "UploadPart",
                       "CompleteMultipartUpload", "AbortMultipartUpload"),
    "download_file": ("HeadObject", "GetObject"),
    "download_fileobj": ("HeadObject", "GetObject"),
    "copy": ("HeadObject", "CopyObject", "CreateMultipartUpload", "UploadPartCopy",
             "CompleteMultipartUpload", "AbortMultipartUpload"),
}

# IAM's service prefix where it is not the boto3 service name.
IAM_PREFIX = {"sagemaker-runtime": "sagemaker"}  # InvokeEndpoint is sagemaker:InvokeEndpoint
# Operations whose IAM action is not "prefix:Operation". None: needs no permission at all.
# S3 is irregular enough that an S3 operation missing here fails the check (add it).
ACTION_OF = {
    ("s3", "PutObject"): "s3:PutObject",
    # The parts of a multipart upload are authorised as s3:PutObject...
    ("s3", "CreateMultipartUpload"): "s3:PutObject",
    ("s3", "UploadPart"): "s3:PutObject",
    ("s3", "CompleteMultipartUpload"): "s3:PutObject",
    # ...except its abort, which is an action of its own.
    ("s3", "AbortMultipartUpload"): "s3:AbortMultipartUpload",
    ("s3", "UploadPartCopy"): "s3:PutObject",
    ("s3", "CopyObject"): "s3:PutObject",  # and s3:GetObject on the source
    ("s3", "GetObject"): "s3:GetObject",
    ("s3", "HeadObject"): "s3:GetObject",  # HEAD is authorised as a read of the object
    ("s3", "ListObjectsV2"): "s3:ListBucket",  # listing a bucket, prefix as a condition key
    ("s3", "ListObjects"): "s3:ListBucket",
    ("s3", "HeadBucket"): "s3:ListBucket",
    ("s3", "DeleteObject"): "s3:DeleteObject",
    ("s3", "DeleteObjects"): "s3:DeleteObject",  # checked per key
    ("s3", "ListBuckets"): "s3:ListAllMyBuckets",
    ("s3", "CreateBucket"): "s3:CreateBucket",
    ("sts", "GetCallerIdentity"): None,  # allowed to every identity; no policy can deny it
}
# A Create call that passes Tags is also authorised as sagemaker:AddTags, with the creating
# operation as sagemaker:TaggingAction; one that passes a role also needs iam:PassRole.
TAG_MEMBERS = {"Tags"}
ROLE_MEMBERS = {"RoleArn", "ExecutionRoleArn"}

# What the SageMaker SDK calls on the caller's behalf (the code names the SDK, not these).
# Required: the pipeline cannot run without them. Optional: denied is survivable or the path is
# opt-in, and docs/aws.md says when to grant them.
SDK_CALLS_REQUIRED = (
    # ModelTrainer._create_training_job_args stages source_dir and the SDK's drivers in S3
    # (Session.upload_data: boto3's transfer manager).
    *(("s3", op, "ModelTrainer stages model_src/ and sm_drivers/")
      for op in S3_TRANSFERS["upload_file"]),
    # Session.default_bucket() checks the bucket (the trainer's staging bucket, and ours).
    ("s3", "HeadBucket", "Session.default_bucket checks the bucket"),
)
SDK_CALLS_OPTIONAL = {
    # Bucket.creation_date lists the account's buckets; AccessDenied is tolerated by boto3.
    ("s3", "ListBuckets"): "s3:ListAllMyBuckets",
    # No bucket configured: the SDK names sagemaker-{region}-{account} and creates it.
    ("s3", "CreateBucket"): "s3:CreateBucket",
}
# Not made at all: the SDK's role validation is switched off when the trainer is built, and
# the trainer's staging-bucket probe is overridden (backends/aws/training.py). Were either to
# come back, list iam:GetRole / iam:SimulatePrincipalPolicy here and in docs/aws.md.


# -- finding the calls ------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedCall:
    """One AWS operation the code names, and where."""

    service: str  # boto3's service name
    operation: str  # the API's operation name
    where: str  # path:line
    how: str  # "call", "reference", "paginator", "waiter", "transfer", "sdk"
    tagged: bool = False  # passes Tags: also sagemaker:AddTags
    passes_role: bool = False  # passes a role: also iam:PassRole


@dataclass
class Scan:
    calls: list[NamedCall] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)  # "path:line: why"
    project_methods: list[str] = field(default_factory=list)  # op-named, not a client's


@functools.cache
def _botocore() -> Any:
    return botocore.session.get_session()


@functools.cache
def operations(service: str) -> dict[str, str]:
    """snake_case method name → API operation name, as boto3 names a client's methods."""
    model = _botocore().get_service_model(service)
    return {xform_name(op): op for op in model.operation_names}


@functools.cache
def waiter_operation(service: str, waiter: str) -> str | None:
    model = _botocore().get_waiter_model(service)
    names = {xform_name(name): name for name in model.waiter_names}
    return model.get_waiter(names[waiter]).operation if waiter in names else None


@functools.cache
def input_members(service: str, operation: str) -> frozenset[str]:
    shape = _botocore().get_service_model(service).operation_model(operation).input_shape
    return frozenset(shape.members) if shape is not None else frozenset()


def python_files(packages: Iterable[str], root: Path = ROOT) -> list[Path]:
    return sorted(p for package in packages for p in (root / package).rglob("*.py"))


def _last_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class ClientNames:
    """Names that hold a boto3 client in the scanned code, and their service, found from the
    code: functions and properties that return a client, and assignments of one."""

    def __init__(self, trees: dict[str, ast.Module]) -> None:
        self.names: dict[str, str] = {}
        self.conflicts: list[str] = []
        changed = True
        while changed:  # a property returning another property's client (sm → sagemaker)
            changed = False
            for where, tree in trees.items():
                for name, value in _bindings(tree):
                    service = self.service_of(value)
                    if service is None:
                        continue
                    known = self.names.get(name)
                    if known is None:
                        self.names[name] = service
                        changed = True
                    elif known != service:
                        self.conflicts.append(f"{where}: {name} is a {known} and a {service} "
                                              f"client")

    def service_of(self, node: ast.AST) -> str | None:
        """The service of the client ``node`` evaluates to, or None when it is not one."""
        if isinstance(node, ast.Call):
            func = _last_name(node.func)
            if func == "client" and node.args and _literal(node.args[0]) in all_services():
                return _literal(node.args[0])
            return self.names.get(func) if func else None
        name = _last_name(node)
        return self.names.get(name) if name else None


def _bindings(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """(name, value) for each function's returned values and each single assignment."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and inner.value is not None:
                    yield node.name, inner.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = _last_name(node.targets[0])
            if target:
                yield target, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = _last_name(node.target)
            if target:
                yield target, node.value


@functools.cache
def all_services() -> frozenset[str]:
    return frozenset(_botocore().get_available_services())


def _parents(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _call_keywords(node: ast.Attribute, parents: dict[ast.AST, ast.AST]) -> tuple[set[str], bool]:
    """The keywords of the call that makes or receives ``node`` (``f(..., client.op, K=v)``
    passes K to op), and whether it also splats a mapping (``**request``)."""
    parent = parents.get(node)
    if not isinstance(parent, ast.Call) or (parent.func is not node and node not in parent.args):
        return set(), False
    names = {k.arg for k in parent.keywords if k.arg}
    return names, any(k.arg is None for k in parent.keywords)


def _enclosing_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.FunctionDef | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node  # type: ignore[return-value]
    return None


def _argument_values(name: str, at: ast.AST, tree: ast.Module,
                     parents: dict[ast.AST, ast.AST]) -> list[ast.AST] | None:
    """What the parameter ``name`` of the function around ``at`` is given at its call sites in
    the module (``self._walk("list_endpoints", ...)``); None when it is not a parameter."""
    function = _enclosing_function(at, parents)
    if function is None:
        return None
    params = [a.arg for a in function.args.posonlyargs + function.args.args]
    if name not in params + [a.arg for a in function.args.kwonlyargs]:
        return None
    bound = params[:1] in (["self"], ["cls"])
    position = params.index(name) - bound if name in params else None
    values: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _last_name(node.func) == function.name:
            given = [k.value for k in node.keywords if k.arg == name]
            if not given and position is not None and position < len(node.args):
                given = [node.args[position]]
            values += given
    return values


def scan(packages: Iterable[str] = CALLER_PACKAGES, root: Path = ROOT,
         sources: dict[str, str] | None = None) -> Scan:
    """The AWS operations named in ``packages`` (or in ``sources``: path → code, for tests of
    the scanner itself)."""
    if sources is None:
        sources = {p.relative_to(root).as_posix(): p.read_text()
                   for p in python_files(packages, root)}
    trees = {path: ast.parse(code, filename=path) for path, code in sources.items()}
    clients = ClientNames(trees)
    result = Scan(unresolved=list(clients.conflicts))
    project = _project_methods(trees)
    watched = {*WATCHED_SERVICES, *clients.names.values()}
    op_names = {name: service for service in watched for name in operations(service)}
    for path, tree in trees.items():
        parents = _parents(tree)
        plain = _plain_names(tree, clients)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                if isinstance(node.value, ast.Name) and node.value.id in plain:
                    continue  # re.search, a module's function, a compiled pattern's method
                _attribute(node, path, tree, parents, clients, project, op_names, result)
    return result


def _plain_names(tree: ast.Module, clients: ClientNames) -> set[str]:
    """Names in the module that never hold a client: imported modules and names, and names
    only ever assigned something else (``DENIED_ACTION = re.compile(...)``)."""
    imported = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    assigned: dict[str, bool] = {}
    for name, value in _bindings(tree):
        assigned[name] = assigned.get(name, False) or clients.service_of(value) is not None
    return (imported | {n for n, holds_client in assigned.items() if not holds_client}) \
        - set(clients.names)


def _project_methods(trees: dict[str, ast.Module]) -> set[str]:
    """Method names the project's own classes define (``backend.delete_endpoint``)."""
    return {item.name for tree in trees.values() for cls in ast.walk(tree)
            if isinstance(cls, ast.ClassDef) for item in cls.body
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)}


def _attribute(node: ast.Attribute, path: str, tree: ast.Module,
               parents: dict[ast.AST, ast.AST], clients: ClientNames, project: set[str],
               op_names: dict[str, str], result: Scan) -> None:
    where = f"{path}:{node.lineno}"
    service = clients.service_of(node.value)
    if service is None:
        if node.attr in op_names and isinstance(node.ctx, ast.Load):
            if node.attr in project:
                result.project_methods.append(f"{where}: {node.attr}")
            else:
                result.unresolved.append(
                    f"{where}: .{node.attr} looks like {op_names[node.attr]}'s operation, but "
                    f"the scanner cannot tell which client {ast.unparse(node.value)} is (name "
                    f"it like the session's client properties, or teach ClientNames)")
        return
    parent = parents.get(node)
    called = isinstance(parent, ast.Call) and parent.func is node
    if node.attr in ("get_paginator", "get_waiter") and called:
        _by_name(node, parent, path, tree, parents, service, result)  # type: ignore[arg-type]
    elif node.attr in operations(service):
        keywords, splat = _call_keywords(node, parents)
        operation = operations(service)[node.attr]
        members = input_members(service, operation)
        # A splatted request may hold Tags: SageMaker's requests built by the SDK do. Other
        # services' requests are the code's own, and tag only by an explicit keyword (the
        # serving tests check at run time that none carries Tags).
        splatted = members if splat and service == "sagemaker" else set()
        result.calls.append(NamedCall(
            service, operation, where, "call" if called else "reference",
            tagged=bool(TAG_MEMBERS & (keywords | splatted)),
            passes_role=bool(ROLE_MEMBERS & (keywords | (members if splat else set())))))
    elif service == "s3" and node.attr in S3_TRANSFERS:
        result.calls += [NamedCall("s3", op, where, "transfer") for op in S3_TRANSFERS[node.attr]]
    elif node.attr not in CLIENT_PLUMBING and node.attr in op_names:
        result.unresolved.append(f"{where}: {node.attr} is not an operation of {service} "
                                 f"(but of {op_names[node.attr]}): is the receiver misnamed?")


def _by_name(node: ast.Attribute, call: ast.Call, path: str, tree: ast.Module,
             parents: dict[ast.AST, ast.AST], service: str, result: Scan) -> None:
    """``get_paginator("op")`` / ``get_waiter("name")``, the name given literally or through a
    parameter of the enclosing function."""
    where = f"{path}:{node.lineno}"
    argument = call.args[0] if call.args else None
    values: list[ast.AST] | None = [argument] if _literal(argument) else None
    if values is None and isinstance(argument, ast.Name):
        values = _argument_values(argument.id, call, tree, parents)
    if not values or any(_literal(v) is None for v in values):
        result.unresolved.append(f"{where}: {node.attr}({ast.unparse(argument or call)}) "
                                 f"names no operation the scanner can read")
        return
    for value in values:
        name = _literal(value) or ""
        if node.attr == "get_paginator":
            operation = operations(service).get(name)
            how = "paginator"
        else:
            operation = waiter_operation(service, name)
            how = "waiter"
        if operation is None:
            result.unresolved.append(f"{where}: {service} has no {how} {name!r}")
        else:
            result.calls.append(NamedCall(service, operation, where, how))


def sdk_calls() -> list[NamedCall]:
    return [NamedCall(service, op, f"sagemaker SDK: {why}", "sdk")
            for service, op, why in SDK_CALLS_REQUIRED]


# -- from operations to IAM actions -----------------------------------------------------------


class UnmappedOperation(KeyError):
    pass


def iam_action(service: str, operation: str) -> str | None:
    """The IAM action that authorises ``operation``; None when none is needed."""
    if (service, operation) in ACTION_OF:
        return ACTION_OF[(service, operation)]
    if service == "s3":
        raise UnmappedOperation(f"s3:{operation}: S3's IAM actions are not its operation "
                                f"names; add the action behind it to ACTION_OF")
    return f"{IAM_PREFIX.get(service, service)}:{operation}"


# -- what each action is asked for, on which resource -----------------------------------------


@dataclass(frozen=True)
class Values:
    """The values the fill command puts in the policies, for one partition."""

    partition: str
    region: str
    account: str = "123456789012"
    bucket: str = "my-bucket"
    prefix: str = "cifar10-pipeline"
    role_name: str = "cifar10-sagemaker"
    dlc_registry: str = "763104351884"
    group: str = "cifar10-pipeline"  # the registry's default model package group

    def env(self) -> dict[str, str]:
        return {"PARTITION": self.partition, "AWS_REGION": self.region,
                "ACCOUNT_ID": self.account, "BUCKET": self.bucket, "PREFIX": self.prefix,
                "ROLE_NAME": self.role_name, "DLC_REGISTRY": self.dlc_registry}


PARTITIONS = {
    "aws": Values("aws", "us-east-1"),
    "aws-cn": Values("aws-cn", "cn-north-1", dlc_registry="727897471807"),
    "aws-us-gov": Values("aws-us-gov", "us-gov-west-1", dlc_registry="442386744353"),
}


@dataclass(frozen=True)
class Request:
    action: str
    resource: str
    context: tuple[tuple[str, str], ...] = ()


# The resources each action is asked for when the pipeline runs, as IAM evaluates them
# ("*" for actions with no resource-level permission). {name} is a pipeline resource name.
# An action the code needs that is missing here fails the check: add what it acts on.
SERVING_ALARMS = ["cloudwatch:{region}:{account}:alarm:{name}-5xx",
                  "cloudwatch:{region}:{account}:alarm:{name}-p99-latency"]
RESOURCES = {
    "sagemaker:CreateTrainingJob": ["training-job/{name}"],
    "sagemaker:DescribeTrainingJob": ["training-job/{name}"],
    "sagemaker:StopTrainingJob": ["training-job/{name}"],
    "sagemaker:CreateModel": ["model/{name}"],
    "sagemaker:DescribeModel": ["model/{name}"],
    "sagemaker:DeleteModel": ["model/{name}"],
    "sagemaker:CreateEndpointConfig": ["endpoint-config/{name}"],
    "sagemaker:DescribeEndpointConfig": ["endpoint-config/{name}"],
    "sagemaker:DeleteEndpointConfig": ["endpoint-config/{name}"],
    "sagemaker:CreateEndpoint": ["endpoint/{name}", "endpoint-config/{name}"],
    "sagemaker:DescribeEndpoint": ["endpoint/{name}"],
    "sagemaker:UpdateEndpoint": ["endpoint/{name}", "endpoint-config/{name}"],
    "sagemaker:DeleteEndpoint": ["endpoint/{name}"],
    "sagemaker:InvokeEndpoint": ["endpoint/{name}"],
    # The reaper asks for the tags of every resource named like the pipeline's.
    "sagemaker:ListTags": ["endpoint/{name}", "endpoint-config/{name}", "model/{name}"],
    "sagemaker:ListEndpoints": ["*"],
    "sagemaker:ListEndpointConfigs": ["*"],
    "sagemaker:ListModels": ["*"],
    "sagemaker:ListTrainingJobs": ["*"],
    "sagemaker:CreateModelPackageGroup": ["model-package-group/{group}"],
    "sagemaker:DescribeModelPackageGroup": ["model-package-group/{group}"],
    "sagemaker:CreateModelPackage": ["model-package/{group}/1"],
    "sagemaker:DescribeModelPackage": ["model-package/{group}/1"],
    "sagemaker:UpdateModelPackage": ["model-package/{group}/1"],
    # Authorised against "*" when it lists (its resource is optional in IAM's data), as in
    # AWS's AmazonSageMakerModelRegistryFullAccess.
    "sagemaker:ListModelPackages": ["*"],
    "s3:ListBucket": ["s3:::{bucket}"],
    "s3:GetObject": ["s3:::{bucket}/{prefix}/data/data_batch_1"],
    "s3:PutObject": ["s3:::{bucket}/{prefix}/data/data_batch_1"],
    "s3:DeleteObject": ["s3:::{bucket}/{prefix}/data/stale"],
    "s3:AbortMultipartUpload": ["s3:::{bucket}/{prefix}/data/data_batch_1"],
    "logs:DescribeLogStreams": ["logs:{region}:{account}:log-group:/aws/sagemaker/TrainingJobs:*"],
    "logs:GetLogEvents": ["logs:{region}:{account}:log-group:/aws/sagemaker/TrainingJobs:"
                          "log-stream:{name}/algo-1-1700000000"],
    # The serving endpoint's rollback alarms (backends/aws/serving.py names them).
    "cloudwatch:PutMetricAlarm": SERVING_ALARMS,
    "cloudwatch:DescribeAlarms": SERVING_ALARMS,
    "cloudwatch:DeleteAlarms": SERVING_ALARMS,
    # Application Auto Scaling names a scalable target's ARN by a random id, not by the
    # endpoint: a grant cannot name the pipeline's targets in advance.
    "application-autoscaling:RegisterScalableTarget": ["*"],
    "application-autoscaling:DeregisterScalableTarget": ["*"],
    "application-autoscaling:DescribeScalableTargets": ["*"],
    "application-autoscaling:PutScalingPolicy": ["*"],
    "application-autoscaling:DescribeScalingPolicies": ["*"],
}

# What AWS authorises on the caller's behalf when it makes an operation, besides the
# operation's own action (Application Auto Scaling validates the caller's permissions on the
# target resource and on the CloudWatch alarms a target-tracking policy manages, and creates
# its service-linked role on first use): (action, resource, context).
TARGET_TRACKING_ALARMS = ["cloudwatch:{region}:{account}:alarm:TargetTracking-endpoint/{name}/"
                          "variant/AllTraffic-AlarmHigh-0123abcd",
                          "cloudwatch:{region}:{account}:alarm:TargetTracking-endpoint/{name}/"
                          "variant/AllTraffic-AlarmLow-0123abcd"]
SCALING_SERVICE = "sagemaker.application-autoscaling.amazonaws.com"
SCALING_ROLE = (f"iam::{{account}}:role/aws-service-role/{SCALING_SERVICE}/"
                f"AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint")
IMPLIED: dict[tuple[str, str], list[tuple[str, str, tuple[tuple[str, str], ...]]]] = {
    ("application-autoscaling", "RegisterScalableTarget"): [
        ("iam:CreateServiceLinkedRole", SCALING_ROLE, (("iam:AWSServiceName", SCALING_SERVICE),)),
        ("sagemaker:DescribeEndpoint", "endpoint/{name}", ()),
        ("sagemaker:DescribeEndpointConfig", "endpoint-config/{name}", ()),
        ("sagemaker:UpdateEndpointWeightsAndCapacities", "endpoint/{name}", ()),
    ],
    ("application-autoscaling", "PutScalingPolicy"): [
        (action, alarm, ()) for action in ("cloudwatch:PutMetricAlarm",
                                           "cloudwatch:DescribeAlarms",
                                           "cloudwatch:DeleteAlarms")
        for alarm in TARGET_TRACKING_ALARMS],
    # Deregistering deletes the target's policies, and with them their alarms.
    ("application-autoscaling", "DeregisterScalableTarget"): [
        ("cloudwatch:DeleteAlarms", alarm, ()) for alarm in TARGET_TRACKING_ALARMS],
}
# Tagging as part of a create: SageMaker authorises it as sagemaker:AddTags with the creating
# operation as sagemaker:TaggingAction; the others as their TagResource.
TAGGING_ACTION = {"sagemaker": "sagemaker:AddTags", "cloudwatch": "cloudwatch:TagResource",
                  "application-autoscaling": "application-autoscaling:TagResource"}


def _arn(template: str, v: Values, name: str) -> str:
    if template == "*":
        return "*"
    filled = template.format(name=name, group=v.group, bucket=v.bucket, prefix=v.prefix,
                             region=v.region, account=v.account)
    if filled.startswith("s3:::") or filled.startswith(("logs:", "cloudwatch:", "iam::")):
        return f"arn:{v.partition}:{filled}"
    return f"arn:{v.partition}:sagemaker:{v.region}:{v.account}:{filled}"


def requests_for(call: NamedCall, v: Values) -> list[Request]:
    """What IAM is asked when the code makes ``call`` (implied actions included)."""
    from backends.base import NAME_PREFIX

    name = f"{NAME_PREFIX}0123456789ab"
    action = iam_action(call.service, call.operation)
    found: list[Request] = []
    if action is not None:
        if action not in RESOURCES:
            raise UnmappedOperation(f"{action}: add the resources it acts on to RESOURCES")
        context = (("s3:prefix", f"{v.prefix}/data/"),) if action == "s3:ListBucket" else ()
        found += [Request(action, _arn(t, v, name), context) for t in RESOURCES[action]]
    if call.tagged:
        context = ((("sagemaker:TaggingAction", call.operation),)
                   if call.service == "sagemaker" else ())
        found += [Request(TAGGING_ACTION[call.service], r.resource, context)
                  for r in found[:1]]
    found += [Request(implied, _arn(template, v, name), context)
              for implied, template, context in IMPLIED.get((call.service, call.operation), [])]
    if call.passes_role:
        found.append(Request("iam:PassRole", f"arn:{v.partition}:iam::{v.account}:role/"
                             f"{v.role_name}", (("iam:PassedToService",
                                                 "sagemaker.amazonaws.com"),)))
    return found


# -- the policies and their evaluation ---------------------------------------------------------


def fill_command(docs: Path = ROOT / "docs/aws.md") -> str:
    """The ``fill() { ... }`` shell function that docs/aws.md tells users to define."""
    text = docs.read_text()
    match = re.search(r"^\s*(fill\(\) \{.*?; \})\s*$", text, re.M | re.S)
    assert match, f"{docs} shows no fill() command"
    return "\n".join(line.strip() for line in match.group(1).splitlines())


@functools.cache
def filled_text(policy: Path, v: Values) -> str:
    """``policy`` as the docs' fill command writes it for ``v``."""
    script = f"{fill_command()}\nfill \"$1\""
    done = subprocess.run(["bash", "-c", script, "fill", str(policy)], env=v.env(),
                          capture_output=True, text=True, check=True)
    return done.stdout


def filled(policy: Path, v: Values) -> dict[str, Any]:
    return json.loads(filled_text(policy, v))


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _conditions_hold(condition: dict[str, dict[str, Any]], context: dict[str, str]) -> bool:
    """StringEquals / StringLike, as these policies use them; a missing key fails them."""
    for operator, keys in condition.items():
        if operator not in ("StringEquals", "StringLike"):
            raise NotImplementedError(f"condition operator {operator}")
        for key, wanted in keys.items():
            have = context.get(key)
            if have is None:
                return False
            patterns = _listed(wanted)
            if operator == "StringEquals" and have not in patterns:
                return False
            if operator == "StringLike" and not any(fnmatchcase(have, p) for p in patterns):
                return False
    return True


def matching_statements(policy: dict[str, Any], request: Request) -> list[str]:
    """The Sids of the Allow statements that allow ``request`` (none when a Deny matches).
    Actions match case-insensitively with wildcards, resources case-sensitively."""
    allowed, denied = [], False
    context = dict(request.context)
    for i, statement in enumerate(policy["Statement"]):
        if "NotAction" in statement or "NotResource" in statement:
            raise NotImplementedError("NotAction/NotResource")
        if not any(fnmatchcase(request.action.lower(), a.lower())
                   for a in _listed(statement["Action"])):
            continue
        if not any(fnmatchcase(request.resource, r) for r in _listed(statement["Resource"])):
            continue
        if not _conditions_hold(statement.get("Condition", {}), context):
            continue
        if statement["Effect"] == "Deny":
            denied = True
        else:
            allowed.append(statement.get("Sid", f"statement {i}"))
    return [] if denied else allowed


def granted_actions(policy: dict[str, Any]) -> set[str]:
    return {a for s in policy["Statement"] if s["Effect"] == "Allow" for a in _listed(s["Action"])}


@dataclass(frozen=True)
class Verdict:
    call: NamedCall
    request: Request
    statements: tuple[str, ...]


def check(calls: Iterable[NamedCall], policy: dict[str, Any], v: Values
          ) -> tuple[list[Verdict], list[str]]:
    """Each request the calls make, with the statements that allow it; and the problems:
    "path:line: Operation needs action on resource"."""
    verdicts: list[Verdict] = []
    problems: list[str] = []
    for call in calls:
        try:
            requests = requests_for(call, v)
        except UnmappedOperation as e:
            problems.append(f"{call.where}: {call.service}.{call.operation}: {e.args[0]}")
            continue
        for request in requests:
            statements = tuple(matching_statements(policy, request))
            verdicts.append(Verdict(call, request, statements))
            if not statements:
                when = f" when {dict(request.context)}" if request.context else ""
                problems.append(f"{call.where}: {call.service}.{call.operation} needs "
                                f"{request.action} on {request.resource}{when}, which the "
                                f"policy does not allow")
    return verdicts, problems


def recorded_actions(operations_made: Iterable[tuple[str, str]]) -> set[str]:
    """The IAM actions behind operations a test saw being made ((service, Operation))."""
    actions = {iam_action(service, op) for service, op in operations_made}
    return {a for a in actions if a is not None}


# -- for tests that record the calls a run really made ----------------------------------------


@functools.cache
def caller_scan() -> Scan:
    return scan()


def known_operations() -> set[tuple[str, str]]:
    """(service, Operation) of every call the caller may make: the code's, the SDK's."""
    return ({(c.service, c.operation) for c in caller_scan().calls + sdk_calls()}
            | set(SDK_CALLS_OPTIONAL))


def policy_grants(policy: dict[str, Any], action: str) -> bool:
    """Whether some Allow statement names ``action`` (wildcards such as sagemaker:Describe*
    resolved), on whatever resource."""
    return any(fnmatchcase(action.lower(), granted.lower()) for granted in granted_actions(policy))


def assert_allowed_by_caller_policy(*recorders: Any) -> None:
    """Every call a test saw (a ``CallRecorder``'s ``calls``; a ``RequestValidator``'s
    ``checked``: S3, CloudWatch Logs and the SDK's own calls too) is one the AST scan or the
    SDK list accounts for, and its IAM action is granted by the caller policy (optional SDK
    calls, which survive a denial, excepted)."""
    made: set[tuple[str, str]] = set()
    for recorder in recorders:
        made |= {(c.service, c.operation) for c in getattr(recorder, "calls", [])}
        made |= {tuple(s.split(".", 1)) for s in getattr(recorder, "checked", [])}  # type: ignore[misc]
    assert made, "no AWS call was recorded"
    unknown = made - known_operations()
    assert not unknown, f"calls the static scan of the code does not account for: {unknown}"
    policy = filled(CALLER_POLICY, PARTITIONS["aws"])
    needed = recorded_actions(made - set(SDK_CALLS_OPTIONAL))
    missing = {a for a in needed if not policy_grants(policy, a)}
    assert not missing, f"the caller policy does not grant {sorted(missing)}"
