"""Where things are: the shipped model code and the local state directory."""

from __future__ import annotations

import os
from pathlib import Path

# What SageMaker receives as source_dir, and the script in it that trains and serves.
SOURCE_DIR = Path(__file__).resolve().parents[1] / "model_src"
ENTRY_POINT = "cifar10.py"

STATE_DIR_ENV = "CIFAR10_PIPELINE_HOME"


def state_dir() -> Path:
    """The pipeline's local state (data, store, jobs, endpoints): ``$CIFAR10_PIPELINE_HOME``,
    else ``~/.cifar10-pipeline``. The Makefile points it at the project's ``.state/``."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".cifar10-pipeline").resolve()
