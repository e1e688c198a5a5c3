"""Where things are (the model code shipped to SageMaker, the local state directory), and how
much of this machine the pipeline may use."""

from __future__ import annotations

import os
from pathlib import Path

# What SageMaker receives as source_dir (its entry point: model_src.contract.TRAINING_PROGRAM).
SOURCE_DIR = Path(__file__).resolve().parents[1] / "model_src"

STATE_DIR_ENV = "CIFAR10_PIPELINE_HOME"


PROJECT_ROOT = SOURCE_DIR.parent


def state_dir() -> Path:
    """The pipeline's local state (data, store, jobs, endpoints, registry):
    ``$CIFAR10_PIPELINE_HOME``; else, run from a checkout of the project, its ``.state/``, where
    ``make run`` keeps it too (so ``.venv/bin/cifar10-pipeline models list`` finds what
    ``make run`` registered); else ``~/.cifar10-pipeline``."""
    if configured := os.environ.get(STATE_DIR_ENV):
        return Path(configured).resolve()
    if (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "Makefile").is_file():
        return PROJECT_ROOT / ".state"
    return (Path.home() / ".cifar10-pipeline").resolve()


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (taskset, a container's cpuset), which
    can be fewer than the machine has, and no more than an OMP_NUM_THREADS the user set (the
    machine is shared with other work)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        cpus = min(cpus or 1, int(limit))
    return cpus or 1
