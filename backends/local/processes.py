"""Process helpers for the local backend: identity checks that survive PID reuse, group
termination, free ports, and children that die with their parent."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (a token that differs when a PID is reused), or None
    when there is no such live process. Zombies count as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return _start_time_portable(pid)
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _start_time_portable(pid: int) -> str | None:
    if sys.platform.startswith("linux"):
        return None  # /proc is authoritative on Linux
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "unknown"
    return "unknown"


def is_running(pid: int | None, expected_start: str | None) -> bool:
    """True when ``pid`` is alive and is still the process we started (same start time)."""
    if not pid:
        return False
    current = start_time(pid)
    if current is None:
        return False
    return expected_start in (None, "unknown") or current in (expected_start, "unknown")


def terminate_group(pid: int, expected_start: str | None, grace_seconds: float = 10.0) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``grace_seconds``.
    Returns False when the process was already gone (or the PID now belongs to another)."""
    if not is_running(pid, expected_start):
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if not is_running(pid, expected_start):
            return True
        time.sleep(0.05)
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while is_running(pid, expected_start) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for rendezvous addresses a child must know first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
    """Called in a new child of ``parent``: on Linux the kernel sends it SIGTERM when the
    parent thread exits (crash or SIGKILL included); exits at once if the parent already has.
    Elsewhere nothing."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def die_with_parent_preexec() -> object:
    """A ``preexec_fn`` for children that must not outlive the process starting them
    (``die_with``). Pair it with ``start_new_session=True`` so the job can be signalled as a
    group."""
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no imports, no locks
        die_with(parent)

    return preexec
