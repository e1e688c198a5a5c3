"""Shared fixtures: generated CIFAR-format data, an isolated state directory, and a check that
no test leaves a local endpoint process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reporting import tables

# The test servers are offline: Prefect's usage telemetry would only log errors (as `make` sets).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from tests.synthetic import make_cifar_dir

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPT = REPO / "model_src" / "cifar10.py"


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


def sagemaker_env(root: Path, data_dir: Path, hosts: list[str] | None = None,
                  host: str = "algo-1") -> dict[str, str]:
    """The environment SageMaker gives a training container whose /opt/ml is ``root``."""
    import json

    hosts = hosts or ["algo-1"]
    for sub in ("model", "output/data"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "SM_MODEL_DIR": str(root / "model"),
        "SM_CHANNEL_TRAINING": str(data_dir),
        "SM_CHANNELS": '["training"]',
        "SM_OUTPUT_DIR": str(root / "output"),
        "SM_OUTPUT_DATA_DIR": str(root / "output/data"),
        "SM_HOSTS": json.dumps(hosts),
        "SM_CURRENT_HOST": host,
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_entry_script(args: list[str], env: dict[str, str], cwd: Path,
                     timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY_SCRIPT), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


FAST_HYPERPARAMETERS = {"epochs": 2, "batch-size": 16, "lr": 0.02}


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


def _ancestors() -> set[int]:
    """This process and the ones above it (make, a shell, `timeout`...): never leftovers,
    even when their command line names the temporary directory (--basetemp)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _processes_under(base: Path) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose command line or working directory lies under
    ``base``: servers, training hosts or anything else a test started there."""
    found = []
    ancestors = _ancestors()
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid in ancestors:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (str(base) in cmdline or cwd.startswith(str(base))):
            found.append((pid, cmdline))
    return found


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
    while (leftovers := _processes_under(base)) and time.monotonic() < deadline:
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
    from tests.synthetic import make_cifar_tarball

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
    """The figures suites reported (``tests.reporting.report_table``), after pytest's own
    summary: the fault-injection suite's table of scenarios and leaked resources, and any
    other suite's."""
    for table in tables():
        terminalreporter.write_sep("=", table.title)
        for line in table.render():
            terminalreporter.write_line(line)
