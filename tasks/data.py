"""Data stages: download (with checksum, safe extraction and reuse) and a preview grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from model_src.contract import CLASSES, read_batch
from tasks.lib.download import (
    DEFAULT_DEADLINE_MINUTES,
    DEFAULT_MAX_BYTES,
    Dataset,
    clear_stale_work_dirs,
    display_url,
    fetch_cifar10,
)
from tasks.lib.plots import image_grid
from tasks.reporting import logger, markdown_image, publish_markdown
from tasks.retries import retry_transient


def _download_run_name(parameters: dict[str, Any]) -> str:
    """The task run's name in the UI, with the URL redacted (it may carry a token)."""
    return f"download {display_url(parameters['url'])}"


@task(name="download_data", task_run_name=_download_run_name, retries=2,
      retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def download_data(url: str, md5: str | None, data_root: Path,
                  max_bytes: int = DEFAULT_MAX_BYTES,
                  deadline_minutes: float = DEFAULT_DEADLINE_MINUTES) -> Dataset:
    """Fetches CIFAR-10 into ``data_root`` unless a verified copy is already there; refuses
    more than ``max_bytes`` and gives up an attempt after ``deadline_minutes``."""
    log = logger()
    shown = display_url(url)
    cleared = clear_stale_work_dirs(Path(data_root))
    if cleared:
        log.info("removed %d stale download directories (%.0f MB) that interrupted runs left "
                 "in %s", len(cleared), sum(size for _, size in cleared) / 1e6, data_root)
    if not md5:
        log.warning("no checksum given for %s: the archive is not verified", shown)
    reported = [-1]

    def progress(done: int, total: int | None) -> None:
        step = done * 10 // total if total else done // (20 << 20)
        if step > reported[0]:
            reported[0] = step
            of = f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
            log.info("downloaded %.1f%s", done / 1e6, of)

    dataset = fetch_cifar10(Path(data_root), url=url, md5=md5, progress=progress,
                            max_bytes=max_bytes, deadline_minutes=deadline_minutes)
    if dataset.reused:
        log.info("reusing the verified copy in %s (md5 %s): nothing downloaded",
                 dataset.path, dataset.md5)
    else:
        log.info("downloaded %.1f MB from %s in %.1fs, md5 %s verified, extracted to %s",
                 dataset.bytes_downloaded / 1e6, shown, dataset.seconds, dataset.md5,
                 dataset.path)
    return dataset


@task(name="preview_data", task_run_name="preview {count} training images")
def preview_data(dataset: Dataset, count: int = 32) -> bytes:
    """A captioned grid of the first training images, as an image artifact (JPEG bytes)."""
    batch = sorted(Path(dataset.path).glob("data_batch_*"))[0]
    images, labels = read_batch(batch)
    count = min(count, len(images))
    grid = image_grid(np.asarray(images[:count]), [CLASSES[i] for i in labels[:count]],
                     title=f"CIFAR-10 training images ({batch.name})")
    publish_markdown(
        "cifar10-preview",
        f"## Training data preview\n\n{markdown_image(grid, 'training images')}\n\n"
        f"First {count} images of `{batch.name}` from `{display_url(dataset.url)}` "
        f"(md5 `{dataset.md5}`).",
        description="Sample training images with their class names",
    )
    logger().info("preview of %d images published (%d KB JPEG)", count, len(grid) // 1024)
    return grid
