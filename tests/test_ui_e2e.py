"""End to end, the way a user does it, with real processes: `make ui` (Prefect's API, UI and
scheduler, with this checkout's auth string) on a free loopback port over a temporary
PREFECT_HOME, `make serve` finding it as the trusted fallback, `make deploy` naming it as the
user's own server, `prefect deployment run` with parameter overrides (generated data over
loopback HTTP, fast hyperparameters), and the flow run's page in headless Chromium, logged in
with what `make ui` printed.

Every process starts in its own process group and is stopped with its group when the module's
tests end, pass or fail. Screenshots go to the pytest temp dir and to .state/screenshots/
(or $CIFAR10_SCREENSHOT_DIR); their paths are printed.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.definitions import pipeline_parameters
from flows.run_context import resource_name
from tests.support import live
from tests.support.browser import Browser, find_chromium
from tests.support.configs import local_config
from tests.support.pipeline import ARTIFACT_KEYS, REPO

pytestmark = [pytest.mark.long_running, pytest.mark.slow]

FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


Server = live.Server
zone_far_from_2am = live.zone_far_from_2am


@pytest.fixture(scope="module")
def server(tmp_path_factory, prefect_database) -> Iterator[Server]:
    with live.make_ui(tmp_path_factory.mktemp("real-server"), database=prefect_database,
                      settings={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}) as server:
        yield server


def port_of(server: Server) -> str:
    return server.url.rsplit(":", 1)[1]


def test_make_ui_requires_this_checkouts_auth_string_and_vacuums_old_runs(server):
    """`make ui` prints what to enter on the UI's login page; its API refuses requests
    without that string (health checks aside), and its database vacuum deletes finished runs
    after RUN_RETENTION_DAYS (90 by default)."""
    auth_file = server.logs / "pipeline-home" / "prefect-auth"
    assert auth_file.stat().st_mode & 0o777 == 0o600
    assert f"log in with: {server.auth_string} (kept in {auth_file})" in \
        (server.logs / "server.log").read_text()
    anonymous = live.api(server.url, "GET", "/api/health")
    assert anonymous is True  # probes need no credentials
    with pytest.raises(AssertionError, match="401"):
        live.api(server.url, "GET", "/api/admin/version")
    vacuum = server.api("GET", "/admin/settings")["server"]["services"]["db_vacuum"]
    print("make ui's database vacuum:", vacuum)
    assert set(vacuum["enabled"]) == {"events", "flow_runs"}
    assert vacuum["retention_period"] in (90 * 86400, "P90D", 90 * 86400.0)


def prefect(server: Server, *args: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> tuple[int, str]:
    """The prefect CLI against ``server``: (exit code, its output on one line)."""
    result = subprocess.run([sys.executable, "-m", "prefect", *args],
                            env={**server.env, **(env or {})}, cwd=cwd or server.logs,
                            capture_output=True, text=True, timeout=180)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


@pytest.fixture(scope="module")
def served(server) -> Iterator[dict[str, Any]]:
    """`make serve` with no API configured, so it falls back to `make ui`'s server (on the
    same UI_PORT, not 4200) once that proved to be this checkout's: every deployment
    registered there and a runner polling for their runs."""
    timezone = zone_far_from_2am(dt.datetime.now(dt.UTC))
    log = server.logs / "serve.log"
    fallback_env = {k: v for k, v in server.env.items()
                    if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    with live.running(live.make("serve", f"UI_PORT={port_of(server)}"), log,
                      env={**fallback_env, "CIFAR10_SCHEDULE_TZ": timezone},
                      cwd=server.logs) as process:
        nightly = live.wait_until(
            lambda: server.api("GET", "/deployments/name/cifar10-pipeline/nightly"),
            "serve registers the nightly deployment", timeout=120, process=process, log=log)
        live.wait_until(lambda: "being served" in log.read_text(errors="replace"),
                        "serve starts polling", timeout=60, process=process, log=log)
        yield {"deployment": nightly, "timezone": timezone, "process": process, "log": log}


def test_make_serve_registers_every_deployment_on_make_uis_server(server, served):
    assert server.api_url.rsplit(":", 1)[1] != "4200/api"
    assert f"Prefect API: {server.api_url}" in served["log"].read_text(errors="replace")
    reaper = server.api("GET", "/deployments/name/cifar10-endpoint-reaper/hourly")
    sweep = server.api("GET", "/deployments/name/cifar10-sweep/on-demand")
    assert reaper is not None and sweep is not None and served["deployment"] is not None
    assert sweep["schedules"] == []  # a sweep runs when asked
    assert {reaper["flow_id"], sweep["flow_id"], served["deployment"]["flow_id"]} == {
        f["id"] for f in server.api("POST", "/flows/filter", {})
        if f["name"] in ("cifar10-pipeline", "cifar10-endpoint-reaper", "cifar10-sweep")}


def runs_of(server: Server, deployment_id: str, auto_scheduled: bool = False) -> list[dict]:
    body: dict[str, Any] = {"deployments": {"id": {"any_": [deployment_id]}},
                            "sort": "EXPECTED_START_TIME_ASC"}
    if auto_scheduled:
        body["flow_runs"] = {"state": {"type": {"any_": ["SCHEDULED"]}},
                             "tags": {"all_": ["auto-scheduled"]}}
    return server.api("POST", "/flow_runs/filter", body)


def manual_runs(server: Server, deployment_id: str) -> list[dict]:
    """Runs asked for by hand (the scheduler adds its own at any moment)."""
    return [r for r in runs_of(server, deployment_id) if "auto-scheduled" not in r["tags"]]


def test_the_cli_rejects_bad_parameters_before_anything_starts(server, served):
    before = len(manual_runs(server, served["deployment"]["id"]))
    code, output = prefect(server, "deployment", "run", "cifar10-pipeline/nightly",
                           "--param", 'config={"training": {"epochs": 0}}')
    assert code == 1, output
    assert ("Error creating flow run: Validation failed for field 'config.training.epochs'. "
            "Failure reason: 0 is less than or equal to the minimum of 0") in output
    assert len(manual_runs(server, served["deployment"]["id"])) == before


@pytest.fixture(scope="module")
def triggered_run(server, served, http_server, cifar_tarball) -> dict[str, Any]:
    """`prefect deployment run` as in the README, with the config overridden to the generated
    data and fast hyperparameters; waits for the run to end."""
    config = local_config(http_server, cifar_tarball).model_dump(mode="json", exclude_defaults=True)
    code, output = prefect(server, "deployment", "run", "cifar10-pipeline/nightly",
                           "--params", json.dumps({"config": config}))
    assert code == 0, output
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
    return live.wait_until(
        lambda: (run := server.api("GET", f"/flow_runs/{run_id}"))
        and run["state_type"] in FINAL_STATES and run,
        f"flow run {run_id} finishes", timeout=240, process=served["process"],
        log=served["log"], interval=1)


def test_a_triggered_deployment_run_completes(triggered_run, served):
    assert triggered_run["state_type"] == "COMPLETED", triggered_run["state"]
    assert triggered_run["deployment_id"] == served["deployment"]["id"]
    assert triggered_run["name"].startswith("local-tutorial-")


def test_the_scheduler_plans_the_nightly_runs(server, served, triggered_run):
    """The real server's scheduler service (which the test harness lacks) plans the nightly
    runs at 02:00 in the configured timezone, with the deployment's default parameters."""
    deployment_id = served["deployment"]["id"]
    upcoming = live.wait_until(lambda: runs_of(server, deployment_id, auto_scheduled=True),
                               "the scheduler plans runs", timeout=60, log=server.logs /
                               "server.log")
    zone = zoneinfo.ZoneInfo(served["timezone"])
    times = [dt.datetime.fromisoformat(r["expected_start_time"]) for r in upcoming]
    print(f"\nnext nightly runs planned by the scheduler ({served['timezone']}):",
          ", ".join(t.isoformat() for t in times[:3]))
    assert len(times) >= 3
    assert all((t.astimezone(zone).hour, t.minute) == (2, 0) for t in times)
    assert all(b - a == dt.timedelta(days=1) for a, b in itertools.pairwise(times))
    assert times[0] - dt.datetime.now(dt.UTC) > dt.timedelta(hours=6)  # not during the test
    assert all(r["parameters"] == pipeline_parameters() for r in upcoming)


def test_prefect_yaml_deploys_to_a_process_work_pool(server, served):
    """`make deploy` (the work-pool route) against the same server, named as a user names
    their own: PREFECT_API_URL and PREFECT_API_AUTH_STRING."""
    result = subprocess.run(live.make("deploy"), env={**server.env,
                                                 "CIFAR10_SCHEDULE_TZ": served["timezone"]},
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Prefect API: {server.api_url}" in output
    assert server.api("GET", "/work_pools/cifar10-local")["type"] == "process"
    served_nightly = served["deployment"]
    worker_nightly = server.api("GET", "/deployments/name/cifar10-pipeline/nightly-worker")
    assert worker_nightly["work_pool_name"] == "cifar10-local"
    assert [s["schedule"] for s in worker_nightly["schedules"]] == \
        [s["schedule"] for s in served_nightly["schedules"]]
    assert worker_nightly["parameters"] == served_nightly["parameters"]
    assert worker_nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                             {"directory": str(REPO)}}]
    # and the served deployment is untouched (the names differ on purpose)
    assert server.api("GET", "/deployments/name/cifar10-pipeline/nightly")[
        "work_pool_name"] is None


def screenshot_dir() -> Path:
    return Path(os.environ.get("CIFAR10_SCREENSHOT_DIR") or REPO / ".state" / "screenshots")


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None,
                    reason="no chromium on PATH: `make test` installs it when it runs as root "
                           "with apt-get; otherwise `apt-get install chromium`")
def test_the_ui_shows_the_run_its_task_runs_and_artifacts(server, triggered_run,
                                                          tmp_path_factory):
    chromium = find_chromium()
    assert triggered_run["state_type"] == "COMPLETED", triggered_run["state"]
    run_id, run_name = triggered_run["id"], triggered_run["name"]
    job = resource_name(run_id)
    shots = tmp_path_factory.mktemp("screenshots")
    task_runs = [f"fit {job}", f"deploy {job}", f"smoke-predict {job}",
                 f"delete endpoint {job}", "preview 32 training images", "upload data to local",
                 "publish run summary", "download http://127.0.0.1:",
                 "register model in cifar10-pipeline", "apply retention on local"]
    with Browser(chromium, shots / "chromium-profile") as browser:
        browser.log_in(server.url, server.auth_string)  # what `make ui` printed
        browser.open(f"{server.url}/runs/flow-run/{run_id}")
        browser.wait_for_text(run_name, "Completed", "cifar10-pipeline", "nightly",
                              f"{len(task_runs)} Task runs", f"Beginning flow run '{run_name}'",
                              f"training job {job} completed")  # the Logs tab
        time.sleep(2)  # the task graph is a canvas (no text to wait for): let it draw
        browser.screenshot(shots / "1-flow-run.png")

        browser.click("Task Runs")
        browser.wait_for_text(f"({len(task_runs)} Completed)", *task_runs)
        browser.screenshot(shots / "2-task-runs.png")

        browser.click("Artifacts")
        browser.wait_for_text(*sorted(ARTIFACT_KEYS), "Sample training images")
        browser.screenshot(shots / "3-artifacts.png")

        browser.click("cifar10-preview")  # the artifact's page: the embedded JPEG renders
        browser.wait_for_text("Sample training images with their class names")
        live.wait_until(lambda: browser.evaluate(
            "[...document.images].some(i => i.src.startsWith('data:image/jpeg')"
            " && i.complete && i.naturalWidth > 100)"), "the preview image renders", timeout=30)
        browser.screenshot(shots / "4-preview-artifact.png")

    kept = screenshot_dir()
    kept.mkdir(parents=True, exist_ok=True)
    for shot in sorted(shots.glob("*.png")):
        shutil.copy(shot, kept / shot.name)
    print(f"\nUI screenshots of flow run {run_name}: {shots} (copied to {kept})")
