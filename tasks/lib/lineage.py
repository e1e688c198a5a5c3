"""What made a model: the digest of the shipped code and the training cache key. (Whether it
may replace the one the team trusts is tasks.lib.promotion_gate's question.)"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

from model_src.contract import SOURCE_IGNORE


def code_digest(source_dir: Path) -> str:
    """sha256 over the shipped code: every file's path and bytes, in a stable order, without
    what is never shipped (caches, hidden files). One changed byte changes it."""
    digest = hashlib.sha256()
    root = Path(source_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(fnmatch.fnmatch(part, pattern) for part in relative.parts
               for pattern in SOURCE_IGNORE):
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(*, data_md5: str, code: str, hyperparameters: dict[str, object],
              instance_type: str, instance_count: int, backend: str) -> str:
    """The training's identity: the same key, the same trained model (the training is seeded),
    so a completed job with this key can be reused instead of paid for again."""
    identity = {"data_md5": data_md5, "code_digest": code,
                "hyperparameters": {k: str(v) for k, v in sorted(hyperparameters.items())},
                "instance_type": instance_type, "instance_count": instance_count,
                "backend": backend}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
