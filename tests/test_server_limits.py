"""The model server's bounds (``backends.local.server.ServerLimits``): requests in flight (503
past them, ServiceUnavailable through the runtime API, as SageMaker throttles), images per
request (413), the time to receive a body (408), and a log that is rate-limited and rotated.

The endpoint here runs with small bounds set through its environment, as a user would set
them: 4 requests in flight, 2 s to receive a body, 512 images per request, 5 log records per
2 s.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from backends.local.server import BoundedLogHandler, ServerLimits
from tests.support.http_client import Client, rss_bytes
from tests.support.npy_crafting import crafted_npy, crafted_npy_cases
from tests.support.payloads import npy
from tests.support.reporting import report_table

MAX_IN_FLIGHT = 4
BODY_TIMEOUT_SECONDS = 2
MAX_IMAGES = 512
LOG_RECORDS, LOG_INTERVAL_SECONDS = 5, 2
NPY = "application/x-npy"
FLOOD_THREADS, FLOOD_SECONDS = 32, 4.0
BODY_IMAGES = 426  # float32: a ~5 MiB body (12 KiB an image)


@pytest.fixture(scope="module")
def limited(local_backend, model_uri):
    from backends.base import EndpointSpec, managed_tags

    environment = {
        "CIFAR10_SERVER_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        "CIFAR10_SERVER_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_SECONDS),
        "CIFAR10_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "CIFAR10_SERVER_LOG_RECORDS_PER_INTERVAL": str(LOG_RECORDS),
        "CIFAR10_SERVER_LOG_INTERVAL_SECONDS": str(LOG_INTERVAL_SECONDS),
    }
    info = local_backend.endpoints.deploy(EndpointSpec(name="server-limits", model_uri=model_uri,
                                                       tags=managed_tags("pytest"),
                                                       environment=environment))
    yield info
    local_backend.endpoints.delete(info.name)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def slow_body(url: str, path: str = "/invocations") -> socket.socket:
    """A connection whose request announces 100 kB of body and sends 10 bytes of it (a slow
    loris): it holds one request slot until the server's receive deadline."""
    sock = socket.create_connection(address(url), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {NPY}\r\n"
                 f"Content-Length: 100000\r\n\r\n".encode() + b"\x93NUMPY\x01\x00xx")
    return sock


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """(status, everything) once the server closes the connection."""
    chunks = []
    with sock:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    return int(answer.split(b" ", 2)[1]), answer


def test_a_slow_body_gets_408_at_the_deadline_and_frees_its_slot(limited):
    started = time.monotonic()
    sock = slow_body(limited.url)
    assert Client(limited.url).request("GET", "/ping")[0] == 200  # the loop is not held
    status, answer = read_answer(sock)
    elapsed = time.monotonic() - started
    assert status == 408, answer
    assert b"did not arrive within 2 seconds" in answer and b"connection: close" in answer
    assert BODY_TIMEOUT_SECONDS - 0.5 < elapsed < BODY_TIMEOUT_SECONDS + 10


def test_past_the_in_flight_bound_both_routes_answer_503_at_once(local_backend, limited,
                                                                 cifar_dir):
    import boto3
    import botocore.config
    import botocore.exceptions

    held = [slow_body(limited.url) for _ in range(MAX_IN_FLIGHT)]
    time.sleep(0.3)  # the server has admitted them
    client = Client(limited.url)
    body = npy(np.zeros((2, 3, 32, 32), np.float32))
    started = time.monotonic()
    status, headers, payload = client.request("POST", "/invocations", body,
                                              {"Content-Type": NPY})
    assert time.monotonic() - started < 1.0  # at once, not after the slots free up
    assert status == 503 and headers["retry-after"] == "1", payload
    assert "4 requests in flight" in json.loads(payload)["message"]
    runtime = boto3.client(
        "sagemaker-runtime", endpoint_url=limited.url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
        config=botocore.config.Config(retries={"mode": "standard", "max_attempts": 1}))
    with pytest.raises(botocore.exceptions.ClientError) as err:
        runtime.invoke_endpoint(EndpointName=limited.name, Body=body, ContentType=NPY)
    assert err.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert client.request("GET", "/ping")[0] == 200
    assert [read_answer(sock)[0] for sock in held] == [408] * MAX_IN_FLIGHT
    assert client.request("POST", "/invocations", body, {"Content-Type": NPY})[0] == 200


def test_too_many_images_is_413_naming_the_limit(limited):
    client = Client(limited.url)
    over = npy(np.zeros((MAX_IMAGES + 1, 3, 32, 32), np.uint8))
    status, _, payload = client.request("POST", "/invocations", over, {"Content-Type": NPY})
    assert status == 413 and "over the limit of 512" in json.loads(payload)["message"]
    status, headers, payload = client.request(
        "POST", f"/endpoints/{limited.name}/invocations", over, {"Content-Type": NPY})
    assert status == 424 and headers["x-amzn-errortype"] == "ModelError"
    assert json.loads(payload)["OriginalStatusCode"] == 413
    at_limit = npy(np.zeros((MAX_IMAGES, 3, 32, 32), np.uint8))
    assert client.request("POST", "/invocations", at_limit, {"Content-Type": NPY})[0] == 200


def test_crafted_npy_headers_answer_400_never_500(limited):
    """The handlers' header fuzz (tests/test_handlers.py), through the server: |V0 and its
    kind answered 500 before."""

    client = Client(limited.url)
    v0 = crafted_npy("|V0", (1, 3, 32, 32))
    status, _, payload = client.request("POST", "/invocations", v0, {"Content-Type": NPY})
    assert status == 400, payload
    statuses = Counter()
    for description, body in crafted_npy_cases(np.random.default_rng(7), 300):
        status, _, payload = client.request("POST", "/invocations", body, {"Content-Type": NPY})
        statuses[status] += 1
        assert status in (200, 400, 413), (description, status, payload[:300])
    assert statuses[400] > 200


def test_a_flood_of_large_requests_keeps_ping_and_bounded_memory(limited):
    """32 clients send ~5 MiB bodies for 4 s against a bound of 4 in flight: /ping answers
    throughout, the rest get 503 (never a crash or a reset), and the server's resident memory
    stays under what 4 requests can hold.

    The bound: each admitted request holds its body twice while it is joined (2 x 5 MiB), its
    float32 batch (5 MiB) and the network's activations (conv1 alone: 426 x 6 x 28 x 28 x 4 B =
    8 MiB; the rest smaller) and its answer: under 32 MiB. A refused body is read and dropped
    64 KiB at a time. So RSS <= baseline + 4 x 32 MiB, plus 128 MiB for the allocator's free
    lists and per-thread arenas. Without the bound, 32 bodies in flight would need ~1 GiB."""
    pid = limited.extra["pid"]
    body = npy(np.random.default_rng(0).random((BODY_IMAGES, 3, 32, 32), dtype=np.float32))
    assert 5 * 2**20 - 64 * 1024 < len(body) < 5 * 2**20 + 64 * 1024
    warm = Client(limited.url, timeout=60)
    for _ in range(3):  # warm-up: the thread pool, the allocator, the model's kernels
        assert warm.request("POST", "/invocations", body, {"Content-Type": NPY})[0] == 200
    baseline = rss_bytes(pid)
    bound = baseline + MAX_IN_FLIGHT * 32 * 2**20 + 128 * 2**20
    statuses: Counter = Counter()
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def flood() -> None:
        client = Client(limited.url, timeout=60)
        while not stop.is_set():
            try:
                status = client.request("POST", "/invocations", body, {"Content-Type": NPY})[0]
            except (OSError, http.client.HTTPException) as e:
                status = repr(e)
            with lock:
                statuses[status] += 1

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(FLOOD_THREADS)]
    for thread in threads:
        thread.start()
    peak, pings, slowest_ping = baseline, 0, 0.0
    ping = Client(limited.url, timeout=10)
    started = time.monotonic()
    while time.monotonic() - started < FLOOD_SECONDS:
        peak = max(peak, rss_bytes(pid))
        sent = time.monotonic()
        try:
            status = ping.request("GET", "/ping")[0]
        except (OSError, http.client.HTTPException) as e:
            status = repr(e)
        slowest_ping = max(slowest_ping, time.monotonic() - sent)
        pings += 1
        if status != 200:
            failures.append(f"ping: {status}")
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(60)
    table = report_table("Flood of 5 MiB requests against 4 in flight",
                         ["clients", "seconds", "statuses", "pings", "slowest ping ms",
                          "RSS baseline MiB", "RSS peak MiB", "bound MiB"])
    table.add(clients=FLOOD_THREADS, seconds=FLOOD_SECONDS,
              statuses=" ".join(f"{s}x{n}" for s, n in sorted(statuses.items(), key=str)),
              pings=pings, **{"slowest ping ms": round(slowest_ping * 1000),
                              "RSS baseline MiB": baseline // 2**20,
                              "RSS peak MiB": peak // 2**20, "bound MiB": bound // 2**20})
    assert not failures, failures
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 1 and statuses[503] >= 1, statuses
    assert peak <= bound, f"RSS peaked at {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    assert Client(limited.url).request("GET", "/ping")[0] == 200


def test_the_log_is_rate_limited_with_a_suppressed_count(limited, local_backend):
    """A flood of bad HTTP requests (each logged by uvicorn) writes at most LOG_RECORDS records
    per interval to server.log, then one line with the count it suppressed."""
    log = Path(limited.extra["log"])
    before = log.read_text()
    time.sleep(LOG_INTERVAL_SECONDS)  # a fresh interval
    for _ in range(100):
        with socket.create_connection(address(limited.url), timeout=10) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            while sock.recv(65536):
                pass
    time.sleep(LOG_INTERVAL_SECONDS + 0.2)
    with socket.create_connection(address(limited.url), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # the next interval's first record
        while sock.recv(65536):
            pass
    time.sleep(0.3)
    new = log.read_text()[len(before):]
    written = new.count("Invalid HTTP request received")
    suppressed = sum(int(n) for n in re.findall(r"suppressed (\d+) log messages", new))
    assert written + suppressed == 101, new  # every record written or counted
    assert written <= 3 * LOG_RECORDS and suppressed >= 101 - 3 * LOG_RECORDS, new
    # The server's own prints (model_fn's) went through the log too; its raw output file
    # holds only what came before logging started.
    assert "serving " in log.read_text()
    assert (log.parent / "server.out").stat().st_size < 4096


def test_the_log_handler_rotates_by_size_and_reports_what_it_dropped(tmp_path):
    now = [0.0]
    limits = ServerLimits(log_records_per_interval=10, log_interval_seconds=1.0,
                          log_max_bytes=2000, log_backups=2)
    handler = BoundedLogHandler(tmp_path / "server.log", limits, clock=lambda: now[0])
    logger = logging.getLogger("test.bounded")
    logger.propagate, logger.handlers[:] = False, [handler]
    for second in range(20):
        now[0] = float(second)
        for i in range(100):
            logger.error("request %d of second %d failed", i, second)
    handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]
    assert all((tmp_path / f).stat().st_size <= 2000 + 200 for f in files)
    text = "".join((tmp_path / f).read_text() for f in reversed(files))
    assert text.count("suppressed 90 log messages") >= 5
    assert text.rstrip().endswith("suppressed 90 log messages (more than 10 in 1 seconds)")


def test_limits_come_from_the_environment_and_refuse_nonsense():
    limits = ServerLimits.from_environment({"CIFAR10_SERVER_MAX_IN_FLIGHT": "3",
                                            "CIFAR10_SERVER_BODY_TIMEOUT_SECONDS": "0.5"})
    assert (limits.max_in_flight, limits.body_timeout_seconds) == (3, 0.5)
    assert ServerLimits.from_environment({}) == ServerLimits()
    for bad in ("0", "-1", "many", "1.5"):
        with pytest.raises(ValueError, match="CIFAR10_SERVER_MAX_IN_FLIGHT"):
            ServerLimits.from_environment({"CIFAR10_SERVER_MAX_IN_FLIGHT": bad})
