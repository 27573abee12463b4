"""Faults stay local: a recording that cannot be written costs that recording only, counted
exactly; output files are never clobbered; the summary comes out on every way out."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import agent.mirror.driver
from agent.cli.configure import mirror_config
from agent.cli.layers import parse_options
from agent.cli.outputs import OutputError, open_output
from agent.cli.run import run_pipeline
from agent.cli.summary import degradation, format_summary
from agent.metrics import key
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record import BackgroundWriter, NativeReader, NativeWriter
from agent.sources.channel import ChannelSource
from tests.unit.segments import Conversation
from tests.unit.test_mirror_contracts import Sink, sink  # noqa: F401  (a fixture)

# Metrics (agent/metrics.py) this file reads from stats.
FORWARD_CONNECTIONS = "mirror_agent_forward_connections_total"
FORWARD_DROPPED_BYTES = "mirror_agent_forward_dropped_bytes_total"
FORWARD_CONNECTIONS_DROPPED = "mirror_agent_forward_connections_dropped_total"
MIRROR_CHUNKS = "mirror_agent_mirror_chunks_total"
MIRROR_FORWARD_LATE_BYTES = "mirror_agent_mirror_forward_late_bytes_total"
RECORD_ERRORS = "mirror_agent_record_errors_total"
RECORD_LOST_BYTES = "mirror_agent_record_lost_bytes_total"
RECORD_LOST_BYTES_QUEUE_FULL = key(
    "mirror_agent_record_lost_bytes_total", reason="queue_full")
RECORD_LOST_BYTES_WRITE_FAILED = key(
    "mirror_agent_record_lost_bytes_total", reason="write_failed")
RECORD_RECORDS = "mirror_agent_record_records_total"
RECORD_RECORDS_LOST = "mirror_agent_record_records_lost_total"
RECORD_RECORDS_LOST_QUEUE_FULL = key(
    "mirror_agent_record_records_lost_total", reason="queue_full")
RECORD_RECORDS_LOST_WRITE_FAILED = key(
    "mirror_agent_record_records_lost_total", reason="write_failed")
RECORD_WRITTEN_BYTES = "mirror_agent_record_written_bytes_total"
SOURCE_FRAMES = "mirror_agent_source_frames_total"

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


def assert_exact(stats: dict[str, float], written: bytes) -> None:
    """The counters add up, and say exactly what the file holds."""
    total = sum(len(request(i)) for i in range(FLOWS))
    assert stats[RECORD_RECORDS] + stats[RECORD_RECORDS_LOST_WRITE_FAILED] == FLOWS
    assert stats[RECORD_WRITTEN_BYTES] + stats[RECORD_LOST_BYTES_WRITE_FAILED] == total
    chunks = [r for r in NativeReader(io.BytesIO(written)) if r.kind == "chunk"]
    assert len(chunks) == stats[RECORD_RECORDS]
    assert sum(len(r.data) for r in chunks) == stats[RECORD_WRITTEN_BYTES]


@pytest.mark.parametrize("background", [False, True], ids=["offline", "live-writer"])
def test_full_disk_costs_the_recording_only(sink: Sink, background: bool) -> None:  # noqa: F811
    out = FullDisk(room=2000)
    mirror = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=sink.addr, writer=out,
                                        record_in_background=background))
    with capture_logs() as logs:
        mirror.run(traffic())  # no exception: forwarding and the rest went on
    stats = mirror.stats()
    assert stats[RECORD_ERRORS] == 1 and 0 < stats[RECORD_RECORDS] < FLOWS
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
    assert (stats[RECORD_RECORDS], stats[RECORD_RECORDS_LOST_WRITE_FAILED]) == (0, FLOWS)
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

    class Small(BackgroundWriter):
        def __init__(self, inner: NativeWriter, _budget: int = 0) -> None:
            super().__init__(inner, max_bytes=2 * len(request(0)))

    monkeypatch.setattr(agent.mirror.driver, "BackgroundWriter", Small)
    out = Stalled()
    threading.Timer(0.5, Stalled.gate.set).start()
    mirror = TrafficMirror(MirrorConfig(observed_port=8080, writer=out,
                                        record_in_background=True))
    mirror.run(traffic())
    stats = mirror.stats()
    total = sum(len(request(i)) for i in range(FLOWS))
    assert stats[RECORD_RECORDS_LOST_QUEUE_FULL] > 0
    assert stats[RECORD_WRITTEN_BYTES] + stats[RECORD_LOST_BYTES_QUEUE_FULL] == total
    chunks = [r for r in NativeReader(io.BytesIO(out.getvalue())) if r.kind == "chunk"]
    assert (len(chunks), sum(len(r.data) for r in chunks)) == (
        stats[RECORD_RECORDS], stats[RECORD_WRITTEN_BYTES])


def test_background_writer_counts_written_and_dropped_apart() -> None:
    out = io.BytesIO()
    w = BackgroundWriter(NativeWriter(out), max_bytes=0)
    w.write(TrafficChunk(b"", "a:1", "b:2", Direction.TO_OBSERVED, 1.0, 7), b"")
    w.write(TrafficChunk(b"lost", "a:1", "b:2", Direction.TO_OBSERVED, 1.0, 7), b"lost")
    w.flush()
    stats = w.stats()
    assert {k: v for k, v in stats.items() if not k.startswith("connections")} == {
        "records": 1, "recorded_bytes": 0, "record_dropped_records": 1,
        "record_dropped_bytes": 4}
    # its flow is one connection, dropped for the record the full queue refused
    assert (stats["connections"], stats["connections_dropped_queue_full"],
            stats["connections_in_flight"]) == (1, 1, 0)


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


def test_an_empty_file_is_not_shared(tmp_path: Path) -> None:
    """Every run makes its files empty at start: an empty file may be another run's."""
    empty = tmp_path / "rec.bin"
    empty.touch()
    with open_output(empty, "recording") as f:
        f.write(b"x")
    assert f.name == str(tmp_path / "rec.1.bin") and empty.read_bytes() == b""


def test_a_device_or_a_fifo_is_written_in_place(tmp_path: Path) -> None:
    with open_output(Path("/dev/null"), "recording") as f:
        assert f.name == "/dev/null"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it to write returns
    try:
        with open_output(fifo, "recording") as f:
            f.write(b"x")
        assert f.name == str(fifo) and os.read(reader, 10) == b"x"
    finally:
        os.close(reader)
    assert list(tmp_path.iterdir()) == [fifo]


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
    def steady(text: str) -> dict[str, object]:  # the memory guard's RSS readings vary
        return {k: v for k, v in json.loads(text).items()
                if not k.startswith("mirror_agent_memory_")}

    assert steady((tmp_path / "stats.1.json").read_text()) == steady(first[1])
    assert again.stderr.count("writing a new file instead") == 2
    assert cli("--record", str(rec), "--overwrite").returncode == 0
    assert not (tmp_path / "rec.2.bin").exists()


def test_cli_never_shares_a_file_another_run_made(tmp_path: Path) -> None:
    """Empty files, as a run that just started leaves them: the next run with the same
    paths writes files of its own."""
    rec, stats = tmp_path / "rec.bin", tmp_path / "stats.json"
    rec.touch()
    stats.touch()
    res = cli("--record", str(rec), "--stats-json", str(stats))
    assert res.returncode == 0, res.stderr
    assert rec.read_bytes() == b"" and stats.read_bytes() == b""
    assert (tmp_path / "rec.1.bin").stat().st_size > 0
    assert json.loads((tmp_path / "stats.1.json").read_text())[RECORD_RECORDS] == 7


def test_cli_one_path_for_two_outputs_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = cli("--record", str(out), "--stats-json", str(tmp_path / "." / "out"))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [res.stderr.strip()] and str(out) in res.stderr
    assert "same file" in res.stderr and list(tmp_path.iterdir()) == []


def test_a_failed_start_leaves_no_file_and_no_descriptor(tmp_path: Path) -> None:
    (tmp_path / "rec.bin").write_bytes(b"precious")  # so the run makes rec.1.bin
    stats = tmp_path / "stats.json"
    args = parse_options(["offline", str(DEMO), "--port", "8080", "--record",
                                      str(tmp_path / "rec.bin"), "--stats-json", str(stats)])

    def no_source() -> ChannelSource:
        raise RuntimeError("no capture today")

    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="no capture today"):
        run_pipeline(args, mirror_config(args), no_source, interrupted_status=130)
    assert set(os.listdir("/proc/self/fd")) <= fds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.bin"]
    assert (tmp_path / "rec.bin").read_bytes() == b"precious"


def test_cli_a_failed_start_leaves_no_file(tmp_path: Path) -> None:
    bad, rec, stats = tmp_path / "bad.pcap", tmp_path / "rec.bin", tmp_path / "stats.json"
    bad.write_bytes(b"not a capture")
    res = subprocess.run([*AGENT, "offline", str(bad), "--port", "8080", "--record", str(rec),
                          "--stats-json", str(stats)], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pcap"]


def test_broken_pipe_on_a_recording_that_is_not_stdout_costs_that_recording() -> None:
    r, w = os.pipe()
    os.close(r)  # its reader went away
    out = open(w, "wb")  # noqa: SIM115
    writer = NativeWriter(out)
    with capture_logs() as logs:
        writer.write(TrafficChunk(b"data", "a:1", "b:2", Direction.TO_OBSERVED, 1.0, 1), b"data")
        writer.flush()  # no BrokenPipeError: that is for stdout only
    assert writer.stats()["record_errors"] == 1 and writer.stats()["record_failed_records"] == 1
    (error,) = errors(logs)
    assert error["errno"] == "EPIPE" and error["file"] == str(w)
    assert out.closed


def test_cli_a_fifo_whose_reader_left_exits_3_naming_it(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    head = subprocess.Popen(["head", "-c", "100", str(fifo)], stdout=subprocess.DEVNULL)
    res = cli("--both-directions", "--record-format", "jsonl", "--record", str(fifo),
              "--stats-json", str(tmp_path / "stats.json"))
    head.wait(10)
    assert res.returncode == 3, res.stderr
    lines = res.stderr.splitlines()
    errs = [json.loads(ln) for ln in lines if ln.startswith("{") and '"error"' in ln]
    assert len(errs) == 1 and errs[0]["file"] == str(fifo) and errs[0]["errno"] == "EPIPE"
    assert lines[-1].startswith("mirror-agent: degraded: 1 recording(s) failed")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats[SOURCE_FRAMES] > 0 and stats[RECORD_RECORDS_LOST_WRITE_FAILED] > 0


def test_cli_a_dead_shadow_exits_3_saying_why() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = cli("--target", f"127.0.0.1:{port}")
    assert res.returncode == 3, res.stderr
    assert res.stderr.splitlines()[-1] == (
        "mirror-agent: degraded: forward sink dropped 7 shadow connection(s) (connect_failed=7) "
        "(see the summary)")


def test_degradation_names_the_sink_and_why() -> None:
    dropped = FORWARD_CONNECTIONS_DROPPED
    assert degradation({key(dropped, reason="connect_failed"): 1,
                        key(dropped, reason="flow_buffer"): 4,
                        key(dropped, reason="reset"): 0,
                        FORWARD_DROPPED_BYTES: 9,
                        RECORD_RECORDS: 3}) == [
        "forward sink dropped 5 shadow connection(s) (flow_buffer=4, connect_failed=1)"]
    assert degradation({key(dropped, reason="reset"): 0,
                        RECORD_RECORDS: 1}) == []
    lost = RECORD_RECORDS_LOST
    assert degradation({key(lost, reason="queue_full"): 2, key(lost, reason="write_failed"): 0,
                        key(RECORD_LOST_BYTES, reason="queue_full"): 10}) == [
        "recording dropped 2 record(s): the disk could not keep up"]


def test_late_forward_bytes_are_the_mirrors() -> None:
    lines = format_summary({MIRROR_CHUNKS: 2,
                            MIRROR_FORWARD_LATE_BYTES: 5,
                            FORWARD_CONNECTIONS: 1}).splitlines()
    mirror = next(ln for ln in lines if ln.split()[0] == "mirror")
    forward = next(ln for ln in lines if ln.split()[0] == "forward")
    assert "forward_late_bytes=5" in mirror and "late" not in forward


def record_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "record-writer"]


def test_the_background_writer_stops_when_the_run_ends() -> None:
    before = len(record_threads())
    out = io.BytesIO()
    mirror = TrafficMirror(MirrorConfig(observed_port=8080, writer=out,
                                        record_in_background=True))
    mirror.run(traffic())
    assert len(record_threads()) == before  # no thread left behind
    assert mirror.stats()[RECORD_RECORDS] == FLOWS
    mirror.run(traffic())  # a mirror can run again: the writer starts again
    assert mirror.stats()[RECORD_RECORDS] == 2 * FLOWS and len(record_threads()) == before


def test_background_writer_close_drains_then_joins() -> None:
    before = len(record_threads())
    out = io.BytesIO()
    w = BackgroundWriter(NativeWriter(out))
    for i in range(50):
        data = request(i)
        w.write(TrafficChunk(data, "a:1", "b:2", Direction.TO_OBSERVED, 1.0, i), data)
    w.close()
    assert len(record_threads()) == before
    assert w.stats()["records"] == 50
    assert len(list(NativeReader(io.BytesIO(out.getvalue())))) == 50
    w.close()  # idempotent


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
    assert s[RECORD_ERRORS] == 1 and s[RECORD_RECORDS] == 0
    assert s[RECORD_RECORDS_LOST_WRITE_FAILED] == 7


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
    assert json.loads(stats.read_text())[SOURCE_FRAMES] > 0
