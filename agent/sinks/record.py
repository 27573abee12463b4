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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from agent.model import Direction, FlowEnd, TrafficChunk

__all__ = [
    "FORMATS",
    "MAGIC",
    "VERSION",
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
        body = b"".join((
            _BODY.pack(kind, direction, len(fa), len(ta), 0, flow_id, seen_at, gap), fa, ta, data
        ))
        self._out.write(_FRAME.pack(len(body), zlib.crc32(body)))
        self._out.write(body)
        self.records += 1
        self.bytes_written += _FRAME.size + len(body)

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
