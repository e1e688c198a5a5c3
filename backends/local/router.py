"""The serving endpoint's front process: one stable URL on loopback, whatever model serves.

Routes:

- ``POST /endpoints/{name}/invocations`` (the SageMaker Runtime ``InvokeEndpoint`` wire API, as
  boto3's ``sagemaker-runtime`` client sends it) and ``POST /invocations`` (the container
  contract): each request goes to one fleet, a weighted random choice among the fleets that
  hold a share of traffic in ``routing.json``, and comes back as that fleet's model server
  answered it (status, body, content type, errors as the model server shapes them), with
  ``x-cifar10-model-version`` saying which registry version answered.
- ``GET /ping``: 200 while some fleet holds traffic.
- ``GET /_router/stats``: the routing generation loaded, and per fleet its weight, requests in
  flight and answered, 5xx answers; with ``?fleet=F&after=N`` also the window of ``F``'s answers
  numbered past ``N`` (invocations, 5xx, p99 latency, in flight): what the promoting process's
  alarms watch.

The promoting process writes ``routing.json`` atomically; the router reloads it when it has
changed (checked before each routing decision: one ``stat``). A fleet is chosen, and its
in-flight count raised, in one step of the event loop, so that once the stats say a routing is
loaded and a fleet has nothing in flight, nothing more will reach that fleet: it can stop.

Bounds: a body over 6 MiB or slower than the model server's receive deadline is refused as the
model server refuses it, and at most ``CIFAR10_ROUTER_MAX_IN_FLIGHT`` requests are admitted at
once (past it: 503, as SageMaker throttles). It listens on 127.0.0.1 only.

Run as ``python -m backends.local.router --name NAME --dir DIR [--port PORT]`` by
``LocalServing`` (detached, like a model server); it records its pid and port in
``DIR/router.json`` and logs to ``DIR/router.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import random
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backends.files import UnreadableRecord, atomic_write_text, read_json_record
from backends.local import processes
from backends.local.server import (
    Admission,
    RequestError,
    ServerLimits,
    drain_body,
    json_http_error,
    read_body,
    route_output_to_log,
    setup_logging,
)
from backends.local.serving import ROUTER_FILE, ROUTER_LOG_FILE, ROUTING_FILE, VERSION_HEADER

MAX_IN_FLIGHT = int(os.environ.get("CIFAR10_ROUTER_MAX_IN_FLIGHT", "64"))
# SageMaker's real-time invocations time out after 60 s; so does the hop to a fleet here.
INVOCATION_TIMEOUT_SECONDS = 60.0
# An idle connection to a fleet is closed after this long: well before the model server
# (uvicorn, 5 s) closes it, so that a request is never sent on one the server is closing.
KEEPALIVE_SECONDS = 2.0
SAMPLES_KEPT = 50_000  # answers remembered per fleet for the alarm windows
# Not passed on, either way: they describe one connection, not the request (or they are the
# proxy's own to set: the length of what it sends). Bodies pass unchanged, encoding included.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host", "expect",
                        "content-length"})
ANSWER_DROPPED = HOP_BY_HOP | {"date", "server"}  # the router's server sets its own
log = logging.getLogger("cifar10.router")


class Fleet:
    """One routed fleet: its share of traffic, its requests in flight, its recent answers."""

    def __init__(self, name: str, url: str, version: int, weight: float) -> None:
        self.name, self.url, self.version, self.weight = name, url, version, weight
        self.in_flight: dict[int, float] = {}  # request → when it was routed here
        self.completed = 0  # answers so far; each answer's number in ``samples``
        self.errors = 0
        self.samples: deque[tuple[int, float, bool]] = deque(maxlen=SAMPLES_KEPT)
        self._tokens = itertools.count()

    def enter(self) -> int:
        token = next(self._tokens)
        self.in_flight[token] = time.perf_counter()
        return token

    def leave(self, token: int, server_error: bool) -> None:
        latency_ms = (time.perf_counter() - self.in_flight.pop(token)) * 1000
        self.completed += 1
        self.errors += server_error
        self.samples.append((self.completed, latency_ms, server_error))

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "weight": self.weight, "url": self.url,
                "in_flight": len(self.in_flight), "completed": self.completed,
                "errors": self.errors}

    def window(self, after: int) -> dict[str, Any]:
        """The answers numbered past ``after``: count, 5xx, and the p99 latency over them and
        the requests still in flight (at their age so far: a hung model shows too)."""
        latencies, errors = [], 0
        for number, latency_ms, server_error in reversed(self.samples):
            if number <= after:
                break
            latencies.append(latency_ms)
            errors += server_error
        now = time.perf_counter()
        everything = sorted(latencies + [(now - t) * 1000 for t in self.in_flight.values()])
        p99 = everything[math.ceil(0.99 * len(everything)) - 1] if everything else None
        return {"invocations": len(latencies), "errors": errors, "p99_ms": p99,
                "in_flight": len(self.in_flight), "after": after}


class RoutingTable:
    """The fleets and weights in ``routing.json``, reloaded when the file changes (the writer
    replaces it whole: a new inode each time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fleets: dict[str, Fleet] = {}
        self.generation = 0
        self._seen: tuple[int, int, int] | None = None
        self._loaded: dict[str, Any] | None = None

    def refresh(self, force: bool = False) -> None:
        """Reloads the routing if its file changed. A new file with the old one's inode, size
        and (coarse) time looks unchanged: ``force`` reads it anyway, as the stats do, which
        the promoting process reads to learn that its routing is loaded."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen == self._seen and not force:
            return
        try:
            data = read_json_record(self.path)
            if data != self._loaded:
                self._load(data)
                self._loaded = data
        except (FileNotFoundError, UnreadableRecord, KeyError, TypeError, ValueError) as e:
            log.warning("routing %s not loaded, keeping the last one: %s", self.path, e)
        self._seen = seen

    def _load(self, data: dict[str, Any]) -> None:
        fleets = {}
        for entry in data["fleets"]:
            name = str(entry["name"])
            fleet = self.fleets.get(name) or Fleet(name, "", 0, 0.0)  # keeps its counts
            fleet.url, fleet.version = str(entry["url"]), int(entry["version"])
            fleet.weight = max(0.0, float(entry["weight"]))
            fleets[name] = fleet
        # A fleet dropped here may still have requests in flight: they hold it, and finish.
        self.fleets, self.generation = fleets, int(data["generation"])
        log.info("routing generation %d: %s", self.generation,
                 ", ".join(f"{f.name} {f.weight:.0%}" for f in fleets.values()))

    def choose(self) -> Fleet | None:
        """A fleet at random, by weight; None when no fleet holds traffic."""
        live = [fleet for fleet in self.fleets.values() if fleet.weight > 0]
        if not live:
            return None
        return random.choices(live, weights=[fleet.weight for fleet in live])[0]


def is_server_error(status: int, body: bytes) -> bool:
    """A 5xx answer, counting a ModelError (424) whose original status is 5xx, as SageMaker's
    Invocation5XXErrors counts the container's 5xx."""
    if status >= 500:
        return True
    if status != 424:
        return False
    try:
        original = json.loads(body).get("OriginalStatusCode")
    except (ValueError, AttributeError):
        return False
    return isinstance(original, int) and original >= 500


def aws_error(status: int, code: str, message: str, extra: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
    """An error shaped as AWS's rest-json protocol, which botocore turns into ClientError."""
    return JSONResponse({"message": message, **(extra or {})}, status_code=status,
                        headers={"x-amzn-ErrorType": code, **(headers or {})})


def own_error(e: RequestError, runtime: bool) -> Response:
    """The router's own refusal (a body too large or too slow, too many requests, nothing to
    route to), shaped as the model server shapes the same refusal."""
    headers = {"Retry-After": "1"} if e.status == 503 else {}
    if not runtime:
        return JSONResponse({"code": e.status, "message": e.message}, status_code=e.status,
                            headers=headers)
    code = {503: "ServiceUnavailable", 408: "RequestTimeout"}.get(e.status, "ValidationError")
    return aws_error(e.status, code, e.message, headers=headers)


def upstream_error(fleet: Fleet, error: Exception, runtime: bool) -> Response:
    """The fleet did not answer (its server stopped or hung): a 5xx, as a ModelError through
    the runtime API, as SageMaker reports a container that does not answer."""
    message = f"the model server of fleet {fleet.name} did not answer: {type(error).__name__}"
    headers = {VERSION_HEADER: str(fleet.version)}
    if not runtime:
        return JSONResponse({"code": 502, "message": message}, status_code=502, headers=headers)
    return aws_error(424, "ModelError", f'Received server error (502) from primary with '
                     f'message "{message}".', {"OriginalStatusCode": 502,
                                                "OriginalMessage": message}, headers)


class Router:
    """The routes of one serving endpoint."""

    def __init__(self, name: str, table: RoutingTable,
                 limits: ServerLimits | None = None) -> None:
        self.name, self.table = name, table
        self.limits = limits or ServerLimits()
        self.admission = Admission(MAX_IN_FLIGHT)
        self.client: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # aiohttp: a third of httpx's CPU per request, and the router's CPU is its latency.
        # trust_env=False: a proxy set in the environment must not see loopback traffic.
        self.client = aiohttp.ClientSession(
            trust_env=False, auto_decompress=False, skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=INVOCATION_TIMEOUT_SECONDS, connect=5.0),
            connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT,
                                           keepalive_timeout=KEEPALIVE_SECONDS))
        try:
            yield
        finally:
            await self.client.close()

    async def invocations(self, request: Request) -> Response:
        return await self.forward(request, lambda fleet: "/invocations", runtime=False)

    async def runtime_invocations(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.name:
            return aws_error(400, "ValidationError", f"Endpoint {name} not found.")
        return await self.forward(request, lambda fleet: f"/endpoints/{fleet.name}/invocations",
                                  runtime=True)

    async def forward(self, request: Request, path_of: Callable[[Fleet], str],
                      runtime: bool) -> Response:
        """Admits the request, receives its body, routes it and answers as the fleet did."""
        timeout = self.limits.body_timeout_seconds
        if not self.admission.try_enter():
            await drain_body(request, timeout)
            return own_error(RequestError(503, f"the endpoint is busy: {MAX_IN_FLIGHT} requests "
                                               f"in flight; try again later"), runtime)
        try:
            try:
                body = await read_body(request, timeout_seconds=timeout)
            except RequestError as e:
                return own_error(e, runtime)
            self.table.refresh()
            fleet = self.table.choose()
            if fleet is None:
                return own_error(RequestError(503, f"no model serves {self.name} now"), runtime)
            return await self.send(fleet, path_of(fleet), body, request.headers, runtime)
        finally:
            self.admission.leave()

    async def send(self, fleet: Fleet, path: str, body: bytes, headers: Headers,
                   runtime: bool) -> Response:
        token = fleet.enter()  # no await since the choice: the drain check can trust it
        server_error = True
        try:
            assert self.client is not None
            async with self.client.post(
                    fleet.url + path, data=body,
                    headers=[(k, v) for k, v in headers.items() if k not in HOP_BY_HOP],
            ) as upstream:
                status, content = upstream.status, await upstream.read()
                upstream_headers = upstream.raw_headers
            server_error = is_server_error(status, content)
        except (TimeoutError, aiohttp.ClientError) as e:
            log.warning("fleet %s: %s: %s", fleet.name, type(e).__name__, e)
            return upstream_error(fleet, e, runtime)
        finally:
            fleet.leave(token, server_error)
        answer = Response(content, status_code=status)
        answer.raw_headers.extend((key.lower(), value) for key, value in upstream_headers
                                  if key.lower().decode("latin-1") not in ANSWER_DROPPED)
        answer.raw_headers.append((VERSION_HEADER.encode(), str(fleet.version).encode()))
        return answer

    async def ping(self, request: Request) -> Response:
        self.table.refresh()
        serving = any(fleet.weight > 0 for fleet in self.table.fleets.values())
        return JSONResponse({"status": "healthy" if serving else "no model serves",
                             "endpoint": self.name}, status_code=200 if serving else 503)

    async def stats(self, request: Request) -> Response:
        self.table.refresh(force=True)
        answer: dict[str, Any] = {
            "endpoint": self.name, "generation": self.table.generation,
            "in_flight": self.admission.in_flight,
            "fleets": {name: fleet.summary() for name, fleet in self.table.fleets.items()}}
        if (name := request.query_params.get("fleet")) is not None:
            fleet = self.table.fleets.get(name)
            try:
                after = int(request.query_params.get("after", "0"))
            except ValueError:
                return JSONResponse({"code": 400, "message": "after: not a number"}, 400)
            answer["window"] = fleet.window(after) if fleet else {
                "invocations": 0, "errors": 0, "p99_ms": None, "in_flight": 0, "after": after}
        return JSONResponse(answer)


def create_app(router: Router) -> Starlette:
    return Starlette(routes=[
        Route("/ping", router.ping, methods=["GET"]),
        Route("/invocations", router.invocations, methods=["POST"]),
        Route("/endpoints/{name}/invocations", router.runtime_invocations, methods=["POST"]),
        Route("/_router/stats", router.stats, methods=["GET"]),
    ], exception_handlers={HTTPException: json_http_error}, lifespan=router.lifespan)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``port`` (the endpoint's URL before a restart), else on any free
    port. Listening before the port is recorded: a client that comes early waits in the
    backlog instead of being refused."""
    for candidate in dict.fromkeys((port, 0)):
        # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (see server.py).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as e:
            sock.close()
            log.warning("port %d is taken (%s): taking another", candidate, e)
            continue
        sock.listen(2048)
        return sock
    raise OSError("no port to listen on")


def serve(name: str, directory: Path, host: str, port: int) -> None:
    import uvicorn

    router = Router(name, RoutingTable(directory / ROUTING_FILE),
                    ServerLimits.from_environment())
    sock = bind(host, port)
    pid = os.getpid()
    atomic_write_text(directory / ROUTER_FILE, json.dumps({
        "pid": pid, "pid_start": processes.start_time(pid), "host": host,
        "port": sock.getsockname()[1]}))
    log.info("router of %s listening on %s:%d", name, host, sock.getsockname()[1])
    config = uvicorn.Config(create_app(router), log_level="warning", access_log=False,
                            log_config=None, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Front one local serving endpoint.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True, type=Path, help="the endpoint's directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging(args.dir / ROUTER_LOG_FILE, ServerLimits.from_environment())
    stop_output = route_output_to_log(logging.getLogger("cifar10.router.output"))
    try:
        serve(args.name, args.dir, args.host, args.port)
    except Exception:
        log.exception("the router failed")
        return 1
    finally:
        stop_output()
    return 0


if __name__ == "__main__":
    sys.exit(main())
