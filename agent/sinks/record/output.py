"""A recording's file (or rotated files), with exact accounting of what reached them."""

from __future__ import annotations

import contextlib
import errno
import os
import time
import weakref
from typing import BinaryIO

import structlog

from agent.sinks.record.codec import Compressor, new_compressor
from agent.sinks.record.files import FileWatch, RecordFiles, Vanished, is_stdout, open_again
from agent.sinks.record.ledger import FlowLedger, Tally

__all__ = ["FLUSH_EVERY", "Output"]

log = structlog.get_logger("agent.record")

_FLUSH_AT = 256 << 10  # buffered bytes that make a writev
_IOV_MAX = 1024  # pieces per writev (the Linux limit)
#: Compressed, buffered records are written (with a flush point) at least this often by the
#: writer thread's idle tick (:meth:`Output.tick`).
FLUSH_EVERY = 1.0


class Output:
    """A recording's file, with exact accounting of what reached it.

    ``out`` is one file, or the :class:`~agent.sinks.record.files.RecordFiles` of a rotated
    or compressed recording; ``preamble`` (the format's file header) starts every file, with
    the file's first record. With a file descriptor, records wait in a buffer (up to
    256 KiB) and go out with ``writev``, so after a partial write it is known which records
    are whole in the file. A file-like without one gets each record at once through
    ``write``. Only chunk records (``data_len`` >= 0) are counted, in :attr:`tally`.

    Compressed, a batch is compressed and written with a flush point after it (at 256 KiB,
    on :meth:`tick` at most once a second, on :meth:`flush`, which also ends the gzip
    member or zstd frame), and its records count once all of its compressed bytes were
    written (after a fault a reader may decode a few records more than were counted).

    Rotating, the writer calls :meth:`begin` before each record: it closes the file when due
    and opens the next (see :mod:`~agent.sinks.record.files`). Compressed, the size a record
    would take the file to is estimated: what was written, plus the records buffered and
    this one at the compression ratio so far.

    Vanishing. A regular file is watched (:class:`~agent.sinks.record.files.FileWatch`):
    before a write and on :meth:`tick` at most once a second, on :meth:`flush` and before
    a rotation closes it. Records written to it count once it is seen in place after them.
    If it left its path: one error line names it; if it was deleted, the records written to
    it since it was last seen in place are lost (``vanished``); and the recording goes on
    in a new file at its path (records still buffered go there), or fails if none can be
    made there. A file our own rotation closed is no longer watched.

    An OSError fails the recording: one error line names the file and the error, the file is
    closed (not a standard stream) and nothing more is written, to this file or a next one.
    A broken pipe on stdout (its reader went away: ``--record - | head``) fails it too,
    without the line, and is raised, so the command can stop quietly; on any other file (a
    FIFO, a socket) it is an error like any other.

    With a ``ledger``, every record added is settled in it as its flow's (see
    :mod:`~agent.sinks.record.ledger`) when it is counted: written, or lost as
    ``write_failed`` or ``vanished``; a record that is not a chunk is its flow's end.
    """

    def __init__(self, out: BinaryIO | RecordFiles, preamble: bytes = b"",
                 ledger: FlowLedger | None = None) -> None:
        self.tally = Tally(ledger)
        self._files = out if isinstance(out, RecordFiles) else None
        policy = self._files.policy if self._files is not None else None
        self._compress = policy.compress if policy is not None else None
        self._codec: Compressor | None = (
            new_compressor(self._compress) if self._compress else None)
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
        self.vanished = 0  # files that left their path while written
        # closes a file made here to replace one that vanished
        self._own: weakref.finalize[[], Output] | None = None
        if self._files is None:
            self._attach(out)  # type: ignore[arg-type]  # not RecordFiles: a file
        else:
            first = self._files.current
            if first is None:
                first = self._files.next_file()
            self._attach(first)

    def _attach(self, out: BinaryIO) -> None:
        """Write to ``out`` from now on (a file with nothing of this recording yet). Records
        still buffered (for a file that vanished) go to it, after the preamble."""
        self._out: BinaryIO | None = out
        self.name = str(getattr(out, "name", "recording"))
        self._fd: int | None = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            out.flush()  # whatever the file object holds goes first
            self._fd = out.fileno()
        self._stdout = self._fd is not None and is_stdout(self._fd)
        self._watch = FileWatch.of(self._fd, self.name)
        pieces, head = self._pieces, self._preamble
        if pieces and head and pieces[0] is not head:  # buffered for a file that vanished
            pieces.insert(0, head)
            self._ends = [(end + len(head), n, flow) for end, n, flow in self._ends]
            self._pending += len(head)
        self._fresh = not pieces  # no record yet: the next one brings the preamble
        self._file_bytes = 0  # bytes in the file (compressed: what the compressor gave)
        files = self._files
        self._deadline = files.deadline(files.clock()) if files is not None else None

    def add(self, head: bytes, data: bytes, data_len: int, flow: int) -> None:
        """One record of ``flow``: ``head``, then ``data`` as it is (not copied; may be
        empty). ``data_len`` is the chunk's data length counted, < 0 for a flow's end
        record."""
        if self.error is not None or self._out is None:
            self.tally.failed(data_len, flow)
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
        compressed batch at most once a second), look whether the file is in place if due,
        close the file if its time slot is over. Returns the seconds until the next call is
        due (None: not before more records; at most a second while a file is watched)."""
        now = time.monotonic()
        if self._codec is None or now - self._committed_at >= FLUSH_EVERY:
            self._commit()
            self._flush_file_object()
        self._look()
        left = None
        if self._deadline is not None and self._out is not None and not self._fresh \
                and self._files is not None:
            left = self._deadline - self._files.clock()
            if left <= 0:
                self._rotate()
                left = None
        now = time.monotonic()
        wait = FLUSH_EVERY - (now - self._committed_at) if self._pieces else None
        look = self._watch.due(now) if self._watch is not None else None
        return min((w for w in (wait, left, look) if w is not None), default=None)

    def flush(self) -> None:
        """Write everything buffered (compressed, end the member or frame too) and look
        whether the file is in place, so every record written so far is counted."""
        self._commit(final=True)
        self._flush_file_object()
        self._look(force=True)

    def stats(self) -> dict[str, int]:
        t = self.tally
        out = {"records": t.records, "recorded_bytes": t.data_bytes}
        if self._files is not None and self.rotating:
            out.update(self._files.stats())
        if self.error is not None:
            out.update(record_errors=1, record_failed_records=t.failed_records,
                       record_failed_bytes=t.failed_bytes)
        if self.vanished:
            out["record_files_vanished"] = self.vanished
        if t.vanished_records:
            out.update(record_vanished_records=t.vanished_records,
                       record_vanished_bytes=t.vanished_bytes)
        return out

    def _flush_file_object(self) -> None:
        if self._fd is None and self._out is not None and self.error is None:
            try:
                self._out.flush()
            except OSError as e:
                self._fail(e)

    def _rotate(self) -> None:
        """Close the current file (everything written and seen in place, the compressed
        stream ended); if it vanished, it is dropped instead, no new file made here."""
        self._commit(final=True)
        self._look(force=True, replace=False)
        out, files = self._out, self._files
        if self.error is not None or out is None or files is None:
            return
        try:
            out.close()
        except OSError as e:
            self._fail(e)
            return
        self._out = self._watch = None
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

    def _look(self, force: bool = False, replace: bool = True) -> None:
        """Is the watched file still at its path? Only when due (or ``force``). If it is,
        the records written to it so far count as written; if not, :meth:`_vanished`."""
        watch = self._watch
        if watch is None or self.error is not None or (
                not force and watch.due(time.monotonic()) > 0):
            return
        gone = watch.check()
        if gone is None:
            self.tally.confirm()
        else:
            self._vanished(gone, replace)

    def _vanished(self, gone: Vanished, replace: bool) -> None:
        """The file left its path: settle what was written to it, say so once, drop it
        and, if ``replace``, go on in a new file at its path (or fail)."""
        records, nbytes = self.tally.confirm(in_place=not gone.deleted)
        lost = (records, nbytes) if gone.deleted else (0, 0)
        self.vanished += 1
        log.error("recording file vanished while being written; what was written to it since "
                  "it was last seen in place is counted as lost (vanished) unless it was only "
                  "moved", file=self.name, how=gone.how, lost_records=lost[0],
                  lost_bytes=lost[1])
        self._close_out()
        self._watch = None
        if self._compress:  # the old stream is abandoned: the next file starts its own
            self._codec = new_compressor(self._compress)
        if self._files is not None:
            self._files.current = None
        if replace:
            self._replace()

    def _replace(self) -> None:
        """Go on in a new file at the vanished one's path
        (:func:`~agent.sinks.record.files.open_again`); if none can be made there, the
        recording fails and the records still buffered are lost."""
        try:
            f = self._files.reopen(self.name) if self._files is not None else \
                open_again(self.name)
        except OSError as e:
            self._fail(e)
            for _, data_len, flow in self._ends:
                self.tally.failed(data_len, flow)
            self._pieces, self._ends, self._pending = [], [], 0
            return
        if self._files is None:  # made here: closed when replaced again, or at exit
            if self._own is not None:
                self._own()
            self._own = weakref.finalize(self, f.close)
        self._attach(f)
        self.generation += 1
        log.info("recording goes on in a new file at its path", file=self.name)

    def _commit(self, final: bool = False) -> None:
        """Hand the buffered records to the file (to a new one first if it vanished, when
        due to look); count which of them got there whole. ``final``: end the compressed
        stream too."""
        if self.error is not None or self._out is None:
            return
        if not self._pieces and not (final and self._codec is not None):
            return
        self._look()
        if self.error is not None:
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
        """Count the records of one write: whole in the first ``sent`` bytes (written; held
        until the file is seen in place, if it is watched), or lost."""
        whole = ends if not ends or ends[-1][0] <= sent else [e for e in ends if e[0] <= sent]
        self.tally.written(whole, hold=self._watch is not None)
        for _, data_len, flow in ends[len(whole):]:
            self.tally.failed(data_len, flow)

    def settled(self, flow: int, end: bool = False) -> None:
        """A record of ``flow`` that the format does not write (a flow end in JSON lines):
        settled as written, nothing of it being missing."""
        if self.tally.ledger is not None:
            self.tally.ledger.done(flow, end)

    def _fail(self, e: OSError) -> None:
        """The recording failed: say so once, close the file; a broken stdout goes up. What
        was written to a watched file is settled first (written, or vanished)."""
        self._look(force=True, replace=False)
        self.error = e
        quiet = isinstance(e, BrokenPipeError) and self._stdout
        if not quiet:
            log.error("recording failed and is closed; capture and forwarding go on, and "
                      "records from now on are counted as record_failed_*", file=self.name,
                      errno=errno.errorcode.get(e.errno or 0, e.errno), error=e.strerror or str(e))
        self._close_out()
        if quiet:
            raise e

    def _close_out(self) -> None:
        """Close the file, quietly (never a standard stream); none is open after."""
        out, self._out = self._out, None
        if out is not None and (self._fd is None or self._fd > 2):
            with contextlib.suppress(OSError, ValueError):
                out.close()
