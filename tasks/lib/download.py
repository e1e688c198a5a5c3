"""Fetching CIFAR-10: stream the archive with progress, verify its checksum, extract it safely,
and swap the result into place atomically. Plain functions, no Prefect: the ``download_data``
task wraps them, and benchmarks call them directly.

A bad checksum or a broken or hostile archive is a clear error and leaves no partial data
directory; a verified copy already in place is reused without any network access and is never
damaged by a failed attempt.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from backends.files import (
    CHUNK,
    BadArchive,
    DataError,
    UnsafeArchive,
    safe_extract,
    sha256_file,
)
from model_src.cifar import BATCH_DIR, find_batch_dir

DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DEFAULT_MD5 = "c58f30108f718f92721af3b95e74349a"
MARKER = ".cifar10-source.json"  # what the data directory was verified from

ProgressCallback = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)

__all__ = ["BadArchive", "ChecksumMismatch", "DataError", "Dataset", "UnsafeArchive",
           "fetch_cifar10"]


class ChecksumMismatch(DataError):
    pass


@dataclass(frozen=True)
class Dataset:
    path: str  # the batch directory (data_batch_*, test_batch, batches.meta)
    url: str
    md5: str  # of the archive it came from
    reused: bool  # True when a verified copy was already in place
    bytes_downloaded: int
    seconds: float
    files: dict[str, str]  # name → sha256


def display_url(url: str) -> str:
    """The URL without credentials or query string (mirrors may carry tokens)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def verified_copy(data_root: Path, url: str, md5: str | None) -> Dataset | None:
    """The dataset under ``data_root`` if it was extracted from an archive with this checksum
    (or, without a checksum, from this URL) and every file still hashes as recorded."""
    marker_path, batch_dir = data_root / MARKER, data_root / BATCH_DIR
    try:
        marker = json.loads(marker_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if (md5 and marker.get("md5") != md5.lower()) or (not md5 and marker.get("url") != url):
        return None
    files = marker.get("files") or {}
    for name, digest in files.items():
        path = batch_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            return None
    if not files:
        return None
    return Dataset(path=str(batch_dir), url=marker["url"], md5=marker["md5"], reused=True,
                   bytes_downloaded=0, seconds=0.0, files=files)


def download(url: str, dest: Path, progress: ProgressCallback | None = None,
             timeout: float = 60.0) -> tuple[str, int]:
    """Streams ``url`` (http, https or file) into ``dest``; returns (md5, bytes)."""
    scheme = urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise DataError(f"unsupported URL scheme {scheme!r} in {url}; use http(s):// or file://")
    digest, size = hashlib.md5(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if progress:
                    progress(size, total)
    except urllib.error.HTTPError as e:
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"download of {url} failed after {size} bytes: {e}") from e
    if total is not None and size != total:
        raise DataError(f"download of {url} was cut short: {size} of {total} bytes")
    return digest.hexdigest(), size


def _batch_dir_in(extracted: Path) -> Path:
    try:
        return find_batch_dir(extracted)
    except FileNotFoundError:
        raise BadArchive("the archive holds no CIFAR-10 batches (data_batch_* and test_batch)") \
            from None


def fetch_cifar10(data_root: Path, url: str = DEFAULT_URL, md5: str | None = DEFAULT_MD5,
                  progress: ProgressCallback | None = None, timeout: float = 60.0) -> Dataset:
    """Makes ``data_root/cifar-10-batches-py`` a verified copy of the archive at ``url``.

    ``md5`` is the archive's expected checksum (override it for mirrors; None skips the
    check). Work happens in a temporary directory beside the data; the old copy is replaced
    only once the new one is complete.
    """
    started = time.perf_counter()
    data_root = Path(data_root)
    existing = verified_copy(data_root, url, md5)
    if existing is not None:
        return existing
    data_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_root, prefix=".fetch-") as tmp:
        work = Path(tmp)
        archive = work / "archive.tar.gz"
        actual_md5, size = download(url, archive, progress, timeout)
        if md5 and actual_md5 != md5.lower():
            raise ChecksumMismatch(
                f"checksum mismatch for {url}: expected md5 {md5}, got {actual_md5} "
                f"({size} bytes). Nothing was changed; for a mirror, pass its md5."
            )
        extracted = work / "extracted"
        safe_extract(archive, extracted)
        batch_dir = _batch_dir_in(extracted)
        files = {p.name: sha256_file(p) for p in sorted(batch_dir.iterdir()) if p.is_file()}
        dataset = Dataset(path=str(data_root / BATCH_DIR), url=url, md5=actual_md5,
                          reused=False, bytes_downloaded=size,
                          seconds=time.perf_counter() - started, files=files)
        _swap_into_place(batch_dir, data_root, dataset, work)
    return dataset


def _swap_into_place(batch_dir: Path, data_root: Path, dataset: Dataset, work: Path) -> None:
    """Moves the new batch directory to ``data_root/cifar-10-batches-py``. The old copy is
    moved aside (into ``work``, deleted with it) and put back if the move fails."""
    target = data_root / BATCH_DIR
    (data_root / MARKER).unlink(missing_ok=True)
    previous = work / "previous"
    if target.exists():
        target.rename(previous)
    try:
        batch_dir.rename(target)
    except OSError:
        if previous.exists():
            previous.rename(target)
        raise
    marker = {k: v for k, v in asdict(dataset).items() if k in ("url", "md5", "files")}
    tmp_marker = work / MARKER
    tmp_marker.write_text(json.dumps(marker, indent=1))
    tmp_marker.replace(data_root / MARKER)
