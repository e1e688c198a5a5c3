"""The real download code against a loopback HTTP server serving generated CIFAR-format data:
progress, checksums, safe extraction, atomic swap, reuse of a verified copy."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tasks.lib.download import (
    BATCH_DIR,
    ChecksumMismatch,
    DataError,
    UnsafeArchive,
    fetch_cifar10,
)


def test_download_verifies_extracts_and_reuses(tmp_path, http_server, cifar_tarball):
    name, md5 = cifar_tarball
    seen: list[tuple[int, int | None]] = []
    first = fetch_cifar10(tmp_path, f"{http_server}/{name}", md5,
                          progress=lambda done, total: seen.append((done, total)))
    assert not first.reused and first.bytes_downloaded > 0
    assert Path(first.path) == tmp_path / BATCH_DIR
    assert {"data_batch_1", "data_batch_2", "test_batch", "batches.meta"} <= set(first.files)
    assert seen[-1] == (first.bytes_downloaded, first.bytes_downloaded)  # progress to the end

    # A second fetch finds the verified copy and never touches the network.
    again = fetch_cifar10(tmp_path, "http://127.0.0.1:9/unreachable", md5)
    assert again.reused and again.files == first.files


def test_file_urls_work_for_mirrors(tmp_path, http_root, cifar_tarball):
    name, md5 = cifar_tarball
    dataset = fetch_cifar10(tmp_path, (http_root / name).as_uri(), md5)
    assert (Path(dataset.path) / "test_batch").is_file()


def test_checksum_mismatch_leaves_nothing_behind(tmp_path, http_server, cifar_tarball):
    name, _ = cifar_tarball
    with pytest.raises(ChecksumMismatch, match=r"expected md5 0{32}"):
        fetch_cifar10(tmp_path, f"{http_server}/{name}", "0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_failed_refetch_never_damages_a_good_copy(tmp_path, http_server, cifar_tarball):
    name, md5 = cifar_tarball
    good = fetch_cifar10(tmp_path, f"{http_server}/{name}", md5)
    with pytest.raises(ChecksumMismatch):
        fetch_cifar10(tmp_path, f"{http_server}/{name}", "f" * 32)
    with pytest.raises(DataError, match="cut short"):
        fetch_cifar10(tmp_path, f"{http_server}/cut/{name}", "e" * 32)
    assert fetch_cifar10(tmp_path, "http://127.0.0.1:9/x", md5).files == good.files
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cifar10-source.json", BATCH_DIR]


def test_interrupted_download_then_retry(tmp_path, http_server, cifar_tarball):
    name, md5 = cifar_tarball
    with pytest.raises(DataError, match="cut short"):
        fetch_cifar10(tmp_path, f"{http_server}/cut/{name}", md5)
    assert list(tmp_path.iterdir()) == []
    assert not fetch_cifar10(tmp_path, f"{http_server}/{name}", md5).reused


def test_a_damaged_copy_is_fetched_again(tmp_path, http_server, cifar_tarball):
    name, md5 = cifar_tarball
    fetch_cifar10(tmp_path, f"{http_server}/{name}", md5)
    (tmp_path / BATCH_DIR / "data_batch_1").write_bytes(b"bit rot")
    assert not fetch_cifar10(tmp_path, f"{http_server}/{name}", md5).reused


def test_http_errors_are_clear(tmp_path, http_server):
    with pytest.raises(DataError, match="HTTP 404"):
        fetch_cifar10(tmp_path, f"{http_server}/missing.tar.gz", None)
    with pytest.raises(DataError, match="unsupported URL scheme"):
        fetch_cifar10(tmp_path, "ftp://example.com/x.tar.gz", None)


def _tar(path: Path, entries: list[tarfile.TarInfo], data: bytes = b"x") -> str:
    import hashlib

    with tarfile.open(path, "w:gz") as tar:
        for info in entries:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return hashlib.md5(path.read_bytes()).hexdigest()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("entries, message", [
    ([_member("../escape")], "outside"),
    ([_member("/etc/evil")], "outside"),
    ([_member("cifar-10-batches-py/data_batch_1", tarfile.SYMTYPE, "/etc/passwd")], "link"),
    ([_member("cifar-10-batches-py/test_batch", tarfile.LNKTYPE, "/etc/passwd")], "link"),
    ([_member("cifar-10-batches-py/dev", tarfile.CHRTYPE)], "device"),
    ([_member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE)], "device"),
])
def test_hostile_archives_are_refused(tmp_path, entries, message):
    archive = tmp_path / "evil.tar.gz"
    md5 = _tar(archive, entries)
    data = tmp_path / "data"
    with pytest.raises(UnsafeArchive, match=message):
        fetch_cifar10(data, archive.as_uri(), md5)
    assert not (tmp_path / "escape").exists()
    assert list(data.iterdir()) == []


def test_truncated_archive_is_a_clear_error(tmp_path, http_root, cifar_tarball):
    import hashlib

    name, _ = cifar_tarball
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes((http_root / name).read_bytes()[:5000])
    md5 = hashlib.md5(truncated.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="not a readable tar archive"):
        fetch_cifar10(tmp_path / "data", truncated.as_uri(), md5)
    assert list((tmp_path / "data").iterdir()) == []


def test_archive_without_batches_is_refused(tmp_path):
    archive = tmp_path / "other.tar.gz"
    md5 = _tar(archive, [_member("readme.txt")])
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        fetch_cifar10(tmp_path / "data", archive.as_uri(), md5)
