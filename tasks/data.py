"""Data stages: download (with checksum, safe extraction and reuse) and a preview grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from model_src.cifar import CLASSES, read_batch
from tasks.lib.download import Dataset, display_url, fetch_cifar10
from tasks.lib.plots import image_grid
from tasks.reporting import logger, markdown_image, publish_markdown
from tasks.retries import retry_transient


@task(name="download_data", task_run_name="download {url}", retries=2,
      retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def download_data(url: str, md5: str | None, data_root: Path) -> Dataset:
    """Fetches CIFAR-10 into ``data_root`` unless a verified copy is already there."""
    log = logger()
    shown = display_url(url)
    if not md5:
        log.warning("no checksum given for %s: the archive is not verified", shown)
    reported = [-1]

    def progress(done: int, total: int | None) -> None:
        step = done * 10 // total if total else done // (20 << 20)
        if step > reported[0]:
            reported[0] = step
            of = f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
            log.info("downloaded %.1f%s", done / 1e6, of)

    dataset = fetch_cifar10(Path(data_root), url=url, md5=md5, progress=progress)
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
    """A captioned grid of the first training images, as a PNG artifact."""
    batch = sorted(Path(dataset.path).glob("data_batch_*"))[0]
    images, labels = read_batch(batch)
    count = min(count, len(images))
    png = image_grid(np.asarray(images[:count]), [CLASSES[i] for i in labels[:count]],
                     title=f"CIFAR-10 training images ({batch.name})")
    publish_markdown(
        "cifar10-preview",
        f"## Training data preview\n\n{markdown_image(png, 'training images')}\n\n"
        f"First {count} images of `{batch.name}` from `{display_url(dataset.url)}` "
        f"(md5 `{dataset.md5}`).",
        description="Sample training images with their class names",
    )
    logger().info("preview of %d images published (%d KB PNG)", count, len(png) // 1024)
    return png
