"""Shared by the benchmarks: where the real CIFAR-10 mirror is, and a verified extracted copy
of it (through the pipeline's own download code, so it is fetched once and checked)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as plain scripts: `python bench/xyz.py`

from tasks.lib.download import DEFAULT_MD5, DEFAULT_URL, display_url, fetch_cifar10  # noqa: E402

# The benchmarks' dataset: the build machines' offline mirror when it is there, else the
# official archive (CIFAR10_BENCH_URL and CIFAR10_BENCH_MD5 name another).
MIRROR = REPO.parent / "shared" / "datasets" / "cifar-10-python.tar.gz"
MIRROR_MD5 = "ad77b861b142a1efde002a4f589043ae"
STATE = Path(os.environ.get("CIFAR10_PIPELINE_HOME") or REPO / ".state")


def real_cifar10() -> Path:
    """The batch directory of the real CIFAR-10, fetched and verified once (through the
    pipeline's own download code) under the state directory."""
    if os.environ.get("CIFAR10_BENCH_URL"):
        url, md5 = os.environ["CIFAR10_BENCH_URL"], os.environ.get("CIFAR10_BENCH_MD5")
    elif MIRROR.is_file():
        url, md5 = MIRROR.as_uri(), MIRROR_MD5
    else:
        url, md5 = DEFAULT_URL, DEFAULT_MD5
    print(f"dataset: {display_url(url)}", flush=True)
    dataset = fetch_cifar10(STATE / "bench-data", url=url, md5=md5)
    return Path(dataset.path)


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
