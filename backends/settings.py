"""Where things are: the model code shipped to SageMaker, and the local state directory."""

from __future__ import annotations

import os
from pathlib import Path

# What SageMaker receives as source_dir (its entry point: model_src.cifar.TRAINING_PROGRAM).
SOURCE_DIR = Path(__file__).resolve().parents[1] / "model_src"

STATE_DIR_ENV = "CIFAR10_PIPELINE_HOME"


def state_dir() -> Path:
    """The pipeline's local state (data, store, jobs, endpoints): ``$CIFAR10_PIPELINE_HOME``,
    else ``~/.cifar10-pipeline``. The Makefile points it at the project's ``.state/``."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".cifar10-pipeline").resolve()
