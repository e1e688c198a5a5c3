"""Runs every benchmark in bench/ one after the other (never side by side: they would share
the CPU) and prints their headline figures in one table. `make bench` runs this."""

from __future__ import annotations

import argparse

import endpoint_load
import flow_overhead
import process_start
import train_vs_seed
from common import machine, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="skip the airbench trainings (auto and fp32 precision: ~13 "
                             "minutes here)")
    args = parser.parse_args()
    rows = []
    for title, run in (
        ("train_vs_seed", lambda: train_vs_seed.main([] if args.quick else ["--strong"])),
        ("endpoint_load", lambda: endpoint_load.main([])),
        ("flow_overhead", lambda: flow_overhead.main([])),
        ("process_start", lambda: process_start.main([])),
    ):
        print(f"\n=== {title} ===", flush=True)
        rows += run()
    print(f"\n=== summary ({machine()}) ===")
    print_table(["benchmark", "measure", "value", "vs baseline"], rows)


if __name__ == "__main__":
    main()
