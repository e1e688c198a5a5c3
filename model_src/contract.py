"""The contract between the container and the orchestrator: everything the training job, the
model artifact and the pipeline must agree on, without torch. The class names, the safe reader
of CIFAR-10's batch files, the artifact's file names, the checkpoint directory and its
variable, the training log's metric lines and names, and SageMaker's resource-name rule.

Shipped with the training and inference code (imported flat there, as ``contract``) and
imported by the orchestrating process as ``model_src.contract``, which must not load torch.
A constant that both sides use lives here and nowhere else.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
BATCH_DIR = "cifar-10-batches-py"  # the official archive's directory

# The model artifact (model.tar.gz) and the job's output data.
WEIGHTS_FILE = "model.pth"
META_FILE = "model_meta.json"
METRICS_FILE = "metrics.json"
CODE_DIR = "code"  # in the artifact: where the serving toolkit imports the handlers from
TRAINING_PROGRAM = "train.py"
INFERENCE_PROGRAM = "inference.py"  # the SageMaker inference toolkit's default module
# What is never shipped from the source directory (to a job or into an artifact).
SOURCE_IGNORE = ("__pycache__", "*.pyc", ".*")

# Request and response media types of the endpoint.
NPY = "application/x-npy"
JSON = "application/json"

# Checkpoints: where the entry script saves one after every epoch and resumes from. SageMaker
# syncs this directory with CheckpointConfig's S3 URI and restores it when a job restarts.
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"
# The local backend has no /opt/ml: it names each job's checkpoint directory in this variable.
CHECKPOINT_DIR_ENV = "CIFAR10_CHECKPOINT_DIR"

# SageMaker's rule for the names of training jobs, endpoints and model package groups: letters,
# digits and single or repeated hyphens, starting and ending with a letter or digit.
MAX_NAME_LENGTH = 63
NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$"


# -- batch files ------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files while refusing every global except numpy's array rebuild.

    CIFAR-10's python format is a pickle; a plain ``pickle.load`` would run arbitrary code from
    a tampered file. The batches only need dicts, lists, bytes and numpy arrays.
    """

    _ALLOWED = frozenset({
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file → (images uint8 N x 3 x 32 x 32, labels int64 N)."""
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch file ({e})") from e
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected a dict, found {type(entry).__name__}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: missing the 'data' or 'labels' entry")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 N x 3072, found {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{path}: labels must lie in 0..{len(CLASSES) - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def find_batch_dir(root: Path) -> Path:
    """The directory holding ``data_batch_*`` and ``test_batch``: ``root``, its
    ``cifar-10-batches-py``, or the first directory below it that has them."""
    root = Path(root)
    below = sorted(p for p in root.rglob("*") if p.is_dir()) if root.is_dir() else []
    for candidate in [root, root / BATCH_DIR, *below]:
        if (candidate / "test_batch").is_file() and any(candidate.glob("data_batch_*")):
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 batches (data_batch_* and test_batch) in {root} or below it")


# -- the training log's metric lines ------------------------------------------------------------

# The numeric metrics the entry script logs as ``name=value;`` pairs: per epoch, then once at
# the end. SageMaker's metric definitions scrape exactly these.
EPOCH_METRICS = ("epoch", "train_loss", "train_accuracy", "epoch_seconds")
FINAL_METRICS = ("test_loss", "test_accuracy", "train_seconds")
METRIC_NAMES = EPOCH_METRICS + FINAL_METRICS

# One ``name=value;`` pair: what SageMaker metric definitions and the pipeline's progress read.
METRIC_PAIR = re.compile(r"\b(\w+)=([^;\s]+);")


def metric_line(**metrics: float | int | str) -> str:
    """``name=value;`` pairs on one line: integers as they are, other numbers to 6 decimals."""
    return " ".join(f"{name}={value if isinstance(value, int | str) else f'{value:.6f}'};"
                    for name, value in metrics.items())


def metric_values(line: str) -> dict[str, str]:
    """The ``name=value;`` pairs of one log line (empty for other lines)."""
    return dict(METRIC_PAIR.findall(line))


def metric_regex(name: str) -> str:
    """A SageMaker metric definition's regex for a numeric metric of the log lines."""
    return f"{name}=([0-9.]+);"


def whole_if_integral(value: float | None) -> int | float | None:
    """2.0 -> 2: an epoch count as a person writes it (``--epochs 2``, "2 epochs")."""
    return int(value) if value is not None and float(value).is_integer() else value
