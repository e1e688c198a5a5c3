"""Fetching CIFAR-10: stream the archive with progress, verify its checksum, extract it safely,
and swap the result into place atomically. Plain functions, no Prefect: the ``download_data``
task wraps them, and benchmarks call them directly.

A bad checksum or a broken or hostile archive is a clear error and leaves no partial data
directory; a verified copy already in place is reused without any network access and is never
damaged by a failed attempt. A download is bounded: it is refused past a size cap and given up
at a deadline. URLs are shown only through ``display_url``: mirrors and presigned URLs carry
credentials and tokens, which no message, log line or record repeats.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from backends.files import (
    CHUNK,
    BadArchive,
    DataError,
    UnsafeArchive,
    atomic_write_text,
    safe_extract,
    sha256_file,
)
from model_src.contract import BATCH_DIR, find_batch_dir

DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DEFAULT_MD5 = "c58f30108f718f92721af3b95e74349a"
MARKER = ".cifar10-source.json"  # what the data directory was verified from
# CIFAR-10's archive is 170 MB: a download far larger is not that archive (a wrong URL, a
# hostile server), and would fill the disk before its checksum could tell.
DEFAULT_MAX_BYTES = 1 << 30
# 170 MB in 30 minutes is ~100 KB/s: slower than that, an unattended run gives up (and its
# task retries) rather than hang on a trickling server.
DEFAULT_DEADLINE_MINUTES = 30.0
DEFAULT_READ_TIMEOUT = 60.0  # seconds of silence from the server before a read fails

# Work directories: ``<data root>/.fetch-*``, one per download, removed when it ends. A kill
# leaves one behind (the archive and its extraction: ~350 MB), so each download first clears
# stale ones. Staleness is decided by a lock, not by age alone (a download can take its whole
# deadline): the download holds an exclusive flock on WORK_LOCK inside its directory until the
# directory is gone, and the kernel releases it when the process dies, even by SIGKILL. So a
# directory whose lock can be taken has no live owner. Pids were not used: they are reused,
# and meaningless across the containers that may share a data directory.
WORK_PREFIX = ".fetch-"
WORK_LOCK = ".owner.lock"
# A directory this young is left alone whatever its lock says: its owner may be between
# creating it and locking it.
WORK_GRACE_SECONDS = 60.0
# A directory without a lock file was made by a version of this code that took no lock: it is
# stale once no download of that version can still be running.
UNLOCKED_STALE_SECONDS = 24 * 3600.0

ProgressCallback = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)

__all__ = ["BadArchive", "ChecksumMismatch", "DataError", "Dataset", "DownloadTimedOut",
           "DownloadTooLarge", "InvalidUrl", "UnsafeArchive", "clear_stale_work_dirs",
           "display_url", "fetch_cifar10", "redact"]


class ChecksumMismatch(DataError):
    pass


class DownloadTooLarge(BadArchive):
    """The server offers more than the size cap: not the archive wanted (a wrong URL, a hostile
    server). Trying again won't help."""


class DownloadTimedOut(DataError):
    """The download did not finish within its deadline: a slow or trickling server."""


class InvalidUrl(DataError, ValueError):
    """The URL cannot be fetched as written (unsupported scheme, malformed): trying again won't
    help."""


@dataclass(frozen=True)
class Dataset:
    path: str  # the batch directory (data_batch_*, test_batch, batches.meta)
    url: str  # where it came from, as display_url shows it: no credentials, no query values
    md5: str  # of the archive it came from
    reused: bool  # True when a verified copy was already in place
    bytes_downloaded: int
    seconds: float
    files: dict[str, str]  # name → sha256


# -- URLs: the one redaction -------------------------------------------------------------------


def display_url(url: str) -> str:
    """``url`` as it may be shown: scheme, host, port and path; credentials become ``***@``
    and each query value ``***`` (presigned URLs and mirrors carry tokens there); no fragment.
    Every message, log line, run name, record and artifact that names a URL uses this."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # unbalanced brackets, a port that is not a number
        return "<malformed URL>"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    if "@" in parts.netloc:
        host = f"***@{host}"
    query = "&".join(f"{pair.partition('=')[0]}=***" if "=" in pair else "***"
                     for pair in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, query, ""))


def _secrets_in(url: str) -> list[str]:
    """The parts of ``url`` that display_url hides, longest first (as written and decoded).
    Pieces under 4 characters are left: replacing them would garble text, and hide nothing."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]
    pieces = [url]
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        pieces += [userinfo, *userinfo.split(":")]
    if parts.query:
        pieces.append(parts.query)
        pieces += [pair.partition("=")[2] or pair for pair in parts.query.split("&")]
    pieces += [urllib.parse.unquote_plus(piece) for piece in pieces]
    return sorted({p for p in pieces if len(p) >= 4}, key=len, reverse=True)


def redact(text: str, url: str) -> str:
    """``text`` (an error from the network stack, say) with ``url`` shown as display_url shows
    it, and each secret in it (password, token) replaced by ``***`` wherever it appears."""
    for secret in _secrets_in(url):
        text = text.replace(secret, display_url(url) if secret == url else "***")
    return text


def _url_digest(url: str) -> str:
    """Identifies the exact URL in the marker without storing its secrets."""
    return hashlib.sha256(url.encode()).hexdigest()


def _request(url: str) -> urllib.request.Request:
    """A request for ``url``. Credentials in it (``user:password@``), which urllib would take
    for part of the host name, become a Basic Authorization header that is not repeated to
    wherever a redirect leads."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return urllib.request.Request(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


# -- reuse: a verified copy already in place ---------------------------------------------------


def _same_source(marker: dict, url: str) -> bool:
    if "url_sha256" in marker:
        return marker["url_sha256"] == _url_digest(url)
    return marker.get("url") == url  # a marker written before URLs were redacted


def verified_copy(data_root: Path, url: str, md5: str | None) -> Dataset | None:
    """The dataset under ``data_root`` if it was extracted from an archive with this checksum
    (or, without a checksum, from this URL) and every file still hashes as recorded."""
    marker_path, batch_dir = data_root / MARKER, data_root / BATCH_DIR
    try:
        marker = json.loads(marker_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if (md5 and marker.get("md5") != md5.lower()) or (not md5 and not _same_source(marker, url)):
        return None
    files = marker.get("files") or {}
    for name, digest in files.items():
        path = batch_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            return None
    if not files:
        return None
    return Dataset(path=str(batch_dir), url=display_url(marker["url"]), md5=marker["md5"],
                   reused=True, bytes_downloaded=0, seconds=0.0, files=files)


# -- the transfer: size cap and deadline -------------------------------------------------------


@dataclass
class _Transfer:
    """One download's progress against its limits. Every refusal says what happened and that
    nothing was changed (the work directory goes, a copy in place stays as it was)."""

    shown: str  # the URL as display_url shows it
    max_bytes: int
    deadline_seconds: float
    started: float = field(default_factory=time.monotonic)
    size: int = 0
    total: int | None = None  # as announced by Content-Length
    digest: Any = field(default_factory=hashlib.md5)

    def announce(self, length: str | None) -> None:
        """Refuses, before reading a byte, a length announced over the cap."""
        self.total = int(length) if length and length.isdigit() else None
        if self.total is not None and self.total > self.max_bytes:
            raise DownloadTooLarge(
                f"refused to download {self.shown}: the server announces "
                f"{self.total / 1e6:.1f} MB, over the cap of {self.max_bytes / 1e6:.1f} MB "
                f"(data.max_bytes). Nothing was downloaded and nothing was changed.")
        self.check_deadline()

    def add(self, chunk: bytes) -> None:
        """Counts ``chunk`` in; stops the download past the cap or the deadline."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            announced = f" (it announced {self.total / 1e6:.1f} MB)" if self.total else ""
            raise DownloadTooLarge(
                f"stopped downloading {self.shown}: it sent more than the cap of "
                f"{self.max_bytes / 1e6:.1f} MB (data.max_bytes){announced}. The partial "
                f"download was deleted and nothing was changed.")
        self.digest.update(chunk)
        self.check_deadline()

    def check_deadline(self) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed > self.deadline_seconds:
            of = f" of {self.total / 1e6:.1f} MB" if self.total is not None else ""
            raise DownloadTimedOut(
                f"gave up downloading {self.shown}: not finished after {elapsed:.0f} s, past "
                f"the deadline of {self.deadline_seconds / 60:g} minutes "
                f"(data.deadline_minutes), with {self.size / 1e6:.1f} MB{of} received. The "
                f"partial download was deleted and nothing was changed.")


def _copy(response: Any, out: BinaryIO, transfer: _Transfer,
          progress: ProgressCallback | None) -> None:
    # read1 returns what has arrived (read(n) waits for all n bytes): a trickling server is
    # then checked against the deadline after every piece, not after a whole chunk.
    read = getattr(response, "read1", response.read)
    while chunk := read(CHUNK):
        transfer.add(chunk)
        out.write(chunk)
        if progress:
            progress(transfer.size, transfer.total)


def download(url: str, dest: Path, progress: ProgressCallback | None = None,
             timeout: float = DEFAULT_READ_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
             deadline_minutes: float = DEFAULT_DEADLINE_MINUTES) -> tuple[str, int]:
    """Streams ``url`` (http, https or file) into ``dest``; returns (md5, bytes).

    Refuses more than ``max_bytes``: at once when the server announces more, else as soon as
    more arrives. Gives up ``deadline_minutes`` after starting, checked after every read; a
    server that goes silent fails its read after ``timeout`` seconds, so a download ends at the
    latest one ``timeout`` past its deadline."""
    shown = display_url(url)
    try:
        scheme = urllib.parse.urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme not in ("http", "https", "file"):
        raise InvalidUrl(f"unsupported URL scheme {scheme!r} in {shown}; use http(s):// or "
                         f"file://")
    transfer = _Transfer(shown, max_bytes, deadline_minutes * 60)
    # The causes are not chained (``from None``): their text, which Prefect would log with the
    # traceback, may hold the URL; the message carries it redacted instead.
    try:
        with urllib.request.urlopen(_request(url), timeout=min(timeout, deadline_minutes * 60)) \
                as response, open(dest, "wb") as out:
            transfer.announce(response.headers.get("Content-Length"))
            _copy(response, out, transfer, progress)
    except DataError:
        raise
    except urllib.error.HTTPError as e:
        raise DataError(f"download of {shown} failed: HTTP {e.code} {e.reason}") from None
    except (http.client.InvalidURL, ValueError) as e:
        raise InvalidUrl(f"cannot download {shown}: {redact(str(e), url)}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DataError(f"download of {shown} failed after {transfer.size} bytes: "
                        f"{redact(str(e), url)}") from None
    if transfer.total is not None and transfer.size != transfer.total:
        raise DataError(f"download of {shown} was cut short: {transfer.size} of "
                        f"{transfer.total} bytes")
    return transfer.digest.hexdigest(), transfer.size


# -- work directories --------------------------------------------------------------------------


@contextmanager
def _work_dir(data_root: Path) -> Iterator[Path]:
    """A fresh ``.fetch-*`` directory under ``data_root``, locked as this process's until it
    is deleted (see WORK_LOCK)."""
    work = Path(tempfile.mkdtemp(dir=data_root, prefix=WORK_PREFIX))
    lock = os.open(work / WORK_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)  # only now: the directory is gone, no one can take it for stale


def _owned_by_a_live_download(work: Path, now: float) -> bool:
    try:
        age = now - work.stat().st_mtime
    except FileNotFoundError:
        return True  # gone already: nothing to do
    if age < WORK_GRACE_SECONDS:
        return True
    try:
        lock = os.open(work / WORK_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return age < UNLOCKED_STALE_SECONDS
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by close, just below
    except BlockingIOError:
        return True
    finally:
        os.close(lock)
    return False


def _tree_bytes(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size
               for d, _, names in os.walk(root) for f in names)


def clear_stale_work_dirs(data_root: Path) -> list[tuple[Path, int]]:
    """Deletes the ``.fetch-*`` work directories under ``data_root`` that no live download
    owns (left by a killed run); returns each one deleted with its size in bytes."""
    cleared = []
    now = time.time()
    for work in sorted(Path(data_root).glob(f"{WORK_PREFIX}*")):
        if work.is_symlink() or not work.is_dir() or _owned_by_a_live_download(work, now):
            continue
        size = _tree_bytes(work)
        shutil.rmtree(work, ignore_errors=True)
        if not work.exists():
            cleared.append((work, size))
    return cleared


# -- the whole fetch ---------------------------------------------------------------------------


def _batch_dir_in(extracted: Path) -> Path:
    try:
        return find_batch_dir(extracted)
    except FileNotFoundError:
        raise BadArchive("the archive holds no CIFAR-10 batches (data_batch_* and test_batch)") \
            from None


def fetch_cifar10(data_root: Path, url: str = DEFAULT_URL, md5: str | None = DEFAULT_MD5,
                  progress: ProgressCallback | None = None,
                  timeout: float = DEFAULT_READ_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
                  deadline_minutes: float = DEFAULT_DEADLINE_MINUTES) -> Dataset:
    """Makes ``data_root/cifar-10-batches-py`` a verified copy of the archive at ``url``.

    ``md5`` is the archive's expected checksum (override it for mirrors; None skips the
    check). Work happens in a temporary directory beside the data (stale ones, left by killed
    runs, are cleared first); the old copy is replaced only once the new one is complete.
    """
    started = time.perf_counter()
    data_root = Path(data_root)
    clear_stale_work_dirs(data_root)
    existing = verified_copy(data_root, url, md5)
    if existing is not None:
        return existing
    data_root.mkdir(parents=True, exist_ok=True)
    shown = display_url(url)
    with _work_dir(data_root) as work:
        archive = work / "archive.tar.gz"
        actual_md5, size = download(url, archive, progress, timeout, max_bytes, deadline_minutes)
        if md5 and actual_md5 != md5.lower():
            raise ChecksumMismatch(
                f"checksum mismatch for {shown}: expected md5 {md5}, got {actual_md5} "
                f"({size} bytes). Nothing was changed; for a mirror, pass its md5."
            )
        extracted = work / "extracted"
        safe_extract(archive, extracted)
        batch_dir = _batch_dir_in(extracted)
        files = {p.name: sha256_file(p) for p in sorted(batch_dir.iterdir()) if p.is_file()}
        dataset = Dataset(path=str(data_root / BATCH_DIR), url=shown, md5=actual_md5,
                          reused=False, bytes_downloaded=size,
                          seconds=time.perf_counter() - started, files=files)
        marker = {"url": shown, "url_sha256": _url_digest(url), "md5": actual_md5,
                  "files": files}
        _swap_into_place(batch_dir, data_root, marker, work)
    return dataset


def _swap_into_place(batch_dir: Path, data_root: Path, marker: dict, work: Path) -> None:
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
    atomic_write_text(data_root / MARKER, json.dumps(marker, indent=1))
