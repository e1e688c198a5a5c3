"""Teardown under faults that need real processes: a real `prefect server start`, `python -m
deployments.serve` running the deployment's runs as subprocesses (as `make serve` does), and
pipeline runs that nobody supervises. Every run trains on generated data served over loopback
HTTP.

- cancel a served run during training, and during smoke-predict (the endpoint up and in use);
- cancel a served sweep while two of its points train;
- SIGKILL a served run's flow process while its endpoint is up (the runner sees it die);
- SIGTERM an unsupervised `cifar10-pipeline run` during smoke-predict (`kill`, a stop);
- SIGKILL an unsupervised run while its endpoint is up, on the local backend (`cifar10-pipeline
  run`) and on the AWS backend against moto (``fault_injection/run_on_moto.py``): the endpoint
  outlives the process by design, the reaper deletes it, and the crash-detection automation
  that serve installs marks the run Crashed once its heartbeats stop.

Served runs are local-backend only: the moto stand-in lives in the process that runs the flow,
and the runner's subprocesses are Prefect's. A slow smoke test is injected without touching
the project's code: ``fault_injection/sitecustomize.py`` on the processes' PYTHONPATH holds a
run's first request to its endpoint while a hold file exists. Every process starts in its own
process group and is stopped with it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from backends.aws import AwsBackend
from backends.local import LocalBackend
from backends.reaper import reap_endpoints
from flows.run_context import resource_name
from flows.sweep import point_job_name
from tests.support import live
from tests.support.aws_fakes import (
    BUCKET,
    REGION,
    ROLE_ARN,
    RUNTIME_URL_ENV,
    SageMakerStandIn,
    fresh_account,
)
from tests.support.configs import aws_config, local_config
from tests.support.faults import (
    FAULT_INJECTION,
    NOT_APPLICABLE,
    alive,
    aws_leaks,
    children_of,
    environment_of,
    fault_table,
    local_leaks,
    short,
)

pytest_plugins = ["tests.support.aws_fixtures"]
pytestmark = [pytest.mark.long_running, pytest.mark.slow]

FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
HEARTBEAT_SECONDS = 30  # Prefect's minimum: runs started here send one every 30 s
# The crash-detection window serve installs here (default: 3 beats). No live run here lasts
# 30 s, so none needs a second heartbeat: the window only has to outlast the first one by more
# than a run lives (the longest, a run held until its scenario, ~25 s).
CRASH_AFTER_SECONDS = 40
LONG_TRAINING = {"epochs": 1000}  # runs until cancelled


@dataclass
class Served:
    server: live.Server
    process: subprocess.Popen
    log: Path
    deployment_id: str
    home: Path  # the runs' CIFAR10_PIPELINE_HOME
    control: Path  # CIFAR10_FAULTS_DIR of the runs

    def backend(self) -> LocalBackend:
        return LocalBackend(root=self.home)


def fault_env(control: Path, home: Path) -> dict[str, str]:
    """The fault injection on the path, its control directory, heartbeats every 30 s."""
    control.mkdir(parents=True, exist_ok=True)
    return {
        "PYTHONPATH": os.pathsep.join([str(FAULT_INJECTION), str(live.REPO)]),
        "CIFAR10_FAULTS_DIR": str(control),
        "CIFAR10_PIPELINE_HOME": str(home),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, prefect_database) -> Iterator[live.Server]:
    with live.prefect_server(tmp_path_factory.mktemp("faults-server"),
                             database=prefect_database) as server:
        yield server


@pytest.fixture(scope="module")
def served(server) -> Iterator[Served]:
    base = server.logs
    log = base / "serve.log"
    env = {**server.env, **fault_env(base / "serve-control", base / "serve-home"),
           "CIFAR10_SCHEDULE_TZ": live.zone_far_from_2am(dt.datetime.now(dt.UTC))}
    with live.running([sys.executable, "-m", "deployments.serve",
                       "--crash-after", str(CRASH_AFTER_SECONDS)],
                      log, env=env, cwd=base) as process:
        deployment = live.wait_until(
            lambda: server.api("GET", "/deployments/name/cifar10-pipeline/nightly"),
            "serve registers the nightly deployment", timeout=120, process=process, log=log)
        live.wait_until(lambda: "being served" in log.read_text(errors="replace"),
                        "serve starts polling", timeout=60, process=process, log=log)
        try:
            yield Served(server, process, log, deployment["id"], base / "serve-home",
                         base / "serve-control")
        finally:
            delete_every_endpoint(LocalBackend(root=base / "serve-home"))


def delete_every_endpoint(backend: LocalBackend) -> None:
    """After a failed scenario: endpoint servers live in sessions of their own, so stopping
    a process group does not stop them."""
    for name in backend.endpoints.records.names():
        backend.endpoints.delete(name)


def wait_for(check: Callable[[], Any], what: str, timeout: float, served: Served | None = None,
             log: Path | None = None, process: subprocess.Popen | None = None) -> Any:
    return live.wait_until(check, what, timeout=timeout,
                           process=process or (served.process if served else None),
                           log=log or (served.log if served else None), interval=0.2)


def flow_run(server: live.Server, run_id: str) -> dict[str, Any]:
    return server.api("GET", f"/flow_runs/{run_id}")


def final_state(server: live.Server, run_id: str, timeout: float, **context) -> dict[str, Any]:
    return wait_for(lambda: (run := flow_run(server, run_id)) and
                    run["state_type"] in FINAL_STATES and run,
                    f"flow run {run_id} ends", timeout, **context)


def trigger(served: Served, http_server: str, cifar_tarball, hold_smoke: bool = False,
            **overrides) -> str:
    """A run of the served deployment (fast settings unless overridden); returns its id."""
    config = local_config(http_server, cifar_tarball, **overrides).model_dump(mode="json")
    run = served.server.api("POST", f"/deployments/{served.deployment_id}/create_flow_run",
                            {"parameters": {"config": config}})
    if hold_smoke:  # long before the run reaches its smoke test (it starts, trains, deploys)
        (served.control / f"hold-smoke-{run['id']}").touch()
    return run["id"]


def cancel(server: live.Server, run_id: str) -> None:
    """What the UI's Cancel button does: propose Cancelling; the runner does the rest."""
    result = server.api("POST", f"/flow_runs/{run_id}/set_state", {
        "state": {"type": "CANCELLING", "message": "cancelled by test_faults_live"}})
    assert result["status"] == "ACCEPT", result


def cancel_and_record(served: Served, run_id: str, scenario: str,
                      started: float) -> dict[str, Any]:
    """Cancels a served run as the UI does, waits for its end and records its row; the run
    must end Cancelled with a message. Returns the run's local leak counts (other served runs
    may be under way: ``test_the_served_runs_left_nothing_behind`` counts everything)."""
    cancel(served.server, run_id)
    run = final_state(served.server, run_id, 90, served=served)
    leaks = local_leaks(served.home, resource_name(run_id))
    record_row(scenario, run, leaks, started)
    assert run["state"]["name"] == "Cancelled", run["state"]
    assert run["state"]["message"]
    return leaks


def endpoint_up(backend: LocalBackend, name: str):
    info = backend.endpoints.describe(name)
    return info if info is not None and info.status == "InService" else None


def flow_process(served: Served, run_id: str) -> int:
    """The runner's subprocess executing the run (its training hosts and endpoint servers
    inherit the run id in their environment too, but are not the runner's children)."""
    found = [pid for pid in children_of(served.process.pid)
             if environment_of(pid).get("PREFECT__FLOW_RUN_ID") == run_id]
    assert len(found) == 1, found
    return found[0]


def record_row(scenario: str, run: dict[str, Any], leaks: dict[str, Any], started: float,
               backend: str = "local", reaped: int | str = "-") -> None:
    fault_table().add(backend=backend, scenario=scenario, **{
        "final state": run["state"]["name"],
        "cause (state message)": short(run["state"]["message"]),
        "reaper deleted": reaped, "seconds": time.monotonic() - started}, **leaks)


def reap_with_the_cli(server: live.Server, home: Path, dry_run: bool = False) -> list[str]:
    """`cifar10-pipeline endpoints reap --older-than 0s` on the local backend at ``home``:
    the names it deleted (``dry_run``: would delete, leaving the other scenarios' endpoints
    alone)."""
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "endpoints", "reap", "--older-than", "0s",
         *(["--dry-run"] if dry_run else [])],
        env={**server.env, "CIFAR10_PIPELINE_HOME": str(home)},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    verb = "would delete " if dry_run else "deleted "
    return [line.removeprefix(verb) for line in result.stdout.splitlines()
            if line.startswith(verb)]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --- SIGKILL of runs nobody supervises. Started first, both at once: the crash detection that
# marks them Crashed takes up to ~50 s after the kill, so the module's last tests check it while
# the other scenarios have run meanwhile. -----------------------------------------------------

@dataclass
class KilledRun:
    run_id: str
    name: str  # its endpoint's
    server_pid: int  # the endpoint's model server
    killed_at: float
    started: float
    reaped: list[str] = field(default_factory=list)
    leaks: dict[str, Any] = field(default_factory=dict)
    state_after_kill: str = ""  # the run's state type right after the kill, as Prefect says


def run_until_smoke_then_kill(args: list[str], env: dict[str, str], control: Path,
                              log: Path, cwd: Path, endpoint_up: Callable[[str], Any],
                              sig: int = signal.SIGKILL) -> tuple[str, int, float, int]:
    """Starts ``args`` (a whole pipeline run), waits until its smoke test holds the endpoint,
    sends it ``sig``, waits for it to exit. Returns (run id, the endpoint server's pid, when
    the signal was sent, the exit status)."""
    (control / "hold-smoke").touch()
    with live.running(args, log, env=env, cwd=cwd) as process:
        marker = wait_for(lambda: next(control.glob("in-smoke-*"), None),
                          "the run reaches its smoke test", 180, process=process, log=log)
        run_id = marker.name.removeprefix("in-smoke-")
        server_pid = endpoint_up(resource_name(run_id))
        assert server_pid, "the endpoint is not InService during the smoke test"
        os.kill(process.pid, sig)
        killed_at = time.monotonic()
        returncode = process.wait(timeout=60)  # SIGTERM: after the flow's own teardown
    return run_id, server_pid, killed_at, returncode


def cli_run(http_server: str, cifar_tarball: tuple[str, str]) -> list[str]:
    """`cifar10-pipeline run` with fast settings on the generated data."""
    name, md5 = cifar_tarball
    return [sys.executable, "-m", "flows.cli", "run", "--data-url", f"{http_server}/{name}",
            "--data-md5", md5, "--epochs", "2", "--batch-size", "16", "--lr", "0.02",
            "--smoke-images", "100", "--accuracy-floor", "0.5"]


@contextlib.contextmanager
def killed_local_run_on(server: live.Server, http_server: str,
                        cifar_tarball: tuple[str, str]) -> Iterator[KilledRun]:
    """`cifar10-pipeline run` against the server, SIGKILLed while its smoke test is using the
    endpoint."""
    started = time.monotonic()
    base = server.logs / "unsupervised-local"
    env = {**server.env, **fault_env(base / "control", base / "home")}
    args = cli_run(http_server, cifar_tarball)

    def server_pid(endpoint: str) -> int | None:
        info = endpoint_up(LocalBackend(root=base / "home"), endpoint)
        return info.extra["pid"] if info else None

    try:
        run_id, pid, killed_at, _ = run_until_smoke_then_kill(
            args, env, base / "control", base / "run.log", base, server_pid)
        yield KilledRun(run_id, resource_name(run_id), pid, killed_at, started)
    finally:
        delete_every_endpoint(LocalBackend(root=base / "home"))


@dataclass
class KilledAwsRun(KilledRun):
    account: Any = None  # tests.support.aws_fakes.MotoAccount
    stand_in: Any = None  # tests.support.aws_fakes.SageMakerStandIn, on the killed run's root


@contextlib.contextmanager
def killed_aws_run_on(server: live.Server, moto_server: str, trained_model, http_server: str,
                      cifar_tarball: tuple[str, str]) -> Iterator[KilledAwsRun]:
    """The pipeline on the AWS backend (moto + the stand-in) in a process of its own, against
    the server, SIGKILLed while its smoke test is using the endpoint."""
    started = time.monotonic()
    account = fresh_account(moto_server)
    base = server.logs / "unsupervised-aws"
    base.mkdir()
    stand_in_root = base / "stand-in"
    config = aws_config(http_server, cifar_tarball)
    (base / "model.tar.gz").write_bytes(trained_model.model_tar)
    (base / "settings.json").write_text(json.dumps({
        "moto_url": moto_server, "stand_in_root": str(stand_in_root),
        "model_tar": str(base / "model.tar.gz"), "metrics": trained_model.metrics,
        "log_lines": trained_model.log_lines, "config": config.model_dump(mode="json")}))
    # moto_server put the AWS settings (moto's URL, dummy credentials) in our environment.
    aws_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    aws_env.pop(RUNTIME_URL_ENV, None)
    env = {**server.env, **aws_env, **fault_env(base / "control", base / "home")}
    stand_in = SageMakerStandIn(account, trained_model, stand_in_root)

    def server_pid(endpoint: str) -> int | None:
        described = account.sm.describe_endpoint(EndpointName=endpoint) \
            if endpoint in account.sagemaker_resources()["endpoints"] else None
        info = stand_in.endpoints.describe(endpoint)
        up = described and described["EndpointStatus"] == "InService" and info and \
            info.status == "InService"
        return info.extra["pid"] if up else None

    args = [sys.executable, str(FAULT_INJECTION / "run_on_moto.py"),
            str(base / "settings.json")]
    try:
        run_id, pid, killed_at, _ = run_until_smoke_then_kill(
            args, env, base / "control", base / "run.log", base, server_pid)
        yield KilledAwsRun(run_id, resource_name(run_id), pid, killed_at, started,
                           account=account, stand_in=stand_in)
    finally:
        stand_in.close()  # stops what a failed scenario left serving


@pytest.fixture(scope="module")
def killed_runs(server, served, moto_server, trained_model, http_server,
                cifar_tarball) -> Iterator[tuple[KilledRun, KilledAwsRun]]:
    """Both unsupervised runs, local and AWS, started together and SIGKILLed (`served`
    installed the crash-detection automation on this server): the wait for their crash
    detection, the module's longest, then runs for both at once."""
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(max_workers=2) as pool:
        local = pool.submit(stack.enter_context,
                            killed_local_run_on(server, http_server, cifar_tarball))
        aws = pool.submit(stack.enter_context, killed_aws_run_on(
            server, moto_server, trained_model, http_server, cifar_tarball))
        futures.wait([local, aws])
        # Read now: the crash detection (another test, in any order) marks them Crashed later.
        for killed in (local.result(), aws.result()):
            killed.state_after_kill = flow_run(server, killed.run_id)["state_type"]
        yield local.result(), aws.result()


@pytest.fixture(scope="module")
def killed_local_run(killed_runs) -> KilledRun:
    return killed_runs[0]


@pytest.fixture(scope="module")
def killed_aws_run(killed_runs) -> KilledAwsRun:
    return killed_runs[1]


def test_sigkill_unsupervised_local_run_then_the_reaper(server, killed_local_run):
    killed = killed_local_run
    home = server.logs / "unsupervised-local" / "home"
    backend = LocalBackend(root=home)
    # By design an endpoint is not tied to the process that deployed it (a SageMaker endpoint
    # is not either): it survives, and the run, unable to report, still says Running.
    survivor = backend.endpoints.describe(killed.name)
    assert survivor is not None and survivor.status == "InService", survivor
    assert alive(killed.server_pid)
    assert killed.state_after_kill == "RUNNING"

    killed.reaped = reap_with_the_cli(server, home)
    killed.leaks = local_leaks(home)
    assert killed.reaped == [killed.name]
    assert backend.endpoints.describe(killed.name) is None
    assert not alive(killed.server_pid)
    assert killed.leaks == {"endpoints": 0, "configs": "-", "models": "-", "processes": 0}


def test_sigkill_unsupervised_aws_run_then_the_reaper(server, killed_aws_run):
    killed = killed_aws_run
    everything = {"endpoints": [killed.name], "endpoint_configs": [killed.name],
                  "models": [killed.name]}
    assert killed.account.sagemaker_resources() == everything
    assert alive(killed.server_pid)  # the stand-in's "instance" serving the endpoint
    assert killed.state_after_kill == "RUNNING"

    # The reaper (what the CLI and the reaper flow run) on a backend whose boto3 session has
    # the stand-in attached: its DeleteEndpoint stops the model server, as AWS would.
    session = boto3.Session(region_name=REGION)
    killed.stand_in.attach(session)
    backend = AwsBackend(region=REGION, role_arn=ROLE_ARN, bucket=BUCKET, boto_session=session)
    killed.reaped = reap_endpoints(backend, dt.timedelta(0)).deleted
    killed.leaks = aws_leaks(killed.account, killed.stand_in)
    assert killed.reaped == [killed.name]
    assert not alive(killed.server_pid)
    assert killed.leaks == {"endpoints": 0, "configs": 0, "models": 0, "processes": 0}


@pytest.fixture(scope="module")
def runs_held_in_smoke(served, http_server, cifar_tarball) -> dict[str, str]:
    """The served runs of the scenarios that strike while a run holds in its smoke test,
    triggered together before the first served scenario: they train and deploy while the
    scenarios before theirs run (what this module does is mostly waiting on runs)."""
    return {scenario: trigger(served, http_server, cifar_tarball, hold_smoke=True)
            for scenario in ("cancel", "sigkill")}


def run_held_in_smoke(served: Served, run_id: str):
    """Waits until the served run ``run_id`` holds in its smoke test with the endpoint
    InService: (backend, run id, endpoint name, endpoint info)."""
    backend = served.backend()
    name = resource_name(run_id)
    wait_for(lambda: (served.control / f"in-smoke-{run_id}").exists(),
             "the run reaches its smoke test", 180, served)
    endpoint = endpoint_up(backend, name)
    assert endpoint is not None, "the endpoint is not InService during the smoke test"
    return backend, run_id, name, endpoint


# --- cancellation --------------------------------------------------------------------------

@pytest.mark.usefixtures("runs_held_in_smoke")  # they get ready meanwhile
def test_cancel_during_training(served, http_server, cifar_tarball):
    started = time.monotonic()
    backend = served.backend()
    run_id = trigger(served, http_server, cifar_tarball, training=LONG_TRAINING)
    name = resource_name(run_id)
    job_dir = backend.jobs.job_dir(name)
    # Training is under way once the job's log shows a finished epoch.
    wait_for(lambda: "epoch=1;" in _read(job_dir / "training.log"),
             "the run's training job finishes an epoch", 180, served)
    hosts = json.loads((job_dir / "job.json").read_text())["processes"]
    assert hosts and all(alive(h["pid"]) for h in hosts)

    leaks = cancel_and_record(served, run_id, "cancel during training (served run)", started)

    job = json.loads((job_dir / "job.json").read_text())
    assert job["status"] == "Stopped", job  # the job itself records why it ended
    assert not any(alive(h["pid"]) for h in hosts)
    assert backend.endpoints.describe(name) is None  # none was ever created
    assert leaks["endpoints"] == leaks["processes"] == 0


def test_cancel_during_smoke_predict(served, runs_held_in_smoke):
    started = time.monotonic()
    backend, run_id, name, endpoint = run_held_in_smoke(served, runs_held_in_smoke["cancel"])

    leaks = cancel_and_record(served, run_id, "cancel during smoke-predict (served run)",
                              started)

    assert backend.endpoints.describe(name) is None
    assert not alive(endpoint.extra["pid"])
    assert leaks["endpoints"] == leaks["processes"] == 0


def test_cancel_mid_sweep_stops_every_training(served, http_server, cifar_tarball):
    """Two points training at once (as long as they are let), cancelled as the UI does: no
    training process survives and no endpoint was ever created."""
    started = time.monotonic()
    backend = served.backend()
    sweep = served.server.api("GET", "/deployments/name/cifar10-sweep/on-demand")
    config = {"base": local_config(http_server, cifar_tarball, training=LONG_TRAINING
                                 ).model_dump(mode="json"),
              "grid": {"learning_rate": [0.021, 0.022]}, "max_parallel": 2}
    run_id = served.server.api("POST", f"/deployments/{sweep['id']}/create_flow_run",
                               {"parameters": {"config": config}})["id"]
    job_dirs = [backend.jobs.job_dir(point_job_name(run_id, i)) for i in (1, 2)]
    wait_for(lambda: all("epoch=1;" in _read(d / "training.log") for d in job_dirs),
             "both points' training jobs finish an epoch", 240, served)
    hosts = [h for d in job_dirs for h in json.loads((d / "job.json").read_text())["processes"]]
    assert len(hosts) == 2 and all(alive(h["pid"]) for h in hosts)

    leaks = cancel_and_record(served, run_id, "cancel mid-sweep (served run, 2 points "
                                              "training)", started)

    assert not any(alive(h["pid"]) for h in hosts)
    for job_dir in job_dirs:  # each job records why it ended
        assert json.loads((job_dir / "job.json").read_text())["status"] == "Stopped"
    assert backend.endpoints.describe(resource_name(run_id)) is None  # none was ever created
    assert leaks["endpoints"] == leaks["processes"] == 0


# --- SIGKILL of a served run's flow process ------------------------------------------------

def test_sigkill_served_flow_process_while_the_endpoint_is_up(served, runs_held_in_smoke):
    started = time.monotonic()
    backend, run_id, name, endpoint = run_held_in_smoke(served, runs_held_in_smoke["sigkill"])

    os.kill(flow_process(served, run_id), signal.SIGKILL)
    run = final_state(served.server, run_id, 60, served=served)
    # The runner saw its subprocess die: it reports Crashed and runs the flow's on_crashed
    # hook, which deletes the endpoint. The reaper, run after it, finds nothing of it left
    # (a dry run: another scenario's run may hold its endpoint up meanwhile).
    wait_for(lambda: backend.endpoints.describe(name) is None,
             "the on_crashed hook deletes the endpoint", 30, served)
    reaped = [n for n in reap_with_the_cli(served.server, served.home, dry_run=True)
              if n == name]
    leaks = local_leaks(served.home, name)
    record_row("SIGKILL flow process, endpoint up (served run; the runner's on_crashed hook)",
               run, leaks, started, reaped=len(reaped))

    assert run["state"]["name"] == "Crashed", run["state"]
    assert "SIGKILL" in run["state"]["message"]
    assert not alive(endpoint.extra["pid"])
    assert reaped == []
    assert leaks["endpoints"] == leaks["processes"] == 0


def test_the_served_runs_left_nothing_behind(served):
    """After every served scenario (some ran side by side): no endpoint, training host or
    server of any of them."""
    assert local_leaks(served.home) == {"endpoints": 0, "configs": NOT_APPLICABLE,
                                        "models": NOT_APPLICABLE, "processes": 0}


# --- SIGTERM of a run nobody supervises (`kill PID`, a service or container stop) ----------

def test_sigterm_unsupervised_run_during_smoke_predict(server, http_server, cifar_tarball):
    started = time.monotonic()
    base = server.logs / "sigterm-local"
    backend = LocalBackend(root=base / "home")
    env = {**server.env, **fault_env(base / "control", base / "home")}

    def server_pid(endpoint: str) -> int | None:
        info = endpoint_up(backend, endpoint)
        return info.extra["pid"] if info else None

    try:
        run_id, pid, _, returncode = run_until_smoke_then_kill(
            cli_run(http_server, cifar_tarball), env, base / "control", base / "run.log",
            base, server_pid, sig=signal.SIGTERM)
        # Prefect turns the SIGTERM into an exception in the flow: its finally deletes the
        # endpoint, the engine reports Crashed, and its on_crashed hook finds nothing left.
        run = flow_run(server, run_id)
        leaks = local_leaks(base / "home")
        record_row("SIGTERM unsupervised `cifar10-pipeline run` during smoke-predict", run,
                   leaks, started)
    finally:
        delete_every_endpoint(backend)
    assert returncode == -signal.SIGTERM
    assert run["state"]["name"] == "Crashed", run["state"]
    assert "termination signal" in run["state"]["message"]
    assert not alive(pid)
    assert leaks["endpoints"] == leaks["processes"] == 0


# --- last: the final states of the runs killed first ---------------------------------------

def assert_marked_crashed(server: live.Server, killed: KilledRun) -> dict[str, Any]:
    """Heartbeats come every 30 s: the last one at most 30 s before the kill, so the
    automation fires at most CRASH_AFTER_SECONDS after it, plus its 5 s evaluation period."""
    remaining = CRASH_AFTER_SECONDS + 20 - (time.monotonic() - killed.killed_at)
    run = final_state(server, killed.run_id, max(remaining, 1), log=server.logs / "server.log")
    assert run["state"]["name"] == "Crashed", run["state"]
    assert f"No heartbeat for {CRASH_AFTER_SECONDS}s" in run["state"]["message"]
    return run


def check_crashed_and_record(server: live.Server, killed: KilledRun, scenario: str,
                             **row: Any) -> None:
    run = flow_run(server, killed.run_id)
    try:
        run = assert_marked_crashed(server, killed)
    finally:
        record_row(scenario, run, killed.leaks, killed.started, reaped=len(killed.reaped),
                   **row)


def test_the_killed_unsupervised_local_run_is_marked_crashed(server, killed_local_run):
    check_crashed_and_record(
        server, killed_local_run,
        "SIGKILL unsupervised `cifar10-pipeline run`, endpoint up; then the reaper")


def test_the_killed_unsupervised_aws_run_is_marked_crashed(server, killed_aws_run):
    check_crashed_and_record(
        server, killed_aws_run,
        "SIGKILL unsupervised run (own process), endpoint up; then the reaper",
        backend="aws (moto)")


def test_installing_crash_detection_again_updates_it_in_place(server, served, killed_local_run,
                                                              killed_aws_run):
    """`make deploy` after `make serve` (or serve restarted) leaves one automation, with the
    newest window. Only once the killed runs are marked Crashed under the window they were
    killed under: a new window would change what marks them, whatever order tests run in."""
    from deployments.automations import CRASH_DETECTION

    for killed in (killed_local_run, killed_aws_run):
        assert_marked_crashed(server, killed)

    result = subprocess.run(
        [sys.executable, "-m", "deployments.automations", "--crash-after", "75"],
        env={**server.env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(75s of silence)" in result.stdout
    found = server.api("POST", "/automations/filter",
                       {"automations": {"name": {"any_": [CRASH_DETECTION]}}})
    assert [a["trigger"]["within"] for a in found] == [75.0]
