"""Record writers: the native format and JSON lines, over an :class:`~.output.Output`."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import BinaryIO, Protocol

from agent.model import FlowEnd, TrafficChunk
from agent.sinks.record.format import (
    BODY,
    CHUNK,
    DIRS,
    END,
    FILE_HEADER,
    FORMATS,
    FRAME,
    MAGIC,
    VERSION,
    chunk_json,
)
from agent.sinks.record.output import Output

__all__ = ["JsonLinesWriter", "NativeWriter", "RecordWriter", "make_writer"]


class RecordWriter(Protocol):
    """What the mirror's record path writes to."""

    def write(self, chunk: TrafficChunk, data: bytes) -> None: ...

    def flow_end(self, end: FlowEnd) -> None: ...

    def flush(self) -> None: ...

    def stats(self) -> dict[str, int]:
        """``records`` and ``recorded_bytes`` written, plus ``record_*`` losses if any."""
        ...


class _FileWriter:
    """A record writer over an :class:`Output`; subclasses frame records as ``pieces``."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = Output(out)

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        pieces = () if self._out.error is not None else self._chunk_pieces(chunk, data)
        self._out.add(pieces, len(data))

    def flow_end(self, end: FlowEnd) -> None:
        pass

    def flush(self) -> None:
        self._out.flush()

    def stats(self) -> dict[str, int]:
        return self._out.stats()

    def _chunk_pieces(self, chunk: TrafficChunk, data: bytes) -> Sequence[bytes]:
        raise NotImplementedError


class NativeWriter(_FileWriter):
    """Writes the native format to a binary file-like object (the header on first use)."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__(out)
        self._started = False

    def _pieces(self, kind: int, direction: int, flow_id: int, seen_at: float, gap: int,
                from_addr: str, to_addr: str, data: bytes) -> list[bytes]:
        pieces = []
        if not self._started:
            pieces.append(FILE_HEADER.pack(MAGIC, VERSION, 0, 0))
            self._started = True
        fa = from_addr.encode()
        ta = to_addr.encode()
        head = BODY.pack(kind, direction, len(fa), len(ta), 0, flow_id, seen_at, gap) + fa + ta
        # The data goes as it is (no copy into one body); the CRC runs over both parts.
        pieces.append(FRAME.pack(len(head) + len(data), zlib.crc32(data, zlib.crc32(head)))
                      + head)
        pieces.append(data)
        return pieces

    def _chunk_pieces(self, chunk: TrafficChunk, data: bytes) -> Sequence[bytes]:
        return self._pieces(CHUNK, DIRS[chunk.direction], chunk.flow_id, chunk.seen_at,
                            chunk.gap_bytes, chunk.from_addr, chunk.to_addr, data)

    def flow_end(self, end: FlowEnd) -> None:
        if self._out.error is None:
            self._out.add(self._pieces(END, 0, end.flow_id, 0.0, end.trailing_gap, "", "",
                                       end.reason.encode()), -1)


class JsonLinesWriter(_FileWriter):
    """One JSON object per chunk, one per line; flow ends are not written."""

    def _chunk_pieces(self, chunk: TrafficChunk, data: bytes) -> Sequence[bytes]:
        return (json.dumps(chunk_json(chunk, data), separators=(",", ":")).encode() + b"\n",)


def make_writer(out: BinaryIO, fmt: str) -> NativeWriter | JsonLinesWriter:
    if fmt == "native":
        return NativeWriter(out)
    if fmt == "jsonl":
        return JsonLinesWriter(out)
    raise ValueError(f"unknown record format {fmt!r} (expected one of {', '.join(FORMATS)})")
