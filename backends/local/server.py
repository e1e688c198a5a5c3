"""The local endpoint's model server: SageMaker's inference contract over HTTP on loopback.

Routes:

- ``GET /ping``: 200 once the model is loaded (the server binds its port only after that).
- ``POST /invocations``: the container contract. Handler errors keep their status (400 malformed
  body, 413 too many images, 415 unsupported content type, 406 unanswerable Accept), 413 over
  6 MiB, 503 past the in-flight bound, 408 for a body slower than the receive deadline; JSON
  bodies.
- ``POST /endpoints/{name}/invocations``: the SageMaker Runtime ``InvokeEndpoint`` wire API, so
  boto3's ``sagemaker-runtime`` client works with ``endpoint_url`` pointed here. As on AWS,
  container errors reach clients as ``ModelError`` (424) carrying ``OriginalStatusCode``, and
  a busy endpoint answers ``ServiceUnavailable`` (503), which botocore retries with backoff.

Bounds (``ServerLimits``, each an environment variable of the endpoint or the server process):
requests in flight, the time to receive a body, and the log (rate-limited, rotated by size);
the images per request are the handlers' (``CIFAR10_MAX_IMAGES_PER_REQUEST``).

Run as ``python -m backends.local.server --name NAME --root DIR`` by ``LocalEndpoints``:
it extracts ``model.tar.gz``, imports the handlers from ``code/``, binds a free port, then
records the port in the endpoint's record. It logs to ``<endpoint dir>/server.log`` (rotated);
once logging is set up, its stdout and stderr are logged there too, line by line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import importlib.util
import logging
import logging.handlers
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backends.base import VARIANT
from backends.files import safe_extract
from model_src.contract import CODE_DIR, INFERENCE_PROGRAM

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints accept at most 6 MiB
DRAIN_LIMIT = 4 * MAX_PAYLOAD_BYTES  # read (and drop) oversized bodies up to this size
# Bodies up to this size (a few images) are answered on the event loop: the hop to a worker
# thread costs more than their inference. Larger ones run in a thread so /ping and small
# requests stay responsive meanwhile.
INLINE_BODY_BYTES = 64 * 1024
LOG_FILE = "server.log"
log = logging.getLogger("cifar10.endpoint")


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """The server's bounds. Each is read from the environment variable named in its field's
    metadata (the endpoint's environment, else the server process's), else its default."""

    # Requests admitted at once, from the first byte of their body to their answer: what
    # bounds the memory that requests hold (each up to a 6 MiB body, its decoded batch and
    # the batch's activations). Past it: 503 at once, as SageMaker throttles.
    max_in_flight: int = dataclasses.field(
        default=16, metadata={"env": "CIFAR10_SERVER_MAX_IN_FLIGHT"})
    # A body must arrive within this many seconds of its headers (slow clients: 408).
    body_timeout_seconds: float = dataclasses.field(
        default=30.0, metadata={"env": "CIFAR10_SERVER_BODY_TIMEOUT_SECONDS"})
    # At most this many log records per interval; the rest are counted, then reported.
    log_records_per_interval: int = dataclasses.field(
        default=20, metadata={"env": "CIFAR10_SERVER_LOG_RECORDS_PER_INTERVAL"})
    log_interval_seconds: float = dataclasses.field(
        default=60.0, metadata={"env": "CIFAR10_SERVER_LOG_INTERVAL_SECONDS"})
    # server.log rotates past this size, keeping this many old files.
    log_max_bytes: int = dataclasses.field(
        default=5 * 2**20, metadata={"env": "CIFAR10_SERVER_LOG_MAX_BYTES"})
    log_backups: int = dataclasses.field(
        default=2, metadata={"env": "CIFAR10_SERVER_LOG_BACKUPS"})

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ServerLimits:
        """The limits ``environ`` sets; ValueError names a variable that is not a positive
        number."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            text = environ.get(field.metadata["env"], "").strip()
            if not text:
                continue
            kind = int if field.type in (int, "int") else float
            try:
                values[field.name] = kind(text)
            except ValueError:
                values[field.name] = -1
            if values[field.name] <= 0 and not (field.name == "log_backups" and text == "0"):
                raise ValueError(f"{field.metadata['env']}={text!r}: expected a positive "
                                 f"{kind.__name__}")
        return cls(**values)


class RequestError(Exception):
    """An answer other than 200. ``from_model``: the handlers refused the request (the runtime
    API wraps those in ModelError); otherwise the server itself did."""

    def __init__(self, status: int, message: str, from_model: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.from_model = status, message, from_model


class Admission:
    """Counts the requests in flight and refuses one past ``limit``. Used only on the event
    loop (one thread), so a plain counter is safe."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


# Models trained before model_src/ was split carry their handlers in the one script that also
# trained them (deployed on AWS with SAGEMAKER_PROGRAM=cifar10.py).
LEGACY_PROGRAM = "cifar10.py"


def handler_program(code_dir: Path, environment: dict[str, str]) -> str:
    """The module SageMaker's inference toolkit would import from ``code/``: the container
    environment's SAGEMAKER_PROGRAM, else inference.py (its default); an artifact from before
    the split carries only its one script."""
    if environment.get("SAGEMAKER_PROGRAM"):
        return environment["SAGEMAKER_PROGRAM"]
    if not (code_dir / INFERENCE_PROGRAM).is_file() and (code_dir / LEGACY_PROGRAM).is_file():
        return LEGACY_PROGRAM
    return INFERENCE_PROGRAM


def load_handlers(code_dir: Path, program: str) -> ModuleType:
    """Imports the handlers from ``code/`` the way SageMaker's inference toolkit does: the
    directory on the path, the program as a module of its own."""
    path = code_dir / program
    if not path.is_file():
        raise FileNotFoundError(f"inference code {program} not found in {code_dir}")
    sys.path.insert(0, str(code_dir))
    spec = importlib.util.spec_from_file_location(Path(program).stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("model_fn", "input_fn", "predict_fn", "output_fn"):
        if not callable(getattr(module, name, None)):
            raise AttributeError(f"{program} does not define {name}()")
    return module


async def read_body(request: Request, limit: int = MAX_PAYLOAD_BYTES,
                    timeout_seconds: float = ServerLimits.body_timeout_seconds) -> bytes:
    """The request body, or RequestError: 413 past ``limit`` bytes, 408 when it has not all
    arrived ``timeout_seconds`` after its headers.

    An oversized body of moderate size is read to its end and discarded before answering:
    clients send the whole body before they read the reply, and a server that hangs up early
    leaves them with a connection reset instead of the 413. Past ``DRAIN_LIMIT`` (or a declared
    length past it) the server answers at once and closes the connection.
    """
    declared = _declared_length(request)
    too_large = RequestError(413, f"payload of {declared or 'more than ' + str(limit)} bytes "
                                  f"is over the {limit}-byte limit")
    if declared is not None and declared > DRAIN_LIMIT:
        raise too_large
    chunks: list[bytes] = []
    size = 0

    def keep(chunk: bytes) -> bool:
        nonlocal size
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        return size <= DRAIN_LIMIT

    await _receive_body(request, timeout_seconds, keep)
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def drain_body(request: Request, timeout_seconds: float) -> None:
    """Reads the body and drops it (so that the client, which sends it all before reading,
    gets the answer), unless it is declared past ``DRAIN_LIMIT``."""
    declared = _declared_length(request)
    if declared is not None and declared > DRAIN_LIMIT:
        return
    size = 0

    def drop(chunk: bytes) -> bool:
        nonlocal size
        size += len(chunk)
        return size <= DRAIN_LIMIT

    await _receive_body(request, timeout_seconds, drop)


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise RequestError(400, f"invalid Content-Length {declared!r}")
    return None if declared is None else int(declared)


async def _receive_body(request: Request, timeout_seconds: float,
                        on_chunk: Callable[[bytes], bool]) -> None:
    """Hands the body's chunks to ``on_chunk`` as they arrive, until it returns False, under
    one deadline for the whole body: a client that trickles its body (slow loris) gets 408
    instead of holding a request slot forever."""

    async def receive() -> None:
        async for chunk in request.stream():
            if not on_chunk(chunk):
                return

    try:
        async with asyncio.timeout(timeout_seconds):
            await receive()
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout_seconds:g} "
                                f"seconds") from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected before sending its body") from None


class ModelRoutes:
    """The routes serving one loaded model within its bounds."""

    def __init__(self, handlers: ModuleType, model: Any, endpoint_name: str,
                 limits: ServerLimits) -> None:
        self.handlers, self.model, self.name, self.limits = handlers, model, endpoint_name, limits
        self.admission = Admission(limits.max_in_flight)

    def transform(self, body: bytes, content_type: str, accept: str) -> tuple[bytes, str]:
        data = self.handlers.input_fn(body, content_type)
        prediction = self.handlers.predict_fn(data, self.model)
        encoded = self.handlers.output_fn(prediction, accept)
        return encoded if isinstance(encoded, tuple) else (encoded, accept)

    async def invoke(self, request: Request) -> tuple[bytes, str]:
        """Admits the request (or 503), receives its body and answers it; raises RequestError
        with the HTTP status."""
        timeout = self.limits.body_timeout_seconds
        if not self.admission.try_enter():
            await drain_body(request, timeout)
            raise RequestError(503, f"the endpoint is busy: {self.admission.limit} requests "
                                    f"in flight (CIFAR10_SERVER_MAX_IN_FLIGHT); try again later")
        try:
            body = await read_body(request, timeout_seconds=timeout)
            return await self.answer(body, request.headers.get("content-type", ""),
                                     request.headers.get("accept") or "application/json")
        finally:
            self.admission.leave()

    async def answer(self, body: bytes, content_type: str, accept: str) -> tuple[bytes, str]:
        """Runs the handlers (off the event loop, but for small bodies)."""
        if not body:
            raise RequestError(400, "empty request body")
        try:
            if len(body) <= INLINE_BODY_BYTES:
                return self.transform(body, content_type, accept)
            # At most max_in_flight requests get here at once: fewer than the thread pool's
            # 40 threads, so none waits for a thread while it holds its body.
            return await anyio.to_thread.run_sync(self.transform, body, content_type, accept)
        except Exception as e:
            status = getattr(e, "status_code", None)
            if isinstance(status, int) and 400 <= status < 500:
                raise RequestError(status, str(e), from_model=True) from e
            log.exception("inference failed")
            raise RequestError(500, f"inference failed: {type(e).__name__}: {e}",
                               from_model=True) from e

    async def ping(self, request: Request) -> Response:
        return JSONResponse({"status": "healthy", "endpoint": self.name})

    async def invocations(self, request: Request) -> Response:
        try:
            body, content_type = await self.invoke(request)
        except RequestError as e:
            return JSONResponse({"code": e.status, "message": e.message}, status_code=e.status,
                                headers=_error_headers(e))
        return Response(body, media_type=content_type)

    async def runtime_invocations(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.name:
            return _aws_error(400, "ValidationError", f"Endpoint {name} not found.")
        try:
            body, content_type = await self.invoke(request)
        except RequestError as e:
            return self.runtime_error(e)
        return Response(body, media_type=content_type,
                        headers={"x-Amzn-Invoked-Production-Variant": VARIANT})

    def runtime_error(self, e: RequestError) -> JSONResponse:
        """As the SageMaker Runtime API answers: its own errors by name (botocore retries
        ServiceUnavailable with backoff, as it does on AWS), the container's as ModelError."""
        if e.status == 503:
            return _aws_error(503, "ServiceUnavailable", e.message, headers=_error_headers(e))
        if e.status == 408:
            return _aws_error(408, "RequestTimeout", e.message, headers=_error_headers(e))
        if e.status == 413 and not e.from_model:
            return _aws_error(413, "ValidationError", e.message)
        return _aws_error(424, "ModelError", _model_error_message(e), {
            "OriginalStatusCode": e.status, "OriginalMessage": e.message,
            "LogStreamArn": f"local:{self.name}/{LOG_FILE}",
        })


async def json_http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in JSON too, like every other error here."""
    status = getattr(exc, "status_code", 500)
    return JSONResponse({"code": status, "message": getattr(exc, "detail", str(exc))},
                        status_code=status)


def create_app(handlers: ModuleType, model: Any, endpoint_name: str,
               limits: ServerLimits | None = None) -> Starlette:
    """The ASGI app serving one loaded model."""
    routes = ModelRoutes(handlers, model, endpoint_name, limits or ServerLimits())
    return Starlette(routes=[
        Route("/ping", routes.ping, methods=["GET"]),
        Route("/invocations", routes.invocations, methods=["POST"]),
        Route("/endpoints/{name}/invocations", routes.runtime_invocations, methods=["POST"]),
    ], exception_handlers={HTTPException: json_http_error})


def _error_headers(e: RequestError) -> dict[str, str]:
    if e.status == 503:
        return {"Retry-After": "1"}
    if e.status == 408:  # the rest of a late body may still come: this connection is done
        return {"Connection": "close"}
    return {}


def _model_error_message(e: RequestError) -> str:
    kind = "client" if e.status < 500 else "server"
    return f'Received {kind} error ({e.status}) from primary with message "{e.message}".'


def _aws_error(status: int, code: str, message: str, extra: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """An error shaped as AWS's rest-json protocol, which botocore turns into ClientError."""
    return JSONResponse({"message": message, **(extra or {})}, status_code=status,
                        headers={"x-amzn-ErrorType": code, **(headers or {})})


# --- the log -----------------------------------------------------------------------------------


class BoundedLogHandler(logging.handlers.RotatingFileHandler):
    """server.log: rotated past ``log_max_bytes`` (``log_backups`` old files kept), and at most
    ``log_records_per_interval`` records per ``log_interval_seconds``: the rest are counted
    and reported in one line when the next interval's first record comes (or at exit), so a
    flood of bad requests cannot fill the disk or bury the first errors."""

    def __init__(self, path: Path, limits: ServerLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(path, maxBytes=limits.log_max_bytes, backupCount=limits.log_backups,
                         encoding="utf-8")
        self.per_interval = limits.log_records_per_interval
        self.interval = limits.log_interval_seconds
        self.clock = clock
        self.window_start, self.written, self.suppressed = clock(), 0, 0

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        now = self.clock()
        if now - self.window_start >= self.interval:
            self._report_suppressed()
            self.window_start, self.written = now, 0
        if self.written >= self.per_interval:
            self.suppressed += 1
            return
        self.written += 1
        super().emit(record)

    def _report_suppressed(self) -> None:
        if not self.suppressed:
            return
        summary = logging.makeLogRecord({
            "name": log.name, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": f"suppressed {self.suppressed} log messages (more than "
                   f"{self.per_interval} in {self.interval:g} seconds)"})
        self.suppressed = 0
        super().emit(summary)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.stream is not None:
                self._report_suppressed()
        super().close()


def setup_logging(path: Path, limits: ServerLimits) -> BoundedLogHandler:
    """Every logger of this process (uvicorn's and Python's warnings included) writes to the
    bounded log at ``path``."""
    handler = BoundedLogHandler(path, limits)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return handler


def route_output_to_log(logger: logging.Logger) -> Callable[[], None]:
    """From now on what this process writes to stdout and stderr (prints, native libraries'
    messages) is logged line by line, so it is bounded like the rest of the log. The original
    descriptors (the raw output file the server was started with) keep fatal-error dumps
    only (faulthandler: a crash's last words must not depend on a thread of this process).
    Returns the function that flushes the output and stops."""
    raw = os.dup(2)
    faulthandler.enable(file=raw, all_threads=True)
    read_end, write_end = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_log_lines, args=(read_end, logger), daemon=True,
                                 name="output-to-log")
    forwarder.start()

    def stop() -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the pipe's last write ends close: the forwarder reads its end
        os.dup2(devnull, 2)
        os.close(devnull)
        forwarder.join(timeout=5)

    return stop


def _log_lines(fd: int, logger: logging.Logger, longest: int = 64 * 1024) -> None:
    with open(fd, "rb") as pipe:
        while line := pipe.readline(longest):
            logger.info("%s", line.rstrip(b"\n").decode("utf-8", "replace"))


# --- the process -------------------------------------------------------------------------------


def serve(name: str, endpoint_dir: Path, model_path: Path, environment: dict[str, str],
          host: str, on_ready: Callable[[int], None], limits: ServerLimits | None = None) -> None:
    """Loads the model, binds a port, reports it through ``on_ready``, serves until SIGTERM."""
    import uvicorn

    model_dir = endpoint_dir / "model"
    safe_extract(model_path, model_dir)
    code_dir = model_dir / CODE_DIR
    os.environ.update(environment)  # the container's environment, as SageMaker sets it
    handlers = load_handlers(code_dir, handler_program(code_dir, environment))
    model = handlers.model_fn(str(model_dir))
    app = create_app(handlers, model, name, limits or ServerLimits.from_environment())
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets that say so, and
    # without it Nagle's algorithm holds every small response back until the client's delayed
    # acknowledgement arrives.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    on_ready(sock.getsockname()[1])
    # log_config=None: uvicorn's records go to this process's bounded log, not to its stderr.
    config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    from backends.local.endpoints import EndpointRecords  # the record format lives there

    parser = argparse.ArgumentParser(description="Serve one local SageMaker-style endpoint.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--root", required=True, type=Path, help="the endpoints directory")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    records = EndpointRecords(args.root)
    record = records.read(args.name)
    if record is None:
        print(f"no record for endpoint {args.name} under {args.root}", file=sys.stderr)
        return 2
    environment = record.environment
    try:
        limits = ServerLimits.from_environment({**os.environ, **environment})
    except ValueError as e:
        print(e, file=sys.stderr)
        records.mark_failed(args.name, str(e))
        return 1
    setup_logging(records.endpoint_dir(args.name) / LOG_FILE, limits)
    stop_routing = route_output_to_log(logging.getLogger("cifar10.endpoint.output"))
    try:
        serve(args.name, records.endpoint_dir(args.name), Path(record.model_path or ""),
              environment, args.host, limits=limits,
              on_ready=lambda port: records.mark_in_service(args.name, args.host, port))
    except Exception as e:
        log.exception("the endpoint failed")
        records.mark_failed(args.name, f"{type(e).__name__}: {e}")
        return 1
    finally:
        stop_routing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
