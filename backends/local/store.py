"""A directory-backed artifact store with ``file://`` URIs: the local stand-in for S3.

Writes are atomic (temporary file, then rename), and every uploaded directory carries a manifest
of sha256 hashes so re-uploading unchanged data copies nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

from backends.base import LogCallback, UploadReport
from backends.files import atomic_copy, atomic_write_text, sha256_file

MANIFEST = ".manifest.json"


def path_from_uri(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"not a file:// URI: {uri}")
    return Path(unquote(parsed.path))


class LocalStore:
    """Keys map to paths under ``root``; URIs are ``file://`` URLs to those paths. The local
    backend's ``Storage``: training data goes to the key ``data``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"key {key!r} leaves the store")
        return path

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def put_file(self, src: Path, key: str) -> str:
        atomic_copy(src, self.path(key))
        return self.uri(key)

    def upload_dir(self, src: Path, key: str) -> UploadReport:
        """Mirrors directory ``src`` at ``key``: copies new or changed files, skips files whose
        sha256 matches the manifest, removes files that are no longer in ``src``."""
        src = Path(src)
        if not src.is_dir():
            raise FileNotFoundError(f"no directory to upload at {src}")
        dest = self.path(key)
        manifest_path = dest / MANIFEST
        try:
            previous = json.loads(manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            previous = {}
        current: dict[str, str] = {}
        uploaded = skipped = nbytes = 0
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = file.relative_to(src).as_posix()
            digest = sha256_file(file)
            current[rel] = digest
            target = dest / rel
            if previous.get(rel) == digest and target.is_file() \
                    and target.stat().st_size == file.stat().st_size:
                skipped += 1
                continue
            atomic_copy(file, target)
            uploaded += 1
            nbytes += file.stat().st_size
        removed = 0
        for rel in set(previous) - set(current):
            (dest / rel).unlink(missing_ok=True)
            removed += 1
        atomic_write_text(manifest_path, json.dumps(current, indent=1, sort_keys=True))
        return UploadReport(self.uri(key), uploaded, skipped, removed, nbytes)

    def upload(self, local_dir: Path, on_log: LogCallback | None = None) -> str:
        report = self.upload_dir(Path(local_dir), "data")
        if on_log:
            on_log(report.summary())
        return report.uri

    def exists(self, uri: str) -> bool:
        return uri.startswith("file://") and path_from_uri(uri).is_file()

    def why_not_reusable(self, uri: str) -> str | None:
        """Only artifacts in this store are reused: a file elsewhere (another state directory's,
        one a registry record points at by hand) may change or vanish under us, and retention,
        which keeps what the registry needs, only looks after the store."""
        if not uri.startswith("file://"):
            return "it is not a file:// URI"
        path = path_from_uri(uri).resolve()
        if not path.is_relative_to(self.root):
            return f"it is outside this backend's store ({self.root})"
        return None if path.is_file() else "it does not exist"
