"""What warm starts save: the local backend's training hosts and model servers forked from its
launcher (torch imported once) against new Python processes, side by side in one run.

Each pass trains a short job on generated data, deploys its model, invokes it once and deletes
the endpoint, ``--cycles`` times, on a fresh local backend. Order: fresh, warm, fresh, warm.
The first warm pass includes starting the launcher (its one torch import). CPU is the
processes' own: the reaped children of this process (fresh) or of the launcher (warm).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from common import machine, print_table
from generated_data import make_cifar_dir

import backends.local.launcher as launcher
from backends.base import EndpointSpec, TrainingSpec
from backends.local import LocalBackend
from tasks.endpoint import invoke_batch

HYPERPARAMETERS = {"epochs": 1, "batch-size": 16, "lr": 0.02}


def children_cpu() -> float:
    """CPU seconds of the reaped processes started from here: directly, and through the
    launchers (each launcher's own time and its reaped children's, from /proc)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    for started in list(launcher._launchers.values()):
        fields = Path(f"/proc/{started.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15]) / 100  # utime stime cutime cstime, ticks
    return total


def one_pass(root: Path, data: Path, cycles: int, warm: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the started processes) for ``cycles`` train-deploy-invoke
    cycles."""
    launcher.WARM_START = warm
    backend = LocalBackend(root=root)
    data_uri = backend.storage.upload(data)
    import numpy as np

    images = np.zeros((1, 3, 32, 32), dtype=np.float32)
    cpu, started = children_cpu(), time.perf_counter()
    for i in range(cycles):
        result = backend.jobs.run(TrainingSpec(job_name=f"bench-{i}", data_uri=data_uri,
                                               hyperparameters=HYPERPARAMETERS))
        backend.endpoints.deploy(EndpointSpec(name=f"bench-{i}", model_uri=result.model_uri))
        try:
            invoke_batch(backend, f"bench-{i}", images)
        finally:
            backend.endpoints.delete(f"bench-{i}")
    wall = time.perf_counter() - started
    time.sleep(0.5)  # the last server's exit is reaped (and counted) by now
    return wall, children_cpu() - cpu


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Runs the benchmark; returns its headline rows for bench/run_all.py."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3, help="train-deploy cycles per pass")
    args = parser.parse_args(argv)
    if not launcher.WARM_START:
        print("warm starts are Linux-only: nothing to compare here")
        return []
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_cifar_dir(work / "cifar")
        passes = {}
        for i, (label, warm) in enumerate((("fresh 1", False),
                                           ("warm 1 (starts the launcher)", True),
                                           ("fresh 2", False), ("warm 2", True))):
            passes[label] = one_pass(work / f"pass-{i}", data, args.cycles, warm)
            print(f"{label}: {passes[label][0]:.2f} s wall, {passes[label][1]:.2f} s CPU",
                  flush=True)
    launcher.WARM_START = True
    fresh = min(passes["fresh 1"][0], passes["fresh 2"][0])
    fresh_cpu = min(passes["fresh 1"][1], passes["fresh 2"][1])
    rows = [[label, f"{wall / args.cycles:.2f}", f"{cpu / args.cycles:.2f}",
             f"{wall / fresh:.2f}"] for label, (wall, cpu) in passes.items()]
    print()
    print_table(["pass", "wall s per cycle", "CPU s per cycle", "wall vs fresh"], rows)
    warm, warm_cpu = passes["warm 2"]
    return [["process_start", "train + deploy + invoke + delete, warm vs fresh processes",
             f"{warm / args.cycles:.2f} s vs {fresh / args.cycles:.2f} s", f"{warm / fresh:.2f}x"],
            ["process_start", "CPU of those processes per cycle, warm vs fresh",
             f"{warm_cpu / args.cycles:.2f} s vs {fresh_cpu / args.cycles:.2f} s",
             f"{warm_cpu / fresh_cpu:.2f}x"]]


if __name__ == "__main__":
    main()
