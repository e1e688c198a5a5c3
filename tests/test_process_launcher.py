"""The local backend's warm starts (``backends.local.launcher``): a process forked from the
launcher must look to its program exactly as a new ``python PROGRAM`` would, and end as one
would; each test runs both ways and compares."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backends.local.launcher as launcher
from backends.local.processes import is_running, start_time
from tests.support import live
from tests.support.pipeline import REPO

pytestmark = [pytest.mark.long_running,
              pytest.mark.skipif(not launcher.WARM_START, reason="warm starts are Linux-only")]

PROBE = '''
import json, os, sys
import numpy, torch
report = {
    "name": __name__, "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
    "own_session": os.getsid(0) == os.getpid(), "stdin": sys.stdin.read(),
    "setting": os.environ.get("PROBE_SETTING"), "unset": "PROBE_UNSET" in os.environ,
    "threads": torch.get_num_threads(),
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "stdout_unbuffered": sys.stdout.write_through,
    # random in every new process:
    "torch_draw": torch.rand(1).item(), "numpy_draw": int(numpy.random.randint(2**31)),
}
print(json.dumps(report))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
'''


def run(argv: list[str], cwd: Path, env: dict[str, str], warm: bool,
        monkeypatch: pytest.MonkeyPatch, die_with_parent: bool = True) -> tuple[int, str]:
    """(exit status, everything the program wrote), started warm or new."""
    monkeypatch.setattr(launcher, "WARM_START", warm)
    output = cwd / f"output-{warm}.txt"
    with open(output, "wb") as out:
        process = launcher.launch([sys.executable, *argv], env=env, cwd=cwd,
                                  output=out.fileno(), die_with_parent=die_with_parent)
    return process.wait(timeout=60), output.read_text()


def report_in(output: str) -> dict:
    [line] = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(line)


@pytest.fixture
def probe_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROBE_UNSET"}
    return {**env, "PROBE_SETTING": "set for this process", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("extra", [{}, {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2",
                                        "PYTHONUNBUFFERED": ""}],
                         ids=["as-the-backend-starts-them", "other-load-time-settings"])
def test_a_warm_started_script_sees_what_a_new_process_would(tmp_path, probe_env, extra,
                                                              monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    (code / "probe.py").write_text(PROBE)
    os.environ["PROBE_UNSET"] = "in the parent only"  # not passed: must not leak through
    try:
        env = {**probe_env, **extra}
        fresh = run(["probe.py", "3"], code, env, warm=False, monkeypatch=monkeypatch)
        warm = run(["probe.py", "3"], code, env, warm=True, monkeypatch=monkeypatch)
    finally:
        del os.environ["PROBE_UNSET"]
    again = run(["probe.py", "3"], code, env, warm=True, monkeypatch=monkeypatch)
    assert fresh[0] == warm[0] == 3
    fresh_report, warm_report, warm_again = (report_in(out) for _, out in (fresh, warm, again))
    for unseeded in ("torch_draw", "numpy_draw"):  # random in every new process
        assert warm_report.pop(unseeded) != warm_again.pop(unseeded)
        fresh_report.pop(unseeded)
    assert warm_report == fresh_report == warm_again
    assert fresh_report["name"] == "__main__" and fresh_report["own_session"]
    assert fresh_report["path0"] == str(code) and fresh_report["setting"] == "set for this process"
    assert "to stderr" in warm[1]


MODULE_PROBE = '''
import json, os, sys
print(json.dumps({"name": __name__, "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd()}))
'''


def test_a_module_runs_as_main_from_its_working_directory(tmp_path, probe_env, monkeypatch):
    (tmp_path / "probe_module.py").write_text(MODULE_PROBE)
    fresh = run(["-m", "probe_module"], tmp_path, probe_env, False, monkeypatch)
    warm = run(["-m", "probe_module"], tmp_path, probe_env, True, monkeypatch)
    assert fresh[0] == warm[0] == 0
    reports = [report_in(out) for _, out in (fresh, warm)]
    assert reports[0] == reports[1]
    assert reports[1]["argv"][0] == str(tmp_path / "probe_module.py")


@pytest.mark.parametrize("body, status, says", [
    ("raise ValueError('broken input')", 1, "ValueError: broken input"),
    ("raise KeyboardInterrupt", -signal.SIGINT, "KeyboardInterrupt"),
    ("import sys; sys.exit('a reason')", 1, "a reason"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL, ""),
])
def test_failures_end_as_a_new_process_would(tmp_path, probe_env, monkeypatch, body, status,
                                             says):
    (tmp_path / "fail.py").write_text(body)
    ends = [run(["fail.py"], tmp_path, probe_env, warm, monkeypatch) for warm in (False, True)]
    assert ends[0] == ends[1]  # the same status, the same traceback
    assert ends[0][0] == status and says in ends[0][1]


CLIENT = '''
import os, sys, time
from pathlib import Path
import backends.local.launcher as launcher
launcher.WARM_START = sys.argv[1] == "warm"
Path("sleeper.py").write_text("import time; time.sleep(120)")
sleeper = [sys.executable, "sleeper.py"]
pids = []
for die_with_parent in (True, False):
    process = launcher.launch(sleeper, env=dict(os.environ), cwd=Path.cwd(),
                              output=1, die_with_parent=die_with_parent)
    pids.append(process.pid)
print(*pids, flush=True)
time.sleep(120)
'''


@pytest.mark.parametrize("warm", [False, True], ids=["new", "warm"])
def test_when_the_starting_process_is_killed_only_tied_children_die(tmp_path, warm):
    """A training host dies with the process running its job (even on SIGKILL); a model
    server outlives the process that deployed it."""
    client = subprocess.Popen([sys.executable, "-c", CLIENT, "warm" if warm else "new"],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    tied, free = (int(pid) for pid in client.stdout.readline().split())
    starts = {pid: start_time(pid) for pid in (tied, free)}
    try:
        client.kill()
        client.wait()
        live.wait_until(lambda: not is_running(tied, starts[tied]) or None,
                        "the tied child dies with the starting process", timeout=10)
        assert is_running(free, starts[free])
    finally:
        for pid in (tied, free):
            if is_running(pid, starts[pid]):
                os.kill(pid, signal.SIGKILL)


def test_processes_that_differ_in_load_time_settings_get_launchers_of_their_own(
        tmp_path, probe_env, monkeypatch):
    """Thread counts are set after the fork (one launcher serves both); a library setting
    read at load time needs a launcher started with it."""
    (tmp_path / "probe.py").write_text(PROBE)
    first = {**probe_env, "OMP_NUM_THREADS": "1"}
    run(["probe.py", "0"], tmp_path, first, True, monkeypatch)
    served_first = launcher._launcher_for(sys.executable, first)
    other_threads = {**probe_env, "OMP_NUM_THREADS": "2"}
    run(["probe.py", "0"], tmp_path, other_threads, True, monkeypatch)
    assert launcher._launcher_for(sys.executable, other_threads) is served_first
    other_isa = {**first, "ATEN_CPU_CAPABILITY": "default"}
    run(["probe.py", "0"], tmp_path, other_isa, True, monkeypatch)
    assert launcher._launcher_for(sys.executable, other_isa) is not served_first


def test_the_launcher_a_run_prepares_is_the_one_its_hosts_and_servers_use(probe_env,
                                                                          monkeypatch):
    """A run starts its launcher while it downloads (``Backend.prepare``); its training hosts
    and model servers (this environment, plus settings applied after the fork) are then forked
    from that one."""
    monkeypatch.setattr(launcher, "WARM_START", True)
    for key, value in probe_env.items():
        monkeypatch.setenv(key, value)
    launcher.prepare()
    prepared = launcher._launcher_for(sys.executable, dict(os.environ))
    host_env = {**os.environ, "OMP_NUM_THREADS": "2", "SM_CURRENT_HOST": "algo-1"}
    server_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    assert launcher._launcher_for(sys.executable, host_env) is prepared
    assert launcher._launcher_for(sys.executable, server_env) is prepared


def test_a_wedged_launcher_times_out_and_the_child_starts_as_a_plain_process(
        tmp_path, probe_env, monkeypatch, caplog):
    """A launcher that stops answering (here SIGSTOPped) costs a launch the timeout, not
    forever: it is killed and forgotten, a warning says so, and the child starts as a new
    process that its program cannot tell apart."""
    monkeypatch.setattr(launcher, "WARM_START", True)
    monkeypatch.setattr(launcher, "LAUNCH_TIMEOUT_SECONDS", 3.0)
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**probe_env, "MALLOC_PROBE_WEDGED": "1"}  # a load-time setting: a launcher of its own
    assert run(["probe.py", "0"], tmp_path, env, True, monkeypatch)[0] == 0  # it answers
    wedged = launcher._launcher_for(sys.executable, env)
    os.kill(wedged.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with open(tmp_path / "output.txt", "wb") as out:
            process = launcher.launch([sys.executable, "probe.py", "4"], env=env, cwd=tmp_path,
                                      output=out.fileno(), die_with_parent=True)
        assert time.monotonic() - started < launcher.LAUNCH_TIMEOUT_SECONDS + 8
        assert isinstance(process, subprocess.Popen)  # not forked by a launcher
        assert process.wait(timeout=60) == 4
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(wedged.process.pid, signal.SIGCONT)
    report = report_in((tmp_path / "output.txt").read_text())
    assert report["own_session"] and report["name"] == "__main__"
    assert report["setting"] == "set for this process" and report["stdin"] == ""
    assert "did not answer within 3 s" in caplog.text and "as a plain process" in caplog.text
    assert not wedged.alive and wedged.process.wait(timeout=10) == -signal.SIGKILL
    # The next launch gets a new launcher, which answers.
    assert run(["probe.py", "0"], tmp_path, env, True, monkeypatch)[0] == 0
    assert launcher._launcher_for(sys.executable, env) is not wedged
