"""Recording files: rotation by size and time with no byte lost, names that never collide,
a total size kept by deleting this run's oldest files, gzip/zstd files that inspect reads,
write faults in the middle of a rotation, and the flags (issue 14, item 2)."""

from __future__ import annotations

import errno
import gzip
import io
import os
import random
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from structlog.testing import capture_logs

from agent.cli.inspect import inspect_recording
from agent.cli.outputs import RunOutputs
from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record import (
    BackgroundWriter,
    NativeReader,
    NativeWriter,
    RecordedChunk,
    RecordFiles,
    RecordPolicy,
    Rotation,
    decoded,
    make_writer,
    parse_rotation,
)
from agent.sinks.record.files import numbered
from agent.sinks.record.format import MAGIC

KiB = 1024


def chunks(n: int, seed: int = 1) -> list[TrafficChunk]:
    """``n`` chunks of 10 flows, sizes 0..3000 bytes (one of 20 KiB), distinct contents."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        size = 20 * KiB if i == n // 2 else rnd.randrange(0, 3000)
        data = rnd.randbytes(size)
        out.append(TrafficChunk(data, f"192.0.2.1:{40000 + i % 10}", "198.51.100.2:80",
                                Direction.TO_OBSERVED, 1_700_000_000.0 + i, i % 10,
                                gap_bytes=i % 3))
    return out


def read_file(path: Path) -> tuple[list[RecordedChunk], NativeReader, str]:
    """Every record of one file (compressed or not), its reader, and the decoder's problem."""
    with path.open("rb") as f:
        src, dec = decoded(f)
        raw = src.read()
    assert raw.startswith(MAGIC), f"{path.name} does not start with the header"
    reader = NativeReader(io.BytesIO(raw))
    return list(reader), reader, dec.problem if dec else ""


def run_files(tmp: Path) -> list[Path]:
    """This directory's recording files in the order written (``rec.bin``, ``rec.1.bin``...)."""
    def order(p: Path) -> int:
        parts = p.name.split(".")
        return int(parts[1]) if parts[1].isdigit() else 0
    return sorted((p for p in tmp.iterdir() if p.name.startswith("rec")), key=order)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- flags and names


@pytest.mark.parametrize(("text", "want"), [
    ("256MiB", Rotation(256 << 20, None)), ("1h", Rotation(None, 3600.0)),
    ("1GiB,15m", Rotation(1 << 30, 900.0)), ("90s, 4K", Rotation(4096, 90.0)),
    ("1d", Rotation(None, 86400.0)), ("2min", Rotation(None, 120.0)),
])
def test_parse_rotation(text: str, want: Rotation) -> None:
    assert parse_rotation(text) == want


@pytest.mark.parametrize(("text", "why"), [
    ("100", "no unit"), ("1h,2h", "two durations"), ("1M,2M", "two sizes"),
    ("0.5s", "every second"), ("100B", "1024 bytes"), ("1h,", "SIZE,DURATION"),
    ("soon", "not a size"),
])
def test_parse_rotation_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_rotation(text)


def test_numbered_names_keep_the_compression_suffix_last() -> None:
    assert numbered(Path("/d/rec.bin"), 3) == Path("/d/rec.3.bin")
    assert numbered(Path("/d/rec.bin.gz"), 3) == Path("/d/rec.3.bin.gz")
    assert numbered(Path("/d/rec.zst"), 1) == Path("/d/rec.1.zst")
    assert numbered(Path("/d/rec"), 2) == Path("/d/rec.2")


def test_names_never_collide_with_existing_files(tmp_path: Path) -> None:
    """Another run's rec.bin, rec.1.bin and rec.3.bin stay untouched: this run starts at
    rec.2.bin and rotates to rec.4.bin, rec.5.bin, ..."""
    theirs = {n: tmp_path / n for n in ("rec.bin", "rec.1.bin", "rec.3.bin")}
    for p in theirs.values():
        p.write_bytes(b"another run's")
    policy = RecordPolicy(Rotation(4 * KiB))
    with capture_logs():
        outs = RunOutputs(str(tmp_path / "rec.bin"), None, False, record_files=policy)
    assert isinstance(outs.record, RecordFiles)
    w = NativeWriter(outs.record)
    for c in chunks(40):
        w.write(c, c.data)
    w.flush()
    outs.finish(None)
    assert all(p.read_bytes() == b"another run's" for p in theirs.values())
    mine = sorted(set(tmp_path.iterdir()) - set(theirs.values()))
    names = {p.name for p in mine}
    assert "rec.2.bin" in names and "rec.4.bin" in names and len(names) == len(mine) > 3
    assert sum(len(read_file(p)[0]) for p in mine) == 40


def test_strftime_names_follow_the_clock(tmp_path: Path) -> None:
    clock = Clock(time.mktime((2026, 3, 1, 10, 59, 0, 0, 0, -1)))
    files = RecordFiles(str(tmp_path / "rec-%Y%m%d-%H%M.bin"), RecordPolicy(Rotation(None, 60)),
                        clock=clock)
    w = NativeWriter(files)
    for minute in range(3):
        clock.now += 60 if minute else 0
        c = chunks(1)[0]
        w.write(c, c.data)
    w.flush()
    files.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rec-20260301-1059.bin", "rec-20260301-1100.bin", "rec-20260301-1101.bin"]


# ---------------------------------------------------------------- rotation by size


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
def test_size_rotation_loses_no_byte(tmp_path: Path, compress: str | None) -> None:
    """Every record is in exactly one file, in order; every file starts with the header and
    reads alone; a plain file stays within the size unless one record is larger."""
    limit = 8 * KiB
    files = RecordFiles(str(tmp_path / "rec.bin"), RecordPolicy(Rotation(limit), None, compress))
    w = NativeWriter(files)
    sent = chunks(300)
    for i, c in enumerate(sent):
        w.write(c, c.data)
        if i % 50 == 49:
            w.flow_end(FlowEnd(i % 10, "fin", 0))
    w.flush()
    files.close()
    got: list[RecordedChunk] = []
    paths = run_files(tmp_path)
    suffix = {None: ".bin", "gzip": ".bin.gz", "zstd": ".bin.zst"}[compress]
    assert all(p.name.endswith(suffix) for p in paths) and len(paths) > 10
    for p in paths:
        recs, reader, problem = read_file(p)
        assert reader.problems() == [] and problem == "" and recs
        if compress is None:
            assert p.stat().st_size <= limit or len(recs) == 1
        else:
            assert p.stat().st_size <= 1.25 * limit or len(recs) == 1  # estimated
        got += recs
    data = [r for r in got if r.kind == "chunk"]
    assert [(r.flow_id, r.data, r.gap_bytes) for r in data] == [
        (c.flow_id, c.data, c.gap_bytes) for c in sent]
    assert sum(r.kind == "end" for r in got) == 6
    stats = w.stats()
    assert stats["records"] == 300 and stats["recorded_bytes"] == sum(len(c.data) for c in sent)
    assert stats["record_files_rotated"] == len(paths) - 1


def test_a_file_is_complete_after_each_rotation(tmp_path: Path) -> None:
    """A closed gzip file is a whole .gz (gzip reads it to its end) before the run ends."""
    files = RecordFiles(str(tmp_path / "rec.bin"), RecordPolicy(Rotation(4 * KiB), None, "gzip"))
    w = NativeWriter(files)
    for c in chunks(60):
        w.write(c, c.data)
    closed = run_files(tmp_path)[:-1]  # the last one is still being written
    assert closed
    for p in closed:
        assert gzip.decompress(p.read_bytes()).startswith(MAGIC)
    files.close()


# ---------------------------------------------------------------- rotation by time


def test_time_rotation_follows_aligned_slots(tmp_path: Path) -> None:
    start = time.mktime((2026, 3, 1, 10, 59, 30, 0, 0, -1))
    clock = Clock(start)
    files = RecordFiles(str(tmp_path / "rec.bin"), RecordPolicy(Rotation(None, 3600)),
                        clock=clock)
    w = NativeWriter(files)
    sent = chunks(6)
    at = [0, 20, 29.9, 31, 3000, 3700]  # 11:00 and 12:00 are slot ends
    for c, dt in zip(sent, at, strict=True):
        clock.now = start + dt
        w.write(c, c.data)
    w.flush()
    files.close()
    per_file = [[r.data for r in read_file(p)[0]] for p in run_files(tmp_path)]
    assert per_file == [[c.data for c in sent[:3]], [c.data for c in sent[3:5]],
                        [sent[5].data]]


def test_idle_tick_closes_the_file_when_its_slot_ends(tmp_path: Path) -> None:
    """No record after the slot's end: the tick closes the file (complete on disk); the next
    record opens a new one; no empty file is ever made."""
    start = time.mktime((2026, 3, 1, 10, 59, 0, 0, 0, -1))
    clock = Clock(start)
    files = RecordFiles(str(tmp_path / "rec.bin"), RecordPolicy(Rotation(None, 60), None,
                                                                "gzip"), clock=clock)
    w = NativeWriter(files)
    c = chunks(1)[0]
    w.write(c, c.data)
    wait = w.tick()
    assert wait is not None and 0 < wait <= 60
    clock.now = start + 61
    assert w.tick() is None and files.current is None
    (first,) = run_files(tmp_path)
    assert gzip.decompress(first.read_bytes()).startswith(MAGIC)
    clock.now = start + 400  # several idle slots: no file for them
    assert w.tick() is None
    w.write(c, c.data)
    w.flush()
    files.close()
    assert [len(read_file(p)[0]) for p in run_files(tmp_path)] == [1, 1]


def test_background_writer_writes_compressed_records_within_a_second(tmp_path: Path) -> None:
    files = RecordFiles(str(tmp_path / "rec.bin"), RecordPolicy(None, None, "gzip"))
    bg = BackgroundWriter(NativeWriter(files))
    sent = chunks(5)
    for c in sent:
        bg.write(c, c.data)
    path = tmp_path / "rec.bin.gz"
    deadline = time.monotonic() + 3
    recs: list[RecordedChunk] = []
    while time.monotonic() < deadline and len(recs) < 5:
        time.sleep(0.1)
        if path.stat().st_size:
            recs = read_file(path)[0]
    assert [r.data for r in recs] == [c.data for c in sent]  # before any flush or close
    bg.close()
    files.close()
    assert len(gzip.decompress(path.read_bytes())) > 0


# ---------------------------------------------------------------- total size


def test_max_total_deletes_only_this_runs_oldest_files(tmp_path: Path) -> None:
    theirs = tmp_path / "rec.bin"
    theirs.write_bytes(b"x" * 100_000)  # another run's, larger than the limit
    limit, total = 8 * KiB, 32 * KiB
    policy = RecordPolicy(Rotation(limit), total)
    with capture_logs() as logs:
        outs = RunOutputs(str(theirs), None, False, record_files=policy)
        assert isinstance(outs.record, RecordFiles)
        w = NativeWriter(outs.record)
        sent = chunks(200)
        for c in sent:
            w.write(c, c.data)
        w.flush()
        outs.finish(None)
    assert theirs.read_bytes() == b"x" * 100_000
    mine = [p for p in run_files(tmp_path) if p != theirs]
    assert sum(p.stat().st_size for p in mine) <= total + 20 * KiB  # + one (large) record
    stats = w.stats()
    assert stats["record_files_deleted"] > 0
    assert stats["record_files_rotated"] + 1 == len(mine) + stats["record_files_deleted"]
    kept = [r.data for p in mine for r in read_file(p)[0]]
    assert kept == [c.data for c in sent[len(sent) - len(kept):]]  # the newest, in order
    assert "rec.1.bin" not in {p.name for p in mine}  # the oldest went first
    assert any(e["event"].startswith("deleted the oldest") for e in logs)


# ---------------------------------------------------------------- compressed files, inspect


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_inspect_reads_compressed_files_and_reports_a_cut(
        tmp_path: Path, compress: str, capsys: pytest.CaptureFixture[str]) -> None:
    files = RecordFiles(str(tmp_path / "rec.bin"), RecordPolicy(None, None, compress))
    w = NativeWriter(files)
    for c in chunks(20):
        w.write(c, c.data)
    w.flush()  # a complete member / frame ...
    for c in chunks(5, seed=2):
        w.write(c, c.data)
    w.flush()  # ... and a second one after it
    files.close()
    (path,) = run_files(tmp_path)
    assert inspect_recording(path, "jsonl") == 0
    assert len(capsys.readouterr().out.splitlines()) == 25
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[:-7])
    assert inspect_recording(cut, "jsonl") == 3
    out, err = capsys.readouterr()
    assert 20 <= len(out.splitlines()) <= 25 and "cut short" in err


@pytest.mark.parametrize(("fmt", "says"), [("pcapng", "pcapng recording.*tshark"),
                                           ("jsonl", "JSON-lines recording")])
def test_inspect_names_a_recording_of_another_format(tmp_path: Path, fmt: str,
                                                      says: str) -> None:
    from agent.sinks.record import RecordError

    files = RecordFiles(str(tmp_path / f"rec.{fmt}"), RecordPolicy(None, None, "gzip"))
    w = make_writer(files, fmt)
    c = chunks(2)[1]
    w.write(c, c.data)
    w.flush()
    files.close()
    with pytest.raises(RecordError, match=says):
        inspect_recording(tmp_path / f"rec.{fmt}.gz")


def test_jsonl_rotation_keeps_whole_lines(tmp_path: Path) -> None:
    import json

    files = RecordFiles(str(tmp_path / "rec.jsonl"), RecordPolicy(Rotation(4 * KiB)))
    w = make_writer(files, "jsonl")
    sent = chunks(40)
    for c in sent:
        w.write(c, c.data)
    w.flush()
    files.close()
    paths = run_files(tmp_path)
    assert len(paths) > 5
    lines = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    assert [x["flow"] for x in lines] == [c.flow_id for c in sent]


# ---------------------------------------------------------------- faults


class Full(io.BytesIO):
    """A file with room for ``room`` bytes (no descriptor), then ENOSPC; keeps its bytes."""

    def __init__(self, name: str, room: int) -> None:
        super().__init__()
        self.name, self.room, self.kept = name, room, b""

    def write(self, b: Any) -> int:
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = super().write(b)
        self.kept = self.getvalue()
        return n


class FakeFiles(RecordFiles):
    """Files made by ``make(n)`` instead of on disk (n = 0, 1, ...)."""

    def __init__(self, make: Callable[[int], BinaryIO]) -> None:
        super().__init__("rec.bin", RecordPolicy(Rotation(4 * KiB)))
        self.made: list[BinaryIO] = []
        self._make = make

    def next_file(self) -> BinaryIO:
        f = self._make(len(self.made))
        self.made.append(f)
        self.current = f
        return f


def errors(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["log_level"] == "error"]


@pytest.mark.parametrize("where", ["write", "create"])
def test_disk_full_in_the_middle_of_rotation(where: str) -> None:
    """The third file fills up (or cannot be made): one error line names it, every later
    record is counted lost, the counters say exactly what the files hold."""
    def make(n: int) -> BinaryIO:
        if n == 2 and where == "create":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "rec.2.bin")
        return Full(f"rec.{n}.bin", 2 * KiB if n == 2 else 1 << 20)

    files = FakeFiles(make)
    w = NativeWriter(files)
    sent = chunks(100)
    with capture_logs() as logs:
        for c in sent:
            w.write(c, c.data)
        w.flush()
    (error,) = errors(logs)
    assert error["file"] == "rec.2.bin" and error["errno"] == "ENOSPC"
    stats = w.stats()
    assert stats["record_errors"] == 1 and stats["records"] > 0
    assert stats["records"] + stats["record_failed_records"] == 100
    held = [r for f in files.made for r in NativeReader(io.BytesIO(f.kept))]  # type: ignore[attr-defined]
    assert [r.data for r in held] == [c.data for c in sent[: len(held)]]
    assert len(held) == stats["records"]


def test_background_close_finishes_the_last_file(tmp_path: Path) -> None:
    """What the end of a run (SIGTERM included) does: the writer thread flushes and ends the
    compressed stream, then the file is closed: a whole .gz."""
    files = RecordFiles(str(tmp_path / "rec.bin"), RecordPolicy(Rotation(4 * KiB), None, "gzip"))
    bg = BackgroundWriter(NativeWriter(files))
    for c in chunks(50):
        bg.write(c, c.data)
    bg.close()
    files.close()
    assert all(gzip.decompress(p.read_bytes()).startswith(MAGIC) for p in run_files(tmp_path))
    assert sum(len(read_file(p)[0]) for p in run_files(tmp_path)) == 50
