"""Shared fixtures: generated CIFAR-format data, an isolated state directory, and a check that
no test leaves a local endpoint process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.reporting import merge, shipped, tables

# The test servers are offline: Prefect's usage telemetry would only log errors (as `make` sets).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Parallel workers (pytest-xdist) share the cores: each worker's torch, and the training jobs it
# starts, get their share. OpenMP threads that spin on an oversubscribed core stall everything.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
# The tests keep more processes busy than there are cores (workers, training hosts, model
# servers, Prefect servers): an OpenMP thread waiting for work sleeps instead of spinning on a
# core another process needs (on two cores, a tenth of the suite's CPU time).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from tests.support.pipeline import FAST_HYPERPARAMETERS, processes_under
from tests.support.synthetic import make_cifar_dir


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated CIFAR-10 batch directory (500 training, 200 test images)."""
    return make_cifar_dir(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session gets its own pipeline state directory (store, jobs, endpoints)."""
    home = tmp_path_factory.mktemp("state")
    os.environ["CIFAR10_PIPELINE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def local_backend(tmp_path_factory):
    from backends.local import LocalBackend

    return LocalBackend(root=tmp_path_factory.mktemp("local-backend"))


@pytest.fixture(scope="session")
def model_uri(local_backend, cifar_dir) -> str:
    """A model.tar.gz trained by a local training job on the generated data."""
    from backends.base import TrainingSpec

    data_uri = local_backend.upload_data(cifar_dir)
    spec = TrainingSpec(job_name="session-model", data_uri=data_uri,
                        hyperparameters=FAST_HYPERPARAMETERS)
    return local_backend.train(spec).model_uri


@pytest.fixture(scope="module")
def endpoint(request, local_backend, model_uri):
    """A local endpoint serving ``model_uri`` for one test module, named after the module."""
    from backends.base import EndpointSpec, managed_tags

    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")
    info = local_backend.deploy(EndpointSpec(name=name, model_uri=model_uri,
                                             tags=managed_tags("pytest")))
    yield info
    local_backend.delete_endpoint(info.name)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory):
    """Fails the session if any test leaves a process (an endpoint server, a training host)
    running; kills them so they do not outlive the session either."""
    yield
    if not sys.platform.startswith("linux"):
        return
    import signal
    import time

    base = tmp_path_factory.getbasetemp()
    deadline = time.monotonic() + 5
    while (leftovers := processes_under(base)) and time.monotonic() < deadline:
        time.sleep(0.2)  # processes told to stop a moment ago may still be exiting
    for found in leftovers:
        os.kill(found.pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture(scope="session")
def http_root(tmp_path_factory) -> Path:
    """The directory served by ``http_server``."""
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="session")
def http_log() -> list[str]:
    """Paths requested from ``http_server``, in order."""
    return []


@pytest.fixture(scope="session")
def http_server(http_root, http_log):
    """A loopback HTTP server over ``http_root``, for the real download code. A request for
    ``/cut/<file>`` announces the file's full length but stops halfway (a dropped connection).
    """
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output clean
            pass

        def do_GET(self):
            http_log.append(self.path)
            if self.path.startswith("/cut/"):
                data = (http_root / self.path.removeprefix("/cut/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.connection.close()
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(http_root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def cifar_tarball(http_root) -> tuple[str, str]:
    """(file name, md5) of a generated cifar-10-python.tar.gz served by ``http_server``."""
    from tests.support.synthetic import make_cifar_tarball

    md5 = make_cifar_tarball(http_root / "cifar-10-python.tar.gz")
    return "cifar-10-python.tar.gz", md5


def pytest_sessionstart(session) -> None:
    """The controller (or a run without workers) starts creating the Prefect database that
    the tests' servers copy (``prefect_database``) at once, in the background: it is ready
    when the first test needs it instead of making that test wait."""
    if hasattr(session.config, "workerinput"):
        return  # a pytest-xdist worker: the controller has started it
    from tests.support.live import create_database_in_background

    shared = session.config._tmp_path_factory.getbasetemp()
    session.config.stash[DATABASE_CREATION] = create_database_in_background(
        shared / PREFECT_DATABASE)


PREFECT_DATABASE = "prefect-database"
DATABASE_CREATION = pytest.StashKey[subprocess.Popen]()


@pytest.fixture(scope="session")
def prefect_database(tmp_path_factory) -> Path:
    """A migrated Prefect database that every test's Prefect server starts from (a copy
    each), created once per session (see ``pytest_sessionstart``): pytest-xdist workers share
    it, and wait under its lock while it is being created."""
    from tests.support.live import migrated_database

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' base directories lie side by side in it
    return migrated_database(shared / PREFECT_DATABASE)


@pytest.fixture(scope="session")
def prefect_harness(prefect_database, tmp_path_factory):
    """A temporary Prefect API on SQLite for the whole session, heartbeats off (each flow
    call would otherwise wait on the heartbeat thread)."""
    import prefect.testing.utilities
    from prefect.settings import temporary_settings

    from tests.support.live import seed_database

    # The harness keeps its database in a new mkdtemp() directory: hand it one that holds a
    # copy of the migrated database, so that its server starts without creating the schema.
    directory = tmp_path_factory.mktemp("prefect-harness")
    seed_database(prefect_database, directory / "prefect-test.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefect.testing.utilities, "mkdtemp", lambda: str(directory))
        with temporary_settings(updates={"flows.heartbeat_frequency": None}), \
                prefect.testing.utilities.prefect_test_harness(server_startup_timeout=120):
            yield


# The long modules first, the rest after in file order: parallel workers then finish together
# instead of one running a long module alone at the end. The first one mostly waits (on
# heartbeats, crash detection, cancellations): the modules right after it keep several cores
# busy each (two-host trainings, the endpoint soak) and fill those waits.
LONGEST_MODULES = ("test_faults_live.py", "test_sagemaker_drivers.py", "test_endpoint_abuse.py",
                   "test_distributed_training.py", "test_local_training.py", "test_faults.py",
                   "test_flow.py", "test_entry_script.py", "test_ui_e2e.py",
                   "test_prefect_api.py", "test_process_launcher.py", "test_aws_flow.py",
                   "test_deployments.py", "test_serving_toolkit.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session) -> None:
    """A pytest-xdist worker hands its report tables to the controller, which prints them.
    The controller stops the database creation it started if a short run ended first."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["report_tables"] = shipped()
    elif creating := session.config.stash.get(DATABASE_CREATION, None):
        if creating.poll() is None:  # no test needed it before the end
            os.killpg(creating.pid, signal.SIGKILL)
        creating.wait()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # pytest-xdist: a worker finished
    payload = getattr(node, "workeroutput", {}).get("report_tables")
    if payload:
        merge(payload)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The figures suites reported (``tests.support.reporting.report_table``), after pytest's own
    summary: the fault-injection suite's table of scenarios and leaked resources, and any
    other suite's."""
    for table in tables():
        terminalreporter.write_sep("=", table.title)
        for line in table.render():
            terminalreporter.write_line(line)
