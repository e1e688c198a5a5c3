"""Backends: the thin client layer between the pipeline's tasks and SageMaker (``aws``) or its
local emulation (``local``). Nothing here imports Prefect."""

from __future__ import annotations

from typing import Any

from backends.base import Backend

BACKENDS = ("local", "aws")


def get_backend(name: str, **settings: Any) -> Backend:
    """The backend called ``name``, built with its settings."""
    if name == "local":
        from backends.local import LocalBackend

        return LocalBackend(**settings)
    if name == "aws":
        from backends.aws import AwsBackend

        return AwsBackend(**settings)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
