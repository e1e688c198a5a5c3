"""Which Prefect API a run reports to, and getting it ready before the flow starts.

- The user's own API wins: ``PREFECT_API_URL`` from the environment or the active Prefect
  profile (a self-hosted server, or Prefect Cloud after ``prefect cloud login``).
- Without one, Prefect starts a temporary server over ``$PREFECT_HOME/prefect.db``. On a fresh
  home it first migrates a new database, and on a slow machine that outlasts Prefect's own
  start-up wait (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, 20 s by default): the
  run then dies with "Timed out while attempting to connect to ephemeral Prefect API server".
  ``connect()`` migrates a new database first, with a message, then starts that same server
  (Prefect's clients in this process share it) and waits for it with a bound sized for a slow
  machine, failing early and plainly when it cannot start.

``python -m flows.prefect_api --fallback URL`` prints the API URL the Makefile's targets use.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx

# `make ui`'s server: where `make serve`/`deploy`/`worker` register when no API is configured.
LOCAL_UI_API_URL = "http://127.0.0.1:4200/api"
# The temporary server's start-up wait is at least this (Prefect's setting can raise it).
STARTUP_TIMEOUT_SECONDS = 180
ADVICE = ("start the Prefect server in another terminal (`make ui`, or `prefect server start`) "
          "and run again (the run then reports to it), or give the temporary server more time "
          "with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")


class PrefectUnavailable(RuntimeError):
    """No Prefect API to run against; the message says what failed and what to do."""


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active profile, else None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def connect(on_status: Callable[[str], None] = print) -> str:
    """The API URL this process's flow runs will report to, checked or started now.

    A configured API must answer its health check; otherwise the temporary server is
    prepared and started here. Raises ``PrefectUnavailable`` with one line saying what to do.
    """
    from backends.local import bypass_proxies_for_loopback

    bypass_proxies_for_loopback()  # the temporary server and local endpoints are on loopback
    url = configured_api_url()
    if url:
        _check_configured(url)
        return url
    return start_temporary_server(on_status)


def _check_configured(url: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise PrefectUnavailable(
            f"the Prefect API at {url} (PREFECT_API_URL) does not answer ({error}): start that "
            f"server, or unset PREFECT_API_URL (and `prefect profile use` a profile without "
            f"one) to run with a temporary server")


def _sqlite_path(connection_url: str) -> Path | None:
    prefix = "sqlite+aiosqlite:///"
    if not connection_url.startswith(prefix) or ":memory:" in connection_url:
        return None
    return Path(connection_url.removeprefix(prefix))


def migrate_new_database(on_status: Callable[[str], None]) -> None:
    """Creates the temporary server's SQLite database up front when it does not exist yet, so
    the server's timed start finds it ready. An existing one is left to the server, which
    upgrades it on start when Prefect changed (quick next to creating it)."""
    from prefect.settings import get_current_settings

    database = get_current_settings().server.database
    path = _sqlite_path(database.connection_url.get_secret_value()
                        if database.connection_url else "")
    if path is None or path.exists():
        return
    on_status(f"creating Prefect's database at {path} (first run in this PREFECT_HOME; "
              f"a minute on a slow machine)...")
    started = time.monotonic()
    from prefect.server.database import provide_database_interface

    try:
        # Prefect creates its home without the directories above it (a nested PREFECT_HOME).
        path.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(provide_database_interface().create_db())
    except Exception as e:
        detail = (str(e).splitlines() or [""])[0]  # SQLAlchemy adds lines of background
        raise PrefectUnavailable(f"could not create Prefect's database at {path} "
                                 f"({type(e).__name__}: {detail}); {ADVICE}") from e
    on_status(f"Prefect's database is ready ({time.monotonic() - started:.0f}s)")


def start_temporary_server(on_status: Callable[[str], None] = print) -> str:
    """Starts the temporary server Prefect would start on first use (the same shared
    instance, so this process's clients use it) and returns its API URL."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not settings.server.ephemeral.enabled:
        raise PrefectUnavailable(
            "no Prefect API: PREFECT_API_URL is not set and temporary servers are off "
            "(PREFECT_SERVER_EPHEMERAL_ENABLED=false); start a server (`make ui`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api")
    server = SubprocessASGIServer()
    if server.running:
        return server.api_url
    migrate_new_database(on_status)
    timeout = max(STARTUP_TIMEOUT_SECONDS, settings.server.ephemeral.startup_timeout_seconds)
    started = time.monotonic()
    # Prefect's own start() waits on a clock that only counts its sleeps, and for the whole
    # timeout even when the server process has already died: run the same server, and wait
    # here on the wall clock, watching the process.
    server.port = server.find_available_port()
    server.server_process = server._run_uvicorn_command()
    server.running = True
    atexit.register(server.stop)
    next_note = started + 15
    restarts = 0
    # Loopback: a proxy from the environment (http_proxy without no_proxy) must not intercept.
    with httpx.Client(timeout=5, trust_env=False) as client:
        while True:
            code = server.server_process.poll()
            if code == 3 and restarts < 3:
                # uvicorn's start-up failure, as when the port was taken meanwhile: Prefect's
                # own answer is another port. Any other cause fails the same way again.
                restarts += 1
                server.port = server.find_available_port()
                server.server_process = server._run_uvicorn_command()
                continue
            if code is not None:
                server.stop()
                raise PrefectUnavailable(
                    f"Prefect's temporary API server exited with code {code} while starting "
                    f"(its output is above); {ADVICE}")
            try:
                if client.get(f"{server.api_url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - started > timeout:
                server.stop()
                raise PrefectUnavailable(
                    f"Prefect's temporary API server did not answer within {timeout}s; "
                    f"{ADVICE}")
            if now >= next_note:
                on_status(f"waiting for Prefect's temporary API server "
                          f"({now - started:.0f}s so far)...")
                next_note = now + 15
            time.sleep(0.2)
    on_status(f"Prefect's temporary API server is up at {server.api_url} "
              f"({time.monotonic() - started:.0f}s); runs are recorded in "
              f"{settings.home} (`make ui` shows them)")
    return server.api_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.prefect_api",
        description="Print the Prefect API URL to use: PREFECT_API_URL from the environment "
                    "or the active Prefect profile, else the fallback (nothing without one).")
    parser.add_argument("--fallback", metavar="URL",
                        help="used when no API is configured (e.g. `make ui`'s server)")
    parser.add_argument("--if-up", action="store_true",
                        help="print the fallback only when it answers its health check")
    args = parser.parse_args(argv)
    # PREFECT_API_URL in the environment wins over every other source (Prefect's rule): a new
    # process knows that without loading Prefect's settings (about 1.5 s).
    url = os.environ.get("PREFECT_API_URL") or configured_api_url()
    if url is None and args.fallback:
        url = args.fallback
        if args.if_up:
            try:
                up = httpx.get(f"{url.rstrip('/')}/health", timeout=2,
                               trust_env=False).status_code == 200
            except httpx.HTTPError:
                up = False
            url = url if up else None
    print(url or "")


if __name__ == "__main__":
    main()
