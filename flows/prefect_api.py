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

Trust: `make ui`'s server (the fallback) is this checkout's only when it proves it. ``make ui``
starts it with ``PREFECT_SERVER_API_AUTH_STRING`` set to a secret generated once per checkout
(``auth_file()``, mode 0600); a client uses the fallback only when (on Linux) the listener
belongs to this user, a request without the secret is refused (401), and one with it is
accepted. Anything else on the port (another user's server, a server without authentication,
another checkout's) is refused in one line before a run, a deployment or a worker trusts it.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from flows.prefect_adapter import launch_server_process

# `make ui`'s server: where `make serve`/`deploy`/`worker` register when no API is configured.
LOCAL_UI_API_URL = "http://127.0.0.1:4200/api"
# The secret `make ui`'s server requires (Prefect's basic auth, "user:password"), in the
# pipeline's state directory: one per checkout.
AUTH_FILE_NAME = "prefect-auth"
AUTH_USER = "cifar10"
# Routes every Prefect server answers only with valid credentials when auth is on (/health and
# /ready are exempt); the UI's own login check calls this one.
PROBE_PATH = "/admin/version"
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
    launch_server_process(server)
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
                launch_server_process(server)
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


# --- trust: is the server at the fallback URL this checkout's `make ui`? -----------------------

class UntrustedServer(PrefectUnavailable):
    """Something at the fallback URL that is not this checkout's `make ui` server."""


def auth_file() -> Path:
    from backends.settings import state_dir

    return state_dir() / AUTH_FILE_NAME


def _read_secret(path: Path) -> str:
    if path.stat().st_mode & 0o077:  # copied or restored with a wider mode: close it again
        os.chmod(path, 0o600)
    return path.read_text().strip()


def auth_string(path: Path | None = None) -> str:
    """This checkout's auth string for `make ui`'s server, created on first use (mode 0600,
    never rewritten: a running server and its clients keep agreeing). Concurrent first calls
    agree too: the secret is written to a private file and linked into place, and whoever
    links second reads the winner's."""
    path = path or auth_file()
    if path.exists() and (existing := _read_secret(path)):
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as out:
            out.write(f"{AUTH_USER}:{secrets.token_urlsafe(24)}\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(draft, path)
        except FileExistsError:
            if not _read_secret(path):  # an empty file (a crash before ours existed)
                os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)
    return _read_secret(path)


def _listener_uids(port: int, tables: dict[str, str]) -> set[int]:
    """The owners of the sockets listening on ``port`` that take connections to 127.0.0.1,
    from /proc/net/tcp-style ``tables`` (name → text)."""
    reaches_loopback = {"tcp": {"0100007F", "00000000"},
                        "tcp6": {"0" * 32, "0000000000000000FFFF00000100007F"}}
    uids = set()
    for name, text in tables.items():
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 8 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and address in reaches_loopback[name]:
                uids.add(int(fields[7]))
    return uids


def listener_owners(port: int) -> set[int] | None:
    """Who listens on 127.0.0.1:``port``, where the platform says (Linux); else None."""
    tables = {}
    for name in ("tcp", "tcp6"):
        try:
            tables[name] = Path(f"/proc/net/{name}").read_text()
        except OSError:
            continue
    return _listener_uids(port, tables) if tables else None


WHAT_TO_DO = ("stop it, or run this checkout's server on a free port (`make ui UI_PORT=4201`, "
              "then the same UI_PORT for make serve/deploy/worker/run), or name a server you "
              "trust with PREFECT_API_URL (and PREFECT_API_AUTH_STRING)")


def verify_own_server(api_url: str, secret: str, timeout: float = 5) -> None:
    """Returns when the server at ``api_url`` is this checkout's `make ui` server; otherwise
    raises ``UntrustedServer`` (or ``PrefectUnavailable`` when nothing answers) with one line:
    what is on the port, and what to do. The secret is sent only to a server of this user that
    already refused a request without it."""
    target = httpx.URL(api_url)
    owners = listener_owners(target.port or 80) if target.host == "127.0.0.1" else None
    if owners and owners != {os.getuid()}:
        raise UntrustedServer(
            f"the server on {target.host}:{target.port} belongs to another user (uid "
            f"{', '.join(map(str, sorted(owners)))}), not to this checkout's `make ui`: "
            f"{WHAT_TO_DO}")
    probe = f"{api_url.rstrip('/')}{PROBE_PATH}"
    token = base64.b64encode(secret.encode()).decode()
    with_secret = None
    with httpx.Client(timeout=timeout, trust_env=False) as client:  # loopback: no proxy
        try:
            anonymous = client.get(probe).status_code
            if anonymous == 401:
                with_secret = client.get(probe, headers={"Authorization": f"Basic {token}"}
                                         ).status_code
        except httpx.HTTPError as e:
            raise PrefectUnavailable(
                f"nothing answers at {api_url} ({type(e).__name__}): start this checkout's "
                f"Prefect server first (`make ui` in another terminal)") from None
    if with_secret != 200:
        raise UntrustedServer(f"the server at {api_url} is not this checkout's `make ui`: "
                              f"{_describe(anonymous, with_secret)}; {WHAT_TO_DO}")


def _describe(anonymous: int, with_secret: int | None) -> str:
    if anonymous < 400:
        return ("it answers without authentication (a Prefect server started without this "
                "checkout's auth string; an older `make ui` of this checkout: restart it)")
    if with_secret == 401:
        return (f"it requires a different auth string than this checkout's "
                f"({auth_file()}): another checkout's or another user's Prefect server")
    if with_secret is None:
        return f"GET {PROBE_PATH} answers {anonymous}, so it is not a Prefect server"
    return f"it answers {with_secret} to this checkout's credentials"


def trusted_fallback(api_url: str) -> str:
    """This checkout's auth string once the server at ``api_url`` proved to be ours."""
    secret = auth_string()
    verify_own_server(api_url, secret)
    return secret


@contextmanager
def api_for_commands(on_status: Callable[[str], None] = print) -> Iterator[str]:
    """The Prefect API for a command that is not a run (``notify``), as the Makefile picks
    one: the user's own; else `make ui`'s while something answers there, once it proved to be
    this checkout's (its auth string is then this process's); else the temporary server over
    the same database (what it stores, `make ui` shows later)."""
    from prefect.settings import temporary_settings

    from backends.local import bypass_proxies_for_loopback

    bypass_proxies_for_loopback()
    if url := configured_api_url():
        _check_configured(url)
        yield url
    elif _answers(LOCAL_UI_API_URL):
        secret = trusted_fallback(LOCAL_UI_API_URL)
        with temporary_settings(updates={"api.url": LOCAL_UI_API_URL,
                                         "api.auth_string": secret}):
            yield LOCAL_UI_API_URL
    else:
        yield start_temporary_server(on_status)


def _answers(api_url: str) -> bool:
    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=2, trust_env=False)
    except httpx.HTTPError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.prefect_api",
        description="Print the Prefect API URL to use: PREFECT_API_URL from the environment "
                    "or the active Prefect profile, else the fallback (nothing without one). "
                    "A fallback is used only when it proves to be this checkout's `make ui` "
                    "server; a second line, 'fallback', then says that the caller must send "
                    "this checkout's auth string (PREFECT_API_AUTH_STRING).")
    parser.add_argument("--fallback", metavar="URL",
                        help="used when no API is configured (e.g. `make ui`'s server)")
    parser.add_argument("--if-up", action="store_true",
                        help="use the fallback only when something answers there")
    parser.add_argument("--print-auth-string", action="store_true",
                        help="print this checkout's auth string (created on first use) and "
                             "exit: what `make ui`'s server requires")
    args = parser.parse_args(argv)
    if args.print_auth_string:
        print(auth_string())
        return
    # PREFECT_API_URL in the environment wins over every other source (Prefect's rule): a new
    # process knows that without loading Prefect's settings (which imports much of Prefect).
    url = os.environ.get("PREFECT_API_URL") or configured_api_url()
    if url is None and args.fallback and not (args.if_up and not _answers(args.fallback)):
        try:
            trusted_fallback(args.fallback)
        except PrefectUnavailable as e:
            sys.exit(f"error: {e}")
        url = f"{args.fallback}\nfallback"
    print(url or "")


if __name__ == "__main__":
    main()
