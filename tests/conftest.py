"""Shared fixtures: generated CIFAR-format data, an isolated state directory, and a check that
no test leaves a local endpoint process behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.reporting import tables

# The test servers are offline: Prefect's usage telemetry would only log errors (as `make` sets).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
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
    for pid, _ in leftovers:
        os.kill(pid, signal.SIGKILL)
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


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API on SQLite for the whole session, heartbeats off (each flow
    call would otherwise wait on the heartbeat thread)."""
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={"flows.heartbeat_frequency": None}), \
            prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The figures suites reported (``tests.support.reporting.report_table``), after pytest's own
    summary: the fault-injection suite's table of scenarios and leaked resources, and any
    other suite's."""
    for table in tables():
        terminalreporter.write_sep("=", table.title)
        for line in table.render():
            terminalreporter.write_line(line)
