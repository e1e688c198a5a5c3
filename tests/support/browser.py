"""Just enough of a headless-Chromium driver for the UI test: open a page, wait for text to
render, click a tab, read the page's text, save a screenshot.

It speaks the DevTools protocol over ``websockets`` (already installed: Prefect depends on it),
so the test needs no Selenium or Playwright, only a Chromium binary.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.support import live

# Headless as root on a closed network: no sandbox (root), no GPU, and nothing that phones
# home (those connections are refused here and would only slow the page down).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """One headless Chromium with one page. A context manager: the browser and all its child
    processes are gone when the block ends, whatever happened in it."""

    def __init__(self, executable: str, profile: Path, width: int = 1400, height: int = 1800):
        self.executable, self.profile = executable, profile
        self.width, self.height = width, height
        self._ids = itertools.count(1)
        self._process: subprocess.Popen | None = None
        self._ws: ClientConnection | None = None

    def __enter__(self) -> Browser:
        self.profile.mkdir(parents=True, exist_ok=True)
        (self.profile / "DevToolsActivePort").unlink(missing_ok=True)  # a previous browser's
        self._process = live.start(
            [self.executable, *FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}", "about:blank"],
            log=self.profile.parent / f"{self.profile.name}.log")
        try:
            self._ws = connect(self._page_websocket(), max_size=None, open_timeout=30)
            self._call("Page.enable")
            self._call("Runtime.enable")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._process is not None:
            live.stop(self._process)  # the whole group: zygotes and renderers too

    def _page_websocket(self, timeout: float = 30) -> str:
        """Chromium writes its DevTools port into the profile once it listens (port 0 = any
        free one, so parallel runs cannot collide)."""
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._process.returncode}")
            if port_file.exists() and (lines := port_file.read_text().split()):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json/list",
                                                timeout=5) as response:
                        pages = [t for t in json.load(response) if t["type"] == "page"]
                except OSError:  # written a moment before it listens
                    pages = []
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.2)
        raise TimeoutError(f"chromium did not open its DevTools port within {timeout}s")

    def _call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:  # events arrive interleaved with answers; skip them
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self._call("Page.navigate", url=url)

    def text(self) -> str:
        """The page's visible text, as a user would read it."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 45) -> str:
        """Waits until every needle is on the page (the UI renders after its API calls
        return); returns the text, or fails naming what never appeared."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"not shown after {timeout}s: {missing}\n"
                                     f"--- page text ---\n{text[-3000:]}")
            time.sleep(0.5)

    def click(self, label: str) -> None:
        """Clicks the innermost element whose text is exactly ``label`` (a tab, a link, a card's
        title); the click bubbles up to whatever handles it."""
        clicked = self.evaluate(f"""(() => {{
            const label = {json.dumps(label)};
            const matches = [...document.body.querySelectorAll('*')]
                .filter(el => el.innerText && el.innerText.trim() === label);
            if (!matches.length) return false;
            matches[matches.length - 1].click();  // document order: descendants come last
            return true;
        }})()""")
        if not clicked:
            raise AssertionError(f"nothing to click labelled {label!r}:\n{self.text()[:2000]}")

    def log_in(self, server_url: str, auth_string: str, timeout: float = 45) -> None:
        """Logs in to the Prefect UI as a user does: opens the server's address (`make ui`
        prints it), which sends a browser without credentials to the login page, types the
        auth string and presses Login. The UI keeps it in localStorage (``prefect-password``)
        for every page of that origin."""
        self.open(server_url)
        live.wait_until(lambda: self.evaluate(
            "!!document.querySelector('input[type=password]')"), "the login page",
            timeout=timeout)
        self.evaluate("document.querySelector('input[type=password]').focus()")
        self._call("Input.insertText", text=auth_string)  # real input events for the UI
        self.click("Login")
        live.wait_until(lambda: not self.evaluate(
            "!!document.querySelector('input[type=password]')"), "the UI after logging in",
            timeout=timeout)

    def screenshot(self, path: Path) -> Path:
        data = self._call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
