"""Faults stay local: a recording that cannot be written costs that recording only, counted
exactly; output files are never clobbered; the summary comes out on every way out."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import agent.mirror
from agent.capture.channel import ChannelSource
from agent.config import MirrorConfig
from agent.mirror import TrafficMirror
from agent.model import Direction, FlowEnd, TrafficChunk
from agent.outputs import OutputError, open_output
from agent.sinks.record import BackgroundWriter, NativeReader, NativeWriter
from tests.unit.segments import Conversation
from tests.unit.test_mirror_contracts import Sink, sink  # noqa: F401  (a fixture)

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
FLOWS = 30


def request(i: int) -> bytes:
    return f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + b"x" * 200


def traffic() -> ChannelSource:
    """FLOWS connections, one request each."""
    src = ChannelSource()
    for i in range(FLOWS):
        c = Conversation(client=(bytes([192, 0, 2, 1]), 40000 + i))
        body = request(i)
        for seg in [*c.handshake(), c.seg(True, 0, body), *c.fins(len(body), 0)]:
            src.put(seg)
    src.end()
    return src


class FullDisk(io.BytesIO):
    """A file (no descriptor) on a disk with room for ``room`` bytes: then ENOSPC."""

    name = "fake.bin"

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, b: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)

    def close(self) -> None:
        self.kept = self.getvalue()
        super().close()


def errors(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["log_level"] == "error"]


def assert_exact(stats: dict[str, int], written: bytes) -> None:
    """The counters add up, and say exactly what the file holds."""
    total = sum(len(request(i)) for i in range(FLOWS))
    assert stats["records"] + stats["record_failed_records"] == FLOWS
    assert stats["recorded_bytes"] + stats["record_failed_bytes"] == total
    chunks = [r for r in NativeReader(io.BytesIO(written)) if r.kind == "chunk"]
    assert len(chunks) == stats["records"]
    assert sum(len(r.data) for r in chunks) == stats["recorded_bytes"]


@pytest.mark.parametrize("background", [False, True], ids=["offline", "live-writer"])
def test_full_disk_costs_the_recording_only(sink: Sink, background: bool) -> None:  # noqa: F811
    out = FullDisk(room=2000)
    mirror = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=sink.addr, writer=out,
                                        record_in_background=background))
    with capture_logs() as logs:
        mirror.run(traffic())  # no exception: forwarding and the rest went on
    stats = mirror.stats()
    assert stats["record_errors"] == 1 and 0 < stats["records"] < FLOWS
    assert_exact(stats, out.kept)
    (error,) = errors(logs)
    assert error["file"] == "fake.bin" and error["errno"] == "ENOSPC"
    assert error["error"] == "No space left on device"
    assert out.closed
    assert sorted(sink.received) == sorted(request(i) for i in range(FLOWS))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_device_that_is_always_full() -> None:
    with open("/dev/full", "wb") as out, capture_logs() as logs:
        mirror = TrafficMirror(MirrorConfig(observed_port=8080, writer=out))
        mirror.run(traffic())
    stats = mirror.stats()
    assert (stats["records"], stats["record_failed_records"]) == (0, FLOWS)
    (error,) = errors(logs)
    assert error["file"] == "/dev/full" and error["error"] == "No space left on device"


def test_partial_write_is_counted_exactly() -> None:
    """A descriptor that takes part of a write and then fails (a full non-blocking pipe):
    the counters say exactly which records are whole in what it took."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    out = open(w, "wb")  # noqa: SIM115
    writer = NativeWriter(out)
    chunks = [TrafficChunk(bytes([i % 256]) * 3000, "192.0.2.1:1", "192.0.2.2:80",
                           Direction.TO_OBSERVED, 1.0, i) for i in range(100)]  # > a pipe
    with capture_logs() as logs:
        for c in chunks:
            writer.write(c, c.data)
        writer.flow_end(FlowEnd(1, "fin"))
        writer.flush()
    got = b""
    with contextlib.suppress(BlockingIOError):
        while part := os.read(r, 1 << 16):
            got += part
    os.close(r)
    stats = writer.stats()
    assert stats["record_errors"] == 1 and 0 < stats["records"] < 100
    assert stats["records"] + stats["record_failed_records"] == 100
    reader = NativeReader(io.BytesIO(got))
    read = list(reader)
    assert len(read) == stats["records"] and reader.skipped == 0
    assert [x.data for x in read] == [c.data for c in chunks[: len(read)]]
    assert errors(logs)[0]["errno"] == "EAGAIN" and len(errors(logs)) == 1


def test_write_func_errors_still_abort_run() -> None:
    def fail(_chunk: TrafficChunk, _data: bytes) -> None:
        raise OSError(errno.ENOSPC, "user writer full")

    with pytest.raises(OSError, match="user writer full"):
        TrafficMirror(MirrorConfig(observed_port=8080, write_func=fail)).run(traffic())


def test_recorded_bytes_do_not_count_dropped_records(monkeypatch: pytest.MonkeyPatch) -> None:
    class Stalled(io.BytesIO):
        """A disk that stalls for its first write, long enough for the queue to overflow."""

        gate = threading.Event()

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.gate.wait(10)
            return super().write(b)

    small = functools.partial(BackgroundWriter, max_bytes=2 * len(request(0)))
    monkeypatch.setattr(agent.mirror, "BackgroundWriter", small)
    out = Stalled()
    threading.Timer(0.5, Stalled.gate.set).start()
    mirror = TrafficMirror(MirrorConfig(observed_port=8080, writer=out,
                                        record_in_background=True))
    mirror.run(traffic())
    stats = mirror.stats()
    total = sum(len(request(i)) for i in range(FLOWS))
    assert stats["record_dropped_records"] > 0
    assert stats["recorded_bytes"] + stats["record_dropped_bytes"] == total
    chunks = [r for r in NativeReader(io.BytesIO(out.getvalue())) if r.kind == "chunk"]
    assert (len(chunks), sum(len(r.data) for r in chunks)) == (
        stats["records"], stats["recorded_bytes"])


def test_background_writer_counts_written_and_dropped_apart() -> None:
    out = io.BytesIO()
    w = BackgroundWriter(NativeWriter(out), max_bytes=0)
    w.write(TrafficChunk(b"", "a:1", "b:2", Direction.TO_OBSERVED, 1.0, 7), b"")
    w.write(TrafficChunk(b"lost", "a:1", "b:2", Direction.TO_OBSERVED, 1.0, 7), b"lost")
    w.flush()
    assert w.stats() == {"records": 1, "recorded_bytes": 0, "record_dropped_records": 1,
                         "record_dropped_bytes": 4}


# ------------------------------------------------------------------ output paths


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    rec = tmp_path / "rec.bin"
    rec.write_bytes(b"precious")
    (tmp_path / "rec.1.bin").write_bytes(b"")  # taken (as by a run starting at once)
    with capture_logs() as logs:
        f = open_output(rec, "recording")
    f.close()
    assert f.name == str(tmp_path / "rec.2.bin") and rec.read_bytes() == b"precious"
    (warning,) = logs
    assert warning["new"] == f.name and warning["log_level"] == "warning"
    with open_output(rec, "recording", overwrite=True) as g:
        assert g.name == str(rec)
    assert rec.read_bytes() == b""


def test_an_empty_file_or_a_device_is_written_in_place(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    with open_output(empty, "recording") as f:
        f.write(b"x")
    assert empty.read_bytes() == b"x"
    with open_output(Path("/dev/null"), "recording") as f:
        assert f.name == "/dev/null"


@pytest.mark.parametrize("path,needle", [
    ("{tmp}", "is a directory"),
    ("{tmp}/missing/rec.bin", "does not exist"),
])
def test_unusable_output_paths(tmp_path: Path, path: str, needle: str) -> None:
    with pytest.raises(OutputError, match=needle):
        open_output(Path(path.format(tmp=tmp_path)), "recording")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, "offline", str(DEMO), "--port", "8080", *args],
                          capture_output=True, text=True)


def test_cli_keeps_earlier_outputs(tmp_path: Path) -> None:
    rec, stats = tmp_path / "rec.bin", tmp_path / "stats.json"
    assert cli("--record", str(rec), "--stats-json", str(stats)).returncode == 0
    first = rec.read_bytes(), stats.read_text()
    again = cli("--record", str(rec), "--stats-json", str(stats))
    assert again.returncode == 0
    assert (rec.read_bytes(), stats.read_text()) == first
    assert (tmp_path / "rec.1.bin").read_bytes() == first[0]
    assert json.loads((tmp_path / "stats.1.json").read_text()) == json.loads(first[1])
    assert again.stderr.count("writing a new file instead") == 2
    assert cli("--record", str(rec), "--overwrite").returncode == 0
    assert not (tmp_path / "rec.2.bin").exists()


@pytest.mark.parametrize("flag", ["--record", "--stats-json"])
@pytest.mark.parametrize("where", ["dir", "missing"])
def test_cli_checks_every_output_path_first(tmp_path: Path, flag: str, where: str) -> None:
    bad = str(tmp_path) if where == "dir" else str(tmp_path / "no" / "x")
    other = "--stats-json" if flag == "--record" else "--record"
    res = cli(flag, bad, other, str(tmp_path / "other"))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [res.stderr.strip()] and bad in res.stderr
    assert not (tmp_path / "other").exists()  # nothing was made before the check


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_cli_recording_fault_exits_3_with_the_summary(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    res = cli("--record", "/dev/full", "--stats-json", str(stats))
    assert res.returncode == 3, res.stderr
    lines = res.stderr.splitlines()
    errs = [json.loads(ln) for ln in lines if ln.startswith("{") and '"error"' in ln]
    assert len(errs) == 1 and errs[0]["file"] == "/dev/full"
    assert "mirror-agent summary:" in res.stderr
    assert lines[-1].startswith("mirror-agent: degraded: 1 recording(s) failed")
    s = json.loads(stats.read_text())
    assert s["record_errors"] == 1 and s["records"] == 0 and s["record_failed_records"] == 7


def test_summary_comes_out_before_a_fatal_error(tmp_path: Path) -> None:
    (tmp_path / "boom.py").write_text(
        "def handle(chunk):\n    raise RuntimeError('hook exploded')\n")
    stats = tmp_path / "stats.json"
    res = subprocess.run([*AGENT, "offline", str(DEMO), "--port", "8080", "--hook",
                          "boom:handle", "--stats-json", str(stats)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{Path.cwd()}"})
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert "mirror-agent summary:" in lines
    assert lines[-1] == "mirror-agent: failed: RuntimeError: hook exploded"
    assert lines.index("mirror-agent summary:") < len(lines) - 1
    assert json.loads(stats.read_text())["source_frames"] > 0
