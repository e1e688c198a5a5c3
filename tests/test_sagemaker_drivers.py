"""The SageMaker SDK v3 container drivers, run for real against our entry script.

ModelTrainer does not start ``train.py`` itself. It uploads an ``sm_drivers`` channel (the
``sm_train.sh`` it generates, its ``scripts/environment.py`` and ``distributed_drivers/``,
``sourcecode.json``, ``distributed.json``) and points the container's entrypoint at
``sm_train.sh``, which turns the platform's ``/opt/ml/input/config/*.json`` into ``SM_*``
variables and runs a driver that starts the entry script with the hyperparameters as
``--key value``. ``test_aws_backend`` checks the request; this module checks that what the
request makes a container run trains a hostable model with our script, so that a mismatch
between what the drivers provide and what ``train.py`` reads shows here, not on a paid job.

How: the backend's own ``build_request`` runs against moto, which receives ModelTrainer's
uploads. The test then plays SageMaker's part for each host, and nothing more: it downloads
every channel the request names into ``input/data/<channel>``, writes
``input/config/{resourceconfig,inputdataconfig,hyperparameters}.json`` as the platform does,
and runs the request's ContainerEntrypoint and ContainerArguments with the job's environment.
The drivers hard-code ``/opt/ml``, so each host runs in its own mount namespace with its own
directory bound over ``/opt/ml`` (nothing is written to the real one) and in its own UTS
namespace named ``algo-N``, as SageMaker names hosts. A job's hosts share a private network
namespace in which ``algo-N`` resolve to loopback (an ``/etc/hosts`` bound in each host's mount
namespace), so the ports they use cannot collide with anything else on the machine.

Namespaces need Linux and root (as in CI): elsewhere the tests skip, saying why.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends.aws import AwsBackend
from backends.aws.s3 import parse_s3_uri
from backends.base import TrainingSpec
from bench.generated_data import class_templates, make_images
from tests.support.aws_fakes import ACCOUNT, BUCKET, REGION, ROLE_ARN, MotoAccount
from tests.support.payloads import npy
from tests.support.pipeline import FAST_HYPERPARAMETERS, import_handlers

pytest_plugins = ["tests.support.aws_fixtures"]
pytestmark = [pytest.mark.long_running,
              pytest.mark.usefixtures("no_network")]  # moto on loopback, never AWS

INSTANCE_TYPE = "ml.m5.xlarge"  # a CPU instance: the hosts train on CPU, with gloo
OPT_ML = Path("/opt/ml")
DRIVERS = "/opt/ml/input/data/sm_drivers"
JOB_TIMEOUT = 240  # seconds for a whole job; a healthy one takes a few

# Holds a fresh network namespace for a job's hosts. Its loopback starts down: bring it up
# (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP) without relying on iproute2 being installed.
# It lives until its stdin closes: when the test is done with it, or dies.
NETWORK_HOLDER = """
import fcntl, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))
print("ready", flush=True)
sys.stdin.read()
"""

# Run inside a host's new mount and UTS namespaces: its /opt/ml and /etc/hosts, its name, then
# the container's entrypoint. unshare makes the new namespace's mounts private, so neither
# bind shows outside it, and both vanish with its last process.
HOST_SETUP = ('mount --bind "$1" /opt/ml && mount --bind "$2" /etc/hosts && hostname "$3" '
              '&& shift 3 && exec "$@"')


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why this machine cannot give a host its own /opt/ml, or None when it can."""
    if not sys.platform.startswith("linux"):
        return (f"the drivers hard-code /opt/ml; binding over it needs Linux "
                f"(this is {sys.platform})")
    if os.geteuid() != 0:
        return "the drivers hard-code /opt/ml; binding over it (unshare -m, mount) needs root"
    missing = [tool for tool in ("unshare", "nsenter", "mount", "hostname")
               if shutil.which(tool) is None]
    if missing:
        return f"the drivers hard-code /opt/ml; binding over it needs {', '.join(missing)}"
    probe = subprocess.run(["unshare", "--mount", "--uts", "--net", "--", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode:
        return f"unshare --mount --uts --net fails here: {probe.stderr.strip()}"
    return None


@pytest.fixture
def namespaces() -> None:
    if reason := namespaces_unavailable():
        pytest.skip(reason)


# -- what SageMaker would be given, and what it gives a host -----------------------------------


def build_request(aws: MotoAccount, cifar_dir: Path, instance_count: int) -> dict[str, Any]:
    """The CreateTrainingJob request the AWS backend sends for a fast job on the generated
    data; ModelTrainer has uploaded the code and its drivers to moto's S3 meanwhile."""
    backend = AwsBackend(role_arn=ROLE_ARN, bucket=BUCKET)
    spec = TrainingSpec(job_name=f"cifar10-drivers-{instance_count}-hosts",
                        data_uri=backend.storage.upload(cifar_dir),
                        hyperparameters=dict(FAST_HYPERPARAMETERS),
                        instance_type=INSTANCE_TYPE, instance_count=instance_count,
                        max_runtime_seconds=1800)
    return backend.jobs.build_request(spec)


def download_channels(aws: MotoAccount, request: dict[str, Any], data_dir: Path) -> None:
    """File mode: every object under a channel's S3 prefix, at its path relative to the prefix
    in ``data_dir/<channel>``, as SageMaker copies it before the container starts."""
    for channel in request["InputDataConfig"]:
        source = channel["DataSource"]["S3DataSource"]
        assert source["S3DataType"] == "S3Prefix"
        bucket, prefix = parse_s3_uri(source["S3Uri"])
        target = data_dir / channel["ChannelName"]
        target.mkdir(parents=True)
        for page in aws.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix):
            for obj in page.get("Contents", []):
                path = target / obj["Key"][len(prefix):].lstrip("/")
                path.parent.mkdir(parents=True, exist_ok=True)
                aws.s3.download_file(bucket, obj["Key"], str(path))


def platform_config(request: dict[str, Any], host: str, hosts: list[str]) -> dict[str, Any]:
    """The files SageMaker writes to /opt/ml/input/config/ of ``host``."""
    instance_type = request["ResourceConfig"]["InstanceType"]
    default_mode = request["AlgorithmSpecification"]["TrainingInputMode"]
    return {
        "resourceconfig.json": {
            "current_host": host, "current_instance_type": instance_type,
            "current_group_name": "homogeneousCluster", "hosts": hosts,
            "instance_groups": [{"instance_group_name": "homogeneousCluster",
                                 "instance_type": instance_type, "hosts": hosts}],
            "network_interface_name": "eth0",
        },
        "inputdataconfig.json": {
            c["ChannelName"]: {
                "TrainingInputMode": c.get("InputMode", default_mode),
                "S3DistributionType": c["DataSource"]["S3DataSource"]["S3DataDistributionType"],
                "RecordWrapperType": c.get("RecordWrapperType", "None"),
            } for c in request["InputDataConfig"]},
        # As sent: string values (ModelTrainer JSON-encodes each).
        "hyperparameters.json": request["HyperParameters"],
    }


def container_env(request: dict[str, Any]) -> dict[str, str]:
    """A training container's environment: the image's (here, this test's minus anything a
    container would not see), the request's Environment, and what the platform adds."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SM_", "MASTER_", "AWS_", "SAGEMAKER_", "PYTHONPATH"))}
    # The image's Python first on PATH: sm_train.sh runs `command -v python3` (and pip3).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # An ml.m5 host has no GPU, even where this test runs on a machine with one (two "hosts"
    # sharing one GPU over NCCL would not work either).
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(request.get("Environment") or {})
    name = request["TrainingJobName"]
    env["TRAINING_JOB_NAME"] = name
    env["TRAINING_JOB_ARN"] = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{name}"
    return env


# -- running a job's hosts ---------------------------------------------------------------------


@dataclass
class Host:
    name: str
    opt_ml: Path  # what the host saw as /opt/ml
    log: Path  # the container's stdout and stderr
    returncode: int | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@contextmanager
def network_namespace() -> Iterator[int]:
    """A private network namespace with loopback up; yields the pid that holds it."""
    holder = subprocess.Popen(["unshare", "--net", "--", sys.executable, "-c", NETWORK_HOLDER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout is not None
        ready = holder.stdout.readline().strip() == "ready"
        assert ready, f"no network namespace: its holder exited {holder.wait()} (stderr above)"
        yield holder.pid
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        holder.stdout.close()


def run_job(aws: MotoAccount, request: dict[str, Any], root: Path) -> list[Host]:
    """Plays SageMaker for ``request`` with one namespaced container per host; returns the
    hosts once all have exited."""
    count = request["ResourceConfig"]["InstanceCount"]
    names = [f"algo-{i}" for i in range(1, count + 1)]
    staged = root / "channels"
    download_channels(aws, request, staged)
    hosts_file = root / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n"
                          + "".join(f"127.0.0.1 {name}\n" for name in names))
    hosts = []
    for name in names:
        opt_ml = root / name / "opt_ml"
        shutil.copytree(staged, opt_ml / "input" / "data")
        config_dir = opt_ml / "input" / "config"
        config_dir.mkdir()
        for file, content in platform_config(request, name, names).items():
            (config_dir / file).write_text(json.dumps(content))
        for sub in ("model", "output/data"):  # the platform creates these before starting
            (opt_ml / sub).mkdir(parents=True)
        hosts.append(Host(name, opt_ml, root / name / "container.log"))

    spec = request["AlgorithmSpecification"]
    container = [*spec["ContainerEntrypoint"], *spec.get("ContainerArguments", [])]
    env = container_env(request)
    # A bind needs a mount point. Created empty when missing, and never removed: another
    # test's host may have its /opt/ml bound on it at this very moment.
    OPT_ML.mkdir(parents=True, exist_ok=True)
    running: list[tuple[Host, subprocess.Popen]] = []
    with network_namespace() as holder:
        try:
            for host in hosts:
                with open(host.log, "wb") as log:
                    running.append((host, subprocess.Popen(
                        ["nsenter", f"--net=/proc/{holder}/ns/net", "--",
                         "unshare", "--mount", "--uts", "--",
                         "bash", "-c", HOST_SETUP, "sagemaker-host",
                         str(host.opt_ml), str(hosts_file), host.name, *container],
                        env=env, cwd=host.opt_ml.parent, stdin=subprocess.DEVNULL,
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)))
            deadline = time.monotonic() + JOB_TIMEOUT
            for host, process in running:
                try:
                    host.returncode = process.wait(timeout=max(1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{host.name} still running after {JOB_TIMEOUT}s:\n"
                                f"{host.tail()}")
        finally:
            # Each host is a session of its own: its whole tree (sm_train.sh, the driver, the
            # entry script) goes, whatever failed.
            for _, process in running:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    return hosts


# -- checks --------------------------------------------------------------------------------------


def check_request_runs_the_basic_driver(request: dict[str, Any], staged: Path) -> None:
    """What ModelTrainer configured: sm_train.sh via bash, the entry script through the basic
    script driver. The SDK picks a distributed driver (torchrun, mpi) only when ModelTrainer
    is given a ``distributed`` config, never from instance_count; the backend gives none."""
    from sagemaker.train import model_trainer

    spec = request["AlgorithmSpecification"]
    assert spec["ContainerEntrypoint"] == ["/bin/bash"]
    assert spec["ContainerArguments"] == [
        "-c", f"chmod +x {DRIVERS}/sm_train.sh && {DRIVERS}/sm_train.sh"]
    drivers = staged / "sm_drivers"
    # What ran is the installed sagemaker-train's own drivers, as ModelTrainer uploads them.
    installed = Path(model_trainer.SM_DRIVERS_LOCAL_PATH)
    for script in ("scripts/environment.py", "distributed_drivers/basic_script_driver.py",
                   "common/utils.py"):
        assert (drivers / script).read_bytes() == (installed / script).read_bytes(), script
    sm_train = (drivers / "sm_train.sh").read_text()
    assert f"{DRIVERS}/distributed_drivers/basic_script_driver.py" in sm_train
    assert "torchrun" not in sm_train
    assert json.loads((drivers / "distributed.json").read_text()) == {}
    assert json.loads((drivers / "sourcecode.json").read_text())["entry_script"] == "train.py"
    assert {p.name for p in (staged / "code").iterdir()} >= {"train.py", "inference.py"}


def check_host_completed(host: Host) -> dict[str, Any]:
    """The host's container exited 0 through the whole sm_train.sh; returns its metrics."""
    assert host.returncode == 0, f"{host.name} exited {host.returncode}:\n{host.tail()}"
    output = host.output()
    assert "Running Basic Script driver" in output
    # The basic driver turned the JSON-encoded hyperparameters back into our arguments.
    assert "train.py --epochs 2 --batch-size 16 --lr 0.02" in output
    assert "Training Container Execution Completed" in output
    assert not (host.opt_ml / "output" / "failure").exists()
    metrics = json.loads((host.opt_ml / "output" / "data" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5, metrics  # generated classes are easy; chance: 0.1
    return metrics


def check_hostable(model_dir: Path) -> None:
    """model.tar.gz's content serves: the handlers in code/inference.py, imported as the
    serving toolkit imports them, load the model and answer logits for a few images."""
    assert (model_dir / "model.pth").is_file()
    assert (model_dir / "model_meta.json").is_file()
    assert (model_dir / "code" / "inference.py").is_file()
    handlers = import_handlers(model_dir / "code")
    model = handlers.model_fn(str(model_dir))
    images, _ = make_images(5, np.random.default_rng(7), class_templates())
    pixels = images.reshape(-1, 3, 32, 32).astype(np.float32) / 255
    batch = handlers.input_fn(npy(pixels), "application/x-npy")
    body, content_type = handlers.output_fn(handlers.predict_fn(batch, model), "application/json")
    assert content_type == "application/json"
    assert np.array(json.loads(body)).shape == (5, 10)


@pytest.fixture
def real_opt_ml_untouched() -> Iterator[None]:
    """Whatever the hosts wrote went to their own directories, not to the real /opt/ml."""
    before = sorted(os.listdir(OPT_ML)) if OPT_ML.is_dir() else []
    yield
    after = sorted(os.listdir(OPT_ML)) if OPT_ML.is_dir() else []
    assert after == before


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("namespaces", "real_opt_ml_untouched")
def test_one_host_job_runs_the_entry_script_through_the_drivers(aws, cifar_dir, tmp_path):
    request = build_request(aws, cifar_dir, instance_count=1)
    [host] = run_job(aws, request, tmp_path)
    check_request_runs_the_basic_driver(request, tmp_path / "channels")
    metrics = check_host_completed(host)
    assert metrics["hosts"] == 1 and metrics["rank"] == 0
    check_hostable(host.opt_ml / "model")


@pytest.mark.usefixtures("namespaces", "real_opt_ml_untouched")
def test_two_host_job_trains_data_parallel_through_the_drivers(aws, cifar_dir, tmp_path):
    """instance_count=2 still runs the basic driver on each host (see
    check_request_runs_the_basic_driver); the entry script joins the hosts itself from
    SM_HOSTS and SM_CURRENT_HOST, which environment.py sets from resourceconfig.json."""
    request = build_request(aws, cifar_dir, instance_count=2)
    hosts = run_job(aws, request, tmp_path)
    check_request_runs_the_basic_driver(request, tmp_path / "channels")
    metrics = [check_host_completed(host) for host in hosts]
    assert [(m["hosts"], m["rank"]) for m in metrics] == [(2, 0), (2, 1)]
    # Data-parallel steps keep the ranks' weights equal.
    assert metrics[0]["weights_sha256"] == metrics[1]["weights_sha256"]
    assert "joining gloo process group as rank 1/2 via algo-1:" in hosts[1].output()
    # Only rank 0 (algo-1) saves the model.
    assert not any((hosts[1].opt_ml / "model").iterdir())
    check_hostable(hosts[0].opt_ml / "model")
