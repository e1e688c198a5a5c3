"""A loopback HTTP server that misbehaves the ways a download must survive: it announces more
than any archive, streams without end, trickles, and guards files behind credentials."""

from __future__ import annotations

import base64
import functools
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ANNOUNCED_BYTES = 2 << 30  # /announces-2GiB: over the default cap of 1 GiB
ENDLESS_LIMIT = 16 << 20  # /endless stops here: today's code, with no cap, must not hang
TRICKLE_BYTES, TRICKLE_PAUSE = 100_000, 0.02  # /trickle: 1 byte every 20 ms (~33 minutes)
USER, PASSWORD = "alice", "pass-word-42"  # /private/<file> wants these (HTTP Basic)


class HostileHandler(http.server.BaseHTTPRequestHandler):
    """``/announces-2GiB``, ``/endless`` (no Content-Length), ``/trickle``,
    ``/private/<file>`` (a file of ``root`` behind Basic auth); anything else is a 404. The
    query string is ignored; the Authorization header of every request is logged."""

    def __init__(self, *args, root: Path, authorizations: list[str | None], **kwargs):
        self.root, self.authorizations = root, authorizations
        super().__init__(*args, **kwargs)

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        self.authorizations.append(self.headers.get("Authorization"))
        path = self.path.split("?", 1)[0]
        routes = {"/announces-2GiB": self.announce_too_much, "/endless": self.endless,
                  "/trickle": self.trickle}
        try:
            if path in routes:
                routes[path]()
            elif path.startswith("/private/"):
                self.private(path.removeprefix("/private/"))
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def announce_too_much(self):
        self.send_response(200)
        self.send_header("Content-Length", str(ANNOUNCED_BYTES))
        self.end_headers()
        self.wfile.write(b"\0" * 1024)  # then a dropped connection

    def endless(self):
        self.send_response(200)  # HTTP/1.0, no Content-Length: the body ends when we close
        self.end_headers()
        block = b"\0" * 65536
        for _ in range(ENDLESS_LIMIT // len(block)):
            self.wfile.write(block)

    def trickle(self):
        self.send_response(200)
        self.send_header("Content-Length", str(TRICKLE_BYTES))
        self.end_headers()
        for _ in range(TRICKLE_BYTES):
            self.wfile.write(b"\0")
            self.wfile.flush()
            time.sleep(TRICKLE_PAUSE)

    def private(self, name: str):
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        file = self.root / name
        if self.headers.get("Authorization") != expected:
            self.send_error(401)
        elif not file.is_file():
            self.send_error(404)
        else:
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)


@contextmanager
def hostile_http_server(root: Path) -> Iterator[tuple[str, list[str | None]]]:
    """Serves ``root`` the hostile way on loopback; yields (base URL, Authorization headers
    received, in order)."""
    authorizations: list[str | None] = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        functools.partial(HostileHandler, root=root, authorizations=authorizations))
    server.daemon_threads = True  # a trickle to a client that left must not hold up the end
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", authorizations
    finally:
        server.shutdown()
        server.server_close()


def with_secrets(base_url: str, path: str) -> str:
    """``base_url + path`` carrying credentials and tokens that no message may repeat."""
    host = base_url.removeprefix("http://")
    return (f"http://{USER}:{PASSWORD}@{host}{path}"
            f"?token=secret-token-7&X-Amz-Signature=secret-signature-9")


# (Distinctive: "pass" alone is in messages such as "for a mirror, pass its md5".)
SECRETS = (USER, PASSWORD, "secret-token-7", "secret-signature-9")
