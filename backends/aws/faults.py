"""Which AWS failures outlast nothing but time: the ones worth asking again about.

botocore's standard retry mode already retries throttling, 5xx answers and dropped connections
a few times within one call. What still fails after that, while the backend follows a training
job for minutes or hours, is a longer outage; asking again later usually works. So do expired
credentials when the chain can refresh them (an SSO login renewed meanwhile, rotated keys, a
credentials block's new session), which takes a fresh session. Everything else (a missing
permission, a malformed request, a job that is gone) fails the same way again.

A quota refusal (``ResourceLimitExceeded``) is a case of its own: it lasts until other jobs end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    TokenRetrievalError,
)

from backends.aws.errors import error_code

# botocore's own lists (botocore.retries.standard), and what SageMaker says when it is busy.
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException",
    "RequestThrottled", "SlowDown", "EC2ThrottledException"})
SERVER_FAULT_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalFailure",
    "InternalError", "InternalServerError", "InternalServerException", "ServiceUnavailable",
    "ServiceUnavailableException"})
EXPIRED_CREDENTIALS_CODES = frozenset({"ExpiredToken", "ExpiredTokenException",
                                       "RequestExpired"})

TRANSIENT = "transient"  # ask again later
CREDENTIALS = "credentials"  # ask again later, with a fresh session


def aws_cause(error: BaseException) -> BaseException:
    """The botocore error behind ``error``: the backend raises its own errors ``from`` it."""
    seen = error
    while seen is not None and not isinstance(seen, ClientError | BotoCoreError):
        seen = seen.__cause__
    return seen if seen is not None else error


def fault_kind(error: BaseException) -> str | None:
    """``TRANSIENT``, ``CREDENTIALS`` (a fresh session may cure it), or None: asking again
    would fail the same way."""
    cause = aws_cause(error)
    if isinstance(cause, ClientError):
        code = error_code(cause)
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in EXPIRED_CREDENTIALS_CODES:
            return CREDENTIALS
        if code in THROTTLING_CODES or code in SERVER_FAULT_CODES or status in {502, 503, 504}:
            return TRANSIENT
        return None
    if isinstance(cause, TokenRetrievalError | CredentialRetrievalError):
        return CREDENTIALS
    if isinstance(cause, ConnectionError | HTTPClientError):  # endpoint, timeouts, resets
        return TRANSIENT
    return None


# "The account-level service limit 'ml.m5.xlarge for training job usage' is 1 Instances, with
# current utilization of 1 Instances and a request delta of 1 Instances. Please use AWS Service
# Quotas to request an increase for this quota."
QUOTA_MESSAGE = re.compile(r"limit '(?P<quota>[^']+)' is (?P<limit>\d+) \w+, with current "
                           r"utilization of (?P<used>\d+) \w+ and a request delta of "
                           r"(?P<delta>\d+)")


@dataclass(frozen=True)
class QuotaRefusal:
    """A ``ResourceLimitExceeded`` answer, read."""

    message: str  # AWS's
    quota: str | None = None  # e.g. "ml.m5.xlarge for training job usage"
    limit: int | None = None
    used: int | None = None
    requested: int | None = None

    @classmethod
    def of(cls, error: ClientError) -> QuotaRefusal:
        message = str(error.response.get("Error", {}).get("Message", "")) or str(error)
        match = QUOTA_MESSAGE.search(message)
        if match is None:
            return cls(message)
        return cls(message, match["quota"], int(match["limit"]), int(match["used"]),
                   int(match["delta"]))

    @property
    def can_clear(self) -> bool:
        """Whether other jobs ending can make room: not when the request alone is over the
        limit (a quota of 0 for the instance type, more instances than it allows). An
        unreadable message gets the benefit of the doubt."""
        return self.limit is None or self.requested is None or self.requested <= self.limit

    def how_to_raise(self) -> str:
        quota = f"'{self.quota}'" if self.quota else "the one AWS named"
        query = (f" (its code: aws service-quotas list-service-quotas --service-code sagemaker "
                 f"--query \"Quotas[?QuotaName=='{self.quota}'].QuotaCode\")"
                 if self.quota else "")
        return (f"this is the AWS account's SageMaker quota {quota}, not the pipeline's: ask "
                f"for more in the Service Quotas console (Amazon SageMaker), or with aws "
                f"service-quotas request-service-quota-increase --service-code sagemaker "
                f"--quota-code CODE --desired-value N{query}; or pick another instance type, "
                f"fewer instances, or fewer jobs at once (a sweep's max_parallel)")


def quota_refusal(error: BaseException) -> QuotaRefusal | None:
    cause = aws_cause(error)
    if isinstance(cause, ClientError) and error_code(cause) == "ResourceLimitExceeded":
        return QuotaRefusal.of(cause)
    return None
