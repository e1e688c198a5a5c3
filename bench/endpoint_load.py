"""Load on a local endpoint against the HTTP floor, loopback only, bounded in count and time.

In one run: trains a model with a local training job on generated data and deploys it as a
local endpoint (the real server process); deploys a second endpoint whose inference code does
no work (a constant answer: what our server itself costs); and starts a minimal ASGI app on the
same stack (Starlette on uvicorn, same settings) that answers a constant: the floor. Then sends
the same requests to all three: 1-image and 64-image float32 ``application/x-npy`` bodies at
concurrency 1 and 8, through the runtime API path that boto3 uses. Targets are measured in
interleaved rounds and the best round is kept (a shared machine is noisy). Prints req/s, p50,
p99, errors and the ratio to the floor.
"""

from __future__ import annotations

import argparse
import http.client
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import REPO, machine, print_table
from generated_data import make_cifar_dir

from backends.base import EndpointSpec, TrainingSpec, managed_tags
from backends.local import LocalBackend
from model_src.contract import JSON, NPY

# Inference code that does no work: deployed like any model, it measures the server alone.
NULL_HANDLERS = """
ANSWER = b"[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]"

def model_fn(model_dir):
    return None

def input_fn(body, content_type):
    return body

def predict_fn(data, model):
    return None

def output_fn(prediction, accept):
    return ANSWER, "application/json"
"""

FLOOR_APP = """
import socket, sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

BODY = b"[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]"

async def answer(request):
    await request.body()  # receive the payload like the endpoint does
    return Response(BODY, media_type="application/json")

app = Starlette(routes=[Route("/{path:path}", answer, methods=["POST"])])
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # as the endpoint
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
config = uvicorn.Config(app, log_level="warning", access_log=False)
uvicorn.Server(config).run(sockets=[sock])
"""


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        return float(np.percentile(self.latencies_ms, p)) if self.latencies_ms else float("nan")


def load(host: str, port: int, path: str, body: bytes, concurrency: int, requests: int,
         max_seconds: float) -> Result:
    """``requests`` POSTs spread over ``concurrency`` keep-alive connections, stopping early
    at ``max_seconds``. A non-200 answer or a connection error counts as an error."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    remaining = [requests]
    deadline = time.monotonic() + max_seconds
    headers = {"Content-Type": NPY, "Accept": JSON}

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while True:
            with lock:
                if remaining[0] <= 0 or time.monotonic() > deadline:
                    break
                remaining[0] -= 1
            started = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                if not ok:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Result(len(latencies), errors[0], time.perf_counter() - started, latencies)


def npy(images: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.save(buffer, rng.random((images, 3, 32, 32), dtype=np.float32))
    return buffer.getvalue()


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def null_model(directory: Path) -> str:
    """A model.tar.gz holding only NULL_HANDLERS as its inference code."""
    import tarfile

    code = directory / "code"
    code.mkdir(parents=True)
    (code / "inference.py").write_text(NULL_HANDLERS)
    archive = directory / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(code, arcname="code")
    return archive.as_uri()


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Runs the benchmark; returns its headline rows for bench/run_all.py."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tutorial", help="network preset to serve")
    parser.add_argument("--requests", type=int, default=1000,
                        help="requests per round of a 1-image case (64-image: a tenth)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case")
    parser.add_argument("--max-seconds", type=float, default=10, help="time cap per round")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(root=Path(tmp) / "state")
        print(f"machine: {machine()}")
        print("training a model on generated data...", flush=True)
        data_uri = backend.storage.upload(make_cifar_dir(Path(tmp) / "data"))
        model_uri = backend.jobs.run(TrainingSpec(
            job_name="bench-model", data_uri=data_uri,
            hyperparameters={"model": args.model, "epochs": 1, "batch-size": 64},
        )).model_uri
        endpoints = [
            backend.endpoints.deploy(EndpointSpec(name="bench-server-only",
                                                  model_uri=null_model(Path(tmp) / "null"),
                                                  tags=managed_tags("bench"))),
            backend.endpoints.deploy(EndpointSpec(name="bench-endpoint", model_uri=model_uri,
                                                  tags=managed_tags("bench"))),
        ]
        floor = subprocess.Popen([sys.executable, "-c", FLOOR_APP], stdout=subprocess.PIPE,
                                 text=True, cwd=REPO)
        try:
            floor_port = int(floor.stdout.readline())
            wait_port(floor_port)
            targets = {"floor": (floor_port, "/invocations")}
            for label, info in zip(("server only", f"endpoint ({args.model})"), endpoints,
                                   strict=True):
                targets[label] = (int(info.url.rsplit(":", 1)[1]),
                                  f"/endpoints/{info.name}/invocations")
            rows, ratios = [], {}
            for images in (1, 64):
                body = npy(images)
                count = args.requests if images == 1 else max(1, args.requests // 10)
                for concurrency in (1, 8):
                    best: dict[str, Result] = {}
                    for _ in range(args.rounds):
                        for target, (port, path) in targets.items():
                            load("127.0.0.1", port, path, body, concurrency, 20, 5)  # warm-up
                            result = load("127.0.0.1", port, path, body, concurrency, count,
                                          args.max_seconds)
                            if target not in best or result.rps > best[target].rps:
                                best[target] = result
                    floor_rps = best["floor"].rps
                    for target, result in best.items():
                        ratio = result.rps / floor_rps
                        ratios[(target, images, concurrency)] = ratio
                        rows.append([target, images, concurrency, result.requests,
                                     result.errors, f"{result.rps:.0f}",
                                     f"{result.percentile(50):.2f}",
                                     f"{result.percentile(99):.2f}", f"{ratio:.2f}"])
        finally:
            floor.terminate()
            floor.wait(10)
            for info in endpoints:
                backend.endpoints.delete(info.name)
    print()
    print_table(["target", "images", "concurrency", "requests", "errors", "req/s", "p50 ms",
                 "p99 ms", "vs floor"], rows)
    errors = sum(int(r[4]) for r in rows)
    model = f"endpoint ({args.model})"
    print(f"\nerrors: {errors}. 1-image throughput vs floor: server alone "
          f"{ratios[('server only', 1, 1)]:.0%} (c=1) / {ratios[('server only', 1, 8)]:.0%} "
          f"(c=8); with the {args.model} model {ratios[(model, 1, 1)]:.0%} (c=1) / "
          f"{ratios[(model, 1, 8)]:.0%} (c=8); target >= 60%")
    return [
        ["endpoint_load", f"1-image req/s vs floor, c=1 / c=8 ({args.model} model)",
         f"{ratios[(model, 1, 1)]:.0%} / {ratios[(model, 1, 8)]:.0%}", f"{errors} errors"],
        ["endpoint_load", "1-image req/s vs floor, c=1 / c=8 (server alone)",
         f"{ratios[('server only', 1, 1)]:.0%} / {ratios[('server only', 1, 8)]:.0%}", ""],
    ]


if __name__ == "__main__":
    main()
