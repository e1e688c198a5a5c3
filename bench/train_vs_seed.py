"""Training speed against the seed notebook, on the real CIFAR-10 mirror.

Runs, each as its own process and one after the other (so they never share the CPU):

1. the seed recipe (bench/seed_recipe.py): tutorial network, torchvision CIFAR10 with
   per-sample ToTensor/Normalize, batch 4, 2 workers, 2 epochs, SGD lr 0.001 momentum 0.9;
2. our entry script with its default configuration (the tutorial network from in-memory
   tensors);
3. with --strong, our entry script's stronger preset (airbench).

Prints wall time (process start to test accuracy), test accuracy, and the time ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, print_table, real_cifar10

ENTRY_SCRIPT = REPO / "model_src" / "cifar10.py"


def run_seed(data_root: Path, work: Path) -> dict:
    out = work / "seed.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "bench" / "seed_recipe.py"), str(data_root),
                    str(out)], check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - started
    return result


def run_entry_script(batch_dir: Path, work: Path, name: str, args: list[str]) -> dict:
    model_dir = work / name / "model"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ENTRY_SCRIPT), "--data-dir", str(batch_dir),
                    "--model-dir", str(model_dir), *args], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = json.loads((work / name / "output" / "data" / "metrics.json").read_text())
    return {"test_accuracy": metrics["test_accuracy"], "wall_seconds": wall,
            "epochs": metrics["epochs"], "batch_size": metrics["batch_size"]}


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Runs the benchmark; returns its headline rows for bench/run_all.py."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strong", action="store_true",
                        help="also train the stronger preset (airbench, ~9 minutes here)")
    parser.add_argument("--skip-seed", action="store_true",
                        help="skip the ~5-minute seed recipe (no ratio is printed)")
    args = parser.parse_args(argv)
    batch_dir = real_cifar10()
    print(f"machine: {machine()}")
    print(f"data: {batch_dir}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seed = None
        if not args.skip_seed:
            print("running the seed recipe...", flush=True)
            seed = run_seed(batch_dir.parent, work)
            rows.append(["seed notebook (tutorial net, batch 4, PIL transforms)",
                         f"{seed['wall_seconds']:.1f}", f"{seed['test_accuracy']:.4f}", "1.00"])
        print("running our default configuration...", flush=True)
        ours = run_entry_script(batch_dir, work, "default", [])
        ratio = f"{seed['wall_seconds'] / ours['wall_seconds']:.2f}" if seed else "-"
        rows.append([f"ours, default (tutorial net, batch {ours['batch_size']}, "
                     f"{ours['epochs']} epochs, tensors)", f"{ours['wall_seconds']:.1f}",
                     f"{ours['test_accuracy']:.4f}", ratio])
        if args.strong:
            print("running our stronger preset...", flush=True)
            strong = run_entry_script(batch_dir, work, "strong", ["--model", "airbench"])
            ratio = f"{seed['wall_seconds'] / strong['wall_seconds']:.2f}" if seed else "-"
            rows.append([f"ours, --model airbench ({strong['epochs']} epochs)",
                         f"{strong['wall_seconds']:.1f}", f"{strong['test_accuracy']:.4f}",
                         ratio])
    print()
    print_table(["recipe", "wall s", "test acc", "speed-up vs seed"], rows)
    summary = [["train_vs_seed", f"default: wall s / test acc (seed {seed['wall_seconds']:.0f} s"
                f" / {seed['test_accuracy']:.4f})" if seed else "default: wall s / test acc",
                f"{ours['wall_seconds']:.1f} / {ours['test_accuracy']:.4f}",
                f"{seed['wall_seconds'] / ours['wall_seconds']:.1f}x faster" if seed else "-"]]
    if args.strong:
        summary.append(["train_vs_seed", "airbench: wall s / test acc",
                        f"{strong['wall_seconds']:.1f} / {strong['test_accuracy']:.4f}", "-"])
    if seed:
        verdict = ("meets" if ours["test_accuracy"] >= seed["test_accuracy"]
                   and ours["wall_seconds"] * 15 <= seed["wall_seconds"] else "MISSES")
        print(f"\ndefault configuration {verdict} the target: >= seed accuracy in <= 1/15 "
              f"of its wall time")
    return summary


if __name__ == "__main__":
    main()
