"""Bad data, end to end: with a good verified copy already in place, every kind of bad input
ends in a clear error, writes nothing outside the data directory, and leaves the good copy
exactly as it was. That holds for downloads cut off by their bounds too (size cap, deadline)."""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from backends.base import TrainingJobFailed, TrainingSpec
from bench.generated_data import make_cifar_dir
from tasks.lib.download import (
    BATCH_DIR,
    BadArchive,
    ChecksumMismatch,
    DataError,
    DownloadTimedOut,
    DownloadTooLarge,
    UnsafeArchive,
    fetch_cifar10,
    verified_copy,
)
from tests.support.hostile_http import hostile_http_server
from tests.support.pipeline import FAST_HYPERPARAMETERS
from tests.support.reporting import report_table


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (links and specials by their kind)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path)] = "symlink"
        elif path.is_file():
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def bad_inputs(workdir: Path, http_server: str, good_name: str, good_bytes: bytes,
               hostile_url: str) -> dict[str, Callable[[Path], object]]:
    """Each bad input as a call that fetches it into a data root."""
    truncated = workdir / "truncated.tar.gz"
    truncated.write_bytes(good_bytes[: len(good_bytes) // 3])

    def hostile(name: str, members: list[tuple[tarfile.TarInfo, bytes]]):
        archive = workdir / f"{name}.tar.gz"
        md5 = tar_with(archive, members)
        return lambda root: fetch_cifar10(root, archive.as_uri(), md5)

    batch = f"{BATCH_DIR}/data_batch_1"
    return {
        "checksum mismatch": lambda root: fetch_cifar10(root, f"{http_server}/{good_name}",
                                                        "0" * 32),
        "truncated archive": lambda root: fetch_cifar10(
            root, truncated.as_uri(), hashlib.md5(truncated.read_bytes()).hexdigest()),
        "path traversal": hostile("traversal", [(member(f"{BATCH_DIR}/../../escaped"), b"x")]),
        "absolute path": hostile("absolute", [(member(str(workdir / "absolute-escape")),
                                               b"x")]),
        "symlink": hostile("symlink", [(member(batch, tarfile.SYMTYPE, "/etc/passwd"), b"")]),
        "hard link": hostile("hardlink", [(member(batch, tarfile.LNKTYPE, "/etc/passwd"),
                                           b"")]),
        "device file": hostile("device", [(member(f"{BATCH_DIR}/dev", tarfile.CHRTYPE), b"")]),
        "no batches in archive": hostile("empty", [(member("README"), b"hello")]),
        # (another checksum, as for a new version: the good copy alone would satisfy good_md5)
        "interrupted download": lambda root: fetch_cifar10(
            root, f"{http_server}/cut/{good_name}", "e" * 32),
        "announced over the size cap": lambda root: fetch_cifar10(
            root, f"{hostile_url}/announces-2GiB", "e" * 32),
        "streamed past the size cap": lambda root: fetch_cifar10(
            root, f"{hostile_url}/endless", "e" * 32, max_bytes=1_000_000),
        "trickled past the deadline": lambda root: fetch_cifar10(
            root, f"{hostile_url}/trickle", "e" * 32, deadline_minutes=0.005),
    }


EXPECTED = {
    "checksum mismatch": (ChecksumMismatch, "checksum mismatch"),
    "truncated archive": (BadArchive, "not a readable tar archive"),
    "path traversal": (UnsafeArchive, "outside"),
    "absolute path": (UnsafeArchive, "outside"),
    "symlink": (UnsafeArchive, "is a link"),
    "hard link": (UnsafeArchive, "is a link"),
    "device file": (UnsafeArchive, "device"),
    "no batches in archive": (BadArchive, "no CIFAR-10 batches"),
    "interrupted download": (DataError, "cut short"),
    "announced over the size cap": (DownloadTooLarge, "over the cap"),
    "streamed past the size cap": (DownloadTooLarge, "more than the cap"),
    "trickled past the deadline": (DownloadTimedOut, "past the deadline"),
}


@pytest.fixture(scope="module")
def hostile(http_root) -> Iterator[str]:
    with hostile_http_server(http_root) as (url, _):
        yield url


def test_bad_data_never_damages_a_good_copy(tmp_path, http_server, http_root, cifar_tarball,
                                            hostile):
    name, md5 = cifar_tarball
    data_root = tmp_path / "project" / "data"
    good = fetch_cifar10(data_root, f"{http_server}/{name}", md5)
    (tmp_path / "inputs").mkdir()
    inputs = bad_inputs(tmp_path / "inputs", http_server, name, (http_root / name).read_bytes(),
                        hostile)
    outside_before = snapshot(tmp_path)
    table = report_table("Bad data (a good copy already in place each time)",
                         ["input", "error", "written outside data dir", "good copy intact"])
    for label, fetch in inputs.items():
        error_type, message = EXPECTED[label]
        with pytest.raises(error_type, match=message) as err:
            fetch(data_root)
        after = snapshot(tmp_path)
        outside = sorted(set(after) - set(outside_before))
        intact = verified_copy(data_root, f"{http_server}/{name}", md5)
        table.add(dict(zip(table.columns, [
            label, f"{type(err.value).__name__}: {str(err.value)[:60]}", len(outside),
            "yes" if intact and intact.files == good.files else "NO"], strict=True)))
        assert outside == [], f"{label} wrote {outside}"
        assert after == outside_before, f"{label} changed files"
        assert intact is not None and intact.files == good.files
        assert sorted(p.name for p in data_root.iterdir()) == [".cifar10-source.json", BATCH_DIR]
    # A retry after the interruption succeeds (the copy is verified and reused).
    assert fetch_cifar10(data_root, f"{http_server}/{name}", md5).reused


def test_malformed_batches_fail_the_training_job_with_a_clear_reason(local_backend, tmp_path):
    table = report_table("Malformed batch directories (the training job's failure)",
                         ["batch directory", "job status", "reason"])
    cases = {
        "garbage bytes": lambda d: (d / "data_batch_1").write_bytes(b"garbage"),
        "wrong shape": lambda d: (d / "data_batch_1").write_bytes(
            pickle.dumps({b"data": np.zeros((3, 10), np.uint8), b"labels": [0, 1, 2]})),
        "labels out of range": lambda d: (d / "data_batch_1").write_bytes(
            pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]})),
        "missing test batch": lambda d: (d / "test_batch").unlink(),
    }
    expected = {"garbage bytes": "not a CIFAR-10 python batch file",
                "wrong shape": "must be uint8 N x 3072", "labels out of range": "labels must lie",
                "missing test batch": "no CIFAR-10 batches"}
    for i, (label, damage) in enumerate(cases.items()):
        batch_dir = make_cifar_dir(tmp_path / f"batches-{i}", train_batches=1, per_batch=20,
                                   test=10)
        damage(batch_dir)
        uri = local_backend.storage.upload_dir(batch_dir, f"bad-data-{i}").uri
        with pytest.raises(TrainingJobFailed) as err:
            local_backend.jobs.run(TrainingSpec(job_name=f"bad-data-{i}", data_uri=uri,
                                                hyperparameters=FAST_HYPERPARAMETERS))
        reason = re.sub(r"/\S+/", ".../", err.value.reason.splitlines()[0])  # paths shortened
        table.add(dict(zip(table.columns, [label, err.value.status, reason[:90]], strict=True)))
        assert err.value.status == "Failed"
        assert expected[label] in err.value.reason
