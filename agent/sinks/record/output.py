"""A recording's file (or rotated files), with exact accounting of what reached them."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from typing import BinaryIO

import structlog

from agent.model import FlowEnd, TrafficChunk
from agent.sinks.record.codec import Compressor, new_compressor
from agent.sinks.record.files import RecordFiles
from agent.sinks.record.ledger import FlowLedger

__all__ = ["FLUSH_EVERY", "FileWriter", "Output"]

log = structlog.get_logger("agent.record")

_FLUSH_AT = 256 << 10  # buffered bytes that make a writev
_IOV_MAX = 1024  # pieces per writev (the Linux limit)
#: Compressed, buffered records are written (with a flush point) at least this often by the
#: writer thread's idle tick (:meth:`Output.tick`).
FLUSH_EVERY = 1.0


def _is_stdout(fd: int) -> bool:
    """Is ``fd`` stdout (fd 1, or the same file opened again, as ``/dev/stdout``)?"""
    if fd == 1:
        return True
    try:
        return os.path.samestat(os.fstat(fd), os.fstat(1))
    except OSError:
        return False


class Output:
    """A recording's file, with exact accounting of what reached it.

    ``out`` is one file, or the :class:`~agent.sinks.record.files.RecordFiles` of a rotated
    or compressed recording; ``preamble`` (the format's file header) starts every file, with
    the file's first record. With a file descriptor, records wait in a buffer (up to
    256 KiB) and go out with ``writev``, so after a partial write it is known which records
    are whole in the file. A file-like without one gets each record at once through
    ``write``. Only chunk records (``data_len`` >= 0) are counted: ``records``/``data_bytes``
    once accepted in full, ``failed_records``/``failed_bytes`` once the recording has failed.

    Compressed, a batch is compressed and written with a flush point after it (at 256 KiB,
    on :meth:`tick` at most once a second, on :meth:`flush`, which also ends the gzip
    member or zstd frame), and its records count once all of its compressed bytes were
    written (after a fault a reader may decode a few records more than were counted).

    Rotating, the writer calls :meth:`begin` before each record: it closes the file when due
    and opens the next (see :mod:`~agent.sinks.record.files`). Compressed, the size a record
    would take the file to is estimated: what was written, plus the records buffered and
    this one at the compression ratio so far.

    An OSError fails the recording: one error line names the file and the error, the file is
    closed (not a standard stream) and nothing more is written, to this file or a next one.
    A broken pipe on stdout (its reader went away: ``--record - | head``) fails it too,
    without the line, and is raised, so the command can stop quietly; on any other file (a
    FIFO, a socket) it is an error like any other.

    With a ``ledger``, every record added is settled in it as its flow's (see
    :mod:`~agent.sinks.record.ledger`) when it is counted: written, or lost as
    ``write_failed``; a record that is not a chunk is its flow's end.
    """

    def __init__(self, out: BinaryIO | RecordFiles, preamble: bytes = b"",
                 ledger: FlowLedger | None = None) -> None:
        self._ledger = ledger
        self._files = out if isinstance(out, RecordFiles) else None
        policy = self._files.policy if self._files is not None else None
        self._codec: Compressor | None = (
            new_compressor(policy.compress) if policy and policy.compress else None)
        rot = policy.rotation if policy is not None else None
        self._limit = rot.max_bytes if rot is not None else None
        self.rotating = rot is not None
        self._preamble = preamble
        self._pieces: list[bytes] = []
        # per buffered record: (end offset, data_len, flow)
        self._ends: list[tuple[int, int, int]] = []
        self._pending = self._sent = 0
        self._committed_at = time.monotonic()
        self.generation = 0  # + 1 per new file
        self._zin = self._zout = 0  # bytes into and out of the compressor
        self.error: OSError | None = None
        self.records = self.data_bytes = self.failed_records = self.failed_bytes = 0
        if self._files is None:
            self._attach(out)  # type: ignore[arg-type]  # not RecordFiles: a file
        else:
            first = self._files.current
            if first is None:
                first = self._files.next_file()
            self._attach(first)

    def _attach(self, out: BinaryIO) -> None:
        """Write to ``out`` from now on (a file with nothing of this recording yet)."""
        self._out: BinaryIO | None = out
        self.name = str(getattr(out, "name", "recording"))
        self._fd: int | None = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            out.flush()  # whatever the file object holds goes first
            self._fd = out.fileno()
        self._stdout = self._fd is not None and _is_stdout(self._fd)
        self._fresh = True  # no record yet: the next one brings the preamble
        self._file_bytes = 0  # bytes in the file (compressed: what the compressor gave)
        files = self._files
        self._deadline = files.deadline(files.clock()) if files is not None else None

    def add(self, head: bytes, data: bytes, data_len: int, flow: int) -> None:
        """One record of ``flow``: ``head``, then ``data`` as it is (not copied; may be
        empty). ``data_len`` is the chunk's data length counted, < 0 for a flow's end
        record."""
        if self.error is not None or self._out is None:
            self._lose(data_len, flow)
            return
        pieces = self._pieces
        if self._fresh:
            self._fresh = False
            if self._preamble:
                pieces.append(self._preamble)
                self._pending += len(self._preamble)
        pieces.append(head)
        if data:
            pieces.append(data)
        self._pending += len(head) + len(data)
        self._ends.append((self._pending, data_len, flow))
        if self._fd is None or self._pending >= _FLUSH_AT or len(pieces) >= _IOV_MAX:
            self._commit()

    def begin(self, size: int) -> int:
        """Before a record of ``size`` bytes (rotating only): close the file if it is due,
        open the next if none is open. Returns :attr:`generation`, which changes with every
        new file (a writer whose records depend on earlier ones starts afresh)."""
        if self.error is None and self._files is not None:
            if self._out is not None and not self._fresh and self._due(size):
                self._rotate()
            if self._out is None and self.error is None:
                self._next_file()
        return self.generation

    def _due(self, size: int) -> bool:
        if self._limit is not None and \
                self._file_bytes + (self._pending + size) * self._ratio > self._limit:
            return True
        return self._deadline is not None and self._files is not None and \
            self._files.clock() >= self._deadline

    @property
    def _ratio(self) -> float:
        """Compressed bytes per byte so far (1 before the first batch)."""
        return self._zout / self._zin if self._zin else 1.0

    def tick(self) -> float | None:
        """The writer thread's call when its queue runs empty: write what is buffered (a
        compressed batch at most once a second), close the file if its time slot is over.
        Returns the seconds until the next call is due (None: not before more records)."""
        now = time.monotonic()
        if self._codec is None or now - self._committed_at >= FLUSH_EVERY:
            self._commit()
            self._flush_file_object()
        left = None
        if self._deadline is not None and self._out is not None and not self._fresh \
                and self._files is not None:
            left = self._deadline - self._files.clock()
            if left <= 0:
                self._rotate()
                left = None
        wait = FLUSH_EVERY - (now - self._committed_at) if self._pieces else None
        return left if wait is None else wait if left is None else min(wait, left)

    def flush(self) -> None:
        """Write everything buffered; compressed, end the member or frame too."""
        self._commit(final=True)
        self._flush_file_object()

    def stats(self) -> dict[str, int]:
        out = {"records": self.records, "recorded_bytes": self.data_bytes}
        if self._files is not None and self.rotating:
            out.update(self._files.stats())
        if self.error is not None:
            out.update(record_errors=1, record_failed_records=self.failed_records,
                       record_failed_bytes=self.failed_bytes)
        return out

    def _flush_file_object(self) -> None:
        if self._fd is None and self._out is not None and self.error is None:
            try:
                self._out.flush()
            except OSError as e:
                self._fail(e)

    def _rotate(self) -> None:
        """Close the current file (everything written, the compressed stream ended)."""
        self._commit(final=True)
        out, files = self._out, self._files
        if self.error is not None or out is None or files is None:
            return
        try:
            out.close()
        except OSError as e:
            self._fail(e)
            return
        self._out = None
        files.file_closed(self.name, self._file_bytes)

    def _next_file(self) -> None:
        assert self._files is not None
        try:
            f = self._files.next_file()
        except OSError as e:
            self._out, self.name = None, str(e.filename or self._files.pattern)
            self._fail(e)
            return
        self._attach(f)
        self.generation += 1

    def _commit(self, final: bool = False) -> None:
        """Hand the buffered records to the file; count which of them got there whole.
        ``final``: end the compressed stream too."""
        if self.error is not None or self._out is None:
            return
        if not self._pieces and not (final and self._codec is not None):
            return
        pieces, ends = self._pieces, self._ends
        self._pieces, self._ends, self._pending, self._sent = [], [], 0, 0
        self._committed_at = time.monotonic()
        try:
            if self._codec is None:
                self._write(pieces)
            else:
                self._write_compressed(pieces, final)
        except OSError as e:
            self._settle(ends, self._sent)
            self._fail(e)
            return
        self._settle(ends, self._sent)

    def _write(self, pieces: list[bytes]) -> None:
        """Write every piece, adding to ``_sent`` as bytes are accepted."""
        if self._fd is None:
            assert self._out is not None
            for p in pieces:
                self._out.write(p)
                self._sent += len(p)
                self._file_bytes += len(p)
            return
        i = 0
        while i < len(pieces):
            some = pieces[i : i + _IOV_MAX]
            n = os.writev(self._fd, some)
            self._sent += n
            self._file_bytes += n
            if n == sum(map(len, some)):  # all of them: the common case
                i += len(some)
                continue
            while i < len(pieces) and n >= len(pieces[i]):
                n -= len(pieces[i])
                i += 1
            if n:  # a partial write: the rest of this piece goes next
                pieces[i] = pieces[i][n:]

    def _write_compressed(self, pieces: list[bytes], final: bool) -> None:
        """Compress ``pieces`` with a flush point (or the stream's end) and write it all;
        ``_sent`` covers the pieces only once every compressed byte was accepted."""
        codec = self._codec
        assert codec is not None
        data = memoryview(codec.compress(b"".join(pieces))  # one call: one GIL release
                          + (codec.finish() if final else codec.sync()))
        self._zout += len(data)
        while data:
            if self._fd is not None:
                n = os.write(self._fd, data)
            else:
                assert self._out is not None
                self._out.write(data)
                n = len(data)
            self._file_bytes += n
            data = data[n:]
        self._sent = sum(map(len, pieces))
        self._zin += self._sent

    def _settle(self, ends: list[tuple[int, int, int]], sent: int) -> None:
        """Count the records of one write: whole in the first ``sent`` bytes, or lost."""
        ledger = self._ledger
        if ends and ends[-1][0] <= sent:  # all whole: the common case
            lens = [n for _, n, _ in ends if n >= 0]
            self.records += len(lens)
            self.data_bytes += sum(lens)
            if ledger is not None:
                ledger.done_many((flow, n < 0) for _, n, flow in ends)
            return
        for end, data_len, flow in ends:
            if end > sent:
                self._lose(data_len, flow)
                continue
            if data_len >= 0:
                self.records += 1
                self.data_bytes += data_len
            if ledger is not None:
                ledger.done(flow, data_len < 0)

    def settled(self, flow: int, end: bool = False) -> None:
        """A record of ``flow`` that the format does not write (a flow end in JSON lines):
        settled as written, nothing of it being missing."""
        if self._ledger is not None:
            self._ledger.done(flow, end)

    def _lose(self, data_len: int, flow: int) -> None:
        if data_len >= 0:
            self.failed_records += 1
            self.failed_bytes += data_len
        if self._ledger is not None:
            self._ledger.done(flow, data_len < 0, "write_failed")

    def _fail(self, e: OSError) -> None:
        """The recording failed: say so once, close the file; a broken stdout goes up."""
        self.error = e
        quiet = isinstance(e, BrokenPipeError) and self._stdout
        if not quiet:
            log.error("recording failed and is closed; capture and forwarding go on, and "
                      "records from now on are counted as record_failed_*", file=self.name,
                      errno=errno.errorcode.get(e.errno or 0, e.errno), error=e.strerror or str(e))
        if self._out is not None and (self._fd is None or self._fd > 2):
            with contextlib.suppress(OSError, ValueError):
                self._out.close()
        if quiet:
            raise e


class FileWriter:
    """A record writer over an :class:`Output` (the formats subclass it, implementing
    :meth:`_write` and :meth:`_flow_end`; every record they make is settled in
    :attr:`ledger` by the :class:`Output`, or by :meth:`Output.settled`).

    Connections (:mod:`~agent.sinks.record.ledger`): :meth:`write` and :meth:`flow_end`
    hand a record of the flow to :attr:`ledger`, unless a stage in front of this writer
    hands them (:meth:`fronted`). :meth:`close` flushes and drops what is still in flight
    as ``shutdown``; the file itself stays open for its owner to close.
    """

    #: The bytes every file of the format starts with.
    preamble = b""

    def __init__(self, out: BinaryIO | RecordFiles) -> None:
        #: The connections of this recording.
        self.ledger = FlowLedger()
        self._handing = True
        self._out = Output(out, self.preamble, self.ledger)

    def fronted(self) -> FlowLedger:
        """A stage in front of this writer (a background writer thread) hands the records
        over from now on and counts them as handed itself; this writer only settles them.
        Returns the ledger they share."""
        self._handing = False
        return self.ledger

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        """One chunk (``data``: its bytes after the hooks)."""
        if self._handing:
            self.ledger.hand(chunk.flow_id)
        self._write(chunk, data)

    def flow_end(self, end: FlowEnd) -> None:
        """The end of a flow that has records: none of the flow follows."""
        if self._handing:
            self.ledger.hand(end.flow_id)
        self._flow_end(end)

    def _write(self, chunk: TrafficChunk, data: bytes) -> None:
        raise NotImplementedError

    def _flow_end(self, end: FlowEnd) -> None:
        self._out.settled(end.flow_id, end=True)  # not written by this format

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        """Flush, then drop the connections still in flight as ``shutdown`` (the end of a
        run). The file stays open; a later record starts the accounting afresh."""
        try:
            self.flush()
        finally:
            self.ledger.shutdown()

    def tick(self) -> float | None:
        """See :meth:`Output.tick`."""
        return self._out.tick()

    def stats(self) -> dict[str, int]:
        """The :class:`Output`'s counts and the ledger's ``connections*``."""
        return {**self._out.stats(), **self.ledger.stats()}
