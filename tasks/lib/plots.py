"""Pictures for the run's artifacts: grids of CIFAR images with captions, as PNG bytes."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # no display: render to memory

import matplotlib.pyplot as plt
import numpy as np


def image_grid(images: np.ndarray, captions: list[str], colors: list[str] | None = None,
               columns: int = 8, title: str | None = None) -> bytes:
    """uint8 images N x 3 x 32 x 32 → a PNG grid, each image captioned (and coloured)."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    title_inches = 0.35 if title else 0.0
    height = rows * 1.25 + title_inches
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, height), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(np.transpose(images[i], (1, 2, 0)), interpolation="nearest")
            ax.set_title(captions[i], fontsize=7, color=(colors[i] if colors else "black"))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - title_inches / height))  # room for the title
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    return buffer.getvalue()
