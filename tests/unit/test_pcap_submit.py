"""``POST /pcap`` opens the file when it is submitted (issue 19, finding 4): by descriptor,
below the pcap directory, no symbolic link followed, regular files only; the job keeps that
descriptor, so what the name points to later changes nothing."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control.api import Api
from agent.control.ingest import PcapIngest
from tests.unit.test_cli_input import DEMO, pcap_records
from tests.unit.test_control_api import FakeAgent, _json, _req, _wait

RAW = DEMO.read_bytes()
SMALL = 100  # frames of the file a test swaps


@pytest.fixture
def pcaps(tmp_path: Path) -> Path:
    d = tmp_path / "pcaps"
    d.mkdir()
    shutil.copy(DEMO, d / "demo.pcap")
    (d / "small.pcap").write_bytes(RAW[: pcap_records(RAW)[SMALL][0]])
    shutil.copy(DEMO, tmp_path / "secret.pcap")  # outside: 474 frames
    return d


@pytest.fixture
def ingest() -> Iterator[PcapIngest]:
    """Nothing to hold what the reader reads: it stalls in the first job until taken."""
    ing = PcapIngest(max_queued=4, budget=0)
    yield ing
    ing.close()


def _post(api: Api, path: str) -> tuple[int, dict[str, object]]:
    r = api.handle(_req("POST", "/pcap", {"path": path}))
    return r.status, _json(r)


def _job(api: Api, job_id: object) -> dict[str, object]:
    return dict(_json(api.handle(_req("GET", f"/pcap/{job_id}"))))


def _queue_behind_a_running_job(api: Api, name: str) -> str:
    """Submit demo.pcap (running, stalled) and then ``name`` (queued); the second job's id."""
    status, first = _post(api, "demo.pcap")
    assert status == 202
    _wait(lambda: _job(api, first["id"])["state"] == "running")
    status, second = _post(api, name)
    assert status == 202 and _job(api, second["id"])["state"] == "queued"
    return str(second["id"])


def _take_until_finished(api: Api, ing: PcapIngest, *jobs: str) -> None:
    deadline = time.monotonic() + 20
    while not all(_job(api, j)["state"] in ("done", "failed") for j in jobs):
        assert time.monotonic() < deadline, [_job(api, j) for j in jobs]
        if ing.poll() is None:
            time.sleep(0.01)


def test_a_queued_file_swapped_for_a_symlink_reads_what_was_submitted(
        pcaps: Path, ingest: PcapIngest) -> None:
    api = Api(FakeAgent(), ingest=ingest, pcap_dir=pcaps)
    job = _queue_behind_a_running_job(api, "small.pcap")
    (pcaps / "small.pcap").unlink()
    (pcaps / "small.pcap").symlink_to(pcaps.parent / "secret.pcap")
    _take_until_finished(api, ingest, job)
    got = _job(api, job)
    assert got["state"] == "done" and got["packets"] == SMALL  # not the secret's 474


def test_a_queued_file_swapped_for_a_fifo_does_not_block_the_reader(
        pcaps: Path, ingest: PcapIngest) -> None:
    api = Api(FakeAgent(), ingest=ingest, pcap_dir=pcaps)
    job = _queue_behind_a_running_job(api, "small.pcap")
    (pcaps / "small.pcap").unlink()
    os.mkfifo(pcaps / "small.pcap")
    _take_until_finished(api, ingest, job)
    assert _job(api, job)["state"] == "done" and _job(api, job)["packets"] == SMALL
    status, later = _post(api, "demo.pcap")  # the reader goes on with later jobs
    assert status == 202
    _take_until_finished(api, ingest, str(later["id"]))
    assert _job(api, later["id"])["state"] == "done"


def test_a_file_truncated_after_submit_fails_its_job_only(
        pcaps: Path, ingest: PcapIngest) -> None:
    api = Api(FakeAgent(), ingest=ingest, pcap_dir=pcaps)
    shutil.copy(DEMO, pcaps / "big.pcap")
    job = _queue_behind_a_running_job(api, "big.pcap")
    os.truncate(pcaps / "big.pcap", pcap_records(RAW)[10][0])  # at a record boundary
    _take_until_finished(api, ingest, job)
    got = _job(api, job)
    assert got["state"] == "failed" and "shrank while being read" in str(got["error"])
    assert got["packets"] == 10
    status, later = _post(api, "demo.pcap")
    assert status == 202
    _take_until_finished(api, ingest, str(later["id"]))
    assert _job(api, later["id"])["state"] == "done"


def test_symlinks_fifos_sockets_and_directories_are_refused_at_submit(
        pcaps: Path, ingest: PcapIngest, tmp_path: Path) -> None:
    (pcaps / "sub").mkdir()
    shutil.copy(DEMO, pcaps / "sub" / "a.pcap")
    (pcaps / "inner.pcap").symlink_to(pcaps / "demo.pcap")  # inside, but a link
    (pcaps / "subdir").symlink_to(pcaps / "sub")
    os.mkfifo(pcaps / "cap.fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(pcaps / "cap.sock"))
    api = Api(FakeAgent(), ingest=ingest, pcap_dir=pcaps)
    try:
        for path, status, says in [
            ("inner.pcap", 403, "symbolic link"),
            ("subdir/a.pcap", 403, "symbolic link"),
            ("cap.fifo", 422, "not a regular file (a FIFO)"),
            ("cap.sock", 422, "not a regular file"),
            ("sub", 422, "not a regular file (a directory)"),
            (".", 422, "not a regular file"),
            ("demo.pcap/x", 404, "not a directory"),
            ("sub/missing.pcap", 404, "no such file"),
            ("sub/../../secret.pcap", 403, "outside the pcap directory"),
            ("a\0b", 403, "NUL"),
        ]:
            got, body = _post(api, path)
            assert (got, says in str(body["error"])) == (status, True), (path, body)
    finally:
        sock.close()
    assert ingest.queued() == 0
    assert _post(api, "sub/a.pcap")[0] == 202
    assert _post(api, str(pcaps / "sub" / ".." / "sub" / "a.pcap"))[0] == 202


def test_an_absolute_path_may_reach_the_directory_through_a_link_above_it(
        pcaps: Path, ingest: PcapIngest, tmp_path: Path) -> None:
    """--pcap-dir /srv/captures where /srv is a link: clients still name files
    /srv/captures/...; nothing below the directory is followed."""
    alias = tmp_path / "alias"
    alias.symlink_to(pcaps)
    api = Api(FakeAgent(), ingest=ingest, pcap_dir=alias)
    status, body = _post(api, str(alias / "demo.pcap"))
    assert status == 202 and _job(api, body["id"])["path"] == str(pcaps.resolve() / "demo.pcap")
    assert _post(api, str(tmp_path / "secret.pcap"))[0] == 403


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_queued_jobs_hold_their_file_until_read_or_dropped(pcaps: Path) -> None:
    ing = PcapIngest(max_queued=4, budget=0)
    api = Api(FakeAgent(), ingest=ing, pcap_dir=pcaps)
    before = _open_fds()
    _queue_behind_a_running_job(api, "small.pcap")
    assert _post(api, "small.pcap")[0] == 202
    assert _open_fds() >= before + 2  # one descriptor per queued job
    ing.close()  # the queued jobs fail, the running one stops
    _wait(lambda: _open_fds() <= before)
