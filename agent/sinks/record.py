"""Recordings: the native framed binary format, JSON lines, and a reader for the native one.

Native format, version 1 (all integers little-endian)::

    file header   8s magic b"MIRRORAG"  u16 version (1)  u16 flags (0)  u32 reserved (0)
    record        u32 body_len  u32 crc32(body)  body
    body          u8 type (1 chunk, 2 flow end)  u8 direction (0 unknown, 1 to_observed,
                  2 from_observed)  u16 from_len  u16 to_len  u16 reserved
                  u64 flow_id  f64 seen_at  u64 gap_bytes  from  to  data
                  (for a flow end, ``data`` is the reason in ASCII and gap_bytes the
                  trailing gap)

A reader skips a corrupt record (bad CRC) when the record after it is whole, and otherwise
stops there and reports the rest as ignored (``truncated_bytes``): a recording cut by a crash
keeps everything before the cut.

Writers count what reached the file (``records``, ``recorded_bytes``). A write error other
than a broken pipe fails only that recording: one error line names the file, the file is
closed, and every later record is counted as lost (``record_failed_*``) instead of written.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
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

    def stats(self) -> dict[str, int]:
        """``records`` and ``recorded_bytes`` written, plus ``record_*`` losses if any."""
        ...


_FLUSH_AT = 256 << 10  # buffered bytes that make a writev
_IOV_MAX = 1024  # pieces per writev (the Linux limit)


class _Output:
    """A recording's file, with exact accounting of what reached it.

    With a file descriptor, records wait in a buffer (up to 256 KiB) and go out with
    ``writev``, so after a partial write it is known which records are whole in the file.
    A file-like without one gets each record at once through ``write``. Only chunk records
    (``data_len`` >= 0) are counted: ``records``/``data_bytes`` once accepted in full,
    ``failed_records``/``failed_bytes`` once the recording has failed.

    An OSError fails the recording: one error line names the file and the error, the file is
    closed (not a standard stream) and nothing more is written. A BrokenPipeError (the
    reader of a pipe went away) fails it too, without the line, and is raised.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.name = str(getattr(out, "name", "recording"))
        self._fd: int | None = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            out.flush()  # whatever the file object holds goes first
            self._fd = out.fileno()
        self._pieces: list[bytes] = []
        self._ends: list[tuple[int, int]] = []  # per buffered record: (end offset, data_len)
        self._pending = 0
        self._sent = 0
        self.error: OSError | None = None
        self.records = self.data_bytes = self.failed_records = self.failed_bytes = 0

    def add(self, pieces: Sequence[bytes], data_len: int) -> None:
        """One record, in pieces; ``data_len`` < 0 for records that are not chunks."""
        if self.error is not None:
            self._lose(data_len)
            return
        self._pieces.extend(pieces)
        self._pending += sum(map(len, pieces))
        self._ends.append((self._pending, data_len))
        if self._fd is None or self._pending >= _FLUSH_AT or len(self._pieces) >= _IOV_MAX:
            self._commit()

    def flush(self) -> None:
        self._commit()
        if self._fd is None and self.error is None:
            try:
                self._out.flush()
            except OSError as e:
                self._fail(e)

    def stats(self) -> dict[str, int]:
        out = {"records": self.records, "recorded_bytes": self.data_bytes}
        if self.error is not None:
            out.update(record_errors=1, record_failed_records=self.failed_records,
                       record_failed_bytes=self.failed_bytes)
        return out

    def _commit(self) -> None:
        """Hand the buffered records to the file; count which of them got there whole."""
        if not self._pieces or self.error is not None:
            return
        pieces, ends = self._pieces, self._ends
        self._pieces, self._ends, self._pending, self._sent = [], [], 0, 0
        try:
            self._write(pieces)
        except OSError as e:
            self._settle(ends, self._sent)
            self._fail(e)
            return
        self._settle(ends, self._sent)

    def _write(self, pieces: list[bytes]) -> None:
        """Write every piece, adding to ``_sent`` as bytes are accepted."""
        if self._fd is None:
            for p in pieces:
                self._out.write(p)
                self._sent += len(p)
            return
        i = 0
        while i < len(pieces):
            n = os.writev(self._fd, pieces[i : i + _IOV_MAX])
            self._sent += n
            while i < len(pieces) and n >= len(pieces[i]):
                n -= len(pieces[i])
                i += 1
            if n:  # a partial write: the rest of this piece goes next
                pieces[i] = pieces[i][n:]

    def _settle(self, ends: list[tuple[int, int]], sent: int) -> None:
        """Count the records of one write: whole in the first ``sent`` bytes, or lost."""
        for end, data_len in ends:
            if end > sent:
                self._lose(data_len)
            elif data_len >= 0:
                self.records += 1
                self.data_bytes += data_len

    def _lose(self, data_len: int) -> None:
        if data_len >= 0:
            self.failed_records += 1
            self.failed_bytes += data_len

    def _fail(self, e: OSError) -> None:
        """The recording failed: say so once, close the file; a BrokenPipeError goes up."""
        self.error = e
        if not isinstance(e, BrokenPipeError):
            log.error("recording failed and is closed; capture and forwarding go on, and "
                      "records from now on are counted as record_failed_*", file=self.name,
                      errno=errno.errorcode.get(e.errno or 0, e.errno), error=e.strerror or str(e))
        if self._fd is None or self._fd > 2:
            with contextlib.suppress(OSError, ValueError):
                self._out.close()
        if isinstance(e, BrokenPipeError):
            raise e


class _FileWriter:
    """A record writer over an :class:`_Output`; subclasses frame records as ``pieces``."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = _Output(out)

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
            pieces.append(_FILE_HEADER.pack(MAGIC, VERSION, 0, 0))
            self._started = True
        fa = from_addr.encode()
        ta = to_addr.encode()
        head = _BODY.pack(kind, direction, len(fa), len(ta), 0, flow_id, seen_at, gap) + fa + ta
        # The data goes as it is (no copy into one body); the CRC runs over both parts.
        pieces.append(_FRAME.pack(len(head) + len(data), zlib.crc32(data, zlib.crc32(head)))
                      + head)
        pieces.append(data)
        return pieces

    def _chunk_pieces(self, chunk: TrafficChunk, data: bytes) -> Sequence[bytes]:
        return self._pieces(_CHUNK, _DIRS[chunk.direction], chunk.flow_id, chunk.seen_at,
                            chunk.gap_bytes, chunk.from_addr, chunk.to_addr, data)

    def flow_end(self, end: FlowEnd) -> None:
        if self._out.error is None:
            self._out.add(self._pieces(_END, 0, end.flow_id, 0.0, end.trailing_gap, "", "",
                                       end.reason.encode()), -1)


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


class JsonLinesWriter(_FileWriter):
    """One JSON object per chunk, one per line; flow ends are not written."""

    def _chunk_pieces(self, chunk: TrafficChunk, data: bytes) -> Sequence[bytes]:
        return (json.dumps(chunk_json(chunk, data), separators=(",", ":")).encode() + b"\n",)


class BackgroundWriter:
    """Runs a record writer on its own thread, so the capture loop never waits for the disk.

    Records keep their order. At most ``max_bytes`` of data wait at once; past that, records
    are dropped and counted (``dropped_records``/``dropped_bytes``), never the reader
    blocked, and the recording stays honest: the flow's next record carries the dropped bytes
    in its ``gap_bytes`` (or its end record in its trailing gap).
    :meth:`flush` waits until everything queued is written and flushed; the writer also
    flushes whenever its queue runs empty. An error the inner writer raises (not a contained
    file error; a broken pipe, say) is raised by the next call on the capture thread.
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

    def stats(self) -> dict[str, int]:
        """The inner writer's counts, plus ``record_dropped_*`` if records were dropped."""
        out = self._inner.stats()
        if self.dropped_records:
            out.update(record_dropped_records=self.dropped_records,
                       record_dropped_bytes=self.dropped_bytes)
        return out

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
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                batch = list(self._queue)
                self._queue.clear()
            for kind, item, data in batch:
                self._apply(kind, item, data)
                with self._cv:
                    self._queued_bytes -= len(data)
            with self._cv:
                idle = not self._queue
            if idle:
                self._apply(2, None, b"")

    def _apply(self, kind: int, item: object, data: bytes) -> None:
        """One queued item (0 chunk, 1 flow end, 2 flush, then set ``item`` if an event)."""
        try:
            if kind == 0:
                self._inner.write(item, data)  # type: ignore[arg-type]
            elif kind == 1:
                self._inner.flow_end(item)  # type: ignore[arg-type]
            else:
                self._inner.flush()
        except BaseException as e:  # handed to the capture thread
            self._error = e
        if isinstance(item, threading.Event):
            item.set()


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
    """Iterates the records of a native recording; :meth:`problems` reports afterwards.

    A record whose CRC fails is skipped (counted in ``skipped``, the first offsets kept in
    ``skipped_offsets``) when the file ends right after it or a whole record follows;
    otherwise reading stops there. A truncated last record stops it too. Either way the bytes
    not read are ``truncated_bytes`` from offset ``stopped_at`` (why: ``stop_reason``).
    Addresses that are not UTF-8 are decoded with U+FFFD and counted (``bad_text_records``).
    """

    def __init__(self, src: BinaryIO) -> None:
        head = src.read(_FILE_HEADER.size)
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
        if len(head) < _FILE_HEADER.size or head[:8] != MAGIC:
            raise RecordError("not a mirror-agent recording (bad magic)")
        _magic, self.version, _flags, _res = _FILE_HEADER.unpack(head)
        if self.version != VERSION:
            raise RecordError(f"recording version {self.version} is not supported (want {VERSION})")

    def __iter__(self) -> Iterator[RecordedChunk]:
        if self._empty:
            return
        offset = _FILE_HEADER.size
        frame = self._frame()
        while frame is not None:
            crc, body = frame
            end = offset + _FRAME.size + len(body)
            good = len(body) >= _BODY.size and zlib.crc32(body) == crc
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
        head = self._src.read(_FRAME.size)
        if len(head) < _FRAME.size:
            self._tail = len(head)
            return None
        size, crc = _FRAME.unpack(head)
        body = _read_up_to(self._src, size)
        if len(body) < size:
            self._tail = _FRAME.size + len(body)
            return None
        return crc, body

    def _resyncs(self, following: tuple[int, bytes] | None) -> bool:
        """After a corrupt record: does a sane record (or the clean end) follow it?"""
        if following is None:
            return not self._tail
        return len(following[1]) >= _BODY.size

    def _consumed(self, frame: tuple[int, bytes] | None) -> int:
        return self._tail if frame is None else _FRAME.size + len(frame[1])

    def _rest(self) -> int:
        return sum(len(part) for part in iter(lambda: self._src.read(_READ_PIECE), b""))

    def _stop(self, offset: int, ignored: int, reason: str) -> None:
        self.stopped_at = offset
        self.truncated_bytes = ignored
        self.stop_reason = reason

    def _record(self, body: bytes) -> RecordedChunk:
        kind, d, flen, tlen, _r, flow_id, seen_at, gap = _BODY.unpack_from(body)
        p = _BODY.size
        fa, ta = body[p : p + flen], body[p + flen : p + flen + tlen]
        try:
            from_addr, to_addr = fa.decode(), ta.decode()
        except UnicodeDecodeError:
            self.bad_text_records += 1
            from_addr, to_addr = fa.decode(errors="replace"), ta.decode(errors="replace")
        return RecordedChunk(
            "chunk" if kind == _CHUNK else "end", flow_id, _DIR_OF.get(d, Direction.UNKNOWN),
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
