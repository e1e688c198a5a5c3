"""The serving endpoint's router under steady load: what it adds to each request, and what a
canary promotion costs the clients (requests failed: must be 0).

In one run: creates a local serving endpoint (router + one fleet) whose model does no work (a
constant answer: what is measured is the serving path, not a network), then

1. latency: the same steady load (1-image float32 ``application/x-npy`` bodies through the
   runtime API path that boto3 uses, ``--concurrency`` keep-alive connections) straight to the
   fleet's model server and through the router, in interleaved rounds of ``--seconds`` each;
   p50/p99 of each side and their ratio (router / direct) from the best round (a shared
   machine is noisy);
2. promotion: the same load through the router while a second model is promoted canary 10%
   (``--wait`` seconds), then baked and the old fleet drained and stopped; requests sent,
   failed, and the share each version answered.

Loopback only, bounded in time (a few rounds of seconds, one promotion).
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from common import machine, print_table
from endpoint_load import npy, null_model

from backends.base import (
    CANARY,
    SERVING_KEY,
    RollbackAlarms,
    ServingSpec,
    TrafficShift,
    managed_tags,
)
from backends.local import LocalBackend
from backends.local.serving import VERSION_HEADER
from model_src.contract import JSON, NPY

NAME = "cifar10-bench-serving"


@dataclass
class Tally:
    """What a steady load saw."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def percentile(self, p: float) -> float:
        return float(np.percentile(self.latencies_ms, p)) if self.latencies_ms else float("nan")


def steady_load(url: str, path: str, body: bytes, concurrency: int, stop: threading.Event,
                tally: Tally) -> None:
    """POSTs on ``concurrency`` keep-alive connections until ``stop`` is set. A non-200 answer
    or a connection error counts as an error (a lost request)."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    lock = threading.Lock()
    headers = {"Content-Type": NPY, "Accept": JSON}

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                ok, version = response.status == 200, response.getheader(VERSION_HEADER, "")
            except (OSError, http.client.HTTPException):
                ok, version = False, "none"
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                tally.latencies_ms.append(elapsed)
                tally.errors += not ok
                tally.versions[version] = tally.versions.get(version, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tally.seconds = time.perf_counter() - started


def timed_load(url: str, path: str, body: bytes, concurrency: int, seconds: float) -> Tally:
    stop, tally = threading.Event(), Tally()
    threading.Timer(seconds, stop.set).start()
    steady_load(url, path, body, concurrency, stop, tally)
    return tally


def spec(version: int, model_uri: str, wait: int) -> ServingSpec:
    return ServingSpec(
        name=NAME, model_uri=model_uri, group="bench", version=version,
        shift=TrafficShift(strategy=CANARY, percent=10, wait_seconds=wait, baking_seconds=2,
                           max_seconds=600),
        # The alarms only stop a broken model; this one is not: they must not fire.
        alarms=RollbackAlarms(max_error_rate=0.05, max_p99_latency_ms=5000),
        tags={**managed_tags("bench", kept=True), SERVING_KEY: "true"})


def measure_latency(backend: LocalBackend, body: bytes,
                    args: argparse.Namespace) -> dict[str, Tally]:
    """The best round (lowest p50) of each side: straight to the fleet, through the router."""
    status = backend.serving.describe(NAME)
    (fleet, info), = status.extra["fleets"].items()
    targets = {"direct to the model server": (info["url"], f"/endpoints/{fleet}/invocations"),
               "through the router": (status.url, f"/endpoints/{NAME}/invocations")}
    best: dict[str, Tally] = {}
    for _ in range(args.rounds):
        for label, (url, path) in targets.items():
            timed_load(url, path, body, args.concurrency, 0.5)  # warm-up
            tally = timed_load(url, path, body, args.concurrency, args.seconds)
            if label not in best or tally.percentile(50) < best[label].percentile(50):
                best[label] = tally
    return best


def measure_promotion(backend: LocalBackend, model_uri: str, body: bytes,
                      args: argparse.Namespace) -> tuple[Tally, str]:
    """The load through the router during a canary promotion: (what it saw, the outcome)."""
    url = backend.serving.describe(NAME).url
    stop, tally = threading.Event(), Tally()
    load = threading.Thread(target=steady_load, args=(
        url, f"/endpoints/{NAME}/invocations", body, args.concurrency, stop, tally))
    load.start()
    try:
        time.sleep(0.5)
        result = backend.serving.promote(spec(2, model_uri, args.wait))
        time.sleep(0.5)
    finally:
        stop.set()
        load.join()
    return tally, f"{result.outcome} {result.reason}".strip()


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Runs the benchmark; returns its headline rows for bench/run_all.py."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=4, help="keep-alive connections")
    parser.add_argument("--seconds", type=float, default=4, help="length of a latency round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per side")
    parser.add_argument("--wait", type=int, default=4, help="the canary's wait, seconds")
    args = parser.parse_args(argv)
    body = npy(1)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(root=Path(tmp) / "state")
        models = [null_model(Path(tmp) / f"model-{n}") for n in (1, 2)]
        try:
            backend.serving.promote(spec(1, models[0], args.wait))
            latency = measure_latency(backend, body, args)
            promotion, outcome = measure_promotion(backend, models[1], body, args)
        finally:
            backend.serving.delete(NAME)
    return report(latency, promotion, outcome, args)


def report(latency: dict[str, Tally], promotion: Tally, outcome: str,
           args: argparse.Namespace) -> list[list[str]]:
    direct, routed = latency["direct to the model server"], latency["through the router"]
    rows = [[label, args.concurrency, len(t.latencies_ms), t.errors,
             f"{len(t.latencies_ms) / t.seconds:.0f}", f"{t.percentile(50):.2f}",
             f"{t.percentile(99):.2f}"] for label, t in latency.items()]
    rows.append([f"through the router, canary promotion ({outcome})", args.concurrency,
                 len(promotion.latencies_ms), promotion.errors,
                 f"{len(promotion.latencies_ms) / promotion.seconds:.0f}",
                 f"{promotion.percentile(50):.2f}", f"{promotion.percentile(99):.2f}"])
    print()
    print_table(["target", "concurrency", "requests", "failed", "req/s", "p50 ms", "p99 ms"],
                rows)
    p50 = routed.percentile(50) / direct.percentile(50)
    p99 = routed.percentile(99) / direct.percentile(99)
    added = routed.percentile(50) - direct.percentile(50)
    shares = ", ".join(f"v{v}: {n}" for v, n in sorted(promotion.versions.items()))
    print(f"\nrouter / direct: p50 {p50:.2f}x, p99 {p99:.2f}x (+{added:.2f} ms at p50). During "
          f"the promotion: {promotion.errors} of {len(promotion.latencies_ms)} requests failed "
          f"(target 0); answered by {shares}")
    return [["promotion", f"router p50 / p99 vs direct (c={args.concurrency})",
             f"{p50:.2f}x / {p99:.2f}x", f"+{added:.2f} ms p50"],
            ["promotion", "requests failed during a canary promotion",
             f"{promotion.errors} of {len(promotion.latencies_ms)}", "target 0"]]


if __name__ == "__main__":
    main()
