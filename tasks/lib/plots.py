"""Pictures for the run's artifacts: grids of CIFAR images with captions (JPEG bytes), and the
sweep's accuracy plot and a promotion's course (PNG bytes)."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np

JPEG_QUALITY = 85  # the captions stay crisp; 90+ costs a fifth more bytes for no visible gain

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    """A figure rendered to memory (no pyplot, no display, no global state: concurrent sweep
    tasks draw their own). Imported on first use: matplotlib costs every flow process a third
    of a second at start otherwise."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def image_grid(images: np.ndarray, captions: list[str], colors: list[str] | None = None,
               columns: int = 8, title: str | None = None) -> bytes:
    """uint8 images N x 3 x 32 x 32 → a JPEG grid, each image captioned (and coloured).

    JPEG, not PNG: photographs compress to half the size, and Prefect stores every artifact
    twice (the artifact and its event) for every run, a nightly run's largest addition to its
    database.

    One mosaic in one axes, captions as text: a figure of one axes per image takes seconds to
    lay out, a noticeable share of a short run."""
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    size, gap, caption = images.shape[-1], 4, 12  # pixels: image, margin, caption line
    cell_w, cell_h = size + gap, size + gap + caption
    mosaic = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        top, left = row * cell_h + caption, column * cell_w + gap // 2
        mosaic[top:top + size, left:left + size] = np.transpose(image, (1, 2, 0))
    scale = 2.2  # screen pixels per image pixel
    title_px = 22 if title else 0
    dpi = 72
    width_in = mosaic.shape[1] * scale / dpi
    height_in = (mosaic.shape[0] * scale + title_px) / dpi
    fig = _figure(figsize=(width_in, height_in), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1 - title_px / (height_in * dpi)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for i in range(n):
        row, column = divmod(i, columns)
        ax.text(column * cell_w + cell_w / 2 - 0.5, row * cell_h + caption - 3, captions[i],
                ha="center", va="bottom", fontsize=7,
                color=colors[i] if colors else "black")
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 4 / (height_in * dpi), va="top")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="jpeg", dpi=dpi, pil_kwargs={"quality": JPEG_QUALITY})
    return buffer.getvalue()


def sweep_plot(points: list[tuple[float | str, float, str, bool]], x_label: str,
               title: str) -> bytes:
    """Test accuracy against the swept value: (x, accuracy, series, is_winner) per completed
    point, one line per series (the other swept settings), the winner ringed. A numeric axis
    spanning more than 4x (learning rates) is logarithmic."""
    fig = _figure(figsize=(6, 3.6), dpi=80)
    ax = fig.subplots()
    numeric = all(isinstance(x, int | float) for x, *_ in points)
    categories = sorted({str(x) for x, *_ in points})
    for series in sorted({s for *_, s, _ in points}):
        mine = sorted((p for p in points if p[2] == series), key=lambda p: (str(p[0]), p[0]))
        if numeric:
            mine.sort(key=lambda p: p[0])
        xs = [p[0] if numeric else categories.index(str(p[0])) for p in mine]
        ax.plot(xs, [p[1] for p in mine], marker="o", label=series or None)
    for x, accuracy, _, winner in points:
        if winner:
            ax.scatter([x if numeric else categories.index(str(x))], [accuracy], s=220,
                       facecolors="none", edgecolors="crimson", linewidths=2, label="winner")
    if numeric:
        values = [float(x) for x, *_ in points]
        if min(values) > 0 and max(values) / min(values) > 4:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def promotion_plot(seconds: list[float], new_share: list[float],
                   error_rate: list[float | None], p99_latency_ms: list[float | None],
                   max_error_rate: float, max_p99_latency_ms: float, title: str) -> bytes:
    """A promotion over time (seconds since it began): the new fleet's share of traffic, and
    what the alarms saw, each against its threshold (dashed). Unmeasured points are gaps."""
    fig = _figure(figsize=(6, 4.2), dpi=80)
    share_ax, error_ax, latency_ax = fig.subplots(3, 1, sharex=True)
    share_ax.step(seconds, [100 * s for s in new_share], where="post", marker="o")
    share_ax.set_ylabel("new fleet %")
    share_ax.set_ylim(-5, 105)
    for ax, values, limit, label in ((error_ax, error_rate, max_error_rate, "5xx rate"),
                                     (latency_ax, p99_latency_ms, max_p99_latency_ms,
                                      "p99 ms")):
        ax.plot(seconds, [float("nan") if v is None else v for v in values], marker="o")
        ax.axhline(limit, color="crimson", linestyle="--", linewidth=1)
        ax.set_ylabel(label)
    latency_ax.set_xlabel("seconds since the promotion began")
    for ax in (share_ax, error_ax, latency_ax):
        ax.grid(alpha=0.3)
    share_ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
