"""Long-running processes for the real-server tests (a Prefect server, the serve script, a
browser): started in their own process group, logging to a file, and stopped as a whole group
so nothing they spawned (flow-run subprocesses, endpoint servers, renderers) outlives a test."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import functools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from backends.local.processes import die_with_parent_preexec, free_port, start_time, terminate_group

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


RETRYABLE = {429, 502, 503}  # what Prefect's own client retries (503: e.g. SQLite locked)
ATTEMPTS = 5


class RetryingTransport(httpx.HTTPTransport):
    """httpx's transport that, like Prefect's client, retries what the server says is worth
    retrying (a busy SQLite database answers 503; the failed request was rolled back, so
    repeating it is safe)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(ATTEMPTS):
            response = super().handle_request(request)
            if response.status_code not in RETRYABLE or attempt == ATTEMPTS - 1:
                return response
            response.close()
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")


@functools.cache
def _loopback_client() -> httpx.Client:
    """One client for every ``api`` call: a new one costs ~20 ms of CPU (its TLS context), and
    the tests poll. Loopback: never through a proxy; no kept-alive connections to servers that
    a test may have stopped."""
    return httpx.Client(trust_env=False, transport=RetryingTransport(
        limits=httpx.Limits(max_keepalive_connections=0)))


def basic_auth(auth_string: str | None) -> dict[str, str]:
    """The header a Prefect client sends for ``PREFECT_API_AUTH_STRING`` (none without one)."""
    if auth_string is None:
        return {}
    return {"Authorization": f"Basic {base64.b64encode(auth_string.encode()).decode()}"}


def api(base: str, method: str, path: str, body: Any = None, timeout: float = 10,
        auth_string: str | None = None) -> Any:
    """One call to the Prefect REST API (retried as ``RetryingTransport`` does); None for a
    404 or when nothing answers yet."""
    try:
        response = _loopback_client().request(method, f"{base}{path}", json=body,
                                              timeout=timeout, headers=basic_auth(auth_string))
    except httpx.TransportError:
        return None
    if response.status_code == 404:
        return None
    if response.is_error:
        raise AssertionError(f"{method} {path}: {response.status_code} "
                             f"{response.content[:2000]!r}")
    return response.json() if response.content else {}


REPO = Path(__file__).resolve().parents[2]


def pythonpath_with_repo() -> str:
    """PYTHONPATH for a subprocess that imports the project (and what was on it already)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@dataclass
class Server:
    url: str            # http://127.0.0.1:<port>; the UI is served at its root
    env: dict[str, str]  # the environment of a client of this server (CLI, serve)
    logs: Path
    auth_string: str | None = None  # what the server requires (`make ui`'s: its auth file)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return api(self.url, method, f"/api{path}", body, auth_string=self.auth_string)


def migrated_database(directory: Path) -> Path:
    """A Prefect SQLite database migrated to the installed Prefect's schema, created once in
    ``directory`` for every test process that asks (pytest-xdist workers share it, so the
    first one creates it under a lock and the others wait). Test servers start from copies:
    creating the schema costs a server ~6 s of CPU, a copy nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    database = directory / "prefect.db"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
            # The CLI's own up-front creation (flows.prefect_api), in a process of its own so
            # that PREFECT_HOME picks the database.
            result = subprocess.run(
                [sys.executable, "-c", "from flows.prefect_api import migrate_new_database; "
                 "migrate_new_database(print)"],
                env={**env, "PREFECT_HOME": str(directory / "home"),
                     "PYTHONPATH": pythonpath_with_repo()},
                cwd=REPO, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"creating the tests' Prefect database failed:\n"
                                   f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
            created = directory / "home" / "prefect.db"
            with contextlib.closing(sqlite3.connect(created)) as db:  # one file, no WAL left
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            created.rename(database)
    return database


def create_database_in_background(directory: Path) -> subprocess.Popen:
    """``migrated_database(directory)`` in a process of its own (and its own process group),
    started now; ``migrated_database`` in any test process then waits for it under its lock.
    The directory travels in the environment: nothing that names the test's temporary
    directory may outlive a short session (``processes_under``) once it is stopped."""
    code = ("import os; from pathlib import Path; from tests.support.live import "
            "migrated_database; migrated_database(Path(os.environ['TESTS_PREFECT_DATABASE']))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TESTS_PREFECT_DATABASE": str(directory),
                                 "PYTHONPATH": pythonpath_with_repo()},
                            start_new_session=True)


def seed_database(database: Path, destination: Path) -> Path:
    """A copy of ``database`` (from ``migrated_database``) at ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(database, destination)
    return destination


@contextlib.contextmanager
def prefect_server(base: Path, database: Path | None = None) -> Iterator[Server]:
    """`prefect server start` (API, UI, scheduler, automations) on a free loopback port over
    a PREFECT_HOME under ``base`` (starting from a copy of ``database`` when given), until the
    block ends; its clients' environment points at it and keeps the pipeline's state under
    ``base`` too."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(base / "prefect-home")
    if database is not None:
        seed_database(database, base / "prefect-home" / "prefect.db")
    server_env = {
        **env,
        # The settings, not `--port`: the UI asks the server for its API URL, which is built
        # from these (with --port alone the UI would call port 4200).
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"{url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no network here
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",  # plan new schedules quickly
    }
    client_env = {
        **env,
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # serve picks up a triggered run within 1 s
        "PYTHONPATH": pythonpath_with_repo(),
        "COLUMNS": "240",  # the CLI's rich output is wrapped at the terminal width
        # the pipeline's own state (data, jobs, endpoints): apart from the other tests'
        "CIFAR10_PIPELINE_HOME": str(base / "pipeline-home"),
    }
    log = base / "server.log"
    with running([sys.executable, "-m", "prefect", "server", "start"], log,
                 env=server_env, cwd=base) as process:
        wait_until(lambda: api(url, "GET", "/api/health") is True,
                   "prefect server start", timeout=120, process=process, log=log)
        yield Server(url=url, env=client_env, logs=base)


def make(target: str, *variables: str) -> list[str]:
    """`make TARGET VAR=value...` from the project root, with this interpreter's environment
    in place of .venv (which it does not try to build)."""
    return ["make", "-C", str(REPO), "-o", ".venv/.installed", target,
            f"BIN={Path(sys.executable).parent}", *variables]


def without_prefect_settings(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("PREFECT_")}


@contextlib.contextmanager
def make_ui(base: Path, database: Path | None = None,
            settings: Mapping[str, str] | None = None) -> Iterator[Server]:
    """`make ui` on a free port (UI_PORT) over a PREFECT_HOME and a pipeline state directory
    under ``base``: the server a user starts, auth string and database vacuum included. The
    server's ``env`` names it the way a user names their own server (PREFECT_API_URL and
    PREFECT_API_AUTH_STRING); without those two, `make serve UI_PORT=...` finds it as the
    trusted fallback. ``settings``: more PREFECT_ settings for the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = without_prefect_settings(os.environ)
    env.update(PREFECT_HOME=str(base / "prefect-home"), PYTHONPATH=pythonpath_with_repo(),
               CIFAR10_PIPELINE_HOME=str(base / "pipeline-home"), COLUMNS="240")
    if database is not None:
        seed_database(database, base / "prefect-home" / "prefect.db")
    log = base / "server.log"
    with running(make("ui", f"UI_PORT={port}"), log, env={**env, **(settings or {})},
                 cwd=base) as process:
        wait_until(lambda: api(url, "GET", "/api/health") is True,
                   "make ui", timeout=120, process=process, log=log)
        secret = (base / "pipeline-home" / "prefect-auth").read_text().strip()
        client_env = {**env, "PREFECT_API_URL": f"{url}/api", "PREFECT_API_AUTH_STRING": secret,
                      "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        yield Server(url=url, env=client_env, logs=base, auth_string=secret)


def zone_far_from_2am(now: dt.datetime) -> str:
    """An Etc/GMT zone in which it is about 14:00 now: the nightly 02:00 run is half a day
    away, so the real scheduler cannot start a real pipeline run (one that would download the
    real CIFAR-10) during a test. Etc/GMT signs are POSIX ones: Etc/GMT-5 is UTC+5."""
    offset = (14 - now.hour) % 24
    if offset > 12:
        offset -= 24
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"
