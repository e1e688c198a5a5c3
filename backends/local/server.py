"""The local endpoint's model server: SageMaker's inference contract over HTTP on loopback.

Routes:

- ``GET /ping``: 200 once the model is loaded (the server binds its port only after that).
- ``POST /invocations``: the container contract. Handler errors keep their status (400 malformed
  body, 415 unsupported content type, 406 unanswerable Accept), 413 over 6 MiB; JSON bodies.
- ``POST /endpoints/{name}/invocations``: the SageMaker Runtime ``InvokeEndpoint`` wire API, so
  boto3's ``sagemaker-runtime`` client works with ``endpoint_url`` pointed here. As on AWS,
  container errors reach clients as ``ModelError`` (424) carrying ``OriginalStatusCode``.

Run as ``python -m backends.local.server --name NAME --root DIR`` by ``LocalEndpoints``:
it extracts ``model.tar.gz``, imports the handlers from ``code/``, binds a free port, then
records the port in the endpoint's record.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backends.base import VARIANT
from backends.files import safe_extract
from model_src.cifar import CODE_DIR, INFERENCE_PROGRAM

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints accept at most 6 MiB
DRAIN_LIMIT = 4 * MAX_PAYLOAD_BYTES  # read (and drop) oversized bodies up to this size
# Bodies up to this size (a few images) are answered on the event loop: the hop to a worker
# thread costs more than their inference. Larger ones run in a thread so /ping and small
# requests stay responsive meanwhile.
INLINE_BODY_BYTES = 64 * 1024
log = logging.getLogger("cifar10.endpoint")


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


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


async def read_body(request: Request, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The request body, or RequestError 413 past ``limit`` bytes.

    An oversized body of moderate size is read to its end and discarded before answering:
    clients send the whole body before they read the reply, and a server that hangs up early
    leaves them with a connection reset instead of the 413. Past ``DRAIN_LIMIT`` (or a declared
    length past it) the server answers at once and closes the connection.
    """
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise RequestError(400, f"invalid Content-Length {declared!r}")
    too_large = RequestError(413, f"payload of {declared or 'more than ' + str(limit)} bytes "
                                  f"is over the {limit}-byte limit")
    if declared is not None and int(declared) > DRAIN_LIMIT:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def create_app(handlers: ModuleType, model: Any, endpoint_name: str) -> Starlette:
    """The ASGI app serving one loaded model."""

    def transform(body: bytes, content_type: str, accept: str) -> tuple[bytes, str]:
        data = handlers.input_fn(body, content_type)
        prediction = handlers.predict_fn(data, model)
        encoded = handlers.output_fn(prediction, accept)
        return encoded if isinstance(encoded, tuple) else (encoded, accept)

    async def invoke(request: Request) -> tuple[bytes, str]:
        """Runs the handlers off the event loop; raises RequestError with the HTTP status."""
        body = await read_body(request)
        content_type = request.headers.get("content-type", "")
        accept = request.headers.get("accept") or "application/json"
        if not body:
            raise RequestError(400, "empty request body")
        try:
            if len(body) <= INLINE_BODY_BYTES:
                return transform(body, content_type, accept)
            return await run_in_threadpool(transform, body, content_type, accept)
        except Exception as e:
            status = getattr(e, "status_code", None)
            if isinstance(status, int) and 400 <= status < 500:
                raise RequestError(status, str(e)) from e
            log.error("inference failed:\n%s", traceback.format_exc())
            raise RequestError(500, f"inference failed: {type(e).__name__}: {e}") from e

    async def ping(request: Request) -> Response:
        return JSONResponse({"status": "healthy", "endpoint": endpoint_name})

    async def invocations(request: Request) -> Response:
        try:
            body, content_type = await invoke(request)
        except RequestError as e:
            return JSONResponse({"code": e.status, "message": e.message}, status_code=e.status)
        return Response(body, media_type=content_type)

    async def runtime_invocations(request: Request) -> Response:
        name = request.path_params["name"]
        if name != endpoint_name:
            return _aws_error(400, "ValidationError", f"Endpoint {name} not found.")
        try:
            body, content_type = await invoke(request)
        except RequestError as e:
            if e.status == 413:
                return _aws_error(413, "ValidationError", e.message)
            return _aws_error(424, "ModelError", _model_error_message(e), {
                "OriginalStatusCode": e.status, "OriginalMessage": e.message,
                "LogStreamArn": f"local:{endpoint_name}/server.log",
            })
        return Response(body, media_type=content_type,
                        headers={"x-Amzn-Invoked-Production-Variant": VARIANT})

    async def http_error(request: Request, exc: Exception) -> Response:
        """Unknown paths and methods answer in JSON too, like every other error here."""
        status = getattr(exc, "status_code", 500)
        return JSONResponse({"code": status, "message": getattr(exc, "detail", str(exc))},
                            status_code=status)

    return Starlette(routes=[
        Route("/ping", ping, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/endpoints/{name}/invocations", runtime_invocations, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error})


def _model_error_message(e: RequestError) -> str:
    kind = "client" if e.status < 500 else "server"
    return f'Received {kind} error ({e.status}) from primary with message "{e.message}".'


def _aws_error(status: int, code: str, message: str,
               extra: dict[str, Any] | None = None) -> JSONResponse:
    """An error shaped as AWS's rest-json protocol, which botocore turns into ClientError."""
    return JSONResponse({"message": message, **(extra or {})}, status_code=status,
                        headers={"x-amzn-ErrorType": code})


def serve(name: str, endpoint_dir: Path, model_path: Path, environment: dict[str, str],
          host: str, on_ready: Callable[[int], None]) -> None:
    """Loads the model, binds a port, reports it through ``on_ready``, serves until SIGTERM."""
    import uvicorn

    model_dir = endpoint_dir / "model"
    safe_extract(model_path, model_dir)
    code_dir = model_dir / CODE_DIR
    os.environ.update(environment)  # the container's environment, as SageMaker sets it
    handlers = load_handlers(code_dir, handler_program(code_dir, environment))
    model = handlers.model_fn(str(model_dir))
    app = create_app(handlers, model, name)
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets that say so, and
    # without it Nagle's algorithm adds ~40 ms to every response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    on_ready(sock.getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    from backends.local.endpoints import EndpointRecords  # the record format lives there

    parser = argparse.ArgumentParser(description="Serve one local SageMaker-style endpoint.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--root", required=True, type=Path, help="the endpoints directory")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    records = EndpointRecords(args.root)
    record = records.read(args.name)
    if record is None:
        print(f"no record for endpoint {args.name} under {args.root}", file=sys.stderr)
        return 2
    try:
        serve(
            args.name, records.endpoint_dir(args.name), Path(record["model_path"]),
            record.get("environment") or {}, args.host,
            on_ready=lambda port: records.mark_in_service(args.name, args.host, port),
        )
    except Exception as e:
        traceback.print_exc()
        records.mark_failed(args.name, f"{type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
