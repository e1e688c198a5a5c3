"""Shared by the benchmarks: where the real CIFAR-10 archive is, a verified extracted copy of it
(through the pipeline's own download code, so it is fetched once and checked), and the table.

The real dataset, for the benchmarks that train on it (train_vs_seed, nightly_soak):

1. ``--dataset PATH_OR_URL`` where the benchmark takes one;
2. else ``$CIFAR10_DATASET`` (a path or a URL; the older ``$CIFAR10_SOAK_DATASET`` and
   ``$CIFAR10_BENCH_URL`` are read too);
3. else ``cifar-10-python.tar.gz`` in ``../shared/datasets/`` beside the checkout, when it is
   there (the build machines' offline mirror);
4. else the official archive (train_vs_seed only: the soak does not download).

A path may name the archive or a directory holding ``cifar-10-python.tar.gz``. Its md5:
``--md5`` or ``$CIFAR10_DATASET_MD5`` (``skip``: no check), else the mirror's for the fallback
mirror and the official one for everything else.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as plain scripts: `python bench/xyz.py`

from tasks.lib.download import DEFAULT_MD5, DEFAULT_URL, display_url, fetch_cifar10  # noqa: E402

ARCHIVE = "cifar-10-python.tar.gz"
DATASET_ENVS = ("CIFAR10_DATASET", "CIFAR10_SOAK_DATASET", "CIFAR10_BENCH_URL")
MD5_ENVS = ("CIFAR10_DATASET_MD5", "CIFAR10_SOAK_MD5", "CIFAR10_BENCH_MD5")
# The documented fallback: the build machines keep an offline mirror beside the checkout.
# Its test split is mostly JPEG-decoded, so its archive (and md5) differ from the official one.
FALLBACK_MIRROR = REPO.parent / "shared" / "datasets" / ARCHIVE
FALLBACK_MIRROR_MD5 = "ad77b861b142a1efde002a4f589043ae"
STATE = Path(os.environ.get("CIFAR10_PIPELINE_HOME") or REPO / ".state")


def first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def chosen_dataset(argument: str | None = None) -> str | None:
    """The dataset named by the argument or the environment, else the fallback mirror when it
    is there; None when nothing names one."""
    chosen = argument or first_env(DATASET_ENVS)
    if chosen is None:
        return str(FALLBACK_MIRROR) if FALLBACK_MIRROR.is_file() else None
    if "://" in chosen:
        return chosen
    path = Path(chosen).expanduser().resolve()
    return str(path / ARCHIVE if path.is_dir() else path)


def dataset_md5(dataset: str, argument: str | None = None) -> str | None:
    """The archive's expected md5 (None: no check)."""
    md5 = argument or first_env(MD5_ENVS)
    if md5 is None:
        md5 = FALLBACK_MIRROR_MD5 if dataset == str(FALLBACK_MIRROR) else DEFAULT_MD5
    return None if md5.lower() in ("skip", "none") else md5


def local_archive(argument: str | None = None) -> Path:
    """The CIFAR-10 archive on this machine (for benchmarks that never download)."""
    dataset = chosen_dataset(argument)
    path = Path(dataset.removeprefix("file://")) if dataset else FALLBACK_MIRROR
    if not path.is_file():
        raise SystemExit(f"no CIFAR-10 archive at {path}: pass --dataset PATH (the archive, or "
                         f"a directory holding {ARCHIVE}) or set CIFAR10_DATASET")
    return path


def real_cifar10(dataset: str | None = None, md5: str | None = None) -> Path:
    """The batch directory of the real CIFAR-10, fetched and verified once (through the
    pipeline's own download code) under the state directory."""
    chosen = chosen_dataset(dataset) or DEFAULT_URL
    url = chosen if "://" in chosen else Path(chosen).as_uri()
    print(f"dataset: {display_url(url)}", flush=True)
    return Path(fetch_cifar10(STATE / "bench-data", url=url, md5=dataset_md5(chosen, md5)).path)


def machine() -> str:
    """One line about where the figures came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
