"""Shared fixtures: generated CIFAR-format data, a pipeline state directory for the tests that
ask for one, and checks that no test leaves a local endpoint process behind or writes to the
state directory of whoever runs the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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
from backends.settings import STATE_DIR_ENV
from bench.generated_data import make_cifar_dir
from tests.support.pipeline import FAST_HYPERPARAMETERS, processes_under


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated CIFAR-10 batch directory (500 training, 200 test images)."""
    return make_cifar_dir(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def pipeline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty pipeline state directory (data, store, jobs, endpoints, registry) for this test,
    named by CIFAR10_PIPELINE_HOME: for code that finds it through the environment (a flow's
    default data directory, ``LocalBackend()``, the CLI)."""
    home = tmp_path / "pipeline-home"
    monkeypatch.setenv(STATE_DIR_ENV, str(home))
    return home


@pytest.fixture(scope="module")
def module_pipeline_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``pipeline_home`` shared by one module's tests, for modules whose tests build on the
    same state (one registry, one training cache, one downloaded copy)."""
    home = tmp_path_factory.mktemp("pipeline-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(STATE_DIR_ENV, str(home))
        yield home


def state_snapshot(home: Path) -> dict[str, int]:
    """The modification times of what lies in a state directory: any record written there
    changes one, or adds one. Aside: Prefect's own home, which the tests share by design, and
    the UI test's screenshots, kept there for a person to look at."""
    if not home.is_dir():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in home.iterdir()
            if p.name not in ("prefect", "screenshots")}


@pytest.fixture(scope="session", autouse=True)
def user_state_untouched() -> Iterator[None]:
    """Fails the session if a test wrote to the state directory that the environment the tests
    were started with names (the checkout's .state/ under ``make test``): a test that needs
    one asks for ``pipeline_home`` or ``module_pipeline_home``."""
    from backends.settings import state_dir

    home = state_dir()
    before = state_snapshot(home)
    yield
    changed = sorted(p for p, t in state_snapshot(home).items() if before.get(p) != t)
    assert not changed, f"tests wrote to {home} (not asked for a pipeline_home): {changed}"


@pytest.fixture(scope="session")
def local_backend(tmp_path_factory):
    from backends.local import LocalBackend

    return LocalBackend(root=tmp_path_factory.mktemp("local-backend"))


@pytest.fixture(scope="session")
def session_training(local_backend, cifar_dir):
    """A local training job on the generated data, in ``local_backend``: its result (job name,
    model.tar.gz, metrics, log file)."""
    from backends.base import TrainingSpec

    data_uri = local_backend.storage.upload(cifar_dir)
    spec = TrainingSpec(job_name="session-model", data_uri=data_uri,
                        hyperparameters=FAST_HYPERPARAMETERS)
    return local_backend.jobs.run(spec)


@pytest.fixture(scope="session")
def model_uri(session_training) -> str:
    """The model.tar.gz of ``session_training``."""
    return session_training.model_uri


@pytest.fixture(scope="module")
def endpoint(request, local_backend, model_uri):
    """A local endpoint serving ``model_uri`` for one test module, named after the module."""
    from backends.base import EndpointSpec, managed_tags

    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")
    info = local_backend.endpoints.deploy(EndpointSpec(name=name, model_uri=model_uri,
                                                       tags=managed_tags("pytest")))
    yield info
    local_backend.endpoints.delete(info.name)


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
    from bench.generated_data import make_cifar_tarball

    md5 = make_cifar_tarball(http_root / "cifar-10-python.tar.gz")
    return "cifar-10-python.tar.gz", md5


def pytest_sessionstart(session) -> None:
    """The controller (or a run without workers) starts creating the Prefect database that
    the tests' servers copy (``prefect_database``) at once, in the background, in a directory
    of its own that it hands to the workers: it is ready when the first test needs it instead
    of making that test wait."""
    if hasattr(session.config, "workerinput"):
        return  # a pytest-xdist worker: the controller has started it
    from tests.support.live import create_database_in_background

    shared = Path(tempfile.mkdtemp(prefix="cifar10-tests-prefect-database-"))
    session.config.stash[DATABASE_DIRECTORY] = shared
    session.config.stash[DATABASE_CREATION] = create_database_in_background(shared)


DATABASE_DIRECTORY = pytest.StashKey[Path]()
DATABASE_CREATION = pytest.StashKey[subprocess.Popen]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # pytest-xdist: the controller starts a worker
    node.workerinput["prefect_database"] = str(node.config.stash[DATABASE_DIRECTORY])


@pytest.fixture(scope="session")
def prefect_database(request: pytest.FixtureRequest) -> Path:
    """A migrated Prefect database that every test's Prefect server starts from (a copy
    each), created once per session (see ``pytest_sessionstart``): pytest-xdist workers share
    it, and wait under its lock while it is being created."""
    from tests.support.live import migrated_database

    worker = getattr(request.config, "workerinput", None)
    shared = Path(worker["prefect_database"]) if worker else \
        request.config.stash[DATABASE_DIRECTORY]
    return migrated_database(shared)


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
# instead of one running a long module alone at the end. A long module says so
# (``pytestmark = pytest.mark.long_running``); among them, the longest in the last run that
# measured them (pytest's cache) first. Only the speed depends on this order.
MODULE_SECONDS = "cifar10-pipeline/module-seconds"


def pytest_collection_modifyitems(session, config, items) -> None:
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    seconds = cache.get(MODULE_SECONDS, {}) if cache else {}

    def rank(item) -> tuple[bool, float]:
        return (item.get_closest_marker("long_running") is None,
                -seconds.get(item.path.name, 0.0))

    items.sort(key=rank)  # stable: file order within a rank


def pytest_runtest_logreport(report) -> None:
    """Adds up each module's seconds (setup, call and teardown), for the next run's order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller, or a run without workers
        module = report.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        MEASURED[module] = MEASURED.get(module, 0.0) + report.duration


MEASURED: dict[str, float] = {}


def pytest_sessionfinish(session, exitstatus) -> None:
    """A pytest-xdist worker hands its report tables to the controller, which prints them.
    The controller stops the database creation it started if a short run ended first."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["report_tables"] = shipped()
        return
    if (cache := getattr(session.config, "cache", None)) and exitstatus == 0 and MEASURED:
        cache.set(MODULE_SECONDS, {**cache.get(MODULE_SECONDS, {}), **MEASURED})
    if creating := session.config.stash.get(DATABASE_CREATION, None):
        if creating.poll() is None:  # no test needed it before the end
            os.killpg(creating.pid, signal.SIGKILL)
        creating.wait()
        shutil.rmtree(session.config.stash[DATABASE_DIRECTORY], ignore_errors=True)


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
