"""Every use of Prefect's private API, in one place, so that an upgrade that breaks one breaks
here and in tests/test_third_party_adapters.py, which says which.

Prefect's temporary API server (``SubprocessASGIServer``) has one public way to start:
``start()``, which waits on a clock that counts only its own sleeps, and for the whole timeout
even when the server process has already died. ``flows.prefect_api`` runs the same server and
waits on the wall clock, watching the process; that needs the step ``start()`` takes before
its wait: ``_run_uvicorn_command()`` (Prefect 3.9).
"""

from __future__ import annotations

import subprocess
from typing import Any


def launch_server_process(server: Any) -> subprocess.Popen[Any]:
    """Starts ``server``'s uvicorn process on a free port, as ``SubprocessASGIServer.start()``
    does before its wait, and marks the server running (so this process's Prefect clients use
    it and ``server.stop()`` ends it)."""
    server.port = server.find_available_port()
    server.server_process = server._run_uvicorn_command()
    server.running = True
    return server.server_process
