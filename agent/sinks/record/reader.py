"""Reading a native recording back, damaged or not."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from agent.model import Direction
from agent.sinks.record.format import (
    BODY,
    CHUNK,
    DIR_OF,
    FILE_HEADER,
    FRAME,
    MAGIC,
    VERSION,
    RecordError,
)

__all__ = ["NativeReader", "RecordedChunk"]


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
    """Iterates the records of a native recording; :meth:`problems` reports afterwards.

    A record whose CRC fails is skipped (counted in ``skipped``, the first offsets kept in
    ``skipped_offsets``) when the file ends right after it or a whole record follows;
    otherwise reading stops there. A truncated last record stops it too. Either way the bytes
    not read are ``truncated_bytes`` from offset ``stopped_at`` (why: ``stop_reason``).
    Addresses that are not UTF-8 are decoded with U+FFFD and counted (``bad_text_records``).
    """

    def __init__(self, src: BinaryIO) -> None:
        head = src.read(FILE_HEADER.size)
        self._src = src
        self._tail = 0  # bytes of an incomplete frame at the end
        self.skipped = 0
        self.skipped_offsets: list[int] = []
        self.bad_text_records = 0
        self.truncated_bytes = 0
        self.stopped_at: int | None = None
        self.stop_reason = ""
        self.corrupt = False  # a record failed its CRC (skipped or where reading stopped)
        if len(head) == 0:
            self.version = VERSION  # an empty file: a recording of nothing
            self._empty = True
            return
        self._empty = False
        if len(head) < FILE_HEADER.size or head[:8] != MAGIC:
            raise RecordError("not a mirror-agent recording (bad magic)")
        _magic, self.version, _flags, _res = FILE_HEADER.unpack(head)
        if self.version != VERSION:
            raise RecordError(f"recording version {self.version} is not supported (this "
                              f"mirror-agent reads version {VERSION})")

    def __iter__(self) -> Iterator[RecordedChunk]:
        if self._empty:
            return
        offset = FILE_HEADER.size
        frame = self._frame()
        while frame is not None:
            crc, body = frame
            end = offset + FRAME.size + len(body)
            good = len(body) >= BODY.size and zlib.crc32(body) == crc
            if good:
                yield self._record(body)
            frame = self._frame()
            if not good:
                self.corrupt = True
                if not self._resyncs(frame):
                    ignored = end - offset + self._consumed(frame) + self._rest()
                    self._stop(offset, ignored, "corrupt and no whole record follows it")
                    return
                self.skipped += 1
                if len(self.skipped_offsets) < _SHOWN_OFFSETS:
                    self.skipped_offsets.append(offset)
            offset = end
        if self._tail:
            self._stop(offset, self._tail, "truncated")

    def problems(self) -> list[str]:
        """What was wrong with the file, one phrase each; empty if nothing."""
        out = []
        if self.skipped:
            more = ", ..." if self.skipped > len(self.skipped_offsets) else ""
            out.append(f"{self.skipped} corrupt record(s) skipped (CRC mismatch) at byte "
                       f"offset(s) {', '.join(map(str, self.skipped_offsets))}{more}")
        if self.bad_text_records:
            out.append(f"{self.bad_text_records} record(s) with addresses that are not UTF-8 "
                       "(shown with U+FFFD)")
        if self.stopped_at is not None:
            out.append(f"record at byte offset {self.stopped_at} {self.stop_reason}: the last "
                       f"{self.truncated_bytes} bytes are ignored")
        return out

    def _frame(self) -> tuple[int, bytes] | None:
        """The next whole (crc, body); None at the end, with ``_tail`` the bytes of an
        incomplete frame there (0 at a clean end)."""
        head = self._src.read(FRAME.size)
        if len(head) < FRAME.size:
            self._tail = len(head)
            return None
        size, crc = FRAME.unpack(head)
        body = _read_up_to(self._src, size)
        if len(body) < size:
            self._tail = FRAME.size + len(body)
            return None
        return crc, body

    def _resyncs(self, following: tuple[int, bytes] | None) -> bool:
        """After a corrupt record: does a sane record (or the clean end) follow it?"""
        if following is None:
            return not self._tail
        return len(following[1]) >= BODY.size

    def _consumed(self, frame: tuple[int, bytes] | None) -> int:
        return self._tail if frame is None else FRAME.size + len(frame[1])

    def _rest(self) -> int:
        return sum(len(part) for part in iter(lambda: self._src.read(_READ_PIECE), b""))

    def _stop(self, offset: int, ignored: int, reason: str) -> None:
        self.stopped_at = offset
        self.truncated_bytes = ignored
        self.stop_reason = reason

    def _record(self, body: bytes) -> RecordedChunk:
        kind, d, flen, tlen, _r, flow_id, seen_at, gap = BODY.unpack_from(body)
        p = BODY.size
        fa, ta = body[p : p + flen], body[p + flen : p + flen + tlen]
        try:
            from_addr, to_addr = fa.decode(), ta.decode()
        except UnicodeDecodeError:
            self.bad_text_records += 1
            from_addr, to_addr = fa.decode(errors="replace"), ta.decode(errors="replace")
        return RecordedChunk(
            "chunk" if kind == CHUNK else "end", flow_id, DIR_OF.get(d, Direction.UNKNOWN),
            seen_at, gap, from_addr, to_addr, body[p + flen + tlen :],
        )


_SHOWN_OFFSETS = 10
_READ_PIECE = 1 << 20


def _read_up_to(src: BinaryIO, n: int) -> bytes:
    """``n`` bytes, or fewer at the end; read in pieces so that a corrupt length cannot make
    one huge allocation."""
    parts = []
    while n > 0:
        part = src.read(min(n, _READ_PIECE))
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)
