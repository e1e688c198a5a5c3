"""Nightly soak: N nightly runs of the pipeline flow on the local backend, on the real CIFAR-10,
in a fresh state directory and Prefect home; prints the state directory's size after each run,
split by kind, and says whether it stays flat once retention applies and how much a cached run
adds.

Each run is the whole flow (download → preview → upload → fit → deploy → smoke-predict →
delete endpoint → register), one after the other in this process, as a long-lived ``flow.serve``
process would run them (Prefect's temporary server starts once, over the soak's own
``$PREFECT_HOME``, never the user's API). Unchanged runs reuse the cached model; every
``--change-every``-th run changes the seed, so it trains anew (the tutorial network for
``--epochs`` passes: seconds). Retention is set small (``--keep-jobs``) so that it applies
within N runs.

Sizes are disk usage as ``du`` counts it (allocated blocks, each file once: a training channel's
hard links are not counted twice), by kind: data (the downloaded dataset), store (the uploaded
channel and the models), jobs (records and metrics), endpoints, registry, logs (training and
server logs, wherever they are) and the Prefect database (``$PREFECT_HOME``).

    python bench/nightly_soak.py                       # 20 runs
    python bench/nightly_soak.py --runs 8              # fewer
    python bench/nightly_soak.py --quick               # 6 runs, keep_jobs=1
    python bench/nightly_soak.py --dataset /path/to/cifar-10-python.tar.gz --md5 <md5>

The dataset: ``--dataset`` (the archive, or a directory holding cifar-10-python.tar.gz), else
``$CIFAR10_DATASET``, else ``../shared/datasets/`` beside the checkout; the soak never
downloads it. Its md5: ``--md5`` (``skip``: no check), else ``$CIFAR10_DATASET_MD5``, else the
official archive's (the fallback mirror's for the mirror). bench/common.py says it in full.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import ARCHIVE, dataset_md5, local_archive, machine, print_table

MB = 1_000_000
CACHED_RUN_TARGET = 1 * MB
KINDS = ("data", "store", "jobs", "endpoints", "registry", "logs", "prefect db", "other")
TOP_LEVEL_KINDS = {"data": "data", "store": "store", "jobs": "jobs", "endpoints": "endpoints",
                   "registry": "registry", "prefect": "prefect db"}


@dataclass
class Night:
    number: int
    seed: int
    outcome: str  # trained | cached | the state's name when the run did not complete
    seconds: float
    sizes: dict[str, int]
    registry: str = ""

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def isolate(state: Path) -> None:
    """A fresh pipeline state and Prefect home, and no user's Prefect API or profile: set
    before Prefect is imported."""
    os.environ["CIFAR10_PIPELINE_HOME"] = str(state)
    os.environ["PREFECT_HOME"] = str(state / "prefect")
    os.environ["PREFECT_PROFILES_PATH"] = str(state / "prefect" / "profiles.toml")
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
        os.environ.pop(key, None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh database is migrated on the first start: minutes on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    (state / "prefect").mkdir(parents=True, exist_ok=True)


def kind_of(relative: Path) -> str:
    """Which column a file of the state directory counts in."""
    name = relative.name
    if ".log" in name and (name.endswith(".log") or name.rsplit(".", 1)[-1].isdigit()):
        return "logs"
    return TOP_LEVEL_KINDS.get(relative.parts[0], "other") if len(relative.parts) > 1 \
        else "other"


def checkpoint_prefect_database(state: Path) -> None:
    """Moves what Prefect's SQLite write-ahead log holds into the database file and empties the
    log, so that the database is measured by what it keeps, not by where the log happens to be
    in its cycle (it grows to about 4 MB, then starts over). Busy: measured as it is."""
    database = state / "prefect" / "prefect.db"
    if database.is_file():
        with contextlib.closing(sqlite3.connect(database, timeout=10)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def disk_usage(state: Path) -> dict[str, int]:
    """Allocated bytes by kind, each inode counted once (as du does)."""
    checkpoint_prefect_database(state)
    sizes = dict.fromkeys(KINDS, 0)
    seen: set[tuple[int, int]] = set()
    for root, _, files in os.walk(state):
        for name in files:
            path = Path(root, name)
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue  # removed while we walked (a temporary file)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            sizes[kind_of(path.relative_to(state))] += info.st_blocks * 512
    return sizes


def night_config(args: argparse.Namespace, archive: Path, seed: int):
    from flows.config import PipelineConfig

    return PipelineConfig.model_validate({
        "data": {"url": archive.as_uri(), "md5": args.md5},
        "training": {"model": "tutorial", "epochs": args.epochs, "seed": seed},
        # A soak measures disk, not accuracy: a few seconds of training must pass the floor.
        "smoke_test": {"accuracy_floor": 0.1},
        "retention": {"keep_jobs": args.keep_jobs, "max_age_days": None},
    })


def run_night(number: int, args: argparse.Namespace, archive: Path, state: Path) -> Night:
    from flows.pipeline import cifar10_pipeline

    seed = (number - 1) // args.change_every
    started = time.perf_counter()
    run = cifar10_pipeline(config=night_config(args, archive, seed), return_state=True)
    seconds = time.perf_counter() - started
    night = Night(number, seed, run.name, seconds, disk_usage(state))
    if run.is_completed():
        summary = run.result()
        night.outcome = "cached" if summary.training.cached_from else "trained"
        if summary.registry is not None:
            night.registry = f"v{summary.registry.version} {summary.registry.status}" + (
                " (reused)" if summary.registry.reused else "")
    else:
        night.outcome = f"{run.name}: {run.message}"[:60]
    return night


def row(night: Night, previous: Night | None) -> list[str]:
    growth = night.total - previous.total if previous else night.total
    return [str(night.number), str(night.seed), night.outcome, f"{night.seconds:.0f}",
            *(f"{night.sizes[k] / MB:.2f}" for k in KINDS if k != "other"),
            f"{night.total / MB:.2f}", f"{growth / MB:+.3f}", night.registry]


HEADERS = ["run", "seed", "outcome", "s", "data MB", "store MB", "jobs MB", "endpoints MB",
           "registry MB", "logs MB", "prefect db MB", "total MB", "growth MB", "registered"]


def verdicts(nights: list[Night], keep_jobs: int) -> None:
    """Flat once retention applies (from the first training past keep_jobs + 1 jobs), and
    the largest growth of a cached run (the first run, which downloads, aside)."""
    trained = [n for n in nights if n.outcome == "trained"]
    cached_growth = [(b.total - a.total, b.number, b.sizes, a.sizes)
                     for a, b in itertools.pairwise(nights) if b.outcome == "cached"]
    if cached_growth:
        growth, number, after, before = max(cached_growth)
        without_db = growth - (after["prefect db"] - before["prefect db"])
        verdict = "meets" if growth <= CACHED_RUN_TARGET else "MISSES"
        print(f"largest growth of a cached run: {growth / MB:+.3f} MB (run {number}; "
              f"{without_db / MB:+.3f} MB outside the Prefect database): {verdict} the "
              f"target of <= {CACHED_RUN_TARGET / MB:.0f} MB")
    if len(trained) <= keep_jobs + 1:
        print(f"retention never had to prune ({len(trained)} trainings, keep_jobs="
              f"{keep_jobs}): run more nights to see it apply")
        return
    steady = [n for n in nights if n.number >= trained[keep_jobs + 1].number]
    outside = [n.total - n.sizes["prefect db"] for n in steady]
    totals = [n.total for n in steady]
    print(f"once retention applies (runs {steady[0].number}-{steady[-1].number}): total "
          f"{min(totals) / MB:.2f}-{max(totals) / MB:.2f} MB (spread "
          f"{(max(totals) - min(totals)) / MB:.2f} MB); outside the Prefect database "
          f"{min(outside) / MB:.2f}-{max(outside) / MB:.2f} MB (spread "
          f"{(max(outside) - min(outside)) / MB:.2f} MB), over "
          f"{sum(n.outcome == 'trained' for n in steady)} trainings")
    per_run_db = (steady[-1].sizes["prefect db"] - steady[0].sizes["prefect db"]) / max(
        1, len(steady) - 1)
    print(f"the Prefect database grows {per_run_db / MB:.3f} MB per run (its db_vacuum service "
          f"bounds it over days, not within a soak)")


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="nightly runs (default 20)")
    parser.add_argument("--quick", action="store_true", help="6 runs with keep_jobs=1")
    parser.add_argument("--dataset", help="the CIFAR-10 archive, or a directory holding "
                                          f"{ARCHIVE}")
    parser.add_argument("--md5", help="the archive's md5 ('skip': no check); default: "
                                      "$CIFAR10_DATASET_MD5, else the official archive's "
                                      "(the mirror's for ../shared/datasets)")
    parser.add_argument("--change-every", type=int, default=3,
                        help="every Nth run changes the seed and trains (default 3)")
    parser.add_argument("--keep-jobs", type=int, default=3, help="retention.keep_jobs")
    parser.add_argument("--epochs", type=float, default=0.25, help="training epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.keep_jobs = 6, 1
    archive = local_archive(args.dataset)
    args.md5 = dataset_md5(str(archive), args.md5)
    with tempfile.TemporaryDirectory(prefix="nightly-soak-") as tmp:
        state = Path(tmp) / ".state"
        isolate(state)
        from prefect.settings import temporary_settings

        print(f"machine: {machine()}\ndataset: {archive}\nstate: {state}\n{args.runs} runs, "
              f"seed changes every {args.change_every}, keep_jobs={args.keep_jobs}, "
              f"{args.epochs} epochs", flush=True)
        nights: list[Night] = []
        with temporary_settings(updates={"flows.heartbeat_frequency": None}):
            for number in range(1, args.runs + 1):
                nights.append(run_night(number, args, archive, state))
                print("  ".join(row(nights[-1], nights[-2] if len(nights) > 1 else None)),
                      flush=True)
        print()
        rows = [row(n, nights[i - 1] if i else None) for i, n in enumerate(nights)]
        print_table(HEADERS, rows)
        print()
        verdicts(nights, args.keep_jobs)
    return rows


if __name__ == "__main__":
    main()
