"""Two hosts on loopback really train data-parallel: gradients are averaged, so both ranks end
with identical weights, unlike anything one rank could reach alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from backends.local.processes import free_port
from tests.support.pipeline import ENTRY_SCRIPT, sagemaker_env

HOSTS = ["algo-1", "algo-2"]
ARGS = ["--epochs", "2", "--batch-size", "16", "--lr", "0.02", "--seed", "3"]


def test_two_process_gloo_training_averages_gradients(tmp_path, cifar_dir):
    port = free_port()
    procs = {}
    for host in HOSTS:
        root = tmp_path / host
        env = sagemaker_env(root, cifar_dir, hosts=HOSTS, host=host)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        procs[host] = subprocess.Popen(
            [sys.executable, str(ENTRY_SCRIPT), *ARGS], env=env, cwd=root,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    outputs = {host: proc.communicate(timeout=300)[0] for host, proc in procs.items()}
    for host, proc in procs.items():
        assert proc.returncode == 0, outputs[host]
        assert "joining gloo process group" in outputs[host]

    metrics = {h: json.loads((tmp_path / h / "output/data/metrics.json").read_text())
               for h in HOSTS}
    assert [metrics[h]["rank"] for h in HOSTS] == [0, 1]
    assert metrics["algo-1"]["hosts"] == 2
    # Identical weights on both ranks: every step applied the same (averaged) gradient.
    assert metrics["algo-1"]["weights_sha256"] == metrics["algo-2"]["weights_sha256"]
    # DistributedSampler gave each rank half of the 500 training images per epoch.
    assert metrics["algo-1"]["samples_per_epoch"] == metrics["algo-2"]["samples_per_epoch"] == 250
    # Only the master saves the model, as on SageMaker.
    assert (tmp_path / "algo-1" / "model" / "model.pth").is_file()
    assert not (tmp_path / "algo-2" / "model" / "model.pth").exists()

    # One process training alone on one shard of the data ends elsewhere.
    shard = tmp_path / "shard"
    shard.mkdir()
    for name in ("data_batch_1", "test_batch"):
        shutil.copy(cifar_dir / name, shard / name)
    alone = tmp_path / "alone"
    result = subprocess.run([sys.executable, str(ENTRY_SCRIPT), *ARGS],
                            env=sagemaker_env(alone, shard), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    single = json.loads((alone / "output/data/metrics.json").read_text())
    assert single["weights_sha256"] != metrics["algo-1"]["weights_sha256"]
