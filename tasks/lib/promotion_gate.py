"""The promotion gate: whether a newly registered model version may replace the one the team
trusts (the registry's approved champion)."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import APPROVED, PENDING, REJECTED, ModelVersion


@dataclass(frozen=True)
class GatePolicy:
    """How the gate decides: approve within ``tolerance`` of the champion's test accuracy,
    or, without ``auto_approve``, leave the decision to a person (pending)."""

    tolerance: float = 0.005
    auto_approve: bool = True


def verdict(test_accuracy: float, smoke_passed: bool, smoke_accuracy: float,
            accuracy_floor: float, champion: ModelVersion | None, tolerance: float,
            auto_approve: bool) -> tuple[str, str]:
    """(status, reason) of a new version. Approved when its smoke test passed and its test
    accuracy is at least the champion's minus ``tolerance`` (the first version: when its smoke
    test passed); else Rejected. With ``auto_approve`` off a person decides: pending."""
    if not smoke_passed:
        return REJECTED, (f"smoke test failed: {smoke_accuracy:.3f} < floor "
                          f"{accuracy_floor:.3f}")
    if champion is None:
        status, why = APPROVED, f"first version, smoke test passed ({smoke_accuracy:.3f})"
    else:
        bar = champion.metrics.get("test_accuracy", 0.0) - tolerance
        comparison = (f"{test_accuracy:.4f} {'>=' if test_accuracy >= bar else '<'} champion "
                      f"v{champion.version} {champion.metrics.get('test_accuracy', 0.0):.4f} - "
                      f"{tolerance:g}")
        status = APPROVED if test_accuracy >= bar else REJECTED
        why = comparison
    if not auto_approve:
        return PENDING, f"awaiting manual approval (the gate says {status.lower()}: {why})"
    return status, why
