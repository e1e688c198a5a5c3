"""The pipeline as the tests run it: the repository's paths, the SageMaker training environment
for the entry script, fast hyperparameters for generated data, a flow run's artifacts, and the
model code as a serving container imports it."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
MODEL_SRC = REPO / "model_src"
ENTRY_SCRIPT = MODEL_SRC / "train.py"
# model_src's modules, imported flat inside a container (and by import_handlers here).
SHIPPED_MODULES = tuple(p.stem for p in MODEL_SRC.glob("*.py") if p.stem != "__init__")

FAST_HYPERPARAMETERS = {"epochs": 2, "batch-size": 16, "lr": 0.02}
ARTIFACT_KEYS = {"cifar10-preview", "cifar10-training-metrics", "cifar10-training-progress",
                 "cifar10-predictions", "cifar10-per-class-accuracy", "cifar10-run-summary",
                 "cifar10-model-lineage"}


def sagemaker_env(root: Path, data_dir: Path, hosts: list[str] | None = None,
                  host: str = "algo-1") -> dict[str, str]:
    """The environment SageMaker gives a training container whose /opt/ml is ``root``."""
    hosts = hosts or ["algo-1"]
    for sub in ("model", "output/data"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "SM_MODEL_DIR": str(root / "model"),
        "SM_CHANNEL_TRAINING": str(data_dir),
        "SM_CHANNELS": '["training"]',
        "SM_OUTPUT_DIR": str(root / "output"),
        "SM_OUTPUT_DATA_DIR": str(root / "output/data"),
        "SM_HOSTS": json.dumps(hosts),
        "SM_CURRENT_HOST": host,
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_entry_script(args: list[str], env: dict[str, str], cwd: Path,
                     timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY_SCRIPT), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def import_handlers(code_dir: Path, program: str = "inference") -> ModuleType:
    """Imports a model's handlers the way SageMaker's inference toolkit does: ``code/`` first
    on the path and the program as a top-level module, its siblings from ``code/`` too (not
    from an earlier import of model_src). The modules imported before are put back after."""
    saved = {name: sys.modules.pop(name) for name in (*SHIPPED_MODULES, program)
             if name in sys.modules}
    sys.path.insert(0, str(code_dir))
    try:
        return importlib.import_module(program)
    finally:
        sys.path.remove(str(code_dir))
        for name in (*SHIPPED_MODULES, program):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def artifacts_of(flow_run_id) -> dict[str, object]:
    """The run's Prefect artifacts by key, from the current API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in asyncio.run(read())}


def ancestors() -> set[int]:
    """This process and the ones above it (make, a shell, `timeout`...): never leftovers,
    even when their command line names the temporary directory (--basetemp)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


class Found(NamedTuple):
    pid: int
    cmdline: str
    cwd: str


def processes_under(base: Path) -> list[Found]:
    """Live processes (not zombies) whose command line or working directory lies under
    ``base``: servers, training hosts or anything else a test started there."""
    found = []
    excluded = ancestors()
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid in excluded:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (str(base) in cmdline or cwd.startswith(str(base))):
            found.append(Found(pid, cmdline, cwd))
    return found
