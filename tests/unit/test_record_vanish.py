"""Recordings that vanish are noticed (issue 19, item 5): a recording file unlinked, moved or
replaced, or its directory removed, while it is written is noticed within a second (fstat of
the open file against stat of its path, at most once a second, on the writer's thread): one
error line names the file, the records that went into a deleted file since it was last seen in
place are counted lost (``vanished``), the recording goes on in a new file at the same path if
its directory is still there (else it fails, and later records are lost as ``write_failed``),
and the run is degraded. Streams, FIFOs and devices are not checked; our own rotation and
``--record-max-total`` deletions are not vanishing.

Real files, real unlink/rename/rmdir, in pytest's temporary directory."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from structlog.testing import capture_logs

from agent import metrics
from agent.cli.summary import degradation
from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record import (
    BackgroundWriter,
    FileWriter,
    NativeReader,
    NativeWriter,
    RecordedChunk,
    RecordFiles,
    RecordPolicy,
    Rotation,
    decoded,
    make_writer,
)
from agent.sinks.record import files as record_files

VANISHED_RECORDS = metrics.key("mirror_agent_record_records_lost_total", reason="vanished")
VANISHED_BYTES = metrics.key("mirror_agent_record_lost_bytes_total", reason="vanished")
FILES_VANISHED = "mirror_agent_record_files_vanished_total"
DROPPED_VANISHED = metrics.key("mirror_agent_record_connections_dropped_total",
                               reason="vanished")
SIZE = 100  # bytes of data per chunk
Every = Callable[[float], None]


def chunk(flow: int, i: int, size: int = SIZE) -> TrafficChunk:
    return TrafficChunk(bytes([65 + (flow + i) % 26]) * size, f"192.0.2.1:{40000 + flow}",
                        "198.51.100.2:80", Direction.TO_OBSERVED, 1_700_000_000.0 + i, flow)


def write(w: FileWriter | BackgroundWriter, flow: int, n: int, size: int = SIZE) -> None:
    for i in range(n):
        c = chunk(flow, i, size)
        w.write(c, c.data)


def read_native(path: Path) -> list[RecordedChunk]:
    """The chunk records of one file (compressed or not); the file must be whole."""
    with path.open("rb") as f:
        src, _ = decoded(f)
        reader = NativeReader(io.BytesIO(src.read()))
        out = [r for r in reader if r.kind == "chunk"]
    assert reader.problems() == [], path
    return out


def errors(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["log_level"] == "error"]


def snapshot(stats: dict[str, int]) -> dict[str, float]:
    """What the registry makes of a record sink's stats (every key declared)."""
    assert metrics.undeclared({"record": stats}) == []
    return metrics.snapshot(metrics.new_registry(lambda: {"record": stats}))


@pytest.fixture
def every(monkeypatch: pytest.MonkeyPatch) -> Iterator[Every]:
    """``every(seconds)``: how often the file is checked from now on (0: at every chance;
    the default here is never, but for a flush, until a test says so)."""
    def set_every(seconds: float) -> None:
        monkeypatch.setattr(record_files, "CHECK_EVERY", seconds)
    set_every(3600.0)
    yield set_every


def test_records_written_into_an_unlinked_file_are_lost_as_vanished(
        tmp_path: Path, every: Every) -> None:
    path = tmp_path / "rec.bin"
    with path.open("wb") as f, capture_logs() as logs:
        w = NativeWriter(f)
        write(w, 1, 4)
        w.flow_end(FlowEnd(1, "fin"))
        w.flush()  # a flush checks: the file is in place, its records are written
        assert w.stats()["records"] == 4 and w.stats()["connections_completed"] == 1
        path.unlink()
        write(w, 2, 3)
        w.tick()  # written, into the unlinked file (not checked yet)
        assert not path.exists()
        every(0)
        w.tick()  # checked: gone
        assert path.exists() and path.stat().st_size == 0  # recreated, empty so far
        w.flow_end(FlowEnd(2, "fin"))
        write(w, 3, 2)
        w.flow_end(FlowEnd(3, "fin"))
        w.close()
    stats = w.stats()
    assert stats["records"] == 6 and stats["recorded_bytes"] == 6 * SIZE
    assert stats["record_vanished_records"] == 3
    assert stats["record_vanished_bytes"] == 3 * SIZE
    assert stats["record_files_vanished"] == 1 and "record_errors" not in stats
    assert (stats["connections"], stats["connections_completed"]) == (3, 2)
    assert stats["connections_dropped_vanished"] == 1 and stats["connections_in_flight"] == 0
    (error,) = errors(logs)
    assert error["file"] == str(path) and error["lost_records"] == 3
    assert error["lost_bytes"] == 3 * SIZE
    assert [r.flow_id for r in read_native(path)] == [3, 3]  # the new file: whole, readable
    snap = snapshot(stats)
    assert snap[VANISHED_RECORDS] == 3 and snap[VANISHED_BYTES] == 3 * SIZE
    assert snap[FILES_VANISHED] == 1 and snap[DROPPED_VANISHED] == 1
    why = degradation(snap)
    assert any("vanished" in phrase for phrase in why), why


@pytest.mark.parametrize("fmt", ["native", "jsonl", "pcapng"])
def test_records_buffered_when_the_file_vanished_go_to_the_new_file_after_its_header(
        tmp_path: Path, every: Every, fmt: str) -> None:
    path = tmp_path / "rec.out"
    with path.open("wb") as f, capture_logs() as logs:
        w = make_writer(f, fmt)
        write(w, 1, 2)
        w.flush()
        path.unlink()
        write(w, 1, 3)  # buffered, not written yet
        every(0)
        w.flush()  # checked before the write: they go to the new file
    stats = w.stats()
    assert stats["records"] == 5 and stats["record_files_vanished"] == 1
    assert "record_vanished_records" not in stats  # nothing went into the deleted file
    assert len(errors(logs)) == 1
    data = path.read_bytes()
    assert data.startswith(w.preamble)
    if fmt == "native":
        assert len(read_native(path)) == 3
    elif fmt == "jsonl":
        assert len(data.splitlines()) == 3


def test_a_file_moved_away_keeps_its_records_and_the_path_starts_afresh(
        tmp_path: Path, every: Every) -> None:
    path, moved = tmp_path / "rec.bin", tmp_path / "moved.bin"
    with path.open("wb") as f, capture_logs() as logs:
        w = NativeWriter(f)
        write(w, 1, 2)
        w.flush()
        write(w, 1, 2)
        w.tick()  # written, not checked yet
        path.rename(moved)
        every(0)
        write(w, 2, 1)
        w.flush()
    stats = w.stats()
    assert stats["records"] == 5 and stats["record_files_vanished"] == 1
    assert "record_vanished_records" not in stats  # they are in the moved file
    (error,) = errors(logs)
    assert error["file"] == str(path) and error["lost_records"] == 0
    assert len(read_native(moved)) == 4 and len(read_native(path)) == 1


def test_a_removed_directory_fails_the_recording_and_later_records_are_lost(
        tmp_path: Path, every: Every) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    path = folder / "rec.bin"
    with path.open("wb") as f, capture_logs() as logs:
        w = NativeWriter(f)
        write(w, 1, 2)
        w.flush()
        write(w, 2, 2)
        w.tick()  # into the file, not checked yet
        shutil.rmtree(folder)
        every(0)
        write(w, 3, 2)  # buffered
        w.flush()  # gone: the 2 written are vanished, the 2 buffered cannot be written
        write(w, 4, 1)
        w.close()
    stats = w.stats()
    assert stats["records"] == 2 and stats["record_files_vanished"] == 1
    assert stats["record_vanished_records"] == 2 and stats["record_errors"] == 1
    assert stats["record_failed_records"] == 3
    assert stats["connections_dropped_vanished"] == 1
    assert stats["connections_dropped_write_failed"] == 2
    vanished, failed = errors(logs)
    assert vanished["file"] == failed["file"] == str(path)
    assert vanished["lost_records"] == 2 and failed["errno"] == "ENOENT"
    assert not folder.exists()  # nothing was made in its place


def test_the_writer_thread_notices_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "rec.bin"
    with path.open("wb") as f, capture_logs() as logs:
        bw = BackgroundWriter(NativeWriter(f))
        write(bw, 1, 3)
        deadline = time.monotonic() + 5
        while path.stat().st_size == 0:  # the idle tick writes them
            assert time.monotonic() < deadline
            time.sleep(0.01)
        path.unlink()
        gone = time.monotonic()
        while not path.exists():
            assert time.monotonic() - gone < 2, "not noticed"
            time.sleep(0.01)
        noticed = time.monotonic() - gone
        write(bw, 2, 2)
        bw.close()
    assert noticed < 1.3  # at most a second, and the time to look
    stats = bw.stats()
    assert stats["record_files_vanished"] == 1
    assert stats["records"] + stats.get("record_vanished_records", 0) == 5
    assert stats["records"] >= 2
    assert [e["file"] for e in errors(logs)] == [str(path)]
    assert [r.flow_id for r in read_native(path)][-2:] == [2, 2]


def test_the_check_runs_at_most_once_a_second(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    looks = []
    check = record_files.FileWatch.check

    def counted(self: record_files.FileWatch) -> Any:
        looks.append(time.monotonic())
        return check(self)

    monkeypatch.setattr(record_files.FileWatch, "check", counted)
    waits = []
    with (tmp_path / "rec.bin").open("wb") as f:
        w = NativeWriter(f)
        start = time.monotonic()
        for i in range(300):
            write(w, i, 1)
            wait = w.tick()
            assert wait is not None
            waits.append(wait)
        elapsed = time.monotonic() - start
        assert len(looks) <= 1 + int(elapsed)
        assert max(waits) <= 1.0  # an idle writer thread looks again within a second
        w.flush()
    assert w.stats()["records"] == 300


def test_our_own_rotation_and_max_total_deletions_are_not_vanishing(
        tmp_path: Path, every: Every) -> None:
    every(0)
    files = RecordFiles(str(tmp_path / "rec.bin"),
                        RecordPolicy(Rotation(max_bytes=1024), max_total=4096))
    w = NativeWriter(files)
    with capture_logs() as logs:
        for i in range(60):
            write(w, i % 5, 1, 200)
            w.tick()
        w.close()
    files.close()
    stats = w.stats()
    assert stats["records"] == 60 and "record_files_vanished" not in stats
    assert stats["record_files_rotated"] > 5 and stats["record_files_deleted"] > 0
    assert errors(logs) == []


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_a_compressed_rotated_file_that_vanishes_starts_again_at_its_name(
        tmp_path: Path, every: Every, compress: str) -> None:
    files = RecordFiles(str(tmp_path / "rec.bin"),
                        RecordPolicy(Rotation(seconds=3600), compress=compress))
    w = NativeWriter(files)
    with capture_logs() as logs:
        write(w, 1, 3)
        w.flush()
        (current,) = tmp_path.iterdir()
        current.unlink()
        every(0)
        write(w, 2, 2)
        w.close()
    files.close()
    stats = w.stats()
    assert stats["records"] == 5 and stats["record_files_vanished"] == 1
    assert stats["record_files_rotated"] == 0  # the same file, made again: no rotation
    assert [e["file"] for e in errors(logs)] == [str(current)]
    assert [p.name for p in tmp_path.iterdir()] == [current.name]
    assert [r.flow_id for r in read_native(current)] == [2, 2]


def test_streams_fifos_and_devices_are_not_checked(tmp_path: Path, every: Every) -> None:
    every(0)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def drain() -> None:
        with fifo.open("rb") as r:
            while part := r.read(65536):
                got.extend(part)

    reader = threading.Thread(target=drain)
    reader.start()
    outs: list[BinaryIO] = [open(fifo, "wb"), open(os.devnull, "wb"),  # noqa: SIM115
                            open("/dev/stdout", "wb")]  # noqa: SIM115
    fifo.unlink()  # still open: the FIFO goes on, its name is no longer there
    with capture_logs() as logs:
        for out in outs:
            w = make_writer(out, "jsonl")
            write(w, 1, 2, 8)
            w.flush()
            write(w, 1, 1, 8)
            w.close()
            out.close()
            stats = w.stats()
            assert stats["records"] == 3 and "record_files_vanished" not in stats, out.name
    reader.join(5)
    assert got.count(b"\n") == 3
    assert errors(logs) == []
