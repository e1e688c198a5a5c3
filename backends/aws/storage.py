"""The AWS backend's ``Storage``: training data and model artifacts in S3, under the configured
bucket (else SageMaker's default bucket) and prefix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backends.aws.s3 import mirror_directory, object_exists, s3_uri, why_unreadable
from backends.aws.session import AwsSession
from backends.base import LogCallback


class S3Storage:
    def __init__(self, aws: AwsSession, bucket: Callable[[], str], prefix: str) -> None:
        """``bucket``: resolved on first use (it may need the SDK to find the default one)."""
        self.aws = aws
        self.bucket = bucket
        self.prefix = prefix

    def upload(self, local_dir: Path, on_log: LogCallback | None = None) -> str:
        """Mirrors the directory to ``s3://{bucket}/{prefix}/data/``."""
        report = mirror_directory(self.aws.s3, Path(local_dir), self.bucket(),
                                  f"{self.prefix}/data")
        if on_log:
            on_log(report.summary())
        return report.uri

    def exists(self, uri: str) -> bool:
        return uri.startswith("s3://") and object_exists(self.aws.s3, uri)

    def why_not_reusable(self, uri: str) -> str | None:
        """Only artifacts under this backend's bucket and prefix are reused. The cache key
        names neither (keys stay stable across a bucket move), while the registry group is
        shared by the whole account: a version may point at another bucket or prefix (an
        earlier configuration, a colleague's run) whose objects the caller's policy does not
        cover. Those are not even asked about; ours are, and a 403 is "not reusable" too."""
        root = s3_uri(self.bucket(), f"{self.prefix}/")
        if not uri.startswith(root):
            return f"it is outside this backend's bucket and prefix ({root})"
        return why_unreadable(self.aws.s3, uri)
