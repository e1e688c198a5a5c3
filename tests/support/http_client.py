"""A keep-alive HTTP client for the endpoint tests, and a process's resident memory."""

from __future__ import annotations

import http.client
from pathlib import Path


class Client:
    """One keep-alive HTTP connection that reconnects when the server closes it."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port, self.timeout = int(port), timeout
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            payload = response.read()
            result = response.status, {k.lower(): v for k, v in response.getheaders()}, payload
            if response.will_close:
                self.reconnect()
            return result
        except (OSError, http.client.HTTPException):
            self.reconnect()
            raise

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
