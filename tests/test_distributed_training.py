"""Two hosts on loopback really train data-parallel: gradients are averaged, so both ranks end
with identical weights, unlike anything one rank could reach alone; and, the batch being global
(each host takes its share), they take one host's steps: the same step up to float32 rounding,
the same loss and accuracy curve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backends.local.processes import free_port
from tests.support.pipeline import ENTRY_SCRIPT, sagemaker_env

pytestmark = pytest.mark.long_running

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


# -- one host and two hosts: the same steps, hence the same trajectory -------------------------
#
# Data-parallel training promises the same *steps* as one host, not the same bits: two hosts
# sum a step's gradient in another order (two half-batches, then gloo's all-reduce) than one
# host does, and each CPU's kernels (AVX2, AVX-512, AMX, Arm) order their sums differently
# again. Those rounding differences compound over many steps (after 2 epochs, one-host and
# two-host weights agree to 4e-6 on AMD Zen and differ by 2.4e-4 on an Intel Xeon with
# AVX-512 kernels), so the guarantees checked are: one step agrees within float32 rounding
# scaled to the step, and over 2 epochs the losses and accuracies agree.

EPS32 = 2.0**-23  # float32's machine epsilon
ONE_STEP = ["--epochs", str(1 / 32)]  # 500 images, 16 a step: 32 steps a pass; 1/32 is one
# A learning rate of 1e-30 moves no weight (each update is ~1e-30 of a weight, far below
# float32's resolution): that run saves the initial weights, and a step is measured from them.
NO_STEP = [*ONE_STEP, "--lr", "1e-30"]
# One step's weights: the final add rounds in each run (a few ulps of the weight), and the
# gradient's sums in another order differ by a relative ~sqrt(n) * eps (~1e-5 here, at most
# ~n * eps): 1e-3 of the step bounds that on any CPU, while a wrong step (gradients not
# averaged, another host's data) is off by a large fraction of the step itself.
ROUNDING_ULPS = 4
STEP_RTOL = 1e-3
# Two epochs' trajectories (measured: one host vs two agree to 2e-7 relative in loss, to the
# image in accuracy; two hosts that do not average their gradients differ by 0.6-4% in loss
# and by 6% in first-epoch accuracy). Accuracy is a count: an image whose top two logits are
# nearly tied may flip, so a few images (1%) of slack.
LOSS_RTOL = 2e-3
ACCURACY_ATOL = 0.01


def start_hosts(root: Path, data_dir: Path, args: list[str],
                hosts: list[str]) -> dict[str, subprocess.Popen]:
    """Starts the entry script once per host of one job (loopback rendezvous, as the
    ``two_hosts`` fixture), each host in ``root/<host>``."""
    port = free_port()
    procs = {}
    for host in hosts:
        env = sagemaker_env(root / host, data_dir, hosts=hosts, host=host)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        procs[host] = subprocess.Popen(
            [sys.executable, str(ENTRY_SCRIPT), *args], env=env, cwd=root / host,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return procs


def finish(procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    """Each host's output, once all have exited successfully."""
    outputs = {host: proc.communicate(timeout=300)[0] for host, proc in procs.items()}
    for host, proc in procs.items():
        assert proc.returncode == 0, outputs[host]
    return outputs


def saved_weights(host_root: Path) -> dict:
    import torch

    return torch.load(host_root / "model" / "model.pth", weights_only=True)


def saved_metrics(host_root: Path) -> dict:
    return json.loads((host_root / "output/data/metrics.json").read_text())


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, cifar_dir) -> dict[str, dict]:
    """Weights before any step ("initial"), after one step on one host ("one") and after one
    step on two hosts ("two"); the three jobs run at once."""
    root = tmp_path_factory.mktemp("one-step")
    jobs = {"initial": start_hosts(root / "initial", cifar_dir, [*ARGS, *NO_STEP], HOSTS[:1]),
            "one": start_hosts(root / "one", cifar_dir, [*ARGS, *ONE_STEP], HOSTS[:1]),
            "two": start_hosts(root / "two", cifar_dir, [*ARGS, *ONE_STEP], HOSTS)}
    for job in jobs.values():
        finish(job)
    for name in jobs:
        assert [h["steps"] for h in saved_metrics(root / name / "algo-1")["history"]] == [1]
    return {name: saved_weights(root / name / "algo-1") for name in jobs}


def test_one_step_on_two_hosts_is_the_one_host_step(one_step):
    """--batch-size is the global batch: two hosts taking 8 images each and averaging their
    gradients make the one host's 16-image step, up to float32 rounding scaled to the step."""
    initial, one, two = one_step["initial"], one_step["one"], one_step["two"]
    assert initial.keys() == one.keys() == two.keys()
    for name, weights in one.items():
        scale = weights.abs().max().item()
        step = (weights - initial[name]).abs().max().item()
        rounding = ROUNDING_ULPS * EPS32 * scale
        if name.endswith((".weight", ".bias")):  # (buffers, such as the input's mean, stay)
            assert step > 100 * rounding, f"{name}: the step ({step:.2e}) is lost in rounding"
        difference = (two[name] - weights).abs().max().item()
        allowed = rounding + STEP_RTOL * step
        assert difference <= allowed, (
            f"{name}: two hosts' step differs from one host's by {difference:.2e} "
            f"(step {step:.2e}, allowed {allowed:.2e})")


def epoch_curve(per_host: list[dict]) -> list[tuple[float, float]]:
    """Each epoch's (training loss, training accuracy) over all hosts: each host reports its
    own shard's, so the job's is their mean weighted by images."""
    curve = []
    for records in zip(*(m["history"] for m in per_host), strict=True):
        images = sum(r["images"] for r in records)
        curve.append((sum(r["train_loss"] * r["images"] for r in records) / images,
                      sum(r["train_accuracy"] * r["images"] for r in records) / images))
    return curve


def test_one_host_and_two_hosts_follow_the_same_trajectory(two_hosts, tmp_path, cifar_dir):
    """Two epochs later, the two-host job's losses and accuracies (each epoch's, and the test
    set's at the end) are the one host's, within what the order of sums can move them."""
    job, _, outputs = two_hosts
    assert "hosts=2; global_batch=16; host_batch=8;" in outputs["algo-1"]
    alone = finish(start_hosts(tmp_path, cifar_dir, ARGS, HOSTS[:1]))
    assert "hosts=1; global_batch=16; host_batch=16;" in alone["algo-1"]
    one = saved_metrics(tmp_path / "algo-1")
    two = [saved_metrics(job / host) for host in HOSTS]
    assert one["batch_size"] == two[0]["batch_size"] == 16
    assert two[0]["host_batch_size"] == 8
    assert [h["steps"] for h in one["history"]] == [h["steps"] for h in two[0]["history"]]

    one_curve = [*epoch_curve([one]), (one["test_loss"], one["test_accuracy"])]
    two_curve = [*epoch_curve(two), (two[0]["test_loss"], two[0]["test_accuracy"])]
    points = [f"epoch {h['epoch']}" for h in one["history"]] + ["test set"]
    for point, (loss, accuracy), (loss2, accuracy2) in zip(points, one_curve, two_curve,
                                                           strict=True):
        shown = f"{point}: one host {loss:.6f}, {accuracy:.3f}; two {loss2:.6f}, {accuracy2:.3f}"
        assert loss2 == pytest.approx(loss, rel=LOSS_RTOL), shown
        assert accuracy2 == pytest.approx(accuracy, abs=ACCURACY_ATOL), shown


def test_a_local_two_host_job_listens_on_loopback_only(local_backend, cifar_dir):
    """The local backend's hosts rendezvous through a file in the job directory: no TCP store
    (torch's binds every interface, [::]) and no port to race other jobs for. What the hosts
    still listen on, gloo's connections between the ranks, binds loopback
    (GLOO_SOCKET_IFNAME=lo). Sampled from /proc while the job runs."""
    import contextlib
    import threading
    import time

    from backends.base import TrainingSpec
    from tests.support.pipeline import FAST_HYPERPARAMETERS, processes_under

    spec = TrainingSpec(job_name="listening-two-hosts", data_uri=local_backend.storage.upload(
        cifar_dir), hyperparameters=FAST_HYPERPARAMETERS, instance_count=2)
    job_dir = local_backend.jobs.job_dir(spec.job_name)
    lines: list[str] = []
    job = threading.Thread(target=local_backend.jobs.run, args=(spec, lines.append))
    job.start()
    listening: dict[int, set[str]] = {}
    while job.is_alive():
        for found in processes_under(job_dir):
            with contextlib.suppress(OSError):  # it ended meanwhile
                listening.setdefault(found.pid, set()).update(listening_sockets(found.pid))
        time.sleep(0.05)
    job.join()
    assert local_backend.jobs.describe(spec.job_name).status == "Completed", lines[-20:]
    rendezvous = f"file://{job_dir}/rendezvous"
    assert sum(f"joining gloo process group as rank {r}/2 via {rendezvous}" in line
               for line in lines for r in (0, 1)) == 2, lines[:20]
    assert len(listening) >= 2, listening  # both hosts were sampled
    everything = set().union(*listening.values())
    assert everything, "gloo's listeners were never seen: the sampling missed the job"
    assert all(address.startswith(("127.", "[::1]")) for address in everything), listening


def listening_sockets(pid: int) -> set[str]:
    """'address:port' of every TCP socket ``pid`` listens on (from /proc: its descriptors'
    socket inodes, matched in its network namespace's tables)."""
    import contextlib
    import ipaddress
    import os

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            local, state, inode = row.split()[1], row.split()[3], row.split()[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(packed)
            address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:a.b.c.d
            text = str(address) if address.version == 4 else f"[{address}]"
            found.add(f"{text}:{int(hex_port, 16)}")
    return found
