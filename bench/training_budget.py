"""What the stronger preset's recipes cost in arithmetic, against what this machine computes.

For each recipe of ``--model airbench`` (airbench94 for GPUs, airbench-cpu for CPUs) and for
airbench93's narrower network as a reference point, prints:

- the FLOPs of one training image (forward and backward, counted by torch's FlopCounterMode
  on the real network) and of the whole recipe (epochs x 50,000 images, plus its test-time
  augmentation over 10,000 test images);
- this machine's measured training throughput on that network (a few timed steps, after
  warm-up, at the recipe's batch, in fp32 and, where the CPU has it natively, bf16);
- the wall time those FLOPs take here at that throughput, against the 10-minute CPU target.

Side by side with the same count for airbench94 (0.36 PFLOP for 94% on an A100 in 3.83 s),
this says how far a CPU's budget is from the GPU recipe, by arithmetic rather than by guess.
No dataset is needed: random images of CIFAR's shape.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import REPO, machine, print_table

sys.path.insert(0, str(REPO / "model_src"))

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import networks
import train
from hardware import HALF_DTYPES, choose_precision

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
CPU_BUDGET_SECONDS = 600.0
TTA_VIEWS = {0: 1, 1: 2, 2: 6}


def training_network(widths: list[int]) -> networks.Classifier:
    """The airbench network as training runs it: the whitening stem frozen, channels-last."""
    model = networks.build_model("airbench", [0.5] * 3, [0.25] * 3, {"widths": widths})
    model.body.stem.requires_grad_(False)
    return model.to(memory_format=torch.channels_last)


def network_flops(widths: list[int]) -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of one training image."""
    model = training_network(widths)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model.body(x)
    with FlopCounterMode(display=False) as both:
        F.cross_entropy(model(x), y).backward()
    return forward.get_total_flops() / 8, both.get_total_flops() / 8


def seconds_per_image(widths: list[int], batch: int, precision: str) -> float:
    """This machine's training time per image on the network: timed steps after two
    warm-up steps."""
    torch.manual_seed(0)
    model = training_network(widths)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    dtype = HALF_DTYPES.get(precision)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()

    for _ in range(2):
        step()
    steps = max(3, 4096 // batch)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps / batch


def recipe_rows(precisions: list[str]) -> list[list[str]]:
    cpu_recipe = train.RECIPES["airbench"]["cpu"]
    airbench94 = train.RECIPES["airbench"]["cuda"]
    airbench93 = train.replace(airbench94, name="airbench93 (reference)", epochs=11.0,
                               network={"widths": [64, 128, 128], "tta_level": 2})
    rows = []
    for recipe in (cpu_recipe, airbench93, airbench94):
        widths = recipe.network["widths"]
        forward, both = network_flops(widths)
        views = TTA_VIEWS[recipe.network.get("tta_level", 2)]
        total = both * TRAIN_IMAGES * recipe.epochs + forward * TEST_IMAGES * views
        for precision in precisions:
            rate = both / seconds_per_image(widths, min(recipe.batch_size, 512), precision)
            seconds = total / rate
            rows.append([
                f"{recipe.name}: {'/'.join(map(str, widths))}, {recipe.epochs:g} epochs, "
                f"TTA x{views}", precision, f"{both / 1e6:.0f}", f"{total / 1e15:.3f}",
                f"{rate / 1e9:.1f}", f"{seconds:.0f}",
                f"{seconds / CPU_BUDGET_SECONDS:.2f}x the 10-minute budget"])
    return rows


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Runs the benchmark; returns its headline rows for bench/run_all.py."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    native, why = choose_precision("auto", torch.device("cpu"))
    precisions = ["fp32"] + (["bf16"] if native == "bf16" else [])
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; auto precision: "
          f"{native} ({why})")
    rows = recipe_rows(precisions)
    print_table(["recipe", "precision", "MFLOP per training image", "PFLOP per run",
                 "measured GFLOP/s here", "seconds here at that rate", "against the budget"],
                rows)
    return [["training_budget", f"{row[0]} ({row[1]}): PFLOP / GFLOP/s / seconds here",
             f"{row[3]} / {row[4]} / {row[5]}", row[6]] for row in rows]


if __name__ == "__main__":
    main()
