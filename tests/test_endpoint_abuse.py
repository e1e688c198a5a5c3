"""Abuse of a local endpoint: a bounded, seeded fuzz run (every malformed request gets a 4xx
with a JSON message, never a 5xx or a hang, and /ping answers throughout), and a soak run
with concurrent clients (0 errors, memory stable).

The soak runs SOAK_SECONDS (8 in `make test` and CI: long enough for the memory check after
its warm-up quarter); `make soak` runs the long version (180 s).
"""

from __future__ import annotations

import http.client
import json
import os
import pickle
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from backends.local.server import MAX_PAYLOAD_BYTES
from tests.support.http_client import Client, rss_bytes
from tests.support.payloads import npy
from tests.support.reporting import report_table

pytestmark = pytest.mark.long_running

FUZZ_CASES = 400
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "8"))
NPY, JSON = "application/x-npy", "application/json"


# -- the fuzz run ---------------------------------------------------------------------------

Case = tuple[str, bytes, dict[str, str]]  # (category, body, headers)


def fuzz_cases(rng: np.random.Generator, n: int) -> list[Case]:
    """Seeded malformed (and some well-formed) requests, across every category of abuse."""
    dtypes = ["int8", "int16", "int32", "int64", "uint16", "uint32", "bool", "complex64",
              "<U3", "S4", "datetime64[s]", "float16", "float64", ">f4"]
    content_types = [NPY, JSON, "", "text/csv", "application/octet-stream",
                     "application/x-npy; q=1", "APPLICATION/JSON", "image/png", "*/*",
                     "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                     "\t", "x" * 300]
    accepts = [NPY, JSON, "*/*", "", "text/csv", "application/x-npy, text/csv", "image/*",
               "application/json;q=0.1, application/x-npy", "nonsense/" + "a" * 200]

    def shape() -> tuple[int, ...]:
        return tuple(int(d) for d in rng.integers(0, 40, size=rng.integers(0, 6)))

    makers: dict[str, Callable[[], tuple[bytes, str]]] = {
        "random bytes": lambda: (rng.bytes(int(rng.integers(1, 20_000))),
                                 str(rng.choice([NPY, JSON]))),
        "pickled npy": lambda: (npy(np.array([{"x": 1}, None], dtype=object), True), NPY),
        "wrong shape": lambda: (npy(rng.random(shape(), dtype=np.float32)), NPY),
        "wrong dtype": lambda: (npy(np.zeros((1, 3, 32, 32), dtype=str(rng.choice(dtypes)))),
                                NPY),
        "nan/inf": lambda: (npy(np.full((2, 3, 32, 32), rng.choice([np.nan, np.inf, -np.inf]),
                                        np.float32)), NPY),
        "empty body": lambda: (b"", str(rng.choice([NPY, JSON]))),
        "truncated npy": lambda: (npy(rng.random((4, 3, 32, 32), dtype=np.float32))[
            : int(rng.integers(1, 49_000))], NPY),
        "bad npy header": lambda: (b"\x93NUMPY" + bytes([int(rng.integers(0, 9)), 0])
                                   + rng.bytes(int(rng.integers(0, 200))), NPY),
        "json oddities": lambda: (str(rng.choice([
            "[" * 5000 + "]" * 5000, '{"instances": "x"}', "[[1e999]]", "null", '"text"',
            "[[[[" + "1," * 100 + "1]]]]", json.dumps([[["a"] * 32] * 32] * 3),
            json.dumps({"instances": [[[[0.5] * 32] * 32] * 3]}) + "garbage",
            "[" + "9" * 500 + "]", "{}", "[]"])).encode(), JSON),
        "wrong content type": lambda: (npy(np.zeros((1, 3, 32, 32), np.float32)),
                                       str(rng.choice(content_types))),
        "wrong accept": lambda: (npy(np.zeros((1, 3, 32, 32), np.float32)), NPY),
        "over the limit": lambda: (b"\0" * (MAX_PAYLOAD_BYTES + int(rng.integers(1, 1000))),
                                   NPY),
    }
    cases = []
    names = list(makers)
    for i in range(n):
        category = names[i % len(names)]
        body, content_type = makers[category]()
        headers = {"Content-Type": content_type} if content_type or rng.random() < 0.5 else {}
        if category == "wrong accept" or rng.random() < 0.3:
            headers["Accept"] = str(rng.choice(accepts))
        cases.append((category, body, headers))
    return cases


def raw_request(url: str, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """A request written by hand (lengths that lie), answer read until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_fuzzed_requests_get_json_4xx_and_never_take_the_server_down(endpoint):
    rng = np.random.default_rng(20261126)
    client = Client(endpoint.url)
    paths = ["/invocations", f"/endpoints/{endpoint.name}/invocations"]
    statuses: dict[str, Counter] = {}
    server_errors, non_json, hangs, ping_failures = [], [], [], 0
    for i, (category, body, headers) in enumerate(fuzz_cases(rng, FUZZ_CASES)):
        path = paths[int(rng.integers(0, 2))]  # the container route, or the runtime API's
        try:
            status, _, payload = client.request("POST", path, body, headers)
        except TimeoutError:
            hangs.append(category)
            continue
        statuses.setdefault(category, Counter())[status] += 1
        if status >= 500:
            server_errors.append((category, status, payload[:200]))
        elif status >= 400:
            try:
                answer = json.loads(payload)
                assert isinstance(answer["message"], str) and answer["message"]
                if status == 424:  # the runtime API's ModelError: what did the model say?
                    assert 400 <= answer["OriginalStatusCode"] < 500
            except (ValueError, KeyError, AssertionError):
                non_json.append((category, status, payload[:200]))
        if i % 10 == 0 and client.request("GET", "/ping")[0] != 200:
            ping_failures += 1

    # Lengths that lie, written by hand: huge declared, shorter than declared, not a number.
    lies = {
        "huge declared length": b"Content-Length: 99999999999999\r\n",
        "body shorter than declared": b"Content-Length: 5000\r\n",
    }
    for category, header in lies.items():
        head = (f"POST {paths[0]} HTTP/1.1\r\nHost: x\r\nContent-Type: {NPY}\r\n".encode()
                + header + b"Connection: close\r\n\r\n")
        try:
            answer = raw_request(endpoint.url, head, b"\x93NUMPY")
        except TimeoutError:
            hangs.append(category)
            continue
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
        statuses.setdefault(category, Counter())[status] += 1
        if status >= 500:
            server_errors.append((category, status, answer[:200]))

    assert client.request("GET", "/ping")[0] == 200
    table = report_table(
        "Endpoint fuzz run (424: the runtime API's ModelError around the model's 4xx)",
        ["category", "requests", "statuses", "5xx"],
        summary=lambda rows: f"{sum(r['requests'] for r in rows)} requests, "
                             f"{sum(r['5xx'] for r in rows)} answered 5xx, {len(hangs)} hung, "
                             f"{ping_failures} failed pings")
    for category, counts in sorted(statuses.items()):
        table.add(category=category, requests=sum(counts.values()),
                  statuses=" ".join(f"{s}x{n}" for s, n in sorted(counts.items())),
                  **{"5xx": sum(n for s, n in counts.items() if s >= 500)})
    assert not server_errors, server_errors
    assert not non_json, non_json
    assert not hangs, hangs
    assert ping_failures == 0
    # The body that declared 5000 bytes and sent 6 ends with no answer (the request never
    # completed), which is every HTTP server's right; the huge one is refused outright.
    assert statuses["huge declared length"] == Counter({413: 1})


def test_unknown_paths_and_methods_answer_in_json(endpoint):
    client = Client(endpoint.url)
    for method, path, expected in [("GET", "/nope", 404), ("GET", "/invocations", 405),
                                   ("DELETE", "/ping", 405)]:
        status, headers, payload = client.request(method, path)
        assert status == expected
        assert headers["content-type"] == "application/json"
        assert json.loads(payload)["code"] == expected


# -- the soak run ---------------------------------------------------------------------------


@pytest.mark.soak
def test_soak_concurrent_clients_zero_errors_stable_memory(endpoint, cifar_dir):
    with open(cifar_dir / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = batch[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255
    bodies = [(npy(images[:1]), NPY, NPY), (npy(images[:64]), NPY, NPY),
              (json.dumps(images[:4].tolist()).encode(), JSON, JSON)]
    pid = endpoint.extra["pid"]
    clients, stop = 4, threading.Event()
    counts = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        client = Client(endpoint.url)
        rng = np.random.default_rng(seed)
        path = f"/endpoints/{endpoint.name}/invocations"
        while not stop.is_set():
            body, content_type, accept = bodies[int(rng.integers(0, len(bodies)))]
            try:
                status, _, payload = client.request(
                    "POST", path, body, {"Content-Type": content_type, "Accept": accept})
                ok = status == 200 and payload
            except (OSError, http.client.HTTPException) as e:
                ok, status = False, repr(e)
            with lock:
                counts["requests"] += 1
                if not ok:
                    errors.append(str(status))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    samples = []
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < SOAK_SECONDS:
        time.sleep(min(1.0, SOAK_SECONDS / 20))
        samples.append((elapsed, rss_bytes(pid)))
        assert Client(endpoint.url).request("GET", "/ping")[0] == 200
    stop.set()
    for t in threads:
        t.join(30)

    # Memory: after the first quarter (warm-up: allocator pools, caches), RSS stays flat.
    warm = [rss for t, rss in samples if t >= SOAK_SECONDS / 4]
    growth = (max(warm) - warm[0]) / 2**20
    table = report_table("Endpoint soak run", ["seconds", "clients", "requests", "errors",
                                               "req/s", "RSS MiB after warm-up", "growth MiB"])
    table.add(dict(zip(table.columns, [
        round(SOAK_SECONDS), clients, counts["requests"], len(errors),
        round(counts["requests"] / SOAK_SECONDS), round(warm[0] / 2**20), round(growth, 1)],
        strict=True)))
    assert errors == []
    assert counts["requests"] > 10 * SOAK_SECONDS
    assert growth < 20, f"server RSS grew {growth:.1f} MiB after warm-up: {samples}"
