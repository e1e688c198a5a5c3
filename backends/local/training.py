"""Local SageMaker training jobs: the entry script runs unmodified in local processes, one per
"host", inside an ``/opt/ml``-style directory with the SageMaker environment.

Layout of a job (``<jobs>/<job-name>/``)::

    job.json                 status record, readable from any process (DescribeTrainingJob)
    training.log             every host's output, line by line; rotated at a size limit
                             (training.log.1, ...: ``retention.BoundedLog``)
    algo-1/                  one /opt/ml per host
        code/                copy of source_dir; the working directory
        input/config/        hyperparameters.json, resourceconfig.json, inputdataconfig.json
        input/data/training/ the channel's files: hard links to the store's (or copies)
        model/               SM_MODEL_DIR, packaged as model.tar.gz when the job completes
        output/data/         SM_OUTPUT_DATA_DIR (metrics.json)
        output/failure       the reason, when the script fails
    checkpoints/             the hosts' checkpoint directory (CIFAR10_CHECKPOINT_DIR)

When the job ends, whatever the outcome, the channel, ``code/``, ``model/`` (now in the store's
model.tar.gz) and ``checkpoints/`` go (``release_inputs``): a finished job keeps its record, its
log, its hosts' ``input/config`` and ``output/``, a few kilobytes; retention removes old jobs.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import math
import os
import queue
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from backends.base import (
    TRAINING_CHANNEL,
    BackendError,
    LogCallback,
    TrainingJobFailed,
    TrainingResult,
    TrainingSpec,
)
from backends.files import RECORD_ERRORS, atomic_write_text
from backends.job_names import existing_jobs, job_to_run
from backends.local import processes
from backends.local.launcher import Launched, launch
from backends.local.retention import BoundedLog, RetentionPolicy, owned_temp_prefix
from backends.local.store import MANIFEST, LocalStore, path_from_uri
from backends.settings import usable_cpus
from model_src.contract import CHECKPOINT_DIR_ENV, METRICS_FILE, SOURCE_IGNORE

FAILURE_REASON_LIMIT = 1024  # SageMaker truncates FailureReason to 1024 characters
JOB_STATUSES = ("InProgress", "Completed", "Failed", "Stopped")
# What a finished job no longer needs (per host, then per job): the channel, the code copy,
# the model directory (packaged into the store) and the checkpoints (a local job never resumes
# under its name: running a name that exists re-attaches to its outcome).
HOST_INPUTS = ("input/data", "code", "model")
JOB_INPUTS = ("checkpoints",)

log = logging.getLogger(__name__)


@dataclass
class JobRecord:
    """What DescribeTrainingJob would say, persisted as ``job.json``."""

    name: str
    status: str  # InProgress | Completed | Failed | Stopped
    secondary_status: str  # Starting | Training | Uploading | Completed | Failed | Stopped...
    hyperparameters: dict[str, str]
    data_uri: str
    instance_type: str
    instance_count: int
    max_runtime_seconds: int
    tags: dict[str, str]
    created: str
    started: str | None = None
    ended: str | None = None
    billable_seconds: int = 0
    failure_reason: str | None = None
    model_uri: str | None = None
    runner: dict[str, Any] = field(default_factory=dict)  # pid + start time of the runner
    processes: list[dict[str, Any]] = field(default_factory=list)  # pid + start time per host


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _record_from(data: dict[str, Any]) -> JobRecord:
    """A JobRecord from job.json's object; TypeError or ValueError when it is not one (a
    field missing or unknown, a field of the wrong kind)."""
    record = JobRecord(**data)
    if record.status not in JOB_STATUSES or not isinstance(record.runner, dict) \
            or not isinstance(record.processes, list) or not isinstance(record.name, str):
        raise ValueError("a field holds a value of the wrong kind")
    return record


def _gpu_count() -> int:
    """Visible NVIDIA GPUs, without importing torch into the orchestrating process."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


class LocalTrainingJobs:
    def __init__(self, jobs_root: Path, store: LocalStore, source_dir: Path,
                 entry_point: str, python: str = sys.executable,
                 concurrent_jobs: int = 1, retention: RetentionPolicy | None = None) -> None:
        """``concurrent_jobs``: how many jobs this process runs at once (a sweep); each
        job's hosts share 1/``concurrent_jobs`` of the CPUs, so that none oversubscribes.
        ``retention``: its log limits bound each job's training.log."""
        self.concurrent_jobs = max(1, concurrent_jobs)
        self.retention = retention or RetentionPolicy()
        self.jobs_root = Path(jobs_root)
        self.store = store
        self.source_dir = Path(source_dir)
        self.entry_point = entry_point
        self.python = python

    # -- records -----------------------------------------------------------------------------

    def job_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid training job name {name!r}")
        return self.jobs_root / name

    def describe(self, name: str) -> JobRecord | None:
        """The job's record, from any process. An InProgress job whose runner process is gone
        (killed, crashed) is reported as Failed: its hosts died with it.

        An unreadable record (empty after a power loss, truncated, garbled, a field missing)
        is skipped with a warning and counts as no job at all: a cache lookup finds no model
        there, so the next run trains again under its own name."""
        path = self.job_dir(name) / "job.json"
        try:
            record = _record_from(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except RECORD_ERRORS as e:
            log.warning("skipping training job record %s, which cannot be read (%s: %s): the "
                        "job counts as absent, so its model is not reused and a run trains "
                        "again under a new name. Delete %s to clear it (retention removes it "
                        "once it is past the limits).", path, type(e).__name__, e, path.parent)
            return None
        runner = record.runner
        if record.status == "InProgress" and not processes.is_running(
            runner.get("pid"), runner.get("start")
        ):
            record.status = record.secondary_status = "Failed"
            record.failure_reason = "the process running this job died before it finished"
        return record

    def _save(self, record: JobRecord) -> None:
        atomic_write_text(self.job_dir(record.name) / "job.json",
                          json.dumps(asdict(record), indent=2))

    def result(self, record: JobRecord) -> TrainingResult:
        if record.status != "Completed" or record.model_uri is None:
            raise TrainingJobFailed(record.name, record.status,
                                    record.failure_reason or "no model was produced")
        metrics_file = self.job_dir(record.name) / "algo-1" / "output" / "data" / METRICS_FILE
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        return TrainingResult(
            job_name=record.name, status=record.status, model_uri=record.model_uri,
            metrics=metrics, billable_seconds=record.billable_seconds,
            log_location=str(self.job_dir(record.name) / "training.log"),
        )

    def completed(self, name: str) -> TrainingResult | None:
        record = self.describe(name)
        if record is None or record.status != "Completed":
            return None
        return self.result(record)

    def stop(self, name: str) -> bool:
        """Stops the running job of ``name``'s chain (``backends.job_names``): its hosts
        (SIGTERM, then SIGKILL), and records it Stopped, from any process; the runner waiting
        for it then reports it stopped. False when none is running."""
        for job, status in existing_jobs(name, self._status):
            if status == "InProgress":
                return self._stop(job)
        return False

    def _status(self, name: str) -> str | None:
        record = self.describe(name)
        return record.status if record is not None else None

    def _stop(self, name: str) -> bool:
        record = self.describe(name)
        if record is None or record.status != "InProgress":
            return False
        # Recorded first: the runner, seeing its hosts die, reads why before it reports.
        record.status = record.secondary_status = "Stopped"
        record.failure_reason = "stopped on request (StopTrainingJob)"
        record.ended = _now()
        self._save(record)
        for host in record.processes:
            processes.terminate_group(host["pid"], host.get("start"), grace_seconds=5)
        return True

    # -- running -----------------------------------------------------------------------------

    def run(self, spec: TrainingSpec, on_log: LogCallback | None = None) -> TrainingResult:
        """Runs the job to the end, or re-attaches to a completed job of the same name. When
        that job Failed or was Stopped, runs under the next name of its chain, as on
        SageMaker, which never reuses a name (``backends.job_names``)."""
        name, existing = self._job_to_run(spec.job_name)
        if existing is not None:
            return self.result(existing)  # Completed: its result
        if name != spec.job_name:
            if on_log:
                on_log(f"training job {spec.job_name}: earlier attempts failed or were "
                       f"stopped: training again as {name}")
            spec = replace(spec, job_name=name)
        if spec.instance_count < 1:
            raise ValueError("instance_count must be >= 1")
        data_dir = path_from_uri(spec.data_uri)
        if not data_dir.is_dir():
            raise BackendError(f"training channel {spec.data_uri} does not exist")

        job_dir = self.job_dir(spec.job_name)
        job_dir.mkdir(parents=True, exist_ok=False)
        hyperparameters = {k: str(v) for k, v in spec.hyperparameters.items()}
        record = JobRecord(
            name=spec.job_name, status="InProgress", secondary_status="Starting",
            hyperparameters=hyperparameters, data_uri=spec.data_uri,
            instance_type=spec.instance_type, instance_count=spec.instance_count,
            max_runtime_seconds=spec.max_runtime_seconds, tags=dict(spec.tags), created=_now(),
            runner={"pid": os.getpid(), "start": processes.start_time(os.getpid())},
        )
        self._save(record)
        hosts = [f"algo-{i + 1}" for i in range(spec.instance_count)]
        try:
            for host in hosts:
                self._materialise_host(job_dir / host, data_dir, hyperparameters, hosts, host,
                                       spec)
            status, reason = self._train(record, job_dir, hosts, spec,
                                         on_log or (lambda line: None))
            self._finish(record, job_dir, status, reason)
        except BaseException as e:
            if record.status == "InProgress":  # setting up or packaging broke (no space?)
                reason = f"{type(e).__name__} while {record.secondary_status.lower()}: {e}"
                record.status = record.secondary_status = "Failed"
                record.failure_reason = reason[:FAILURE_REASON_LIMIT]
                record.ended = _now()
                self._save(record)
            raise
        finally:
            # Whatever the outcome: the channel's links or copies, the code, the model
            # directory and the checkpoints are no use once the hosts have exited.
            self.release_inputs(spec.job_name)
        return self.result(record)

    def _job_to_run(self, name: str) -> tuple[str, JobRecord | None]:
        """The name of ``name``'s chain to run or re-attach to, with its record (None: run it)."""
        records: dict[str, JobRecord | None] = {}

        def status_of(candidate: str) -> str | None:
            records[candidate] = record = self._recorded(candidate)
            return record.status if record is not None else None

        chosen, _ = job_to_run(name, status_of)
        return chosen, records[chosen]

    def _recorded(self, name: str) -> JobRecord | None:
        """The finished job recorded under ``name`` (to re-attach to), None when there is no
        job of that name. Raises when it is running, or when its directory exists without a
        readable record: that record held the runner's pid, so nothing tells whether a process
        still runs the job there, and starting another in the same directory could mix them."""
        existing = self.describe(name)
        if existing is not None and existing.status == "InProgress":
            raise BackendError(f"training job {name} is already running in another process")
        if existing is None and self.job_dir(name).exists():
            raise BackendError(
                f"training job {name} cannot run: its directory {self.job_dir(name)} exists "
                f"but holds no readable job.json (a crash while it was written?). Delete that "
                f"directory to run this name again, or run under another name (a pipeline run "
                f"names its jobs after itself, so the next run is not affected)")
        return existing

    def _train(self, record: JobRecord, job_dir: Path, hosts: list[str], spec: TrainingSpec,
               emit: LogCallback) -> tuple[str, str | None]:
        """Starts the hosts and waits for them: (status, failure reason). Interrupted or
        cancelled, it stops them, records the job Stopped and raises."""
        hyperparameters = record.hyperparameters
        lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        procs: dict[str, Launched] = {}
        log_file = BoundedLog(job_dir / "training.log", self.retention.log_max_bytes,
                              self.retention.log_backups)
        started = time.monotonic()
        try:
            record.started, record.secondary_status = _now(), "Training"
            for host in hosts:
                output, output_end = os.pipe()
                try:
                    proc = launch(
                        [self.python, self.entry_point, *self._cli_args(hyperparameters)],
                        cwd=job_dir / host / "code",
                        env=self._environment(job_dir / host, hyperparameters, hosts, host,
                                              spec),
                        output=output_end, die_with_parent=True)
                finally:
                    os.close(output_end)  # the host holds it: EOF once the host exits
                procs[host] = proc
                record.processes.append({"host": host, "pid": proc.pid,
                                         "start": processes.start_time(proc.pid)})
                stream = open(output, encoding="utf-8", errors="replace")  # noqa: SIM115
                threading.Thread(target=_pump, args=(stream, host, lines), daemon=True).start()
            self._save(record)
            status, reason = self._wait(job_dir, procs, lines, started, spec, log_file, emit)
        except BaseException as e:  # interrupted or cancelled: never leave the job running
            for proc in procs.values():
                processes.terminate_group(proc.pid, None, grace_seconds=5)
            record.status = record.secondary_status = "Stopped"
            record.failure_reason = f"stopped: {type(e).__name__}: {e}"
            record.ended = _now()
            self._save(record)
            raise
        finally:
            log_file.close()
        record.billable_seconds = math.ceil(time.monotonic() - started) * spec.instance_count
        return status, reason

    def _finish(self, record: JobRecord, job_dir: Path, status: str,
                reason: str | None) -> None:
        """Records the outcome; a completed job's model goes to the store first."""
        stopped = self.describe(record.name)
        if stopped is not None and stopped.status == "Stopped":  # stop() ended its hosts
            status, reason = "Stopped", stopped.failure_reason
        record.ended = _now()
        if status == "Completed":
            record.secondary_status = "Uploading"
            self._save(record)
            record.model_uri = self._package_model(job_dir / "algo-1" / "model", record.name)
        record.status = record.secondary_status = status
        record.failure_reason = reason
        self._save(record)

    def release_inputs(self, name: str) -> bool:
        """Removes what an ended job no longer needs (``HOST_INPUTS``, ``JOB_INPUTS``): the
        channel's hard links (the store's files stay) or copies among them. True when there
        was something to remove. Also used by retention, for a job whose runner was killed."""
        job_dir = self.job_dir(name)
        leftovers = [job_dir / sub for sub in JOB_INPUTS]
        leftovers += [host / sub for host in job_dir.glob("algo-*") for sub in HOST_INPUTS]
        found = False
        for path in leftovers:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
                found = True
        return found

    def _wait(self, job_dir: Path, procs: dict[str, Launched], lines: queue.Queue,
              started: float, spec: TrainingSpec, log_file,
              emit: LogCallback) -> tuple[str, str | None]:
        """Forwards log lines (on this thread, so callbacks need no locking) until every host
        exits, a host fails, or the max runtime passes."""
        multi_host = len(procs) > 1
        open_streams = len(procs)
        while open_streams:
            try:
                host, line = lines.get(timeout=0.2)
            except queue.Empty:
                host, line = "", ""
            if line is None:
                open_streams -= 1
            elif host:
                text = f"[{host}] {line}" if multi_host else line
                log_file.write(text + "\n")
                emit(text)
            failed = [h for h, p in procs.items() if p.poll() not in (None, 0)]
            if failed:
                # One host failed: the others would wait forever at the next all-reduce.
                for proc in procs.values():
                    processes.terminate_group(proc.pid, None, grace_seconds=5)
                _drain(lines, log_file, emit, multi_host)
                return "Failed", _failure_reason(job_dir, failed[0], procs[failed[0]].returncode)
            if time.monotonic() - started > spec.max_runtime_seconds:
                for proc in procs.values():
                    processes.terminate_group(proc.pid, None, grace_seconds=5)
                _drain(lines, log_file, emit, multi_host)
                return "Stopped", (f"MaxRuntimeExceeded: the job ran longer than "
                                   f"{spec.max_runtime_seconds}s and was stopped")
        for proc in procs.values():
            proc.wait()
        failed = [h for h, p in procs.items() if p.returncode != 0]
        if failed:
            return "Failed", _failure_reason(job_dir, failed[0], procs[failed[0]].returncode)
        return "Completed", None

    # -- job directory -------------------------------------------------------------------

    def _materialise_host(self, root: Path, data_dir: Path, hyperparameters: dict[str, str],
                          hosts: list[str], host: str, spec: TrainingSpec) -> None:
        config = root / "input" / "config"
        config.mkdir(parents=True)
        (config / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=2))
        (config / "resourceconfig.json").write_text(json.dumps(
            {"current_host": host, "hosts": hosts, "network_interface_name": "lo"}, indent=2))
        (config / "inputdataconfig.json").write_text(json.dumps(
            {TRAINING_CHANNEL: {"TrainingInputMode": "File", "S3DistributionType":
                                "FullyReplicated", "RecordWrapperType": "None"}}, indent=2))
        # File mode: SageMaker copies the channel onto each instance before the script starts.
        _link_channel(data_dir, root / "input" / "data" / TRAINING_CHANNEL)
        shutil.copytree(self.source_dir, root / "code",
                        ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
        for sub in ("model", "output/data"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def _environment(self, root: Path, hyperparameters: dict[str, str], hosts: list[str],
                     host: str, spec: TrainingSpec) -> dict[str, str]:
        cpus = max(1, usable_cpus() // self.concurrent_jobs // len(hosts))
        gpus = _gpu_count()
        env = dict(os.environ)
        host_index = hosts.index(host)
        if gpus >= len(hosts) > 1:  # one GPU per host
            env["CUDA_VISIBLE_DEVICES"], gpus_here = str(host_index), 1
        elif len(hosts) > 1:  # hosts share the CPU
            env["CUDA_VISIBLE_DEVICES"], gpus_here = "", 0
        else:
            gpus_here = gpus
        training_env = {
            "job_name": spec.job_name, "hosts": hosts, "current_host": host,
            "channel_input_dirs": {TRAINING_CHANNEL: str(root / "input/data" / TRAINING_CHANNEL)},
            "hyperparameters": hyperparameters, "model_dir": str(root / "model"),
            "output_data_dir": str(root / "output/data"), "num_gpus": gpus_here,
            "num_cpus": cpus, "user_entry_point": self.entry_point,
        }
        env.update({
            "SM_TRAINING_ENV": json.dumps(training_env),
            "SM_MODEL_DIR": str(root / "model"),
            "SM_CHANNELS": json.dumps([TRAINING_CHANNEL]),
            f"SM_CHANNEL_{TRAINING_CHANNEL.upper()}": str(root / "input/data" / TRAINING_CHANNEL),
            "SM_HOSTS": json.dumps(hosts),
            "SM_CURRENT_HOST": host,
            "SM_NUM_GPUS": str(gpus_here),
            "SM_NUM_CPUS": str(cpus),
            "SM_INPUT_DIR": str(root / "input"),
            "SM_INPUT_CONFIG_DIR": str(root / "input/config"),
            "SM_OUTPUT_DIR": str(root / "output"),
            "SM_OUTPUT_DATA_DIR": str(root / "output/data"),
            "SM_HPS": json.dumps(hyperparameters),
            "SM_USER_ENTRY_POINT": self.entry_point,
            "SM_NETWORK_INTERFACE_NAME": "lo",
            # Every local host is a process on this machine: they rendezvous through a file
            # in the job's directory (torch's FileStore), so no TCP store listens and no port
            # is raced for; gloo's own connections bind GLOO_SOCKET_IFNAME's address.
            "CIFAR10_RENDEZVOUS_FILE": str(root.parent / "rendezvous"),
            "GLOO_SOCKET_IFNAME": "lo" if sys.platform.startswith("linux") else "lo0",
            "OMP_NUM_THREADS": str(cpus),
            # One checkpoint directory for all hosts (SageMaker syncs each instance's
            # /opt/ml/checkpoints with one S3 prefix): rank 0 writes, every rank resumes.
            CHECKPOINT_DIR_ENV: str(root.parent / "checkpoints"),
            "PYTHONUNBUFFERED": "1",
        })
        for key, value in hyperparameters.items():
            env[f"SM_HP_{key.upper().replace('-', '_')}"] = value
        return env

    @staticmethod
    def _cli_args(hyperparameters: dict[str, str]) -> list[str]:
        args: list[str] = []
        for key, value in hyperparameters.items():
            args += [f"--{key}", value]
        return args

    def _package_model(self, model_dir: Path, job_name: str) -> str:
        """model/ → model.tar.gz in the store, where SageMaker would put it. Packed in a
        temporary directory beside the jobs (not /tmp: a kill leaves it where retention looks,
        named after this process so that it is cleared once that process is gone)."""
        with tempfile.TemporaryDirectory(dir=self.jobs_root,
                                         prefix=owned_temp_prefix("package")) as tmp:
            archive = Path(tmp) / "model.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                for item in sorted(model_dir.iterdir()):
                    tar.add(item, arcname=item.name)
            return self.store.put_file(archive, f"training-jobs/{job_name}/output/model.tar.gz")


def _link_channel(data_dir: Path, dest: Path) -> None:
    """Gives a host the channel's files as hard links to the store's: no copy of 178 MB per
    host and job, and a snapshot (the store replaces a file by renaming a new one over it, so
    a link keeps the version the job started with). Where linking fails (another filesystem:
    EXDEV; one without hard links; a link count limit) the files are copied; either way they
    go when the job ends.

    A link shares the store's inode: a script that wrote into its channel would change the
    store's file under a manifest that still vouches for it. The entry script only reads its
    channel; to turn a stray write into an error rather than a corrupt store, the linked files
    are made read-only, which costs the store nothing (it never writes a file in place; a
    rename needs only its directory writable). Root ignores file modes: that guard is for
    accidents, the script is trusted code."""
    linking = True
    for src in sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        target = dest / src.relative_to(data_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        if linking:
            try:
                _make_read_only(src)
                os.link(src, target)
                continue
            except OSError as e:
                linking = False  # the same for every file of the channel: copy the rest
                log.info("cannot hard-link the training channel into %s (%s): copying it; "
                         "the copy is deleted when the job ends", dest,
                         errno.errorcode.get(e.errno or 0, e))
        shutil.copyfile(src, target)


def _make_read_only(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & 0o222:
        os.chmod(path, mode & ~0o222)


def _failure_reason(job_dir: Path, host: str, returncode: int | None) -> str:
    """The script's own reason (output/failure), as SageMaker reports it, else the exit code."""
    failure = job_dir / host / "output" / "failure"
    text = failure.read_text().strip() if failure.is_file() else ""
    if not text:
        text = f"AlgorithmError: {host} exited with code {returncode} and wrote no reason"
    return text[:FAILURE_REASON_LIMIT]


def _pump(stream: TextIO, host: str, lines: queue.Queue) -> None:
    with stream:
        for line in stream:
            lines.put((host, line.rstrip("\n")))
    lines.put((host, None))


def _drain(lines: queue.Queue, log_file, emit: LogCallback, multi_host: bool) -> None:
    """Forwards what the stopped processes printed last."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            host, line = lines.get(timeout=0.1)
        except queue.Empty:
            return
        if line is not None:
            text = f"[{host}] {line}" if multi_host else line
            log_file.write(text + "\n")
            emit(text)
