"""AWS credentials the Prefect way: an ``AwsCredentials`` block (the prefect-aws package) named
by ``aws.credentials_block``, turned into the boto3 session factory the AWS backend makes all
its clients from (SageMaker, S3, CloudWatch Logs, the runtime, the SageMaker SDK's). It lives
in flows/ because backends never import Prefect.

What the block decides, and what comes before it:

- credentials: the block's keys or profile, else boto3's default chain (prefect-aws's own
  fallback), never the environment's keys on top of the block's;
- region: ``aws.region`` (``--region``) first, since it is this run's explicit choice; then the
  block's ``region_name``, chosen for these credentials; then the machine's ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION`` or profile;
- ``assume_role_arn`` (with ``assume_role_kwargs``): the role is assumed with the block's
  credentials, and the temporary credentials are renewed before they expire (botocore's
  refreshing credentials), so a training job followed for hours keeps working. prefect-aws's
  ``get_boto3_session()`` assumes the role once, whose credentials expire after an hour;
- ``aws_client_parameters`` are not used (prefect-aws applies them only to clients made by its
  ``get_client``, and one ``endpoint_url`` cannot serve SageMaker, S3 and STS alike): a run
  logs a warning when they are set. ``AWS_ENDPOINT_URL_<SERVICE>`` redirects endpoints.
"""

from __future__ import annotations

import os
import uuid
from functools import partial
from typing import Any

import boto3
import botocore.session
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    CredentialResolver,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import ProfileNotFound

from backends.aws.config import REGION_ENVS
from backends.aws.session import SessionFactory
from backends.base import ConfigurationError
from tasks.reporting import logger

BLOCK_TYPE = "aws-credentials"
HOW_TO_CREATE = ("create it with `AwsCredentials(...).save(NAME)` (prefect_aws) or in the "
                 "Prefect UI under Blocks; see the README's Real AWS section")


def block_session_factory(name: str) -> SessionFactory:
    """The session factory of the ``AwsCredentials`` block ``name``. The block is loaded now,
    so that a missing one fails the run before anything is downloaded; sessions are made on
    the backend's first use of AWS."""
    block = load_credentials_block(name)
    warn_unused_client_parameters(block, name)
    return partial(session_from_block, block, name)


def load_credentials_block(name: str) -> Any:
    """The ``AwsCredentials`` block ``name`` (or ``aws-credentials/NAME``) from the Prefect
    API; a ``ConfigurationError`` of one line when it cannot be had."""
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise ConfigurationError(
            f"aws.credentials_block is {name!r}, but prefect-aws is not installed here: "
            f"pip install prefect-aws (it is among this project's dependencies)") from None
    from prefect.blocks.core import Block

    try:
        # A slug (TYPE/NAME) may name a block of any type: checked below.
        block = (Block.load(name, _sync=True) if "/" in name
                 else AwsCredentials.load(name, _sync=True))
    except ValueError as e:  # not found, or a document that does not validate
        if str(e).startswith("Unable to find block document"):
            raise ConfigurationError(not_found_message(name)) from None
        raise ConfigurationError(f"block {name!r} could not be read as AwsCredentials: "
                                 f"{first_line(e)}") from None
    if not isinstance(block, AwsCredentials):
        raise ConfigurationError(
            f"block {name!r} is a {type(block).__name__} block, not AWS credentials: "
            f"aws.credentials_block names a block of type {BLOCK_TYPE}")
    return block


def not_found_message(name: str) -> str:
    """Why ``name`` was not found, naming any block of another type that has that name (the
    likely mistake: an S3Bucket or a Secret saved under the name meant for credentials)."""
    document_name = name.split("/", 1)[-1]
    others = [slug for slug in block_types_named(document_name) if slug != BLOCK_TYPE]
    if others:
        return (f"no AwsCredentials block named {document_name!r} on this Prefect server; "
                f"the block of that name is of type {', '.join(others)}, not {BLOCK_TYPE}")
    return (f"no AwsCredentials block named {document_name!r} on this Prefect server "
            f"(aws.credentials_block): {HOW_TO_CREATE}")


def block_types_named(document_name: str) -> list[str]:
    """The type slugs of the saved blocks called ``document_name`` (secrets not read)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        documents = client.read_block_documents(include_secrets=False)
    return sorted({d.block_type.slug for d in documents
                   if d.name == document_name and d.block_type is not None})


def warn_unused_client_parameters(block: Any, name: str) -> None:
    """Says so when the block sets client parameters this pipeline does not use."""
    params = block.aws_client_parameters.get_params_override()
    defaults = type(block.aws_client_parameters)().get_params_override()
    unused = sorted(key for key, value in params.items() if defaults.get(key) != value)
    if unused:
        logger().warning(
            "AwsCredentials block %r: its aws_client_parameters (%s) are not used; the "
            "SageMaker SDK makes clients of its own. Set AWS_ENDPOINT_URL_<SERVICE>, "
            "AWS_CA_BUNDLE or HTTPS_PROXY instead", name, ", ".join(unused))


def session_from_block(block: Any, name: str, region: str | None) -> boto3.Session:
    """A boto3 session with the block's credentials, in ``region``, else the block's region,
    else the machine's; its assumed role, if any, renewed before it expires."""
    region = region or block.region_name or environment_region()
    located = block.model_copy(update={"region_name": region, "assume_role_arn": None})
    try:
        session = located.get_boto3_session()
    except ProfileNotFound as e:
        raise ConfigurationError(f"AwsCredentials block {name!r}: {e} on this machine (the "
                                 f"block's profile_name is read from ~/.aws/config)") from None
    if block.assume_role_arn:
        return assumed_role_session(session, block, name)
    return session


def environment_region() -> str | None:
    """``AWS_REGION`` / ``AWS_DEFAULT_REGION``, the backend's own fallback (boto3 reads only
    the second)."""
    return next((os.environ[k] for k in REGION_ENVS if os.environ.get(k)), None)


class _RoleCredentials(CredentialProvider):
    """Hands botocore the refreshing credentials of the block's role."""

    METHOD = "assume-role"

    def __init__(self, credentials: DeferredRefreshableCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> DeferredRefreshableCredentials:
        return self._credentials


def assumed_role_session(source: boto3.Session, block: Any, name: str) -> boto3.Session:
    """A session on the block's ``assume_role_arn``, assumed with ``source``'s credentials
    on first use and again before each set expires (botocore renews refreshing credentials
    15 minutes ahead), with the block's ``assume_role_kwargs``."""
    source_credentials = source.get_credentials()
    if source_credentials is None:
        raise ConfigurationError(
            f"AwsCredentials block {name!r} assumes {block.assume_role_arn}, but neither the "
            f"block nor boto3's default chain has credentials to assume it with")
    extra = block.assume_role_kwargs.get_params_override()
    # prefect-aws's own default session name, so CloudTrail shows the same either way.
    extra.setdefault("RoleSessionName", f"prefect-session-{uuid.uuid4().hex[:8]}")
    fetcher = AssumeRoleCredentialFetcher(
        client_creator=source.client, source_credentials=source_credentials,
        role_arn=block.assume_role_arn, extra_args=extra)
    credentials = DeferredRefreshableCredentials(refresh_using=fetcher.fetch_credentials,
                                                 method=_RoleCredentials.METHOD)
    core = botocore.session.get_session()
    core.register_component("credential_provider",
                            CredentialResolver([_RoleCredentials(credentials)]))
    return boto3.Session(botocore_session=core, region_name=source.region_name)


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
