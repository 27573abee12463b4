"""The native recording format round-trips; a truncated tail is reported, not fatal."""

from __future__ import annotations

import base64
import io
import json
import threading
import zlib
from pathlib import Path

import pytest

from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record import (
    BackgroundWriter,
    JsonLinesWriter,
    NativeReader,
    NativeWriter,
    RecordError,
)
from agent.sinks.record.format import BODY, CHUNK, END, FILE_HEADER, FRAME, MAGIC, VERSION


def chunk(i: int) -> TrafficChunk:
    return TrafficChunk(bytes([i]) * (i * 10), f"192.0.2.1:{1000 + i}", "[2001:db8::1]:80",
                        Direction.TO_OBSERVED if i % 2 else Direction.FROM_OBSERVED,
                        1700000000.5 + i, i, gap_bytes=i * 3)


def test_roundtrip() -> None:
    buf = io.BytesIO()
    w = NativeWriter(buf)
    for i in range(1, 6):
        w.write(chunk(i), chunk(i).data)
    w.flow_end(FlowEnd(3, "rst", 4))
    buf.seek(0)
    recs = list(NativeReader(buf))
    assert len(recs) == 6
    for i, r in enumerate(recs[:5], 1):
        c = chunk(i)
        assert (r.kind, r.flow_id, r.direction, r.seen_at, r.gap_bytes, r.from_addr, r.to_addr,
                r.data) == ("chunk", i, c.direction, c.seen_at, c.gap_bytes, c.from_addr,
                            c.to_addr, c.data)
    assert (recs[5].kind, recs[5].data, recs[5].gap_bytes) == ("end", b"rst", 4)


@pytest.mark.parametrize("to_file", [False, True])
def test_records_are_the_format_byte_for_byte(tmp_path: Path, to_file: bool) -> None:
    """Small data copied into its record or large data as a piece of its own, to a file
    (writev) or a file-like (write): the bytes are the format's, record after record."""
    sizes = [0, 1, 300, 1023, 1024, 1025, 70_000, 5]
    chunks = [TrafficChunk(bytes([n % 251]) * n, "192.0.2.1:1000", "[2001:db8::1]:80",
                           Direction.TO_OBSERVED, 1700000000.25 + n, n, n // 7) for n in sizes]
    want = [FILE_HEADER.pack(MAGIC, VERSION, 0, 0)]
    for c in chunks:
        fa, ta = c.from_addr.encode(), c.to_addr.encode()
        body = BODY.pack(CHUNK, 1, len(fa), len(ta), 0, c.flow_id, c.seen_at, c.gap_bytes)
        body += fa + ta + c.data
        want.append(FRAME.pack(len(body), zlib.crc32(body)) + body)
    body = BODY.pack(END, 0, 0, 0, 0, 9, 0.0, 11) + b"fin"
    want.append(FRAME.pack(len(body), zlib.crc32(body)) + body)
    path = tmp_path / "r.bin"
    with path.open("wb") if to_file else io.BytesIO() as out:
        w = NativeWriter(out)
        for c in chunks:
            w.write(c, c.data)
        w.flow_end(FlowEnd(9, "fin", 11))
        w.flush()
        got = out.getvalue() if isinstance(out, io.BytesIO) else path.read_bytes()
    assert got == b"".join(want)
    stats = w.stats()
    assert (stats["records"], stats["recorded_bytes"]) == (len(sizes), sum(sizes))
    assert not any(k.startswith("record_") for k in stats)  # nothing lost


def test_truncated_last_record_is_reported() -> None:
    buf = io.BytesIO()
    w = NativeWriter(buf)
    for i in range(1, 4):
        w.write(chunk(i), chunk(i).data)
    data = buf.getvalue()[:-7]
    r = NativeReader(io.BytesIO(data))
    assert len(list(r)) == 2
    assert r.truncated_bytes > 0 and not r.corrupt


def test_corrupt_record_is_reported() -> None:
    buf = io.BytesIO()
    w = NativeWriter(buf)
    w.write(chunk(2), chunk(2).data)
    raw = bytearray(buf.getvalue())
    raw[-1] ^= 0xFF
    r = NativeReader(io.BytesIO(bytes(raw)))
    assert list(r) == [] and r.corrupt


def test_not_a_recording() -> None:
    with pytest.raises(RecordError):
        NativeReader(io.BytesIO(b"GIF89a........."))


def test_jsonl_exact_keys() -> None:
    buf = io.BytesIO()
    JsonLinesWriter(buf).write(chunk(1), b"\x00\xffdata")
    obj = json.loads(buf.getvalue())
    assert set(obj) == {"flow", "from", "to", "direction", "seen_at", "data", "gap_bytes"}
    assert base64.b64decode(obj["data"]) == b"\x00\xffdata"
    assert obj["direction"] == "to_observed" and obj["gap_bytes"] == 3


def test_background_writer_keeps_order_and_marks_dropped_records_as_gaps() -> None:
    class SlowFile(io.BytesIO):
        gate = threading.Event()

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.gate.wait(10)
            return super().write(b)

    out = SlowFile()
    w = BackgroundWriter(NativeWriter(out), max_bytes=10)

    def chunk(data: bytes) -> TrafficChunk:
        return TrafficChunk(data, "a:1", "b:2", Direction.TO_OBSERVED, 1.0, 7)

    for data in (b"first", b"12345", b"dropped!", b"next"):  # the queue holds 10 bytes
        w.write(chunk(data), data)
    w.flow_end(FlowEnd(7, "fin"))
    SlowFile.gate.set()
    w.flush()
    assert (w.dropped_records, w.dropped_bytes) == (2, 12)
    out.seek(0)
    recs = list(NativeReader(out))
    assert [(r.kind, r.data, r.gap_bytes) for r in recs] == [
        ("chunk", b"first", 0), ("chunk", b"12345", 0), ("end", b"fin", 12)]


def test_background_writer_hand_off_counts_drops_as_full() -> None:
    w = BackgroundWriter(NativeWriter(io.BytesIO()), max_bytes=4)
    w.close()
    for data in (b"1234", b"56789", b""):
        w.write(TrafficChunk(data, "a:1", "b:2", Direction.TO_OBSERVED, 1.0, 7), data)
    w.close()
    st = w.handoff_stats()
    assert (st.name, st.policy, st.budget_bytes) == ("record_writer", "drop", 4)
    assert st.dropped_items.get("full", 0) == w.dropped_records
    assert st.dropped_bytes.get("full", 0) == w.dropped_bytes
    assert st.items + w.dropped_records >= 3 and st.queued_bytes == 0
