"""What made a model, and whether it may replace the one the team trusts: the digest of the
shipped code, the training cache key, and the promotion gate."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

from backends.base import APPROVED, PENDING, REJECTED, ModelVersion
from model_src.cifar import SOURCE_IGNORE


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


def decide(test_accuracy: float, smoke_passed: bool, smoke_accuracy: float,
           accuracy_floor: float, champion: ModelVersion | None, tolerance: float,
           auto_approve: bool) -> tuple[str, str]:
    """(status, reason) of a new version. Approved when its smoke test passed and its test
    accuracy is at least the champion's minus ``tolerance`` (the first version: when its smoke
    test passed); else Rejected. With ``auto_approve`` off a person decides: pending."""
    if not smoke_passed:
        return REJECTED, (f"smoke test failed: {smoke_accuracy:.3f} < floor "
                          f"{accuracy_floor:.3f}")
    if champion is None:
        verdict, why = APPROVED, f"first version, smoke test passed ({smoke_accuracy:.3f})"
    else:
        bar = champion.metrics.get("test_accuracy", 0.0) - tolerance
        comparison = (f"{test_accuracy:.4f} {'>=' if test_accuracy >= bar else '<'} champion "
                      f"v{champion.version} {champion.metrics.get('test_accuracy', 0.0):.4f} - "
                      f"{tolerance:g}")
        verdict = APPROVED if test_accuracy >= bar else REJECTED
        why = comparison
    if not auto_approve:
        return PENDING, f"awaiting manual approval (the gate says {verdict.lower()}: {why})"
    return verdict, why
