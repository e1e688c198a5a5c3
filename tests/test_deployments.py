"""The deployments in deployments/: what serve.py registers, that prefect.yaml says the same,
that the API plans the schedule's runs and rejects bad parameters, and that a deployment run
executes the flow to Completed on generated data (what `make serve` does, one polling round).

The test harness's temporary server runs no scheduler, so the schedule is planned through the
API's own endpoint (POST /deployments/{id}/schedule), which the scheduler service also calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import json
import os
import signal
import threading
import time
import zoneinfo
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from deployments import definitions
from deployments.definitions import (
    PIPELINE_CRON,
    PIPELINE_DEPLOYMENT,
    REAPER_CRON,
    REAPER_DEPLOYMENT,
    pipeline_deployment,
    pipeline_parameters,
    promote_deployment,
    reaper_deployment,
    reaper_parameters,
    sweep_deployment,
)
from flows.config import PipelineConfig
from tests.support import live
from tests.support.configs import local_config
from tests.support.pipeline import ARTIFACT_KEYS, REPO, artifacts_of

pytestmark = pytest.mark.long_running

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
# A zone without daylight saving and with a half-hour offset: proves the schedule is read in
# the configured zone, not in UTC or the machine's, on any day of the year.
TIMEZONE = "Asia/Kolkata"
STAGE_TASKS = ["download_data", "preview_data", "upload_data", "fit", "deploy", "smoke_predict",
               "delete_endpoint", "register_model", "publish_summary", "apply_retention"]


def api() -> httpx.Client:
    """A plain HTTP client for the harness's API: the REST calls a UI or script makes (that
    retries a busy database's 503, as Prefect's own client does)."""
    from prefect.settings import get_current_settings

    return httpx.Client(base_url=get_current_settings().api.url, timeout=30,
                        transport=live.RetryingTransport())


def flow_runs_of(deployment_id, auto_scheduled: bool = False) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"deployments": {"id": {"any_": [str(deployment_id)]}},
                            "sort": "EXPECTED_START_TIME_ASC"}
    if auto_scheduled:  # what a schedule created, as opposed to runs asked for by hand
        body["flow_runs"] = {"state": {"type": {"any_": ["SCHEDULED"]}},
                             "tags": {"all_": ["auto-scheduled"]}}
    with api() as client:
        response = client.post("/flow_runs/filter", json=body)
    response.raise_for_status()
    return response.json()


# --- what serve.py registers (no server needed) ----------------------------------------------

def test_pipeline_deployment_defaults(monkeypatch):
    monkeypatch.delenv("CIFAR10_SCHEDULE_TZ", raising=False)  # the user's zone, if exported
    deployment = pipeline_deployment()
    assert deployment.name == PIPELINE_DEPLOYMENT == "nightly"
    assert deployment.flow_name == "cifar10-pipeline"
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
    assert deployment.parameters == {"config": PipelineConfig().model_dump(mode="json")}
    assert deployment.tags == ["cifar10", "sagemaker", "pytorch"]
    assert deployment.version == definitions.project_version() != "0+unknown"
    assert deployment.description.startswith("Nightly: download CIFAR-10")
    assert deployment.enforce_parameter_schema is True
    assert deployment.entrypoint == "flows.pipeline.cifar10_pipeline"


def test_reaper_deployment_defaults():
    deployment = reaper_deployment()
    assert (deployment.name, deployment.flow_name) == (REAPER_DEPLOYMENT, "cifar10-endpoint-reaper")
    assert deployment.schedules[0].schedule.cron == REAPER_CRON == "30 * * * *"
    assert deployment.parameters == {"backend": "local", "older_than_minutes": 120,
                                     "dry_run": False}
    assert "reaper" in deployment.tags
    assert deployment.entrypoint == "flows.reaper.reap_endpoints_flow"


def test_timezone_comes_from_the_environment_or_the_argument(monkeypatch):
    monkeypatch.setenv(definitions.TIMEZONE_ENV, "Europe/Berlin")
    assert pipeline_deployment().schedules[0].schedule.timezone == "Europe/Berlin"
    assert reaper_deployment().schedules[0].schedule.timezone == "Europe/Berlin"
    assert pipeline_deployment(timezone=TIMEZONE).schedules[0].schedule.timezone == TIMEZONE


def test_bad_schedule_settings_are_clear_errors():
    from deployments.serve import main

    with pytest.raises(SystemExit, match="unknown timezone 'Mars/Olympus'"):
        main(["--timezone", "Mars/Olympus"])
    with pytest.raises(SystemExit, match="Invalid cron string"):
        main(["--cron", "0 25 * * *"])


def test_serve_refuses_to_run_without_a_server():
    """Without PREFECT_API_URL, Prefect would serve against a temporary server that has no
    scheduler: nothing would ever run on schedule."""
    from prefect.settings import temporary_settings

    from deployments.serve import main

    with temporary_settings(updates={"api.url": None}), \
            pytest.raises(SystemExit, match=r"PREFECT_API_URL is not set.*make ui"):
        main([])


def test_crash_detection_window_follows_the_heartbeat():
    """Three missed heartbeats by default; a window a healthy run's heartbeats could not
    fill is refused before anything is installed."""
    from prefect.settings import temporary_settings

    from deployments.automations import CRASH_DETECTION, FLOWS, crash_detection
    from deployments.serve import main

    with temporary_settings(updates={"flows.heartbeat_frequency": 60}):
        automation = crash_detection()
        assert automation.name == CRASH_DETECTION
        assert automation.trigger.within == dt.timedelta(seconds=180)
        assert automation.trigger.posture == "Proactive"
        assert automation.trigger.after == {"prefect.flow-run.heartbeat"}
        assert "prefect.flow-run.Completed" in automation.trigger.expect
        assert automation.trigger.match_related.get("prefect.resource.name") == FLOWS
        assert automation.actions[0].state == "CRASHED"
        assert "No heartbeat for 180s" in automation.actions[0].message
        assert crash_detection(90).trigger.within == dt.timedelta(seconds=90)
        with pytest.raises(ValueError, match="would crash healthy runs"):
            crash_detection(60)
        with pytest.raises(SystemExit, match="would crash healthy runs"):
            main(["--crash-after", "45"])
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        assert crash_detection() is None  # no heartbeats: nothing to detect with


def test_prefect_yaml_matches_the_served_deployments():
    """The work-pool route must schedule and parameterise runs exactly like `make serve`."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load(PREFECT_YAML.read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    for served in (pipeline_deployment(), reaper_deployment(), sweep_deployment(),
                   promote_deployment()):
        worker = by_name[f"{served.name}-worker"]
        if served.schedules:
            [schedule] = worker["schedules"]
            assert schedule["cron"] == served.schedules[0].schedule.cron
            assert schedule["timezone"] == "{{ $" + definitions.TIMEZONE_ENV + " }}"
        else:  # the sweep and the promotion run on demand
            assert not worker.get("schedules")
        assert worker["parameters"] == served.parameters
        assert worker["tags"] == served.tags
        assert worker["description"] == served.description
        assert worker["version"] == served.version
        assert worker["enforce_parameter_schema"] is True
        assert worker["work_pool"]["name"] == "cifar10-local"
        path, name = worker["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(str(REPO / path) + ":" + name)
        assert flow.name == served.flow_name


# --- against the API (the session's temporary server) ----------------------------------------

@pytest.fixture(scope="module")
def deployed(prefect_harness):
    """Both deployments applied as serve.py applies them, the pipeline's schedule in a
    non-UTC zone."""
    pipeline = pipeline_deployment(timezone=TIMEZONE)
    reaper = reaper_deployment()
    return {"pipeline": pipeline, "pipeline_id": pipeline.apply(),
            "reaper": reaper, "reaper_id": reaper.apply()}


def test_the_api_holds_the_deployment_with_its_schedule_and_parameters(deployed):
    with api() as client:
        response = client.get(f"/deployments/name/cifar10-pipeline/{PIPELINE_DEPLOYMENT}")
    response.raise_for_status()
    stored = response.json()
    assert stored["id"] == str(deployed["pipeline_id"])
    [schedule] = stored["schedules"]
    assert schedule["active"] is True and stored["paused"] is False
    assert schedule["schedule"] == {"cron": PIPELINE_CRON, "timezone": TIMEZONE, "day_or": True}
    assert stored["parameters"] == pipeline_parameters()
    assert stored["enforce_parameter_schema"] is True
    assert stored["version"] == definitions.project_version()
    assert set(stored["tags"]) == {"cifar10", "sagemaker", "pytorch"}
    assert "config" in stored["parameter_openapi_schema"]["properties"]


def next_daily(hour: int, zone: str, after: dt.datetime, count: int) -> list[dt.datetime]:
    """The next ``count`` times at ``hour``:00 in ``zone`` after ``after``, in UTC."""
    tz = zoneinfo.ZoneInfo(zone)
    local = after.astimezone(tz)
    first = local.replace(hour=hour, minute=0, second=0, microsecond=0)
    if first <= local:
        first += dt.timedelta(days=1)
    return [(first + dt.timedelta(days=i)).astimezone(dt.UTC) for i in range(count)]


def test_asking_the_api_to_schedule_plans_the_nightly_runs(deployed):
    deployment_id = deployed["pipeline_id"]
    before = dt.datetime.now(dt.UTC)
    with api() as client:
        response = client.post(f"/deployments/{deployment_id}/schedule",
                               json={"min_runs": 3, "max_runs": 3})
    response.raise_for_status()
    upcoming = flow_runs_of(deployment_id, auto_scheduled=True)
    times = [dt.datetime.fromisoformat(r["expected_start_time"]) for r in upcoming]
    print("next nightly runs (Asia/Kolkata 02:00) as the API reported them:",
          ", ".join(t.isoformat() for t in times))
    assert times == next_daily(2, TIMEZONE, before, 3)
    assert all(t.astimezone(zoneinfo.ZoneInfo(TIMEZONE)).hour == 2 for t in times)
    for run in upcoming:
        assert run["parameters"] == pipeline_parameters()
        assert "auto-scheduled" in run["tags"]
    # the reaper: hourly at half past, in UTC
    with api() as client:
        client.post(f"/deployments/{deployed['reaper_id']}/schedule",
                    json={"min_runs": 2, "max_runs": 2}).raise_for_status()
    reaper_times = [dt.datetime.fromisoformat(r["expected_start_time"])
                    for r in flow_runs_of(deployed["reaper_id"], auto_scheduled=True)]
    assert len(reaper_times) == 2 and all(t.minute == 30 for t in reaper_times)
    assert reaper_times[1] - reaper_times[0] == dt.timedelta(hours=1)


BAD_PARAMETERS = [
    ("pipeline", {"config": {"training": {"epochs": 0}}},
     "Validation failed for field 'config.training.epochs'. Failure reason: 0 is less than "
     "or equal to the minimum of 0"),
    ("pipeline", {"config": {"backend": "gcp"}},
     "Validation failed for field 'config.backend'. Failure reason: 'gcp' is not one of "
     "['local', 'aws']"),
    ("pipeline", {"config": {"trainig": {"epochs": 3}}},
     "Additional properties are not allowed ('trainig' was unexpected)"),
    ("pipeline", {"config": {"smoke_test": {"accuracy_floor": 1.5}}},
     "Validation failed for field 'config.smoke_test.accuracy_floor'. Failure reason: 1.5 is "
     "greater than the maximum of 1"),
    ("reaper", {"older_than_minutes": 0},
     "Validation failed for field 'older_than_minutes'. Failure reason: 0 is less than the "
     "minimum of 1"),
]


@pytest.mark.parametrize(("which", "parameters", "message"), BAD_PARAMETERS,
                         ids=["zero-epochs", "unknown-backend", "misspelt-section",
                              "floor-above-1", "reaper-zero-ttl"])
def test_bad_parameters_are_rejected_before_a_run_exists(deployed, which, parameters, message):
    deployment_id = deployed[f"{which}_id"]
    runs_before = len(flow_runs_of(deployment_id))
    with api() as client:
        response = client.post(f"/deployments/{deployment_id}/create_flow_run",
                               json={"parameters": parameters})
    assert response.status_code == 409, response.text
    assert message in response.json()["detail"]
    assert len(flow_runs_of(deployment_id)) == runs_before  # nothing was created, let alone run


# --- a deployment run, executed as `make serve` executes it ----------------------------------

def run_due_runs_once(*deployments) -> None:
    """One polling round of the runner that `serve` starts: submit the runs that are due as
    subprocesses and wait for them to finish."""
    from prefect.runner import Runner

    async def poll_once() -> None:
        runner = Runner(pause_on_shutdown=False, limit=3)
        for deployment in deployments:
            await runner.aadd_deployment(deployment)
        await runner.start(run_once=True)

    sigterm = signal.getsignal(signal.SIGTERM)  # the runner installs its own in the main thread
    try:
        asyncio.run(poll_once())
    finally:
        signal.signal(signal.SIGTERM, sigterm)


@contextlib.contextmanager
def subprocess_env(tmp_path_factory) -> Iterator[None]:
    """For the flow-run subprocesses: this checkout on the path (whichever is installed), and
    a pipeline state directory of their own, so their download does not pre-empt test_flow's
    first one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
            str(REPO), os.environ.get("PYTHONPATH")])))
        mp.setenv("CIFAR10_PIPELINE_HOME", str(tmp_path_factory.mktemp("deployment-state")))
        yield


# --- someone is told: a notification block on a loopback receiver ----------------------------

class Receiver(http.server.ThreadingHTTPServer):
    """A loopback webhook endpoint: remembers every POST as (path, JSON body)."""

    def __init__(self):
        self.posts: list[tuple[str, dict[str, Any]]] = []
        super().__init__(("127.0.0.1", 0), ReceiverHandler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def posts_to(self, path: str) -> list[dict[str, Any]]:
        return [body for to, body in self.posts if to == path]


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts.append((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def webhook_block(receiver: Receiver, name: str, path: str) -> str:
    """A CustomWebhookNotificationBlock posting {subject, body} to ``receiver``; its name."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    CustomWebhookNotificationBlock(
        name=name, url=receiver.url(path), json_data={"subject": "{{subject}}",
                                                      "body": "{{body}}"},
        allow_private_urls=True,  # a loopback receiver
    ).save(name, overwrite=True)
    return name


@pytest.fixture(scope="module")
def failure_notice(prefect_harness, receiver):
    """What `make serve NOTIFY_BLOCK=on-call` installs, installed twice (it must stay one)."""
    from deployments.automations import install_failure_notice

    block = webhook_block(receiver, "on-call", "/on-call")
    install_failure_notice(block)
    return install_failure_notice(block)


@pytest.fixture(scope="module")
def deployment_runs(deployed, failure_notice, http_server, cifar_tarball, tmp_path_factory):
    """A good run, one that bypasses the API's parameter check (a client may ask for that)
    and a dry run of the reaper, executed side by side by one runner in subprocesses (the
    failure notice is installed first)."""
    good = {"config": local_config(http_server, cifar_tarball).model_dump(mode="json")}
    bad = {"config": {**good["config"], "training": {"epochs": 0}}}
    with api() as client:
        created = [client.post(f"/deployments/{deployed[deployment]}/create_flow_run",
                               json=body) for deployment, body in (
            ("pipeline_id", {"parameters": good, "tags": ["test"]}),
            ("pipeline_id", {"parameters": bad, "enforce_parameter_schema": False,
                             "tags": ["test"]}),
            ("reaper_id", {"parameters": {"dry_run": True}}))]
    for response in created:
        response.raise_for_status()
    with subprocess_env(tmp_path_factory):
        run_due_runs_once(deployed["pipeline"], deployed["reaper"])
    with api() as client:
        return [client.get(f"/flow_runs/{r.json()['id']}").json() for r in created]


def task_runs_of(flow_run_id: str) -> list[dict[str, Any]]:
    with api() as client:
        response = client.post("/task_runs/filter", json={
            "flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})
    response.raise_for_status()
    return response.json()


def test_a_deployment_run_completes_on_generated_data(deployment_runs, deployed):
    run = deployment_runs[0]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["deployment_id"] == str(deployed["pipeline_id"])
    assert run["name"].startswith("local-tutorial-")  # the flow's run name, from the config
    tasks = task_runs_of(run["id"])
    assert sorted(t["task_key"].split("-")[0] for t in tasks) == sorted(STAGE_TASKS)
    assert {t["state"]["type"] for t in tasks} == {"COMPLETED"}
    assert set(artifacts_of(run["id"])) >= ARTIFACT_KEYS


def test_parameters_that_bypass_the_api_check_fail_before_any_task(deployment_runs):
    """Prefect validates again when the flow starts: a run the API was told not to check ends
    Failed with the pydantic message, and no task ran."""
    run = deployment_runs[1]
    print("a run that bypassed the API check ended:", run["state"]["message"])
    assert run["state"]["type"] == "FAILED"
    assert "Validation of flow parameters failed" in run["state"]["message"]
    assert task_runs_of(run["id"]) == []


def test_reaper_deployment_runs(deployment_runs):
    run = deployment_runs[2]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"] == {**reaper_parameters(), "dry_run": True}


def test_parameters_are_merged_per_key(deployed):
    """Documented behaviour for the README: an override replaces a top-level parameter whole.
    `--param config='{"training": {"epochs": 5}}'` runs with every other config field at its
    default, so the deployment's defaults must be the flow's defaults (they are)."""
    with api() as client:
        response = client.post(f"/deployments/{deployed['pipeline_id']}/create_flow_run",
                               json={"parameters": {"config": {"training": {"epochs": 5}}},
                                     "state": {"type": "SCHEDULED", "state_details": {
                                         "scheduled_time": "2099-01-01T00:00:00Z"}}})
    response.raise_for_status()
    assert response.json()["parameters"] == {"config": {"training": {"epochs": 5}}}
    resolved = PipelineConfig.model_validate(response.json()["parameters"]["config"])
    assert resolved.model_dump(mode="json") == {
        **pipeline_parameters()["config"],
        "training": {**pipeline_parameters()["config"]["training"], "epochs": 5}}



def test_a_failed_deployment_run_is_sent_to_the_notification_block_once(deployment_runs,
                                                                        receiver):
    """One failed run (of the three) produces exactly one message, saying which run, what
    failed, where to look, and which endpoint may still be up."""
    from flows.run_context import resource_name

    failed = deployment_runs[1]

    def notices() -> list[dict[str, Any]]:
        return [p for p in receiver.posts_to("/on-call") if failed["id"] in p["body"]]

    [notice] = live.wait_until(notices, "the failure notice arrives", timeout=60)
    time.sleep(3)  # a duplicate would come within the same round of the automation service
    # Exactly one failure notice: `notify test` (another test, in any order) may also post
    # its test message to this block.
    failure_notices = [p for p in receiver.posts_to("/on-call")
                       if p["subject"] != "cifar10-pipeline: a test notification"]
    assert len(failure_notices) == 1 == len(notices())
    print("the failure notice:", notice["subject"], "\n" + notice["body"])
    assert notice["subject"] == f"cifar10-pipeline run {failed['name']} ended Failed"
    body = notice["body"]
    assert f"Flow run {failed['name']} of cifar10-pipeline (deployment " \
           f"cifar10-pipeline/{PIPELINE_DEPLOYMENT}) ended Failed." in body
    assert "What failed: Validation of flow parameters failed" in body
    # The UI link; the tests' temporary server has no UI URL (`make ui` sets PREFECT_UI_URL),
    # so the notice names the run for the UI instead.
    assert f"/runs/flow-run/{failed['id']}" in body or (
        f"Open it: flow run {failed['id']} in the Prefect UI (this server has no "
        f"PREFECT_UI_URL to link to)" in body)
    endpoint = resource_name(failed["id"])
    assert f"The endpoint {endpoint} may still be up" in body
    assert f"cifar10-pipeline endpoints delete {endpoint}" in body


def test_installing_the_failure_notice_again_keeps_one(failure_notice):
    with api() as client:
        automations = client.post("/automations/filter", json={}).json()
    named = [a for a in automations if a["name"] == failure_notice.name]
    assert len(named) == 1 and named[0]["id"] == str(failure_notice.id)
    assert set(named[0]["trigger"]["expect"]) == {
        "prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}


def test_notify_test_sends_one_message(prefect_harness, receiver, failure_notice):
    from typer.testing import CliRunner

    from flows.cli import app

    block = webhook_block(receiver, "manual-check", "/manual-check")
    result = CliRunner().invoke(app, ["notify", "test", "--block", block])
    assert result.exit_code == 0, result.output
    assert "sent a test message through custom-webhook/manual-check" in result.output
    [message] = receiver.posts_to("/manual-check")
    assert message["subject"] == "cifar10-pipeline: a test notification"
    # Without --block: the block the installed automation sends to.
    before = len(receiver.posts_to("/on-call"))
    result = CliRunner().invoke(app, ["notify", "test"])
    assert result.exit_code == 0, result.output
    assert len(receiver.posts_to("/on-call")) == before + 1


def test_notify_names_a_missing_block_in_one_line(prefect_harness):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["notify", "install", "--block", "nobody-listens"])
    assert result.exit_code == 1
    assert "error: no notification block named 'nobody-listens'" in result.output
