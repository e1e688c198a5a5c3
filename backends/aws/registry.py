"""SageMaker Model Registry for the AWS backend: one model package group (tagged as the
pipeline's; its versions take the group's tags, as SageMaker requires), one model package version
per registered model, with the inference specification the endpoint used, the metrics as a
model-quality report in S3, and the lineage as customer metadata.

boto3 rather than the SDK v3's ``ModelPackage.create``: in sagemaker-core 3.x that method is
validated against the model *card*'s ``InferenceSpecification`` (``sagemaker.core.shapes``
re-exports it over the API's shape of the same name), which has no content types and refuses
the API's shape, so it cannot register a deployable version.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import regex  # the API's patterns use \p{...} classes, which re lacks
from botocore.exceptions import ClientError

from backends.aws.config import AwsOptions
from backends.aws.errors import aws_errors, error_code, unless_missing
from backends.aws.s3 import s3_uri
from backends.aws.session import AwsSession
from backends.base import (
    BackendError,
    Decide,
    ModelVersion,
    ModelVersionSpec,
    Registration,
    champion,
)
from model_src.contract import JSON, NPY

log = logging.getLogger(__name__)

# CustomerMetadataProperties: keys of at most 128 characters, values of at most 256.
MAX_VALUE = 256
METRIC_PREFIX = "metric:"  # metrics kept beside the lineage, so listing needs no S3 read
# Where the version stands on the serving endpoint (ModelVersion.deployment): customer metadata
# too, as SageMaker Model Registry has no field for it.
DEPLOYMENT_KEY = "deployment"
KNOWN = ("training_job", "cache_key", "model_uri", DEPLOYMENT_KEY)
# The characters a metadata value may hold (the API's pattern); others become "_".
METADATA_VALUE = regex.compile(r"[^\p{L}\p{Z}\p{N}_.:/=+\-@]")
# Fresh keys tried for a metrics report before giving up (each is random: a second is needed
# only after a retried write that landed, a third never in practice).
REPORT_ATTEMPTS = 3


class AwsRegistry:
    def __init__(self, aws: AwsSession, options: AwsOptions, bucket: Callable[[], str],
                 inference_image: Callable[[str], str]) -> None:
        """``inference_image``: the serving container for an instance type, which every
        version names (``AwsEndpoints.image``)."""
        self.aws = aws
        self.options = options
        self.bucket = bucket
        self.inference_image = inference_image

    @property
    def sm(self) -> Any:
        return self.aws.sagemaker

    def _group_exists(self, group: str) -> bool:
        return unless_missing(f"finding model package group {group}",
                              self.sm.describe_model_package_group,
                              ModelPackageGroupName=group) is not None

    def ensure_group(self, group: str, tags: dict[str, str]) -> bool:
        """Creates the group when missing; True when it existed already. Idempotent and
        race-safe: CreateModelPackageGroup takes no ClientToken, so two first runs at once, or
        botocore's retry of a create whose answer was lost, are told that the group already
        exists. That is success once a describe finds the group (as the SDK's own
        ``_model_package_group_exists`` treats it), and counts as "existed": another run may
        have registered a version in it already."""
        if self._group_exists(group):
            return True
        with aws_errors(f"creating model package group {group}"):
            try:
                self.sm.create_model_package_group(
                    ModelPackageGroupName=group,
                    ModelPackageGroupDescription="CIFAR-10 models trained by cifar10-pipeline",
                    Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
            except ClientError as e:
                if not (_says_already_exists(e) and self._group_exists(group)):
                    raise
                log.info("model package group %s was created meanwhile (%s): using it",
                         group, error_code(e))
                return True
        return False

    def register(self, spec: ModelVersionSpec, decide: Decide) -> Registration:
        image = self.inference_image(spec.instance_type)
        existed = self.ensure_group(spec.group, spec.tags)
        report = self._put_metrics(spec)
        metadata = {**{k: _fit(v) for k, v in spec.lineage.items()},
                    **{f"{METRIC_PREFIX}{k}": f"{v:.6g}" for k, v in spec.metrics.items()},
                    "training_job": spec.training_job, "cache_key": spec.cache_key,
                    "model_uri": _fit(spec.model_uri)}
        # SageMaker Model Registry has no lock and no conditional create, so unlike the local
        # registry the gate cannot decide under a lock: the champion is read as late as
        # possible, right before CreateModelPackage. That narrows the window, but two runs
        # registering within the same few seconds can still both be measured against the same
        # champion (both approved, though the second is worse than the first).
        before = champion(self._versions_of(spec.group)) if existed else None
        status, reason = decide(before)
        with aws_errors(f"registering a version of model package group {spec.group}"):
            arn = self.sm.create_model_package(
                ModelPackageGroupName=spec.group,
                ModelPackageDescription=f"trained by {spec.training_job}",
                InferenceSpecification={
                    "Containers": [{"Image": image, "ModelDataUrl": spec.model_uri}],
                    "SupportedContentTypes": [NPY, JSON],
                    "SupportedResponseMIMETypes": [NPY, JSON],
                    "SupportedRealtimeInferenceInstanceTypes": [spec.instance_type]},
                ModelMetrics={"ModelQuality": {"Statistics": {"ContentType": JSON,
                                                              "S3Uri": report}}},
                ModelApprovalStatus=status,
                CustomerMetadataProperties=metadata)["ModelPackageArn"]
            # The decision's reason: CreateModelPackage has no field for it.
            self.sm.update_model_package(ModelPackageArn=arn, ModelApprovalStatus=status,
                                         ApprovalDescription=reason[:1024],
                                         CustomerMetadataProperties=metadata)
        return Registration(version=self._version(arn), champion_before=before)

    def _put_metrics(self, spec: ModelVersionSpec) -> str:
        """The model-quality report the version points at (the registry stores references),
        under a key of its own: ``registry/{group}/{training_job}/{report id}/metrics.json``.
        Not the training job alone (a cached model is registered again under its original
        job), not the version (known only after CreateModelPackage, which takes this URI),
        not the flow run (a sweep registers several points in one run, a retried run
        registers again): a random id, one per registration. S3 refuses to overwrite
        (If-None-Match), so an earlier version's report never changes."""
        body = json.dumps({"metrics": spec.metrics, "training_job": spec.training_job,
                           "lineage": spec.lineage}, indent=1).encode()
        folder = f"{self.options.prefix}/registry/{spec.group}/{spec.training_job}"
        for _ in range(REPORT_ATTEMPTS):
            key = f"{folder}/{new_report_id()}/metrics.json"
            if self._put_new(key, body):
                return s3_uri(self.bucket(), key)
        raise BackendError(f"could not write a new metrics report under "
                           f"{s3_uri(self.bucket(), folder)}/: every key tried was taken")

    def _put_new(self, key: str, body: bytes) -> bool:
        """Writes the object unless one is at ``key``; False when one is. A 412 can also
        answer botocore's retry of a write that landed: the caller then writes under a fresh
        key, leaving an unreferenced copy rather than risking someone else's report."""
        with aws_errors(f"writing the metrics report {s3_uri(self.bucket(), key)}"):
            try:
                self.aws.s3.put_object(Bucket=self.bucket(), Key=key, Body=body,
                                       ContentType=JSON, IfNoneMatch="*")
            except ClientError as e:
                if error_code(e) not in {"PreconditionFailed", "412"}:
                    raise
                return False
        return True

    def versions(self, group: str) -> list[ModelVersion]:
        return self._versions_of(group) if self._group_exists(group) else []

    def _versions_of(self, group: str) -> list[ModelVersion]:
        """The versions of a group that exists."""
        with aws_errors(f"listing the versions of model package group {group}"):
            pages = self.sm.get_paginator("list_model_packages").paginate(
                ModelPackageGroupName=group, ModelPackageType="Versioned")
            arns = [s["ModelPackageArn"] for page in pages
                    for s in page["ModelPackageSummaryList"]]
        versions = []
        for arn in arns:
            try:
                versions.append(self._version(arn))
            except (KeyError, TypeError, ValueError) as e:  # metadata not as we write it
                log.warning("skipping model package %s: its metadata cannot be read (%s: %s); "
                            "fix its customer metadata or delete the version", arn,
                            type(e).__name__, e)
        return sorted(versions, key=lambda v: v.version)

    def set_status(self, group: str, version: int, status: str, reason: str) -> ModelVersion:
        found = [v for v in self.versions(group) if v.version == version]
        if not found:
            raise BackendError(f"model package group {group} has no version {version}")
        arn = found[0].arn
        metadata = self._describe(arn).get("CustomerMetadataProperties") or {}
        # The metadata passed again whole (some implementations replace the map rather than
        # merge it), and left out when there is none (a version registered outside the
        # pipeline): the API refuses an empty map (at least 1 entry), a check botocore does
        # not make before sending.
        keep = {"CustomerMetadataProperties": metadata} if metadata else {}
        with aws_errors(f"updating version {version} of model package group {group}"):
            self.sm.update_model_package(ModelPackageArn=arn, ModelApprovalStatus=status,
                                         ApprovalDescription=reason[:1024], **keep)
        return self._version(arn)

    def set_deployment(self, group: str, version: int, deployment: str | None) -> ModelVersion:
        """UpdateModelPackage with the version's metadata, its ``deployment`` key set (or
        removed: None). The status and its reason are passed again as they are: some
        implementations (moto) clear what a request leaves out, and the metadata is passed
        whole for those that replace the map rather than merge it."""
        found = [v for v in self.versions(group) if v.version == version]
        if not found:
            raise BackendError(f"model package group {group} has no version {version}")
        arn = found[0].arn
        described = self._describe(arn)
        metadata = dict(described.get("CustomerMetadataProperties") or {})
        metadata.pop(DEPLOYMENT_KEY, None)
        if deployment is not None:
            metadata[DEPLOYMENT_KEY] = _fit(deployment)
        change: dict[str, Any] = {"CustomerMetadataProperties": metadata} if metadata else {}
        if deployment is None:
            change["CustomerMetadataPropertiesToRemove"] = [DEPLOYMENT_KEY]
        with aws_errors(f"recording where version {version} of model package group {group} "
                        f"is deployed"):
            self.sm.update_model_package(
                ModelPackageArn=arn, ModelApprovalStatus=described["ModelApprovalStatus"],
                ApprovalDescription=described.get("ApprovalDescription", "")[:1024], **change)
        return self._version(arn)

    def _describe(self, arn: str) -> dict[str, Any]:
        with aws_errors(f"describing model package {arn}"):
            return self.sm.describe_model_package(ModelPackageName=arn)

    def _version(self, arn: str) -> ModelVersion:
        described = self._describe(arn)
        metadata: dict[str, str] = described.get("CustomerMetadataProperties") or {}
        metrics = {k.removeprefix(METRIC_PREFIX): float(v) for k, v in metadata.items()
                   if k.startswith(METRIC_PREFIX)}
        lineage = {k: v for k, v in metadata.items()
                   if not k.startswith(METRIC_PREFIX) and k not in KNOWN}
        created = described.get("CreationTime") or dt.datetime.now(dt.UTC)
        return ModelVersion(
            group=described["ModelPackageGroupName"],
            version=int(described["ModelPackageVersion"]),
            status=described["ModelApprovalStatus"],
            reason=described.get("ApprovalDescription", ""),
            created=created if created.tzinfo else created.replace(tzinfo=dt.UTC),
            model_uri=metadata.get("model_uri", ""),
            training_job=metadata.get("training_job", ""),
            cache_key=metadata.get("cache_key", ""), metrics=metrics, lineage=lineage, arn=arn,
            deployment=metadata.get(DEPLOYMENT_KEY))


def new_report_id() -> str:
    """A metrics report's own folder name: unique per registration."""
    return uuid.uuid4().hex


def _says_already_exists(error: ClientError) -> bool:
    """Whether a create failed because the resource is there. SageMaker answers a second
    CreateModelPackageGroup with a ValidationException "... already exists"; ResourceInUse
    is the modelled code elsewhere, checked as the SDK checks it. The caller confirms with a
    describe, so a loose match cannot turn a real failure into success."""
    if error_code(error) in {"ResourceInUse", "ResourceInUseException"}:
        return True
    return "already exist" in str(error.response.get("Error", {}).get("Message", "")).lower()


def _fit(value: object) -> str:
    """A customer metadata value: the characters the API allows, at most 256 of them (the
    metrics report in S3 has every value whole)."""
    text = METADATA_VALUE.sub("_", str(value))
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + "_"
