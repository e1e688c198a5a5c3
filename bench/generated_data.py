"""Small generated datasets in CIFAR-10's "python version" format, for the benchmarks that
measure the machinery (servers, processes, Prefect) rather than learning, and for the tests.

Each class has a fixed smooth colour template; an image is its template plus noise, so a small
network learns them in an epoch or two and the smoke test's accuracy floor means something.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from model_src.contract import BATCH_DIR, CLASSES, IMAGE_SHAPE

PIXELS = int(np.prod(IMAGE_SHAPE))


def class_templates(seed: int = 1234) -> np.ndarray:
    """One smooth 3 x 32 x 32 pattern in [0, 1] per class."""
    coarse = np.random.default_rng(seed).random((len(CLASSES), 3, 4, 4))
    return coarse.repeat(8, axis=2).repeat(8, axis=3)


def make_images(n: int, rng: np.random.Generator, templates: np.ndarray,
                noise: float = 0.35) -> tuple[np.ndarray, list[int]]:
    """``n`` images (uint8, N x 3072, as the batch files hold them) and their labels."""
    labels = rng.integers(0, len(CLASSES), size=n)
    pixels = (1 - noise) * templates[labels] + noise * rng.random((n, *IMAGE_SHAPE))
    return np.clip(pixels * 255, 0, 255).astype(np.uint8).reshape(n, PIXELS), labels.tolist()


def write_batch(path: Path, images: np.ndarray, labels: list[int], name: str) -> None:
    entry = {b"batch_label": name.encode(), b"labels": labels, b"data": images,
             b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def make_cifar_dir(root: Path, train_batches: int = 2, per_batch: int = 250, test: int = 200,
                   seed: int = 0) -> Path:
    """Writes ``root/cifar-10-batches-py`` (training batches and a test batch) and returns it."""
    rng = np.random.default_rng(seed)
    templates = class_templates()
    batch_dir = Path(root) / BATCH_DIR
    batch_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, train_batches + 1):
        write_batch(batch_dir / f"data_batch_{i}", *make_images(per_batch, rng, templates),
                    f"training batch {i}")
    write_batch(batch_dir / "test_batch", *make_images(test, rng, templates), "testing batch 1")
    with open(batch_dir / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [name.encode() for name in CLASSES],
                     b"num_cases_per_batch": per_batch, b"num_vis": PIXELS}, f, protocol=2)
    return batch_dir


def make_cifar_tarball(path: Path, **kwargs: int) -> str:
    """Writes a cifar-10-python.tar.gz-style archive at ``path``; returns its md5."""
    with tempfile.TemporaryDirectory() as tmp:
        batch_dir = make_cifar_dir(Path(tmp), **kwargs)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(batch_dir, arcname=BATCH_DIR)
    path.write_bytes(buffer.getvalue())
    return hashlib.md5(buffer.getvalue()).hexdigest()
