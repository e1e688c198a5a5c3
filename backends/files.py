"""File helpers shared by the stages and the local emulation: content hashes, atomic writes, and
the one safe way to unpack an archive (the dataset's, a model.tar.gz)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

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


def atomic_copy(src: Path, dest: Path) -> None:
    """Copies ``src`` to ``dest`` so that readers see the old file or the whole new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(dest: Path, text: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
