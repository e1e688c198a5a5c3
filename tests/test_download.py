"""The real download code against a loopback HTTP server serving generated CIFAR-format data:
progress, checksums, safe extraction, atomic swap, reuse of a verified copy; against a hostile
one: the size cap and the deadline; URLs redacted everywhere; stale work directories."""

from __future__ import annotations

import base64
import fcntl
import functools
import io
import logging
import os
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.lib.download import (
    BATCH_DIR,
    DEFAULT_URL,
    WORK_GRACE_SECONDS,
    WORK_LOCK,
    ChecksumMismatch,
    DataError,
    DownloadTimedOut,
    DownloadTooLarge,
    UnsafeArchive,
    clear_stale_work_dirs,
    display_url,
    fetch_cifar10,
)
from tests.support.hostile_http import SECRETS, hostile_http_server, with_secrets

REPO = Path(__file__).resolve().parents[1]


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


# -- bounds: a size cap and a deadline ---------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(http_root, cifar_tarball) -> Iterator[tuple[str, list[str | None]]]:
    """A server that announces too much, streams without end, trickles, and keeps the
    generated archive behind credentials: (base URL, Authorization headers it received)."""
    with hostile_http_server(http_root) as served:
        yield served


def test_an_announced_size_over_the_cap_is_refused_before_reading(tmp_path, hostile):
    seen: list[tuple[int, int | None]] = []
    with pytest.raises(DownloadTooLarge, match=r"announces 2147\.5 MB, over the cap of "
                                               r"1073\.7 MB .*Nothing was downloaded"):
        fetch_cifar10(tmp_path, f"{hostile[0]}/announces-2GiB", None,  # the default cap: 1 GiB
                      progress=lambda done, total: seen.append((done, total)))
    assert seen == []  # not a byte read
    assert list(tmp_path.iterdir()) == []


def test_a_stream_past_the_cap_is_stopped(tmp_path, hostile):
    """Without a Content-Length, the cap stops the stream as it passes it."""
    seen: list[tuple[int, int | None]] = []
    with pytest.raises(DownloadTooLarge, match=r"sent more than the cap of 1\.0 MB .*deleted"):
        fetch_cifar10(tmp_path, f"{hostile[0]}/endless", None, max_bytes=1_000_000,
                      progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] <= 1_000_000 and seen[-1][1] is None
    assert list(tmp_path.iterdir()) == []


def test_a_trickling_server_is_given_up_at_the_deadline(tmp_path, hostile):
    """Every read gets a byte well within the read timeout: only the overall deadline ends
    it (the whole trickle would take half an hour)."""
    started = time.monotonic()
    with pytest.raises(DownloadTimedOut, match=r"past the deadline of 0\.01 minutes "
                                               r"\(data\.deadline_minutes\).*of 0\.1 MB"):
        fetch_cifar10(tmp_path, f"{hostile[0]}/trickle", None, deadline_minutes=0.01)
    assert time.monotonic() - started < 0.6 + 5  # the deadline, with room for a slow machine
    assert list(tmp_path.iterdir()) == []


def test_the_pipeline_config_bounds_every_download(tmp_path, hostile):
    from flows.config import PipelineConfig
    from tasks.data import download_data

    data = PipelineConfig().data
    assert (data.max_bytes, data.deadline_minutes) == (1 << 30, 30)
    with pytest.raises(DownloadTooLarge, match=r"more than the cap of 1\.0 MB"):
        download_data.fn(f"{hostile[0]}/endless", None, tmp_path, max_bytes=1_000_000)


# -- URLs are shown redacted -------------------------------------------------------------------


def test_display_url_keeps_scheme_host_and_path_only():
    url = ("https://alice:pass-word-42@mirror.example:8443/c/cifar.tar.gz"
           "?token=secret-token-7&X-Amz-Signature=abc&flag#fragment")
    assert display_url(url) == \
        "https://***@mirror.example:8443/c/cifar.tar.gz?token=***&X-Amz-Signature=***&***"
    assert display_url(display_url(url)) == display_url(url)
    assert display_url(DEFAULT_URL) == DEFAULT_URL
    assert display_url("file:///data/cifar.tar.gz") == "file:///data/cifar.tar.gz"
    assert display_url("http://[::1]:8080/x.tar.gz") == "http://[::1]:8080/x.tar.gz"
    assert display_url("http://alice:secret@host:port/x") == "<malformed URL>"


def redaction_cases(hostile_url: str, name: str) -> dict[str, tuple[str, dict]]:
    """Each failure, as (URL with secrets, fetch_cifar10's other arguments)."""
    secret = functools.partial(with_secrets, hostile_url)
    closed = with_secrets("http://127.0.0.1:9", "/cifar.tar.gz")  # nothing listens on port 9
    return {
        "HTTP error": (secret("/missing.tar.gz"), {}),
        "connection refused": (closed, {}),
        "size cap": (secret("/announces-2GiB"), {}),
        "deadline": (secret("/trickle"), {"deadline_minutes": 0.005}),
        "checksum mismatch": (secret(f"/private/{name}"), {"md5": "0" * 32}),
        "unsupported scheme": (secret("/x").replace("http://", "ftp://"), {}),
        "malformed URL": ("http://alice:pass-word-42@127.0.0.1:notaport/x?token=secret-token-7",
                          {}),
    }


def test_errors_never_show_credentials_or_tokens(tmp_path, hostile, cifar_tarball):
    name, _ = cifar_tarball
    for label, (url, kwargs) in redaction_cases(hostile[0], name).items():
        with pytest.raises(DataError) as err:
            fetch_cifar10(tmp_path / label, url, **{"md5": None, **kwargs})
        # Everything a log shows: the message and the whole traceback, causes included.
        shown = "".join(traceback.format_exception(err.value))
        leaked = [s for s in SECRETS if s in shown]
        assert not leaked, f"{label}: {leaked} in {shown}"
        assert "***" in str(err.value) or label == "malformed URL", (label, str(err.value))


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_stored(tmp_path, hostile,
                                                                        cifar_tarball):
    name, md5 = cifar_tarball
    url = with_secrets(hostile[0], f"/private/{name}")
    dataset = fetch_cifar10(tmp_path, url, None)
    assert hostile[1][-1] == "Basic " + base64.b64encode(b"alice:pass-word-42").decode()
    assert dataset.md5 == md5 and dataset.url == display_url(url)
    marker = (tmp_path / ".cifar10-source.json").read_text()
    assert not [s for s in SECRETS if s in marker + repr(dataset)]
    # Without a checksum, the copy is reused for exactly this URL (recorded as a digest).
    assert fetch_cifar10(tmp_path, url, None).reused
    assert not fetch_cifar10(tmp_path, url.replace("token=", "token=other-"), None).reused


# -- stale work directories --------------------------------------------------------------------


def work_dir(data_root: Path, name: str, age_seconds: float, lock_file: bool) -> Path:
    """A ``.fetch-*`` work directory as a download leaves it, last modified that long ago."""
    work = data_root / name
    work.mkdir(parents=True)
    (work / "archive.tar.gz").write_bytes(b"x" * 4096)
    if lock_file:
        (work / WORK_LOCK).touch()
    then = time.time() - age_seconds
    os.utime(work, (then, then))
    return work


def test_only_stale_work_directories_are_cleared(tmp_path, http_server, cifar_tarball, caplog):
    from tasks.data import download_data

    name, md5 = cifar_tarball
    data_root, hour = tmp_path / "data", 3600
    # Left by killed downloads: a lock file nobody holds; a lock-less one (older code) a day on.
    work_dir(data_root, ".fetch-abandoned", 2 * hour, lock_file=True)
    work_dir(data_root, ".fetch-older-code", 2 * 24 * hour, lock_file=False)
    # Maybe in use: a download holds its lock; one just created (it may not have locked yet);
    # a lock-less one of the day (an older version's download may still run).
    live = work_dir(data_root, ".fetch-live", 2 * hour, lock_file=True)
    work_dir(data_root, ".fetch-young", 0, lock_file=True)
    work_dir(data_root, ".fetch-older-code-today", 2 * hour, lock_file=False)
    (data_root / "fetch-not-ours").mkdir()
    held = os.open(live / WORK_LOCK, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # as the live download's process does
    try:
        with caplog.at_level(logging.INFO, logger="cifar10_pipeline"):
            download_data.fn(f"{http_server}/{name}", md5, data_root)
    finally:
        os.close(held)
    assert sorted(p.name for p in data_root.iterdir()) == [
        ".cifar10-source.json", ".fetch-live", ".fetch-older-code-today", ".fetch-young",
        BATCH_DIR, "fetch-not-ours"]
    assert "removed 2 stale download directories" in caplog.text


def test_a_killed_download_leaves_a_directory_that_the_next_one_clears(tmp_path, hostile,
                                                                       http_server,
                                                                       cifar_tarball):
    data_root = tmp_path / "data"
    fetch = (f"from tasks.lib.download import fetch_cifar10; "
             f"fetch_cifar10({str(data_root)!r}, {hostile[0] + '/trickle'!r}, None)")
    process = subprocess.Popen([sys.executable, "-c", fetch], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not list(data_root.glob(".fetch-*/archive.tar.gz")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        [work] = data_root.glob(".fetch-*")
        long_ago = time.time() - 2 * WORK_GRACE_SECONDS
        os.utime(work, (long_ago, long_ago))
        assert clear_stale_work_dirs(data_root) == []  # its download is alive: left alone
    finally:
        process.kill()  # SIGKILL: nothing cleans up
        process.wait(timeout=30)
    assert work.is_dir()
    name, md5 = cifar_tarball
    assert not fetch_cifar10(data_root, f"{http_server}/{name}", md5).reused
    assert sorted(p.name for p in data_root.iterdir()) == [".cifar10-source.json", BATCH_DIR]


def test_prefect_shows_no_credential_or_token(prefect_harness, tmp_path, hostile, cifar_tarball):
    """What the Prefect UI shows of a download, failed or done: task run names, state
    messages and every log line (the failure's traceback included)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    from tasks.data import download_data

    name, _ = cifar_tarball
    good, bad = (with_secrets(hostile[0], path) for path in (f"/private/{name}", "/missing"))

    @flow
    def downloads(root: Path) -> None:
        download_data(good, None, root / "good")
        download_data.with_options(retries=0)(bad, None, root / "bad")

    state = downloads(tmp_path, return_state=True)
    assert state.is_failed()
    APILogHandler().flush()  # the logs reach the API in batches: send them now
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    names = [run.name for run in task_runs]
    assert sorted(names) == sorted(f"download {display_url(url)}" for url in (good, bad))
    shown = "\n".join([*names, *(run.state.message or "" for run in task_runs),
                       *(log.message for log in logs)])
    assert "HTTP 404" in shown and "no checksum given for http://***@127.0.0.1" in shown
    assert not [s for s in SECRETS if s in shown], shown
