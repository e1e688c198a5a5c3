"""Long-running processes for the real-server tests (a Prefect server, the serve script, a
browser): started in their own process group, logging to a file, and stopped as a whole group
so nothing they spawned (flow-run subprocesses, endpoint servers, renderers) outlives a test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from backends.processes import die_with_parent_preexec, start_time, terminate_group

T = TypeVar("T")


def start(args: list[str], log: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=dict(env) if env is not None else None,
                                start_new_session=True, preexec_fn=die_with_parent_preexec())


def stop(process: subprocess.Popen, grace_seconds: float = 15) -> None:
    """SIGTERM the process's group (a graceful stop: the runner cancels its runs and pauses
    its schedules), SIGKILL what is left, and wait until no member of the group remains."""
    terminate_group(process.pid, start_time(process.pid), grace_seconds)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    deadline = time.monotonic() + 5
    while _group_alive(process.pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def running(args: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen]:
    process = start(args, log, **kwargs)
    try:
        yield process
    finally:
        stop(process)


def wait_until(check: Callable[[], T | None], what: str, timeout: float,
               process: subprocess.Popen | None = None, log: Path | None = None,
               interval: float = 0.5) -> T:
    """Polls ``check`` until it returns something truthy; fails early when ``process`` dies,
    and shows the tail of ``log`` in either failure."""
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        died = process is not None and process.poll() is not None
        if died or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            reason = f"exited with {process.returncode}" if died else f"not after {timeout}s"
            raise AssertionError(f"{what}: {reason}\n--- {log} ---\n{tail}")
        time.sleep(interval)


def api(base: str, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
    """One call to the Prefect REST API; None for a 404 or when nothing answers yet."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise AssertionError(f"{method} {path}: {e.code} {e.read()[:2000]!r}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return json.loads(text) if text else {}
