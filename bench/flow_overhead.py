"""What Prefect costs: the flow's wall time against the same stage functions called in a plain
script, with the same inputs, in the same run.

Each pass gets a fresh state directory (so each downloads, uploads, trains, deploys, invokes
and deletes from scratch) and a generated dataset served from a file:// URL. Order: plain,
the Prefect API made ready as `cifar10-pipeline run` does it (Prefect's temporary server
started, its database created first when new; none of this with a PREFECT_API_URL), flow (the
first flow call in a process), flow again, plain again.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import machine, print_table
from generated_data import make_cifar_tarball

from backends.base import EndpointSpec, TrainingSpec, managed_tags
from flows.config import PipelineConfig, data_root, get_backend
from flows.pipeline import cifar10_pipeline
from flows.prefect_api import connect
from tasks.data import download_data, preview_data
from tasks.endpoint import delete_endpoint, deploy, smoke_predict
from tasks.training import fit, upload_data


def plain_pipeline(config: PipelineConfig, name: str) -> None:
    """The flow's stages as plain function calls (``task.fn``): no Prefect engine, no API."""
    backend = get_backend(config)
    tags = managed_tags(owner="bench")
    dataset = download_data.fn(config.data.url, config.data.md5, data_root())
    preview_data.fn(dataset, config.data.preview_images)
    data_uri = upload_data.fn(backend, dataset)
    training = fit.fn(backend, TrainingSpec(
        job_name=name, data_uri=data_uri, hyperparameters=config.training.hyperparameters(),
        instance_type="local", max_runtime_seconds=3600, tags=tags))
    try:
        deploy.fn(backend, EndpointSpec(name=name, model_uri=training.model_uri, tags=tags))
        smoke_predict.fn(backend, name, dataset, config.smoke_test.images,
                         config.smoke_test.accuracy_floor)
    finally:
        delete_endpoint.fn(backend, name)


def timed_pass(label: str, work: Path, run: Callable[[], object]) -> float:
    os.environ["CIFAR10_PIPELINE_HOME"] = str(work / label)
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Runs the benchmark; returns its headline rows for bench/run_all.py."""
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archive = work / "cifar-10-python.tar.gz"
        md5 = make_cifar_tarball(archive)
        config = PipelineConfig.model_validate({
            "data": {"url": archive.as_uri(), "md5": md5},
            "training": {"epochs": 2, "batch_size": 16, "learning_rate": 0.02},
            "smoke_test": {"images": 100, "accuracy_floor": 0.5},
        })
        print(f"machine: {machine()}")
        times = {
            "plain 1": timed_pass("plain1", work, lambda: plain_pipeline(config, "bench-plain1")),
            "Prefect API ready (connect(): the temporary server starts)": timed_pass(
                "connect", work, connect),
            "flow 1 (first in the process)": timed_pass(
                "flow1", work, lambda: cifar10_pipeline(config)),
            "flow 2": timed_pass("flow2", work, lambda: cifar10_pipeline(config)),
            "plain 2": timed_pass("plain2", work, lambda: plain_pipeline(config, "bench-plain2")),
        }
    plain = min(times["plain 1"], times["plain 2"])
    rows = [[label, f"{seconds:.2f}", f"{seconds - plain:+.2f}", f"{seconds / plain:.2f}"]
            for label, seconds in times.items()]
    print()
    print_table(["pass", "wall s", "overhead s", "ratio to plain"], rows)
    warm = times["flow 2"]
    print(f"\nPrefect's overhead per run with the API up: {warm - plain:.2f}s "
          f"({warm / plain:.2f}x the plain stages)")
    cold = times["flow 1 (first in the process)"]
    start = times["Prefect API ready (connect(): the temporary server starts)"]
    return [["flow_overhead", "flow vs plain stage calls (API up)",
             f"{warm - plain:+.1f} s", f"{warm / plain:.2f}x"],
            ["flow_overhead", "flow vs plain, first flow in the process",
             f"{cold - plain:+.1f} s", f"{cold / plain:.2f}x"],
            ["flow_overhead", "starting Prefect's temporary API (once per process)",
             f"{start:.1f} s", "-"]]


if __name__ == "__main__":
    main()
