"""Two hosts on loopback really train data-parallel: gradients are averaged, so both ranks end
with identical weights, unlike anything one rank could reach alone; and, the batch being global
(each host takes its share), with the weights one host training alone reaches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from backends.local.processes import free_port
from tests.support.pipeline import ENTRY_SCRIPT, sagemaker_env

HOSTS = ["algo-1", "algo-2"]
# fp32: the comparison with one host is then exact up to the order of floating-point sums.
ARGS = ["--epochs", "2", "--batch-size", "16", "--lr", "0.02", "--seed", "3",
        "--precision", "fp32"]


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, cifar_dir):
    """A two-host job; (its directory, each host's output)."""
    tmp_path = tmp_path_factory.mktemp("two-hosts")
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
    return tmp_path, procs, outputs


def test_two_process_gloo_training_averages_gradients(two_hosts, tmp_path, cifar_dir):
    job, procs, outputs = two_hosts
    for host, proc in procs.items():
        assert proc.returncode == 0, outputs[host]
        assert "joining gloo process group" in outputs[host]

    metrics = {h: json.loads((job / h / "output/data/metrics.json").read_text())
               for h in HOSTS}
    assert [metrics[h]["rank"] for h in HOSTS] == [0, 1]
    assert metrics["algo-1"]["hosts"] == 2
    # Identical weights on both ranks: every step applied the same (averaged) gradient.
    assert metrics["algo-1"]["weights_sha256"] == metrics["algo-2"]["weights_sha256"]
    # DistributedSampler gave each rank half of the 500 training images per epoch.
    assert metrics["algo-1"]["samples_per_epoch"] == metrics["algo-2"]["samples_per_epoch"] == 250
    # Only the master saves the model, as on SageMaker.
    assert (job / "algo-1" / "model" / "model.pth").is_file()
    assert not (job / "algo-2" / "model" / "model.pth").exists()

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


def test_one_host_and_two_hosts_follow_the_same_trajectory(two_hosts, tmp_path, cifar_dir):
    """--batch-size is the global batch: two hosts taking 8 images a step each make the same
    16-image steps as one host, so the same seed ends with the same weights."""
    import torch

    job, _, outputs = two_hosts
    assert "hosts=2; global_batch=16; host_batch=8;" in outputs["algo-1"]
    alone = tmp_path / "one-host"
    result = subprocess.run([sys.executable, str(ENTRY_SCRIPT), *ARGS],
                            env=sagemaker_env(alone, cifar_dir), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "hosts=1; global_batch=16; host_batch=16;" in result.stdout
    one = torch.load(alone / "model" / "model.pth", weights_only=True)
    two = torch.load(job / "algo-1" / "model" / "model.pth", weights_only=True)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    metrics = [json.loads((d / "output/data/metrics.json").read_text())
               for d in (alone, job / "algo-1")]
    assert [m["batch_size"] for m in metrics] == [16, 16]
    assert metrics[1]["host_batch_size"] == 8
    assert [h["steps"] for h in metrics[0]["history"]] == \
        [h["steps"] for h in metrics[1]["history"]]
