"""Records set aside on disk, so that the look-ahead of a replay stays within its memory.

When the records read ahead would take the replay past its memory, those of connections that
are not replaying yet (waiting for their time or for a free slot) go to one temporary file
(unlinked: it disappears with the process) instead, each connection's in a chain of its own
(every record points to the next one of its connection, so a connection costs two offsets in
memory whatever it holds on disk). When the connection's turn comes its records are read back
in order, a piece at a time. The file is emptied whenever no chain holds anything.

The file goes to ``$TMPDIR`` if that is set, else to ``/var/tmp``: ``/tmp`` is often a
tmpfs, which is memory (and counts against a memory cgroup's limit).
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from typing import IO

from agent.model import Direction
from agent.sinks.record.format import DIR_OF, DIRS

__all__ = ["Chain", "Spill", "Spilled", "spill_dir"]

#: next record's offset (-1: none), end record?, direction, seen_at, due, gap_bytes, data length
_HEAD = struct.Struct("<qBBddQI")
_NEXT = struct.Struct("<q")


@dataclass(slots=True)
class Chain:
    """One connection's records on disk: the first and last one's offsets, how many."""

    head: int = -1
    tail: int = -1
    count: int = 0


@dataclass(frozen=True, slots=True)
class Spilled:
    """One record read back: a chunk, or the end of its flow (``end``)."""

    end: bool
    direction: Direction
    seen_at: float
    due: float
    gap: int
    data: bytes


def spill_dir() -> str | None:
    """Where the temporary file goes by default (see the module docstring)."""
    if os.environ.get("TMPDIR"):
        return None  # tempfile's choice: $TMPDIR
    var_tmp = "/var/tmp"
    return var_tmp if os.access(var_tmp, os.W_OK | os.X_OK) else None


class Spill:
    """The temporary file (made in ``directory``, default :func:`spill_dir`, on first
    use)."""

    def __init__(self, directory: str | None = None) -> None:
        self._dir = directory
        self._file: IO[bytes] | None = None
        self._end = 0
        self._live = 0  # chains holding something
        self.written = 0  # data bytes ever set aside (for the report)
        self.records = 0

    def _fd(self) -> int:
        if self._file is None:
            where = self._dir if self._dir is not None else spill_dir()
            self._file = tempfile.TemporaryFile(dir=where)  # noqa: SIM115 (closed in close)
        return self._file.fileno()

    def push(self, chain: Chain, rec: Spilled) -> None:
        """Append ``rec`` to ``chain``."""
        fd = self._fd()
        off = self._end
        head = _HEAD.pack(-1, rec.end, DIRS[rec.direction], rec.seen_at, rec.due, rec.gap,
                          len(rec.data))
        os.pwritev(fd, [head, rec.data], off)
        self._end += len(head) + len(rec.data)
        if chain.count:
            os.pwrite(fd, _NEXT.pack(off), chain.tail)
        else:
            chain.head = off
            self._live += 1
        chain.tail = off
        chain.count += 1
        self.written += len(rec.data)
        self.records += 1

    def pop(self, chain: Chain) -> Spilled:
        """The first record of a ``chain`` that holds one, taken off it."""
        fd = self._fd()
        raw = os.pread(fd, _HEAD.size, chain.head)
        nxt, end, d, seen_at, due, gap, n = _HEAD.unpack(raw)
        data = os.pread(fd, n, chain.head + _HEAD.size) if n else b""
        chain.head = nxt
        chain.count -= 1
        if not chain.count:
            self._emptied(chain)
        return Spilled(bool(end), DIR_OF.get(d, Direction.UNKNOWN), seen_at, due, gap, data)

    def drop(self, chain: Chain) -> None:
        """Forget what ``chain`` holds."""
        if chain.count:
            chain.count = 0
            self._emptied(chain)

    def _emptied(self, chain: Chain) -> None:
        chain.head = chain.tail = -1
        self._live -= 1
        if not self._live and self._file is not None:
            os.ftruncate(self._file.fileno(), 0)
            self._end = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
