"""SageMaker real-time endpoints for the AWS backend, through boto3: model, endpoint config and
endpoint (all three named after the endpoint and tagged as the pipeline's), a bounded wait for
InService, idempotent deletion, and the listing the reaper works from.

boto3 rather than the SDK's ``ModelBuilder``/``sagemaker.core.resources``: ModelBuilder infers
a serving setup of its own and polls every 30 s without a bound we control; the three plain
Create calls say exactly what the endpoint runs, and their failures carry AWS's reason.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from time import monotonic
from typing import Any

from botocore.exceptions import ClientError

from backends.aws.config import AwsOptions
from backends.aws.errors import aws_errors, error_code, is_not_found, unless_missing
from backends.aws.images import pytorch_image
from backends.aws.s3 import object_exists
from backends.aws.session import AwsSession
from backends.base import (
    CREATED_KEY,
    MANAGED_BY_KEY,
    MANAGED_BY_VALUE,
    NAME_PREFIX,
    OWNER_KEY,
    VARIANT,
    BackendError,
    EndpointExists,
    EndpointFailed,
    EndpointInfo,
    EndpointSpec,
    Invocation,
    LogCallback,
    invoke_through,
)
from backends.polling import poll

FAILED = {"Failed", "OutOfService", "Deleting", "UpdateRollbackFailed"}
# States in which SageMaker refuses DeleteEndpoint; each ends by itself.
BUSY = {"Creating", "Updating", "SystemUpdating", "RollingBack"}


class AwsEndpoints:
    def __init__(self, aws: AwsSession, options: AwsOptions) -> None:
        self.aws = aws
        self.options = options

    @property
    def sm(self) -> Any:
        return self.aws.sagemaker

    def runtime_client(self, endpoint_name: str) -> Any:
        """boto3's ``sagemaker-runtime`` client for this region (``AWS_ENDPOINT_URL_SAGEMAKER_
        RUNTIME`` redirects it, as for any boto3 client). No DescribeEndpoint first: a missing
        endpoint is InvokeEndpoint's own clear ValidationError."""
        return self.aws.runtime

    def invoke(self, endpoint_name: str, body: bytes, content_type: str,
               accept: str = "application/json") -> Invocation:
        with aws_errors(f"invoking endpoint {endpoint_name}"):
            return invoke_through(self.aws.runtime, endpoint_name, body, content_type, accept)

    def image(self, instance_type: str) -> str:
        return pytorch_image("inference", self.aws.region, self.options.inference_framework_version,
                             self.options.py_version, instance_type)

    # -- deploy ----------------------------------------------------------------------------

    def deploy(self, spec: EndpointSpec, on_log: LogCallback | None = None) -> EndpointInfo:
        """Creates model, endpoint config and endpoint, and waits until InService. On any
        failure, what this call created is deleted before the error is raised."""
        emit = on_log or (lambda line: None)
        role = self.options.require_role()
        if not spec.model_uri.startswith("s3://"):
            raise BackendError(f"the aws backend hosts models from S3; got {spec.model_uri}")
        if self._describe_endpoint(spec.name) is not None:
            raise EndpointExists(spec.name)
        if not object_exists(self.aws.s3, spec.model_uri):
            raise BackendError(f"model artifact {spec.model_uri} does not exist")
        image = self.image(spec.instance_type)
        # created-at says when the endpoint was created (the flow stamps the run's start): the
        # reaper measures an endpoint's age from it, and a long training must not count.
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        tag_map = {**spec.tags, CREATED_KEY: created}
        tags = [{"Key": k, "Value": v} for k, v in tag_map.items()]
        owner = spec.tags.get(OWNER_KEY, "")
        try:
            self.create_model_and_config(spec.name, spec.model_uri, spec.instance_type,
                                         spec.instance_count, role, tags, owner,
                                         spec.environment)
            self._create("endpoint", spec.name, owner, self.sm.create_endpoint,
                         EndpointName=spec.name, EndpointConfigName=spec.name, Tags=tags)
            emit(f"endpoint {spec.name}: creating ({spec.instance_count} x "
                 f"{spec.instance_type}, image {image})")
            described = self._wait_in_service(spec.name, emit)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error
                self.delete(spec.name)
            raise
        return EndpointInfo(
            name=spec.name, status="InService",
            created=created_at(tag_map, described["CreationTime"]), tags=tag_map,
            instance_type=spec.instance_type, url=None,
            extra={"arn": described["EndpointArn"], "endpoint_config": spec.name,
                   "models": [spec.name]})

    def create_model_and_config(self, name: str, model_uri: str, instance_type: str,
                                instance_count: int, role: str, tags: list[dict[str, str]],
                                owner: str, environment: dict[str, str] | None = None) -> None:
        """CreateModel and CreateEndpointConfig (one variant, VARIANT), both named ``name``:
        what a run's endpoint and each serving fleet are made of."""
        image = self.image(instance_type)
        self._create("model", name, owner, self.sm.create_model,
                     ModelName=name, ExecutionRoleArn=role, Tags=tags,
                     PrimaryContainer={"Image": image, "ModelDataUrl": model_uri,
                                       # The PyTorch inference toolkit imports the handlers
                                       # from code/inference.py of model.tar.gz by default.
                                       "Environment": {
                                           "SAGEMAKER_REGION": self.aws.region,
                                           "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                                           **(environment or {}),
                                       }})
        self._create("endpoint config", name, owner, self.sm.create_endpoint_config,
                     EndpointConfigName=name, Tags=tags,
                     ProductionVariants=[{
                         "VariantName": VARIANT, "ModelName": name,
                         "InstanceType": instance_type,
                         "InitialInstanceCount": instance_count,
                         "InitialVariantWeight": 1.0,
                     }])

    def _create(self, kind: str, name: str, owner: str, call: Any, **params: Any) -> None:
        """One Create call. botocore retries a call whose answer was lost (a timeout, a 5xx),
        and the retry finds what the first attempt created: "Cannot create already existing
        ...". That resource is this call's own when it is named so and tagged with this run
        as its owner: success, not a failure that would tear the deploy down."""
        doing = f"creating {kind} {name}"
        with aws_errors(doing):
            try:
                call(**params)
            except ClientError as e:
                message = str(e.response.get("Error", {}).get("Message", "")).lower()
                if "already exist" not in message or not self._owned_by(kind, name, owner):
                    raise

    def _owned_by(self, kind: str, name: str, owner: str) -> bool:
        """Whether the ``kind`` called ``name`` carries the pipeline's tags with ``owner``."""
        describe, arn_key = {
            "model": (lambda: unless_missing(f"describing model {name}",
                                             self.sm.describe_model, ModelName=name),
                      "ModelArn"),
            "endpoint config": (lambda: self._describe_config(name), "EndpointConfigArn"),
            "endpoint": (lambda: self._describe_endpoint(name), "EndpointArn"),
        }[kind]
        described = describe()
        tags = self._tags(described[arn_key]) if described else None
        return bool(owner) and tags is not None and \
            tags.get(MANAGED_BY_KEY) == MANAGED_BY_VALUE and tags.get(OWNER_KEY) == owner

    def _wait_in_service(self, name: str, emit: LogCallback) -> dict[str, Any]:
        started = monotonic()
        last: str | None = None

        def check() -> dict[str, Any] | None:
            nonlocal last
            described = self._describe_endpoint(name)
            if described is None:
                raise EndpointFailed(name, "deleted while it was being created")
            status = described["EndpointStatus"]
            if status != last:
                last = status
                emit(f"endpoint {name}: {status} after {monotonic() - started:.0f}s")
            if status in FAILED:
                raise EndpointFailed(name, described.get("FailureReason") or status)
            return described if status == "InService" else None

        return poll(check, interval=self.options.poll_seconds,
                    timeout=self.options.deploy_timeout_seconds,
                    on_timeout=lambda elapsed: EndpointFailed(
                        name, f"not InService after {elapsed:.0f}s (still {last})"))

    # -- describe and list -------------------------------------------------------------------

    def _describe_endpoint(self, name: str) -> dict[str, Any] | None:
        return unless_missing(f"describing endpoint {name}", self.sm.describe_endpoint,
                              EndpointName=name)

    def _describe_config(self, name: str) -> dict[str, Any] | None:
        return unless_missing(f"describing endpoint config {name}",
                              self.sm.describe_endpoint_config, EndpointConfigName=name)

    def _tags(self, arn: str) -> dict[str, str] | None:
        """The resource's tags; None when it is gone."""
        def read() -> dict[str, str]:
            pages = self.sm.get_paginator("list_tags").paginate(ResourceArn=arn)
            return {t["Key"]: t.get("Value", "") for page in pages for t in page.get("Tags", [])}

        return unless_missing(f"listing the tags of {arn}", read)

    def _info(self, name: str, arn: str, status: str, creation_time: dt.datetime,
              config_name: str | None, tags: dict[str, str]) -> EndpointInfo:
        config = self._describe_config(config_name) if config_name else None
        variants = (config or {}).get("ProductionVariants") or [{}]
        return EndpointInfo(
            name=name, status=status, created=created_at(tags, creation_time), tags=tags,
            instance_type=variants[0].get("InstanceType", "unknown"), url=None,
            extra={"arn": arn, "endpoint_config": config_name,
                   "models": [v.get("ModelName") for v in variants if v.get("ModelName")]},
        )

    def describe(self, name: str) -> EndpointInfo | None:
        described = self._describe_endpoint(name)
        if described is None:
            return None
        tags = self._tags(described["EndpointArn"]) or {}
        info = self._info(name, described["EndpointArn"], described["EndpointStatus"],
                          described["CreationTime"], described.get("EndpointConfigName"), tags)
        if described.get("FailureReason"):
            info.extra["failure_reason"] = described["FailureReason"]
        return info

    def list(self) -> list[EndpointInfo]:
        """The pipeline's endpoints in this region (tagged managed-by=cifar10-pipeline), in
        every status: the endpoints named like the pipeline's, and ListTags for each."""
        found = []
        with aws_errors("listing endpoints"):
            summaries = self._walk("list_endpoints", "Endpoints", "EndpointName")
        for summary in summaries:
            tags = self._tags(summary["EndpointArn"])
            if tags is None or tags.get(MANAGED_BY_KEY) != MANAGED_BY_VALUE:
                continue  # deleted since the listing, or not the pipeline's
            # The pipeline names the endpoint config like the endpoint: no DescribeEndpoint.
            found.append(self._info(summary["EndpointName"], summary["EndpointArn"],
                                    summary["EndpointStatus"], summary["CreationTime"],
                                    summary["EndpointName"], tags))
        return found

    def _walk(self, operation: str, key: str, name_key: str) -> list[dict[str, Any]]:
        """Every item of a paginated List call named like the pipeline's resources: narrowed
        by AWS (NameContains) and checked here, before anything asks for their tags (a large
        account has thousands of models, and ListTags for each would be slow and throttled)."""
        pages = self.sm.get_paginator(operation).paginate(NameContains=NAME_PREFIX)
        return [item for page in pages for item in page.get(key, [])
                if item[name_key].startswith(NAME_PREFIX)]

    def orphans(self) -> list[EndpointInfo]:
        """The pipeline's endpoint configs and models whose endpoint is gone (a teardown that
        failed after DeleteEndpoint, a deploy killed between its Create calls): invisible to
        ``list``, so the reaper asks for them too. One per name (config and model share it)."""
        with aws_errors("listing endpoints, endpoint configs and models"):
            endpoints = {s["EndpointName"]
                         for s in self._walk("list_endpoints", "Endpoints", "EndpointName")}
            parts = [(c["EndpointConfigName"], c["EndpointConfigArn"], c["CreationTime"])
                     for c in self._walk("list_endpoint_configs", "EndpointConfigs",
                                         "EndpointConfigName")]
            parts += [(m["ModelName"], m["ModelArn"], m["CreationTime"])
                      for m in self._walk("list_models", "Models", "ModelName")]
        found: dict[str, EndpointInfo] = {}
        for name, arn, creation_time in parts:
            if name in endpoints or name in found:
                continue
            tags = self._tags(arn)
            if tags is None or tags.get(MANAGED_BY_KEY) != MANAGED_BY_VALUE:
                continue  # deleted since the listing, or not the pipeline's
            found[name] = EndpointInfo(name=name, status="Orphaned",
                                       created=created_at(tags, creation_time), tags=tags,
                                       instance_type="unknown", url=None, extra={"arn": arn})
        return list(found.values())

    # -- delete ------------------------------------------------------------------------------

    def delete(self, name: str) -> bool:
        """Deletes the endpoint, its endpoint config and its models. Idempotent: whatever is
        already gone is skipped; True when anything was deleted. An endpoint still being
        created or updated cannot be deleted yet: the wait for it is bounded
        (``delete_wait_seconds``). The config and the models are deleted even when the
        endpoint could not be (and after a deploy that died between its Create calls: named
        like the endpoint, no endpoint); the first failure is raised after all were tried."""
        deleted = False
        failures: list[Exception] = []
        config_name = name
        described = self._describe_endpoint(name)
        if described is not None:
            config_name = described.get("EndpointConfigName") or name
            try:
                deleted |= self._delete_endpoint(name, described)
            except Exception as e:
                failures.append(e)
        models = [name]
        try:
            config = self._describe_config(config_name)
            if config is not None:
                models = [v["ModelName"] for v in config.get("ProductionVariants", [])
                          if v.get("ModelName")] or [name]
                deleted |= self._delete("endpoint config", config_name,
                                        self.sm.delete_endpoint_config,
                                        EndpointConfigName=config_name)
        except Exception as e:
            failures.append(e)
        for model in dict.fromkeys(models):
            try:
                deleted |= self._delete("model", model, self.sm.delete_model, ModelName=model)
            except Exception as e:
                failures.append(e)
        if failures:
            first = failures[0]
            for other in failures[1:]:
                first.add_note(f"also: {other}")
            raise first
        return deleted

    def _delete_endpoint(self, name: str, described: dict[str, Any]) -> bool:
        """DeleteEndpoint, once the endpoint is in a state that allows it. SageMaker refuses
        it while the endpoint is Creating or Updating (minutes; close to an hour for a
        container that keeps failing its health check), and an endpoint left so bills."""
        latest: dict[str, Any] | None = described
        status = described["EndpointStatus"]

        def attempt() -> bool | None:
            nonlocal latest, status
            current = latest if latest is not None else self._describe_endpoint(name)
            latest = None  # the next attempt asks again
            if current is None or current["EndpointStatus"] == "Deleting":
                return False  # gone, or already going
            status = current["EndpointStatus"]
            if status in BUSY:
                return None
            with aws_errors(f"deleting endpoint {name}"):
                try:
                    self.sm.delete_endpoint(EndpointName=name)
                except ClientError as e:
                    if is_not_found(e):
                        return False
                    if error_code(e) == "ValidationException" and any(
                            word in str(e).lower() for word in ("in-progress", "creating",
                                                                 "updating")):
                        return None  # it became busy meanwhile (an update): wait again
                    raise
            return True

        return poll(attempt, interval=self.options.poll_seconds,
                    timeout=self.options.delete_wait_seconds,
                    on_timeout=lambda waited: EndpointNotDeletable(name, status, waited))

    @staticmethod
    def _delete(kind: str, name: str, call: Any, **params: str) -> bool:
        """True when deleted, False when there was nothing to delete."""
        return unless_missing(f"deleting {kind} {name}", call, **params) is not None


class EndpointNotDeletable(BackendError):
    def __init__(self, name: str, status: str, waited: float) -> None:
        super().__init__(
            f"endpoint {name} cannot be deleted: it is still {status} after {waited:.0f}s of "
            f"waiting (SageMaker refuses to delete an endpoint while it is being created or "
            f"updated), and it is billed while it runs. Delete it once it is InService or "
            f"Failed: `cifar10-pipeline endpoints delete {name} --backend aws`")
        self.endpoint_name, self.status = name, status


def created_at(tags: dict[str, str], creation_time: dt.datetime) -> dt.datetime:
    """When the endpoint was created: its created-at tag (set by ``deploy``), else SageMaker's
    CreationTime."""
    text = tags.get(CREATED_KEY)
    if text:
        with contextlib.suppress(ValueError):
            created = dt.datetime.fromisoformat(text)
            return created if created.tzinfo else created.replace(tzinfo=dt.UTC)
    if creation_time.tzinfo is None:
        return creation_time.replace(tzinfo=dt.UTC)
    return creation_time.astimezone(dt.UTC)
