"""Reusing a completed training: the registry finds the candidates, the store says whether
their artifacts can still be used, the training jobs give their results. One function over a
backend's collaborators, the same on every family."""

from __future__ import annotations

import logging

from backends.base import Backend, LogCallback, TrainingResult

log = logging.getLogger(__name__)


def cached_training(backend: Backend, group: str, cache_key: str,
                    on_log: LogCallback | None = None) -> TrainingResult | None:
    """The newest completed training of this pipeline with ``cache_key`` whose model artifact
    ``backend`` can still reuse, found through the registry's versions; None when there is
    none (the run trains). A candidate passed over for its artifact is reported to ``on_log``
    (else this module's logger) with the reason: a lookup never fails a run that training
    would let succeed."""
    report = on_log or log.info
    for version in sorted(backend.registry.versions(group), key=lambda v: -v.version):
        if version.cache_key != cache_key:
            continue
        if refusal := backend.storage.why_not_reusable(version.model_uri):
            report(f"cache: {group} v{version.version} (job {version.training_job}) has "
                   f"this cache key, but its model {version.model_uri} is not reusable: "
                   f"{refusal}; passed over")
            continue
        result = backend.jobs.completed(version.training_job)
        if result is not None and result.model_uri == version.model_uri:
            return result
    return None
