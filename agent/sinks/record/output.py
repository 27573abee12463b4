"""A recording's file, with exact accounting of what reached it."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import BinaryIO

import structlog

__all__ = ["Output"]

log = structlog.get_logger("agent.record")

_FLUSH_AT = 256 << 10  # buffered bytes that make a writev
_IOV_MAX = 1024  # pieces per writev (the Linux limit)


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

    With a file descriptor, records wait in a buffer (up to 256 KiB) and go out with
    ``writev``, so after a partial write it is known which records are whole in the file.
    A file-like without one gets each record at once through ``write``. Only chunk records
    (``data_len`` >= 0) are counted: ``records``/``data_bytes`` once accepted in full,
    ``failed_records``/``failed_bytes`` once the recording has failed.

    An OSError fails the recording: one error line names the file and the error, the file is
    closed (not a standard stream) and nothing more is written. A broken pipe on stdout (its
    reader went away: ``--record - | head``) fails it too, without the line, and is raised,
    so the command can stop quietly; on any other file (a FIFO, a socket) it is an error like
    any other.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.name = str(getattr(out, "name", "recording"))
        self._fd: int | None = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            out.flush()  # whatever the file object holds goes first
            self._fd = out.fileno()
        self._stdout = self._fd is not None and _is_stdout(self._fd)
        self._pieces: list[bytes] = []
        self._ends: list[tuple[int, int]] = []  # per buffered record: (end offset, data_len)
        self._pending = 0
        self._sent = 0
        self.error: OSError | None = None
        self.records = self.data_bytes = self.failed_records = self.failed_bytes = 0

    def add(self, head: bytes, data: bytes, data_len: int) -> None:
        """One record: ``head``, then ``data`` as it is (not copied; may be empty).
        ``data_len`` is the chunk's data length counted, < 0 for records that are not
        chunks."""
        if self.error is not None:
            self._lose(data_len)
            return
        pieces = self._pieces
        pieces.append(head)
        if data:
            pieces.append(data)
        self._pending += len(head) + len(data)
        self._ends.append((self._pending, data_len))
        if self._fd is None or self._pending >= _FLUSH_AT or len(pieces) >= _IOV_MAX:
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
            some = pieces[i : i + _IOV_MAX]
            n = os.writev(self._fd, some)
            self._sent += n
            if n == sum(map(len, some)):  # all of them: the common case
                i += len(some)
                continue
            while i < len(pieces) and n >= len(pieces[i]):
                n -= len(pieces[i])
                i += 1
            if n:  # a partial write: the rest of this piece goes next
                pieces[i] = pieces[i][n:]

    def _settle(self, ends: list[tuple[int, int]], sent: int) -> None:
        """Count the records of one write: whole in the first ``sent`` bytes, or lost."""
        if ends and ends[-1][0] <= sent:  # all whole: the common case
            lens = [n for _, n in ends if n >= 0]
            self.records += len(lens)
            self.data_bytes += sum(lens)
            return
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
        """The recording failed: say so once, close the file; a broken stdout goes up."""
        self.error = e
        quiet = isinstance(e, BrokenPipeError) and self._stdout
        if not quiet:
            log.error("recording failed and is closed; capture and forwarding go on, and "
                      "records from now on are counted as record_failed_*", file=self.name,
                      errno=errno.errorcode.get(e.errno or 0, e.errno), error=e.strerror or str(e))
        if self._fd is None or self._fd > 2:
            with contextlib.suppress(OSError, ValueError):
                self._out.close()
        if quiet:
            raise e
