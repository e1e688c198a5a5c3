"""File helpers shared by the stages and the local emulation: content hashes, atomic and durable
writes, reading state records that a crash may have damaged, and the one safe way to unpack an
archive (the dataset's, a model.tar.gz)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

CHUNK = 1 << 20
MAX_EXTRACTED_BYTES = 2 * 1024**3  # CIFAR-10 is 178 MB, a model far less: far larger is hostile


class DataError(RuntimeError):
    """Input data cannot be used (fetched, unpacked, read); the message says why and what was
    left untouched."""


class BadArchive(DataError):
    """The archive is unreadable or does not hold what it should: trying again won't help."""


class UnsafeArchive(BadArchive):
    """The archive tries to write outside its directory, or holds links or devices."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_directory(directory: Path) -> None:
    """Makes a rename or a new file in ``directory`` durable: without it a power loss can undo
    an ``os.replace`` that already returned, or leave the name pointing at an empty file."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(dest: Path, mode: str) -> Iterator[IO[Any]]:
    """A temporary file beside ``dest`` to write; on success it is fsynced, renamed over
    ``dest`` and the directory fsynced, so that after a crash readers see the old file or the
    whole new one, never an empty or partial one. On failure it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())  # the data first: a rename may reach the disk before it
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(dest.parent)


def atomic_copy(src: Path, dest: Path) -> None:
    """Copies ``src`` to ``dest`` so that readers see the old file or the whole new one."""
    with _replacing(dest, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out, CHUNK)


def atomic_write_text(dest: Path, text: str) -> None:
    """Writes ``text`` to ``dest`` so that readers see the old file or the whole new one."""
    with _replacing(dest, "w") as out:
        out.write(text)


# What reading a damaged record can raise: OSError (unreadable file), ValueError (empty,
# truncated or garbled JSON, undecodable bytes, a bad date), KeyError and TypeError (a field
# missing, or JSON of the wrong shape).
RECORD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, TypeError)


class UnreadableRecord(ValueError):
    """A state record that exists but cannot be read (an empty file after a power loss,
    truncated or garbled JSON): the message names the file and says what to do."""

    def __init__(self, path: Path, error: object) -> None:
        super().__init__(f"unreadable record {path} ({error}): move it aside or delete it")
        self.path = path


def read_json_record(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``. Raises FileNotFoundError when there is none, and
    ``UnreadableRecord`` when it cannot be read or is not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        empty = isinstance(e, json.JSONDecodeError) and not e.doc.strip()
        raise UnreadableRecord(path, "empty file" if empty else e) from e
    if not isinstance(data, dict):
        raise UnreadableRecord(path, f"a JSON {type(data).__name__}, not an object")
    return data


def unreadable_message(path: Path, error: BaseException) -> str:
    """"unreadable record <path> (<why>): move it aside or delete it"."""
    if isinstance(error, UnreadableRecord):
        return str(error)
    return str(UnreadableRecord(path, f"{type(error).__name__}: {error}"))


def warn_unreadable(log: logging.Logger, path: Path, error: BaseException) -> None:
    """The one warning every reader gives when it skips a damaged record."""
    log.warning("skipping %s", unreadable_message(path, error))


def safe_extract(archive: Path, dest: Path, max_bytes: int = MAX_EXTRACTED_BYTES) -> None:
    """Extracts a (compressed) tar archive into ``dest``, refusing links, devices, absolute
    paths, paths that climb out of ``dest``, and archives that expand past ``max_bytes``.
    Raises ``UnsafeArchive``, or ``BadArchive`` for an unreadable one."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            total = 0
            for member in members:
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise UnsafeArchive(f"archive member {member.name!r} points outside the "
                                        f"extraction directory")
                if member.issym() or member.islnk():
                    raise UnsafeArchive(f"archive member {member.name!r} is a link")
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchive(f"archive member {member.name!r} is a device or "
                                        f"special file")
                total += member.size
                if total > max_bytes:
                    raise UnsafeArchive(f"archive expands past {max_bytes} bytes")
            # The "data" filter re-checks all of the above inside tarfile itself.
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    except UnsafeArchive:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise BadArchive(f"{archive.name} is not a readable tar archive "
                         f"(truncated or corrupt?): {e}") from e
