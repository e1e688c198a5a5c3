"""Starts the local backend's training hosts and model servers already warm: each is forked
from a launcher process that has imported torch once, instead of a new Python importing it
again (about 1.3 s of CPU per process, most of a short job's start or a model server's load).

The forked process is made what a new ``python PROGRAM ARGS`` would be before the program
runs: its own session (process group), the environment, working directory, ``sys.argv`` and
``sys.path`` it was given, stdin from /dev/null, stdout and stderr on the file it was given and
buffered as Python buffers them, Python's signal handlers, torch's thread count from
``OMP_NUM_THREADS``, torch's and numpy's random generators seeded anew; it ends as Python ends
(the exit status, an uncaught exception's traceback). ``tests/test_process_launcher.py`` runs
probes both ways and compares. Settings that native libraries read once when they load
(``OMP_*``, ``MKL_*``, ``ONEDNN_*``, ``ATEN_CPU_CAPABILITY``, ``PYTHON*``, ``LD_*``, ...)
cannot change after the fork: processes that differ in them get a launcher of their own,
started with them.

A launcher belongs to the process that started it and exits when that process ends (its end of
the socket closes); the children that asked to die with their parent (training hosts) then
get SIGTERM, the others (model servers) keep running. It reaps its children and reports each
exit status, so ``Launched`` answers as ``subprocess.Popen`` does.

Linux only (fork after importing torch is not safe on macOS); elsewhere, for an interpreter
other than this one, and for command lines other than a script or ``-m`` module, ``launch``
starts a new process. So it does when a launcher does not answer within
``LAUNCH_TIMEOUT_SECONDS`` (wedged: stopped, starved, deadlocked) or has gone: that launcher
is killed and forgotten (the next launch starts a new one), a warning is logged, and the child
starts as a plain subprocess with the same contract.

Started by ``launch`` (``LAUNCHER_COMMAND``), never by hand.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from backends.local import processes
from backends.polling import poll

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # where `-m backends...` imports from
WARM_START = sys.platform.startswith("linux")
# What the launcher imports before it forks anything: the training script's and the model
# server's heavy imports. A module that is not installed is skipped.
PRELOAD = ("numpy", "torch", "torch.nn.functional", "torch.distributed", "uvicorn",
           "starlette.applications", "backends.local.server")
# Read by native libraries or Python only when they start: a launcher serves the children
# that agree with it on every such variable.
LOAD_TIME_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "ONEDNN_", "DNNL_",
                      "ATEN_", "TORCH", "PYTORCH", "PYTHON", "LD_", "MALLOC_")
# ... except these, which the child applies itself after the fork.
APPLIED_AFTER_FORK = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONUNBUFFERED"})
MESSAGE_LIMIT = 1 << 20
# Not `-m backends.local.launcher`: the package imports this module first, and runpy would
# then run a second copy of it as __main__.
LAUNCHER_COMMAND = ("import sys; from backends.local.launcher import main; "
                    "sys.exit(main(sys.argv[1:]))")
# How long a launch waits for its launcher's answer (a fork takes milliseconds, but a new
# launcher answers only once it has imported torch: seconds, more on a loaded machine).
LAUNCH_TIMEOUT_SECONDS = float(os.environ.get("CIFAR10_LAUNCHER_TIMEOUT_SECONDS", "60"))
log = logging.getLogger(__name__)


class LauncherUnavailable(OSError):
    """The launcher did not answer in time, or has gone: start the child another way."""


class Launched(Protocol):
    """What the callers use of a started process: ``subprocess.Popen``'s answers."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def launch(argv: list[str], *, env: Mapping[str, str], cwd: Path, output: int,
           die_with_parent: bool) -> Launched:
    """Starts ``argv`` (``[python, script, ...]`` or ``[python, "-m", module, ...]``) in a
    session of its own, stdout and stderr on the file descriptor ``output``.
    ``die_with_parent``: SIGTERM when this process ends (a crash or SIGKILL included)."""
    env = dict(env)
    program = argv[1:2] == ["-m"] or (len(argv) > 1 and not argv[1].startswith("-"))
    if _warm(argv[0]) and program:
        try:
            return _launcher_for(argv[0], env).launch(argv, env, cwd, output, die_with_parent)
        except LauncherUnavailable as e:
            log.warning("%s: starting %s as a plain process instead", e, " ".join(argv[1:3]))
    return _plain(argv, env, cwd, output, die_with_parent)


def _plain(argv: list[str], env: dict[str, str], cwd: Path, output: int,
           die_with_parent: bool) -> Launched:
    """``argv`` as a new process (no launcher), with ``launch``'s contract."""
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=output,
        stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=processes.die_with_parent_preexec() if die_with_parent else None)
    # Reaped as soon as it exits, as the launcher reaps its children: never a zombie.
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def prepare(python: str = sys.executable) -> None:
    """Starts this process's launcher now, for children started with this environment: it
    imports torch while the caller does other work (a run downloads its data), and the first
    host or server does not wait for it."""
    if _warm(python):
        _launcher_for(python, dict(os.environ))


def _warm(python: str) -> bool:
    """Whether this platform forks warm children, for this interpreter (forks run this one)."""
    return WARM_START and python == sys.executable


def _load_time(key: str) -> bool:
    return key.startswith(LOAD_TIME_PREFIXES) and key not in APPLIED_AFTER_FORK


_launchers: dict[tuple[str, tuple[tuple[str, str], ...]], _Launcher] = {}
_launchers_lock = threading.Lock()


def _launcher_for(python: str, env: dict[str, str]) -> _Launcher:
    key = (python, tuple(sorted((k, v) for k, v in env.items() if _load_time(k))))
    with _launchers_lock:
        launcher = _launchers.get(key)
        if launcher is None or not launcher.alive:
            launcher = _launchers[key] = _Launcher(python, dict(key[1]))
        return launcher


# A fork of this process (not a subprocess, which execs) must start launchers of its own.
os.register_at_fork(after_in_child=_launchers.clear)


class _Launcher:
    """This process's end of one launcher process."""

    def __init__(self, python: str, load_time_env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if not _load_time(k)} | load_time_env
        for key in APPLIED_AFTER_FORK:  # the children set theirs: libraries load with defaults
            env.pop(key, None)
        with theirs:
            self.process = subprocess.Popen(
                [python, "-c", LAUNCHER_COMMAND, str(theirs.fileno())],
                cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()], start_new_session=True)
        threading.Thread(target=self.process.wait, daemon=True).start()  # no zombie when done
        self.socket = ours
        self.alive = True
        self._requests = threading.Lock()  # one request at a time: replies come in order
        self._lock = threading.Lock()  # the children's table
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._children: dict[int, _Child] = {}
        self._exited: dict[int, int] = {}  # exits reported before their launch returned
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def launch(self, argv: list[str], env: dict[str, str], cwd: Path, output: int,
               die_with_parent: bool) -> Launched:
        """Raises LauncherUnavailable when this launcher does not answer within
        ``LAUNCH_TIMEOUT_SECONDS`` (it is then discarded) or has gone."""
        request = {"argv": argv[1:], "env": env, "cwd": str(cwd),
                   "die_with_parent": die_with_parent}
        deadline = time.monotonic() + LAUNCH_TIMEOUT_SECONDS
        # Another launch stuck on a wedged launcher holds the lock: wait no longer than ours.
        if not self._requests.acquire(timeout=LAUNCH_TIMEOUT_SECONDS):
            raise LauncherUnavailable(f"the process launcher {self.process.pid} is busy")
        try:
            reply = self._exchange(request, output, deadline)
        finally:
            self._requests.release()
        if reply.get("gone"):
            raise LauncherUnavailable(f"the process launcher {self.process.pid} has gone")
        if "error" in reply:
            raise OSError(f"could not start {argv[1:]}: {reply['error']}")
        child = _Child(reply["pid"], self)
        with self._lock:
            self._children[child.pid] = child
            if child.pid in self._exited:
                child.returncode = self._exited.pop(child.pid)
        return child

    def _exchange(self, request: dict[str, Any], output: int,
                  deadline: float) -> dict[str, Any]:
        """Sends ``request`` (with the descriptor ``output``) and waits for its reply until
        ``deadline``; called holding ``_requests``."""
        if not self.alive:
            raise LauncherUnavailable(f"the process launcher {self.process.pid} has gone")
        try:
            socket.send_fds(self.socket, [json.dumps(request).encode()], [output])
        except OSError as e:
            self.alive = False
            raise LauncherUnavailable(f"the process launcher has gone: {e}") from e
        try:
            return self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.discard()
            raise LauncherUnavailable(
                f"the process launcher {self.process.pid} did not answer within "
                f"{LAUNCH_TIMEOUT_SECONDS:g} s (CIFAR10_LAUNCHER_TIMEOUT_SECONDS)") from None

    def discard(self) -> None:
        """Kills this launcher (SIGKILL ends a stopped process too), so that it never starts a
        request late, and stops a child it forked before it wedged, whose pid never reached
        us. Its other children carry on (``_Child.poll`` then asks /proc)."""
        self.alive = False
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self._reader.join(timeout=5)  # the socket's end: every reply it sent is queued
        while True:
            try:
                late = self._replies.get_nowait()
            except queue.Empty:
                return
            if "pid" in late:
                processes.terminate_group(late["pid"], None, grace_seconds=5)

    def _read(self) -> None:
        while True:
            try:
                message = self.socket.recv(MESSAGE_LIMIT)
            except OSError:
                message = b""
            if not message:  # the launcher is gone (killed): so are the children tied to it
                self.alive = False  # the children's statuses are lost: poll() asks /proc
                self._replies.put({"error": "the process launcher exited", "gone": True})
                return
            reply = json.loads(message)
            if "exited" not in reply:
                self._replies.put(reply)
                continue
            with self._lock:
                child = self._children.pop(reply["exited"], None)
                if child is None:
                    self._exited[reply["exited"]] = reply["returncode"]
                else:
                    child.returncode = reply["returncode"]


class _Child:
    """A forked child, as its launcher reports it."""

    def __init__(self, pid: int, launcher: _Launcher) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._launcher = launcher
        self._start = processes.start_time(pid)

    def poll(self) -> int | None:
        if self.returncode is None and not self._launcher.alive and not processes.is_running(
                self.pid, self._start):
            self.returncode = 1  # it ended after its launcher was killed: the status is lost
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return poll(self.poll, interval=0.05,
                    timeout=math.inf if timeout is None else timeout,
                    on_timeout=lambda _: subprocess.TimeoutExpired(str(self.pid), timeout or 0))


# --- the launcher process ---------------------------------------------------------------------

def main(argv: list[str]) -> int:
    """``argv``: the socket's file descriptor. Preloads, then forks a child per request until
    its parent closes the socket. Returns in the child too: with the child's exit status, once
    its program has run."""
    connection = socket.socket(fileno=int(argv[0]))
    base_path = sys.path[1:]  # PYTHONPATH's and the interpreter's, as a new Python has them
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through the pipe
    while True:
        ready, _, _ = select.select([connection, wake_read], [], [])
        if wake_read in ready:
            os.read(wake_read, 4096)
        _report_exits(connection)
        if connection not in ready:
            continue
        try:
            message, fds, _, _ = socket.recv_fds(connection, MESSAGE_LIMIT, 1)
        except ConnectionResetError:
            message, fds = b"", []
        if not message:
            return 0  # our parent has gone: so do we
        launcher_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            connection.send(json.dumps({"error": str(e)}).encode())
            continue
        if pid == 0:
            connection.close()  # the child's copy: only the launcher talks to its parent
            os.close(wake_read)
            os.close(wake_write)
            return _run_child(json.loads(message), fds[0], launcher_pid, base_path)
        for fd in fds:
            os.close(fd)
        connection.send(json.dumps({"pid": pid}).encode())


def _report_exits(connection: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):  # the parent may be gone
            connection.send(json.dumps({"exited": pid,
                                        "returncode": os.waitstatus_to_exitcode(status)}).encode())


def _run_child(request: dict[str, Any], output: int, launcher_pid: int,
               base_path: list[str]) -> int:
    """In the fork: becomes ``python ARGV`` started with ``request``'s environment."""
    os.setsid()
    if request["die_with_parent"]:
        processes.die_with(launcher_pid)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(devnull)
    os.close(output)
    env = request["env"]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    _standard_streams(unbuffered=bool(env.get("PYTHONUNBUFFERED")))
    if "torch" in sys.modules and (threads := env.get("OMP_NUM_THREADS", "")).isdigit():
        sys.modules["torch"].set_num_threads(max(1, int(threads)))
    # Generators seeded once in the launcher would repeat in every child: a new seed each, as
    # a new process gets (Python's own `random` reseeds itself after a fork).
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.path[:] = ["", *base_path]  # [0]: the program's directory, set when it runs
    return _run_program(request["argv"])


def _standard_streams(unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr on the new descriptors, buffered as Python would set them."""
    def writer(fd: int, errors: str, line_buffering: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, "w", closefd=False)
        binary = raw if unbuffered else io.BufferedWriter(raw)
        return io.TextIOWrapper(binary, encoding="utf-8", errors=errors,  # type: ignore[arg-type]
                                line_buffering=line_buffering, write_through=unbuffered)

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = writer(1, "strict", line_buffering=False)
    sys.stderr = writer(2, "backslashreplace", line_buffering=True)


def _run_program(argv: list[str]) -> int:
    """``python ARGV`` from here: ``-m MODULE`` or a script, as ``__main__``; the exit status
    as Python gives it (SystemExit's code, 1 and the traceback for an uncaught exception)."""
    import runpy

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # run_module puts the module's path in argv[0]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)  # as given (run_path would make argv[0] absolute)
            sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
            _run_script(os.path.abspath(argv[0]))
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException as e:
        traceback.print_exception(type(e), e, _program_frames(e.__traceback__))
        if isinstance(e, KeyboardInterrupt):  # Python ends by the signal: -SIGINT
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return 1
    return 0


def _run_script(path: str) -> None:
    """Runs the script at ``path`` as a new ``__main__`` module, as ``python path`` does."""
    import importlib.machinery
    import types

    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    sys.modules["__main__"] = main
    with io.open_code(path) as source:
        code = compile(source.read(), path, "exec")
    exec(code, main.__dict__)


def _program_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the program's first frame on, as a new Python prints it (without
    this module's and runpy's frames above it)."""
    while tb is not None and (tb.tb_frame.f_code.co_filename == __file__
                              or "runpy" in tb.tb_frame.f_code.co_filename):  # -m programs
        tb = tb.tb_next
    return tb

