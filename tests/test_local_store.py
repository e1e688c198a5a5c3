"""The local artifact store: file:// URIs, atomic writes, unchanged uploads skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.local.store import LocalStore, path_from_uri


def test_upload_skips_unchanged_and_mirrors_changes(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 1000)
    (src / "sub" / "b.bin").write_bytes(b"b" * 10)
    store = LocalStore(tmp_path / "store")

    first = store.upload_dir(src, "data")
    assert (first.uploaded, first.skipped, first.removed) == (2, 0, 0)
    assert first.uri.startswith("file://")
    dest = path_from_uri(first.uri)
    assert (dest / "sub" / "b.bin").read_bytes() == b"b" * 10

    again = store.upload_dir(src, "data")
    assert (again.uploaded, again.skipped, again.bytes_uploaded) == (0, 2, 0)

    (src / "a.bin").write_bytes(b"changed")
    (src / "sub" / "b.bin").unlink()
    (src / "c.bin").write_bytes(b"new")
    changed = store.upload_dir(src, "data")
    assert (changed.uploaded, changed.skipped, changed.removed) == (2, 0, 1)
    assert (dest / "a.bin").read_bytes() == b"changed"
    assert not (dest / "sub" / "b.bin").exists()
    assert not list(dest.rglob("*.part")), "temporary files left behind"


def test_a_damaged_copy_is_uploaded_again(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 100)
    store = LocalStore(tmp_path / "store")
    dest = path_from_uri(store.upload_dir(src, "data").uri)
    (dest / "a.bin").write_bytes(b"truncated")
    assert store.upload_dir(src, "data").uploaded == 1
    assert (dest / "a.bin").read_bytes() == b"a" * 100


def test_keys_cannot_leave_the_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ValueError, match="leaves the store"):
        store.path("../outside")


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory to upload"):
        LocalStore(tmp_path / "store").upload_dir(tmp_path / "nope", "data")


def test_put_file_is_atomic(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "model.tar.gz"
    src.write_bytes(b"x" * 4096)
    uri = store.put_file(src, "jobs/j/output/model.tar.gz")
    assert Path(path_from_uri(uri)).read_bytes() == b"x" * 4096
