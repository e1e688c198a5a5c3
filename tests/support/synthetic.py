"""Small generated datasets in CIFAR-10's "python version" format, for tests and benchmarks.

Each class has a fixed smooth colour template; images are the template plus noise, so a small
network learns them in a couple of epochs and accuracy checks mean something.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

BATCH_DIR = "cifar-10-batches-py"
LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
               b"ship", b"truck"]


def make_images(n: int, rng: np.random.Generator, templates: np.ndarray,
                noise: float = 0.35) -> tuple[np.ndarray, list[int]]:
    labels = rng.integers(0, 10, size=n)
    pixels = (1 - noise) * templates[labels] + noise * rng.random((n, 3, 32, 32))
    images = np.clip(pixels * 255, 0, 255).astype(np.uint8).reshape(n, 3072)
    return images, labels.tolist()


def class_templates(seed: int = 1234) -> np.ndarray:
    """Ten smooth 3 x 32 x 32 patterns in [0, 1], one per class."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((10, 3, 4, 4))
    return coarse.repeat(8, axis=2).repeat(8, axis=3)


def write_batch(path: Path, images: np.ndarray, labels: list[int], name: str) -> None:
    entry = {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": images,
        b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def make_cifar_dir(root: Path, train_batches: int = 2, per_batch: int = 250, test: int = 200,
                   seed: int = 0) -> Path:
    """Writes ``root/cifar-10-batches-py`` and returns it."""
    rng = np.random.default_rng(seed)
    templates = class_templates()
    batch_dir = Path(root) / BATCH_DIR
    batch_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, train_batches + 1):
        images, labels = make_images(per_batch, rng, templates)
        write_batch(batch_dir / f"data_batch_{i}", images, labels, f"training batch {i}")
    images, labels = make_images(test, rng, templates)
    write_batch(batch_dir / "test_batch", images, labels, "testing batch 1")
    with open(batch_dir / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": LABEL_NAMES, b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f, protocol=2)
    return batch_dir


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """``array`` as numpy.save writes it: an ``application/x-npy`` request body."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def make_cifar_tarball(path: Path, **kwargs) -> str:
    """Writes a cifar-10-python.tar.gz-style archive at ``path``; returns its md5."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        batch_dir = make_cifar_dir(Path(tmp), **kwargs)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(batch_dir, arcname=BATCH_DIR)
    path.write_bytes(buffer.getvalue())
    return hashlib.md5(buffer.getvalue()).hexdigest()
