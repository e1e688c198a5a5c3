"""Trust by proof, not by port: the Makefile's targets fall back to `make ui`'s Prefect server
only when it proves to be this checkout's (it refuses a request without the checkout's auth
string and accepts one with it). A server this checkout did not start is refused in one line.

Stand-ins on free ports play the servers (a plain HTTP server, another checkout's server,
ours); `make ui` itself is started in tests/test_ui_e2e.py, where `make serve` trusts it.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows import prefect_api
from tests.support.pipeline import REPO


class StandIn(http.server.ThreadingHTTPServer):
    """A server on a free loopback port that answers every GET as ``policy`` says (given the
    Authorization header it received) and remembers the headers it saw."""

    def __init__(self, policy):
        self.policy, self.authorizations = policy, []
        super().__init__(("127.0.0.1", 0), StandInHandler)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"


class StandInHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        authorization = self.headers.get("Authorization")
        self.server.authorizations.append(authorization)
        status = self.server.policy(self.path, authorization)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'"3.9.1"' if status == 200 else b'{"exception_message": "no"}')


@contextlib.contextmanager
def stand_in(policy) -> Iterator[StandIn]:
    server = StandIn(policy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def answers_everyone(path: str, authorization: str | None) -> int:
    return 200  # a Prefect server without an auth string (or anything else) on the port


def requires_another_secret(path: str, authorization: str | None) -> int:
    return 200 if path.endswith("/health") else 401  # another checkout's `make ui`


def ours(secret: str):
    expected = f"Basic {base64.b64encode(secret.encode()).decode()}"

    def policy(path: str, authorization: str | None) -> int:
        return 200 if path.endswith("/health") or authorization == expected else 401
    return policy


@pytest.fixture
def checkout_state(tmp_path, monkeypatch) -> Path:
    """A pipeline state directory of its own: this "checkout's" auth file lives there."""
    state = tmp_path / "state"
    monkeypatch.setenv("CIFAR10_PIPELINE_HOME", str(state))
    return state


def make_fallback(api_url: str, state: Path, *args: str) -> subprocess.CompletedProcess:
    """What the Makefile's USE_API runs, with no Prefect API configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    prefect_home = state.parent / "prefect"  # as `make` makes it (prefect-home)
    prefect_home.mkdir(parents=True, exist_ok=True)
    env.update(CIFAR10_PIPELINE_HOME=str(state), PREFECT_HOME=str(prefect_home),
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "flows.prefect_api", "--fallback", api_url,
                           *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_the_auth_string_is_created_once_private_and_stable(checkout_state):
    secret = prefect_api.auth_string()
    path = checkout_state / "prefect-auth"
    assert path.stat().st_mode & 0o777 == 0o600
    assert secret.startswith("cifar10:") and len(secret) > 30
    assert prefect_api.auth_string() == secret == path.read_text().strip()
    path.chmod(0o644)  # restored from a backup with a wider mode
    assert prefect_api.auth_string() == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in checkout_state.iterdir()] == ["prefect-auth"]  # no drafts left


def test_an_empty_auth_file_is_replaced(checkout_state):
    checkout_state.mkdir()
    (checkout_state / "prefect-auth").write_text("")
    secret = prefect_api.auth_string()
    assert secret.startswith("cifar10:")
    assert prefect_api.auth_string() == secret


@pytest.mark.parametrize("if_up", [False, True], ids=["serve-deploy-worker", "run"])
def test_a_server_that_answers_without_auth_is_refused_in_one_line(checkout_state, if_up):
    """Whatever this checkout did not start answers without our auth string: a Prefect
    server started by hand or by another user, or any other program on the port."""
    with stand_in(answers_everyone) as server:
        result = make_fallback(server.api_url, checkout_state, *(["--if-up"] if if_up else []))
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: the server at {server.api_url} is not this checkout's "
                           f"`make ui`: it answers without authentication")
    assert "make ui UI_PORT=4201" in line and "PREFECT_API_URL" in line
    # It was refused before it could see the secret.
    assert set(server.authorizations) == {None}


def test_another_checkouts_server_is_refused(checkout_state):
    with stand_in(requires_another_secret) as server:
        result = make_fallback(server.api_url, checkout_state)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "it requires a different auth string than this checkout's" in line
    assert str(checkout_state / "prefect-auth") in line


def test_our_own_server_is_used_with_the_auth_string(checkout_state):
    """The Makefile exports PREFECT_API_AUTH_STRING when a second line says 'fallback'."""
    secret = prefect_api.auth_string()
    with stand_in(ours(secret)) as server:
        result = make_fallback(server.api_url, checkout_state)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [server.api_url, "fallback"]
        assert make_fallback(server.api_url, checkout_state, "--if-up").stdout.splitlines() \
            == [server.api_url, "fallback"]


def test_nothing_listening(checkout_state):
    """serve/deploy/worker need a server: one line says to start it; run (--if-up) goes on
    with a temporary server."""
    nothing = "http://127.0.0.1:9/api"
    result = make_fallback(nothing, checkout_state)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: nothing answers at {nothing}")
    assert "make ui" in result.stderr
    assert make_fallback(nothing, checkout_state, "--if-up").stdout == "\n"


def test_another_users_listener_never_sees_the_secret(checkout_state, monkeypatch):
    secret = prefect_api.auth_string()
    with stand_in(ours(secret)) as server:
        monkeypatch.setattr(prefect_api, "listener_owners", lambda port: {os.getuid() + 1})
        with pytest.raises(prefect_api.UntrustedServer, match="belongs to another user"):
            prefect_api.verify_own_server(server.api_url, secret)
    assert server.authorizations == []  # not even asked


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1068 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 1 1
   1: 0100007F:1068 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1002        0 2 1
   2: 0A000005:1069 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1003        0 3 1
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1069 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1004        0 4 1
"""  # noqa: E501 (the kernel's own layout)


def test_listener_owners_come_from_the_kernels_socket_tables():
    tables = {"tcp": PROC_NET_TCP, "tcp6": PROC_NET_TCP6}
    assert prefect_api._listener_uids(0x1068, tables) == {1001}  # not the connection's 1002
    assert prefect_api._listener_uids(0x1069, tables) == {1004}  # 10.0.0.5 does not count
    if Path("/proc/net/tcp").exists():
        with stand_in(answers_everyone) as server:
            assert prefect_api.listener_owners(server.server_address[1]) == {os.getuid()}
