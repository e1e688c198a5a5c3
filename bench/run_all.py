"""Runs every benchmark in bench/ one after the other (never side by side: they would share
the CPU), prints their headline figures in one table, and with --results writes that table
into a results file between its markers (`make bench` writes bench/RESULTS.md)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import endpoint_load
import flow_overhead
import process_start
import promotion
import train_vs_seed
import training_budget
from common import machine, print_table

HEADERS = ["benchmark", "measure", "value", "vs baseline"]
BEGIN, END = "<!-- bench/run_all.py: generated table -->", "<!-- end of the generated table -->"


def markdown_table(rows: list[list[str]]) -> str:
    lines = [f"| {' | '.join(HEADERS)} |", f"|{'---|' * len(HEADERS)}"]
    lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    return "\n".join(lines)


def write_results(path: Path, rows: list[list[str]]) -> None:
    """Replaces the generated table in ``path`` (between its markers; the whole file when it
    has none), keeping what is written around it."""
    generated = (f"{BEGIN}\nMachine: {machine()}. Run: {time.strftime('%Y-%m-%d')}, every "
                 f"benchmark one after the other.\n\n{markdown_table(rows)}\n{END}")
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        text = before + generated + rest.split(END, 1)[1]
    else:
        text = f"# Benchmark results\n\n{generated}\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="skip the stronger preset's trainings (3 seeds on each precision "
                             "path: up to 10 minutes each on 2 cores)")
    parser.add_argument("--results", type=Path, metavar="MARKDOWN",
                        help="write the table into this file between its markers")
    args = parser.parse_args()
    rows = []
    for title, run in (
        ("train_vs_seed", lambda: train_vs_seed.main([] if args.quick else ["--strong"])),
        ("training_budget", lambda: training_budget.main([])),
        ("endpoint_load", lambda: endpoint_load.main([])),
        ("flow_overhead", lambda: flow_overhead.main([])),
        ("process_start", lambda: process_start.main([])),
        ("promotion", lambda: promotion.main([])),
    ):
        print(f"\n=== {title} ===", flush=True)
        rows += run()
    print(f"\n=== summary ({machine()}) ===")
    print_table(HEADERS, rows)
    if args.results:
        write_results(args.results, rows)
        print(f"\nwritten to {args.results}")


if __name__ == "__main__":
    main()
