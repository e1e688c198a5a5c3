"""Which Prefect API runs report to, and a fresh PREFECT_HOME that works the first time: the
CLI in real subprocesses, each with a new Prefect home and a clean Prefect environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends.local import LocalBackend
from tests.support.pipeline import REPO

pytestmark = [pytest.mark.long_running, pytest.mark.slow]

TINY_FLOW = """
from prefect import flow

@flow
def tiny():
    return 1

tiny()
"""
EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def fresh_prefect_env(home: Path, **settings: str) -> dict[str, str]:
    """This environment without any PREFECT_ setting, over a new PREFECT_HOME (no profiles
    file: Prefect's default, a temporary server), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "CIFAR10_PIPELINE_HOME": str(home.parent / "pipeline-state"),
            "PYTHONPATH": str(REPO), **settings}


def cli(*args: str, env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_a_fresh_home_runs_the_first_time_even_with_a_short_startup_timeout(
        tmp_path, http_server, cifar_tarball):
    """Prefect's temporary server creates a new database before it answers: with a start-up
    timeout shorter than that (a slow machine against Prefect's 20 s), a plain flow dies. The
    CLI creates the database first and waits for the server as long as a slow machine needs."""
    short = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    # A plain flow and our CLI, each in a fresh home of its own, side by side (independent).
    plain = subprocess.Popen([sys.executable, "-c", TINY_FLOW], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=fresh_prefect_env(tmp_path / "plain" / "prefect", **short))
    home = tmp_path / "ours" / "prefect"
    name, md5 = cifar_tarball
    try:
        result = cli("run", "--data-url", f"{http_server}/{name}", "--data-md5", md5,
                     "--epochs", "2", "--batch-size", "16", "--lr", "0.02", "--smoke-images",
                     "50", "--accuracy-floor", "0.5", "--json",
                     env=fresh_prefect_env(home, **short))
        _, plain_stderr = plain.communicate(timeout=300)
    finally:
        plain.kill()  # a no-op once it has exited
        plain.wait()
    assert plain.returncode != 0 and EPHEMERAL_TIMEOUT in plain_stderr  # the original failure

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"creating Prefect's database at {home / 'prefect.db'}" in result.stderr
    assert "Prefect's temporary API server is up" in result.stderr
    assert (home / "prefect.db").stat().st_size > 0  # the run is recorded there for `make ui`

    # `run --json`: stdout holds the run summary as one JSON object and nothing else.
    summary = json.loads(result.stdout)
    assert list(summary["stages"]) == ["download", "preview", "upload", "fit", "deploy",
                                       "smoke_predict", "delete_endpoint", "register"]
    assert summary["smoke_test"]["images"] == 50
    assert summary["training"]["metrics"]["test_accuracy"] > 0.5
    assert summary["data"]["uri"].startswith("file://")
    assert summary["endpoint"]["url"].startswith("http://127.0.0.1:")
    pipeline_state = home.parent / "pipeline-state"
    assert LocalBackend(root=pipeline_state).endpoints.describe(summary["endpoint"]["name"]) \
        is None


def test_when_prefect_cannot_start_the_cli_says_what_to_do_in_one_line(tmp_path):
    """A database Prefect cannot create: one error line with the way out, no traceback."""
    env = fresh_prefect_env(tmp_path / "prefect", PREFECT_SERVER_DATABASE_CONNECTION_URL=(
        f"sqlite+aiosqlite:///{tmp_path / 'a-file' / 'prefect.db'}"))
    (tmp_path / "a-file").write_text("a file where a directory should be")
    result = cli("run", env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "could not create Prefect's database" in line and "make ui" in line
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line


def test_an_unreachable_configured_api_is_one_clear_line(tmp_path):
    env = fresh_prefect_env(tmp_path / "prefect", PREFECT_API_URL="http://127.0.0.1:9/api")
    result = cli("run", env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: the Prefect API at http://127.0.0.1:9/api (PREFECT_API_URL) does not " \
           "answer" in result.stderr


def api_url_for_make(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "flows.prefect_api", *args], env=env,
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_the_users_api_wins_over_make_uis(tmp_path):
    """What the Makefile's serve/deploy/worker/run use: PREFECT_API_URL from the environment,
    else from the active profile (as `prefect cloud login` or `prefect config set` write it),
    else `make ui`'s server once it proves to be this checkout's (tests/test_api_trust.py;
    for `run`, only while something answers there). The user's own is used as it is, unchecked
    by this checkout's auth string."""
    local_ui = "http://127.0.0.1:4200/api"
    env = fresh_prefect_env(tmp_path / "prefect")
    nothing_listens = "http://127.0.0.1:9/api"
    assert api_url_for_make(env, "--fallback", nothing_listens, "--if-up") == ""

    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "team"\n\n[profiles.team]\n'
                        'PREFECT_API_URL = "https://prefect.example.com/api"\n')
    env["PREFECT_PROFILES_PATH"] = str(profiles)
    assert api_url_for_make(env, "--fallback", local_ui) == "https://prefect.example.com/api"
    assert api_url_for_make(env, "--fallback", local_ui, "--if-up") == \
        "https://prefect.example.com/api"

    env["PREFECT_API_URL"] = "http://10.0.0.5:4200/api"
    assert api_url_for_make(env, "--fallback", local_ui) == "http://10.0.0.5:4200/api"
