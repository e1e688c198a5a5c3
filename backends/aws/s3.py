"""S3 for the AWS backend: mirror the data directory into the bucket (skipping unchanged
objects), and read small files out of a job's ``output.tar.gz``."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError

from backends.aws.errors import (
    ACCESS_DENIED_CODES,
    aws_errors,
    denied_action,
    error_code,
    is_not_found,
    unless_missing,
)
from backends.base import BackendError, UploadReport
from backends.files import sha256_file

SHA256_METADATA = "sha256"  # x-amz-meta-sha256: ETags are not content hashes for multipart
MAX_OUTPUT_ARCHIVE_BYTES = 64 << 20  # output.tar.gz holds metrics.json; refuse anything huge


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def mirror_directory(s3: Any, local_dir: Path, bucket: str, prefix: str) -> UploadReport:
    """Makes ``s3://bucket/prefix/`` hold exactly the files of ``local_dir``: uploads new or
    changed files, skips those whose size and sha256 (kept in the object's metadata) match,
    deletes objects that are no longer local, so the training channel is the dataset and
    nothing else. Returns the channel URI with its trailing slash (an S3Prefix without one
    would also match ``data-old/``)."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"no directory to upload at {local_dir}")
    prefix = prefix.strip("/") + "/"
    where = s3_uri(bucket, prefix)
    with aws_errors(f"listing {where}"):
        existing: dict[str, int] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            existing.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    uploaded = skipped = nbytes = 0
    current = set()
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        key = prefix + file.relative_to(local_dir).as_posix()
        current.add(key)
        size = file.stat().st_size
        digest = sha256_file(file)
        if existing.get(key) == size and _stored_sha256(s3, bucket, key) == digest:
            skipped += 1
            continue
        _upload(s3, file, bucket, key, digest)
        uploaded += 1
        nbytes += size
    stale = sorted(set(existing) - current)
    failed: list[dict[str, str]] = []
    with aws_errors(f"deleting stale objects under {where}"):
        for i in range(0, len(stale), 1000):  # DeleteObjects takes at most 1000 keys
            response = s3.delete_objects(Bucket=bucket, Delete={
                "Objects": [{"Key": k} for k in stale[i:i + 1000]], "Quiet": True})
            # A 200 answer can still list keys it did not delete (access denied, object lock).
            failed += response.get("Errors", [])
    if failed:
        shown = ", ".join(f"{e.get('Key')} ({e.get('Code')}: {e.get('Message')})"
                          for e in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        hint = (f"; grant {denied_action('', 'DeleteObjects')}"
                if any(e.get("Code") == "AccessDenied" for e in failed) else "")
        raise BackendError(
            f"could not delete {len(failed)} stale object(s) under {where}: {shown}{more}. "
            f"They would be trained on as part of the channel; delete them{hint}")
    return UploadReport(where, uploaded, skipped, len(stale), nbytes)


def _stored_sha256(s3: Any, bucket: str, key: str) -> str | None:
    head = unless_missing(f"reading {s3_uri(bucket, key)}", s3.head_object, Bucket=bucket,
                          Key=key)
    return None if head is None else head.get("Metadata", {}).get(SHA256_METADATA)


def _upload(s3: Any, file: Path, bucket: str, key: str, digest: str) -> None:
    """Managed transfer (multipart and parallel for large files), with the hash attached."""
    uri = s3_uri(bucket, key)
    try:
        with aws_errors(f"uploading {file.name} to {uri}"):
            s3.upload_file(str(file), bucket, key,
                           ExtraArgs={"Metadata": {SHA256_METADATA: digest}})
    except S3UploadFailedError as e:  # the transfer manager wraps the ClientError in text
        hint = (f"; grant {denied_action('', 'PutObject')} on {uri}"
                if "AccessDenied" in str(e) else "")
        raise BackendError(f"uploading {file.name} to {uri} failed{hint}: {e}") from e


def object_exists(s3: Any, uri: str) -> bool:
    bucket, key = parse_s3_uri(uri)
    return unless_missing(f"checking {uri}", s3.head_object, Bucket=bucket, Key=key) is not None


def why_unreadable(s3: Any, uri: str) -> str | None:
    """Why the object at ``uri`` cannot be read (None: it can). Unlike ``object_exists``, a
    403 is an answer, not an error: S3 answers 403 for a missing object too when the caller
    lacks ``s3:ListBucket`` on the bucket, so "refused" may mean "missing"; either way the
    object is of no use to a caller that cannot read it. Other errors (credentials, region,
    throttling) are raised, translated, as everywhere else."""
    bucket, key = parse_s3_uri(uri)
    with aws_errors(f"checking {uri}"):
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if is_not_found(e):
                return "it does not exist"
            if error_code(e) in ACCESS_DENIED_CODES:
                return (f"S3 refused to say whether it exists (403: s3:GetObject on it, or "
                        f"s3:ListBucket on bucket {bucket} when it is missing, is not granted)")
            raise
    return None


def read_tar_member(s3: Any, uri: str, name: str) -> bytes | None:
    """The file ``name`` from the tar.gz at ``uri``; None when the archive or the member is
    missing (a job that wrote no output data)."""
    bucket, key = parse_s3_uri(uri)
    response = unless_missing(f"reading {uri}", s3.get_object, Bucket=bucket, Key=key)
    if response is None:
        return None
    if response.get("ContentLength", 0) > MAX_OUTPUT_ARCHIVE_BYTES:
        response["Body"].close()
        return None
    with aws_errors(f"reading {uri}"):
        data = response["Body"].read()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.removeprefix("./") == name:
                    extracted = tar.extractfile(member)
                    return extracted.read() if extracted else None
    except tarfile.TarError:
        return None
    return None
