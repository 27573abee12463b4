"""Recordings: the native framed binary format, JSON lines, and a reader for the native one.

Native format, version 1 (all integers little-endian)::

    file header   8s magic b"MIRRORAG"  u16 version (1)  u16 flags (0)  u32 reserved (0)
    record        u32 body_len  u32 crc32(body)  body
    body          u8 type (1 chunk, 2 flow end)  u8 direction (0 unknown, 1 to_observed,
                  2 from_observed)  u16 from_len  u16 to_len  u16 reserved
                  u64 flow_id  f64 seen_at  u64 gap_bytes  from  to  data
                  (for a flow end, ``data`` is the reason in ASCII and gap_bytes the
                  trailing gap)

A reader stops at a truncated or corrupt last record and reports it (``truncated_bytes``)
instead of failing: a recording cut by a crash keeps everything before the cut.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol

import structlog

from agent.model import Direction, FlowEnd, TrafficChunk

log = structlog.get_logger("agent.record")

__all__ = [
    "FORMATS",
    "MAGIC",
    "VERSION",
    "BackgroundWriter",
    "JsonLinesWriter",
    "NativeReader",
    "NativeWriter",
    "RecordError",
    "RecordWriter",
    "RecordedChunk",
    "chunk_json",
    "make_writer",
]

MAGIC = b"MIRRORAG"
VERSION = 1
_FILE_HEADER = struct.Struct("<8sHHI")
_FRAME = struct.Struct("<II")
_BODY = struct.Struct("<BBHHHQdQ")
_DIRS = {Direction.UNKNOWN: 0, Direction.TO_OBSERVED: 1, Direction.FROM_OBSERVED: 2}
_DIR_OF = {v: k for k, v in _DIRS.items()}
_CHUNK, _END = 1, 2
FORMATS = ("native", "jsonl")


class RecordError(Exception):
    """A recording cannot be read (not a recording, unknown version)."""


class RecordWriter(Protocol):
    """What the mirror's record path writes to."""

    def write(self, chunk: TrafficChunk, data: bytes) -> None: ...

    def flow_end(self, end: FlowEnd) -> None: ...

    def flush(self) -> None: ...


class NativeWriter:
    """Writes the native format to a binary file-like object (the header on first use)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._started = False
        self.records = 0
        self.bytes_written = 0

    def _record(self, kind: int, direction: int, flow_id: int, seen_at: float, gap: int,
                from_addr: str, to_addr: str, data: bytes) -> None:
        if not self._started:
            self._out.write(_FILE_HEADER.pack(MAGIC, VERSION, 0, 0))
            self._started = True
            self.bytes_written += _FILE_HEADER.size
        fa = from_addr.encode()
        ta = to_addr.encode()
        head = _BODY.pack(kind, direction, len(fa), len(ta), 0, flow_id, seen_at, gap) + fa + ta
        size = len(head) + len(data)
        # The data is written as it is (no copy into one body); the CRC runs over both parts.
        self._out.write(_FRAME.pack(size, zlib.crc32(data, zlib.crc32(head))) + head)
        self._out.write(data)
        self.records += 1
        self.bytes_written += _FRAME.size + size

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        self._record(_CHUNK, _DIRS[chunk.direction], chunk.flow_id, chunk.seen_at,
                     chunk.gap_bytes, chunk.from_addr, chunk.to_addr, data)

    def flow_end(self, end: FlowEnd) -> None:
        self._record(_END, 0, end.flow_id, 0.0, end.trailing_gap, "", "", end.reason.encode())

    def flush(self) -> None:
        self._out.flush()


def chunk_json(chunk: TrafficChunk, data: bytes) -> dict[str, object]:
    """The JSON-lines object of one chunk: exactly flow, from, to, direction, seen_at, data,
    gap_bytes."""
    return {
        "flow": chunk.flow_id,
        "from": chunk.from_addr,
        "to": chunk.to_addr,
        "direction": chunk.direction.value,
        "seen_at": chunk.seen_at,
        "data": base64.b64encode(data).decode("ascii"),
        "gap_bytes": chunk.gap_bytes,
    }


class JsonLinesWriter:
    """One JSON object per chunk, one per line; flow ends are not written."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.records = 0
        self.bytes_written = 0

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        line = json.dumps(chunk_json(chunk, data), separators=(",", ":")).encode() + b"\n"
        self._out.write(line)
        self.records += 1
        self.bytes_written += len(line)

    def flow_end(self, end: FlowEnd) -> None:
        pass

    def flush(self) -> None:
        self._out.flush()


class BackgroundWriter:
    """Runs a record writer on its own thread, so the capture loop never waits for the disk.

    Records keep their order. At most ``max_bytes`` of data wait at once; past that, records
    are dropped and counted (``dropped_records``/``dropped_bytes``), never the reader
    blocked, and the recording stays honest: the flow's next record carries the dropped bytes
    in its ``gap_bytes`` (or its end record in its trailing gap).
    :meth:`flush` waits until everything queued is written and flushed. A write
    error is raised by the next call on the capture thread.
    """

    def __init__(self, inner: RecordWriter, max_bytes: int = 256 << 20) -> None:
        self._inner = inner
        self._max = max_bytes
        self._queue: deque[tuple[int, object, bytes]] = deque()
        self._queued_bytes = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self.dropped_records = 0
        self.dropped_bytes = 0
        self._missed: dict[tuple[int, str], int] = {}  # (flow, from) → bytes dropped since
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        key = (chunk.flow_id, chunk.from_addr)
        missed = self._missed.pop(key, 0)
        queued = replace(chunk, gap_bytes=chunk.gap_bytes + missed) if missed else chunk
        if not self._put(0, queued, data):
            # Dropped: its bytes, and the gap before them, are owed to the next record.
            self._missed[key] = queued.gap_bytes + len(data)

    def flow_end(self, end: FlowEnd) -> None:
        missed = sum(v for (fid, _), v in self._missed.items() if fid == end.flow_id)
        if missed:
            self._missed = {k: v for k, v in self._missed.items() if k[0] != end.flow_id}
            end = replace(end, trailing_gap=end.trailing_gap + missed)
        self._put(1, end, b"")

    def flush(self) -> None:
        done = threading.Event()
        self._put(2, done, b"")
        while not done.wait(0.5):
            if not self._thread.is_alive():
                break
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _put(self, kind: int, item: object, data: bytes) -> bool:
        """Queue one item; False if a chunk was dropped because the queue is full."""
        self._raise()
        n = len(data)
        with self._cv:
            if kind == 0 and self._queued_bytes + n > self._max:
                if not self.dropped_records:
                    log.warning("recording cannot keep up; dropping records (counted, and "
                                "marked as gaps in the recording)")
                self.dropped_records += 1
                self.dropped_bytes += n
                return False
            self._queue.append((kind, item, data))
            self._queued_bytes += n
            self._cv.notify()
        return True

    def _run(self) -> None:
        inner = self._inner
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                batch = list(self._queue)
                self._queue.clear()
            for kind, item, data in batch:
                try:
                    if kind == 0:
                        inner.write(item, data)  # type: ignore[arg-type]
                    elif kind == 1:
                        inner.flow_end(item)  # type: ignore[arg-type]
                    else:
                        inner.flush()
                        item.set()  # type: ignore[attr-defined]
                except BaseException as e:  # handed to the capture thread
                    self._error = e
                    if kind == 2:
                        item.set()  # type: ignore[attr-defined]
                with self._cv:
                    self._queued_bytes -= len(data)


def make_writer(out: BinaryIO, fmt: str) -> NativeWriter | JsonLinesWriter:
    if fmt == "native":
        return NativeWriter(out)
    if fmt == "jsonl":
        return JsonLinesWriter(out)
    raise ValueError(f"unknown record format {fmt!r} (expected one of {', '.join(FORMATS)})")


@dataclass(frozen=True, slots=True)
class RecordedChunk:
    """One record read back: a chunk (``kind == "chunk"``) or a flow end (``"end"``, with the
    reason in ``data``)."""

    kind: str
    flow_id: int
    direction: Direction
    seen_at: float
    gap_bytes: int
    from_addr: str
    to_addr: str
    data: bytes


class NativeReader:
    """Iterates the records of a native recording; see ``truncated_bytes`` afterwards."""

    def __init__(self, src: BinaryIO) -> None:
        head = src.read(_FILE_HEADER.size)
        self._src = src
        self.truncated_bytes = 0
        self.corrupt = False
        if len(head) == 0:
            self.version = VERSION  # an empty file: a recording of nothing
            self._empty = True
            return
        self._empty = False
        if len(head) < _FILE_HEADER.size or head[:8] != MAGIC:
            raise RecordError("not a mirror-agent recording (bad magic)")
        _magic, self.version, _flags, _res = _FILE_HEADER.unpack(head)
        if self.version != VERSION:
            raise RecordError(f"recording version {self.version} is not supported (want {VERSION})")

    def __iter__(self) -> Iterator[RecordedChunk]:
        if self._empty:
            return
        src = self._src
        while True:
            frame = src.read(_FRAME.size)
            if not frame:
                return
            if len(frame) < _FRAME.size:
                self.truncated_bytes = len(frame)
                return
            size, crc = _FRAME.unpack(frame)
            body = src.read(size)
            if len(body) < size:
                self.truncated_bytes = _FRAME.size + len(body)
                return
            if zlib.crc32(body) != crc or size < _BODY.size:
                self.corrupt = True
                self.truncated_bytes = _FRAME.size + len(body) + len(src.read())
                return
            kind, d, flen, tlen, _r, flow_id, seen_at, gap = _BODY.unpack_from(body)
            p = _BODY.size
            fa = body[p : p + flen].decode()
            ta = body[p + flen : p + flen + tlen].decode()
            yield RecordedChunk(
                "chunk" if kind == _CHUNK else "end", flow_id, _DIR_OF.get(d, Direction.UNKNOWN),
                seen_at, gap, fa, ta, body[p + flen + tlen :],
            )
