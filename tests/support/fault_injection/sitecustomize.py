"""Test-only fault injection for processes the tests start rather than call (a
``deployments.serve`` runner and the flow-run subprocesses it spawns, a ``cifar10-pipeline run``):
their environment puts this directory first on PYTHONPATH and names a control directory in
``CIFAR10_FAULTS_DIR``. Nothing in the project's code knows about it.

It holds a run's smoke test inside its first request to the endpoint while a hold file exists,
so that a test can cancel or kill the run while the endpoint is up and in use:

    $CIFAR10_FAULTS_DIR/hold-smoke             holds every run's smoke test
    $CIFAR10_FAULTS_DIR/hold-smoke-<run id>    holds that flow run's
    $CIFAR10_FAULTS_DIR/in-smoke-<run id>      written by a run when it starts waiting

Python imports ``sitecustomize`` at start-up in every process with this directory on its path,
training hosts and endpoint servers included (they inherit the environment). So this only
installs an import hook, and wraps ``tasks.endpoint.invoke_batch`` if and when a process
imports that module: the flow processes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

CONTROL_ENV = "CIFAR10_FAULTS_DIR"
TARGET = "tasks.endpoint"
HOLD_LIMIT_SECONDS = 300  # a test that forgets its hold file does not hang CI forever


def _hold_smoke_test() -> None:
    from prefect.runtime import flow_run

    control = Path(os.environ[CONTROL_ENV])
    run_id = str(flow_run.id)
    holds = [control / "hold-smoke", control / f"hold-smoke-{run_id}"]
    if not any(h.exists() for h in holds):
        return
    (control / f"in-smoke-{run_id}").touch()
    deadline = time.monotonic() + HOLD_LIMIT_SECONDS
    # Short sleeps: a SIGTERM (cancellation) is raised as an exception in this thread, here.
    while any(h.exists() for h in holds) and time.monotonic() < deadline:
        time.sleep(0.1)


def _wrap(module: ModuleType) -> None:
    original = module.invoke_batch

    def held_invoke_batch(*args: Any, **kwargs: Any) -> Any:
        _hold_smoke_test()
        return original(*args, **kwargs)

    # smoke_predict looks invoke_batch up in its module's globals at call time.
    module.invoke_batch = held_invoke_batch


class _WrapAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``tasks.endpoint`` as the normal path finder would, then wraps the module right
    after it has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _wrap(module)

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


if os.environ.get(CONTROL_ENV):
    sys.meta_path.insert(0, _WrapAfterImport())
