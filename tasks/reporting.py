"""Logging and Prefect artifacts for the tasks, degrading to plain logging outside a run (so a
task's function can be called from a script or a benchmark without Prefect)."""

from __future__ import annotations

import base64
import logging
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError

# The Prefect UI renders images embedded as data URIs in markdown artifacts, stored in Prefect's
# own database. Past a few MB the UI shows a blank block, so keep pictures small.
MAX_EMBEDDED_IMAGE_BYTES = 1_000_000

_fallback = logging.getLogger("cifar10_pipeline")


def in_run() -> bool:
    try:
        get_run_context()
    except MissingContextError:
        return False
    return True


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (its lines reach the UI), else a
    standard logger."""
    if in_run():
        from prefect import get_run_logger

        return get_run_logger()
    return _fallback


def markdown_image(image: bytes, alt: str) -> str:
    """The image (PNG or JPEG, told by its signature) embedded in markdown as a data URL."""
    if len(image) > MAX_EMBEDDED_IMAGE_BYTES:
        raise ValueError(f"{alt}: {len(image)} bytes is too large to embed in an artifact")
    mime = "image/jpeg" if image.startswith(b"\xff\xd8") else "image/png"
    return f"![{alt}](data:{mime};base64,{base64.b64encode(image).decode()})"


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if in_run():
        create_markdown_artifact(markdown=markdown, key=key, description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if in_run():
        create_table_artifact(table=rows, key=key, description=description)


class Progress:
    """A Prefect progress artifact (a bar on the run's page), updated as work advances."""

    def __init__(self, key: str, description: str) -> None:
        self.artifact_id: UUID | None = None
        if in_run():
            self.artifact_id = create_progress_artifact(0.0, key=key, description=description)

    def update(self, percent: float, description: str | None = None) -> None:
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, max(0.0, min(100.0, percent)),
                                     description=description)
