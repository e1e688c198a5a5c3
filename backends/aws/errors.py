"""AWS errors turned into the backend's errors, with messages that say what to fix.

botocore raises generic ``ClientError``s whose text is written for AWS engineers. The pipeline's
user needs to know which setting is missing or which permission to grant, so every AWS call the
backend makes runs inside ``aws_errors("what we were doing")``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from botocore.exceptions import (
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from backends.base import BackendError, ConfigurationError

DOCS = "docs/aws.md"

CREDENTIALS_HELP = (
    "no AWS credentials found: run `aws configure` (or `aws sso login --profile NAME` and set "
    "AWS_PROFILE), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; on EC2, ECS or "
    f"SageMaker an attached role is picked up by itself. See {DOCS}."
)
REGION_HELP = (
    "no AWS region configured: pass --region (aws.region in the flow config), set AWS_REGION "
    f"(or AWS_DEFAULT_REGION), or set `region` in your AWS profile. See {DOCS}."
)
ROLE_HELP = (
    "no SageMaker execution role configured: pass --role-arn (aws.role_arn in the flow config) "
    "or set SAGEMAKER_ROLE_ARN to the ARN of a role that SageMaker may assume, e.g. "
    f"arn:aws:iam::123456789012:role/cifar10-sagemaker. {DOCS} has its policy."
)

ACCESS_DENIED_CODES = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation",
                       "Forbidden", "403"}
BAD_CREDENTIALS_CODES = {"ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId",
                         "UnrecognizedClientException", "SignatureDoesNotMatch",
                         "InvalidAccessKeyId", "InvalidToken"}
# AWS names the denied action in most services' messages, e.g. "User: arn:... is not authorized
# to perform: sagemaker:CreateTrainingJob on resource: ...".
DENIED_ACTION = re.compile(r"not authorized to perform:? ([A-Za-z0-9-]+:[A-Za-z0-9*]+)")
# S3 only says "Access Denied"; these are the actions behind the operations the backend uses.
S3_ACTIONS = {
    "PutObject": "s3:PutObject", "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject", "CompleteMultipartUpload": "s3:PutObject",
    "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
    "ListObjectsV2": "s3:ListBucket", "HeadBucket": "s3:ListBucket",
    "DeleteObject": "s3:DeleteObject", "DeleteObjects": "s3:DeleteObject",
    "CreateBucket": "s3:CreateBucket",
}


def denied_action(message: str, operation: str | None = None) -> str | None:
    """The IAM action AWS says was denied; for S3, which does not say, the action behind the
    operation (marked as likely)."""
    match = DENIED_ACTION.search(message or "")
    if match:
        return match.group(1)
    if operation in S3_ACTIONS:
        return f"{S3_ACTIONS[operation]} (likely)"
    return None


def translate(error: BaseException, doing: str) -> BaseException:
    """The backend error for an AWS error raised while ``doing`` something; other exceptions
    are returned unchanged."""
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return ConfigurationError(f"{doing}: {CREDENTIALS_HELP}")
    if isinstance(error, NoRegionError):
        return ConfigurationError(f"{doing}: {REGION_HELP}")
    if not isinstance(error, ClientError):
        return error
    details = error.response.get("Error", {})
    code = str(details.get("Code", ""))
    message = str(details.get("Message", "")) or str(error)
    if code in ACCESS_DENIED_CODES:
        action = denied_action(message, error.operation_name)
        missing = f"; grant {action} to the caller" if action else ""
        # A permission is missing: configuration to fix, not a fault that a retry could cure.
        return ConfigurationError(f"{doing}: access denied by AWS{missing} (policies in "
                                  f"{DOCS}). AWS said: {message}")
    if code in BAD_CREDENTIALS_CODES:
        return ConfigurationError(f"{doing}: AWS rejected the credentials ({code}: {message}); "
                                  f"refresh them (`aws sso login`, new keys). See {DOCS}.")
    if "could not access model data" in message.lower():
        # CreateModel: "Could not access model data at s3://.... Please ensure that the role
        # "arn:..." exists and that its trust relationship policy allows the action
        # "sts:AssumeRole" ..." names the role and AssumeRole, but the cause is reading S3.
        return ConfigurationError(
            f"{doing}: SageMaker cannot read the model artifact: {message} — the execution "
            f"role needs s3:GetObject on it (and kms:Decrypt if the bucket is encrypted with "
            f"a KMS key), and the bucket must be in the endpoint's region (policies in {DOCS})")
    if "assume" in message.lower() and "role" in message.lower():
        # CreateTrainingJob/CreateModel: "Could not assume role arn:... Please ensure that the
        # role exists and allows principal 'sagemaker.amazonaws.com' to assume the role."
        return ConfigurationError(f"{doing}: SageMaker cannot assume the execution role: "
                                  f"{message} (the role's trust policy is in {DOCS})")
    if code == "ResourceLimitExceeded":
        return BackendError(f"{doing}: {message} — request a higher SageMaker quota for this "
                            f"instance type (Service Quotas console) or pick another type")
    return BackendError(f"{doing}: {code}: {message}")


@contextmanager
def aws_errors(doing: str) -> Iterator[None]:
    """Re-raises AWS errors from the block as ``BackendError``/``ConfigurationError``."""
    try:
        yield
    except (ClientError, NoCredentialsError, PartialCredentialsError, NoRegionError) as e:
        raise translate(e, doing) from e


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def is_not_found(error: ClientError) -> bool:
    """Whether AWS says the resource does not exist. SageMaker has no dedicated code for it:
    DescribeTrainingJob says ValidationException "Requested resource not found.", the endpoint
    calls "Could not find endpoint ..."; S3 says 404/NoSuchKey."""
    code = error_code(error)
    message = str(error.response.get("Error", {}).get("Message", "")).lower()
    if code in {"ResourceNotFound", "ResourceNotFoundException", "NoSuchKey", "404", "NotFound"}:
        return True
    return code == "ValidationException" and any(
        phrase in message for phrase in ("could not find", "not found", "does not exist"))


T = TypeVar("T")


def unless_missing(doing: str, call: Callable[..., T], **params: Any) -> T | None:
    """``call(**params)``, or None when AWS says the resource does not exist; any other AWS
    error is translated as by ``aws_errors(doing)``."""
    with aws_errors(doing):
        try:
            return call(**params)
        except ClientError as e:
            if is_not_found(e):
                return None
            raise
