"""The files of one recording: their names, when a new one starts (``--record-rotate``), and
the room they may take together (``--record-max-total``).

Names. The ``--record`` path is a :func:`time.strftime` pattern, expanded in local time when
each file opens (``/var/lib/m/rec-%Y%m%d-%H%M.bin``; directories are not created). With
``--record-compress`` the compression's suffix (``.gz``, ``.zst``) is added unless the path
ends with it (or names a FIFO, a device or a stream, written in place). A file is never
written over: when NAME exists, the next free ``STEM.N.SUFFIX`` is created instead (N = 1,
2, ...; before a compression suffix: ``rec.1.bin.gz``), always with ``O_EXCL``, and within a
run N only grows for one NAME (a name this run used, even one it deleted since, is not used
again), so a run writes ``rec.bin``, ``rec.1.bin``, ``rec.2.bin``, ... in that order. Only
the first file follows ``--overwrite``.

Rotation. A new file starts before a record when the current one holds records and either
(size) that record would take it past SIZE (a record larger than SIZE gets a file of its own;
compressed, SIZE counts compressed bytes, estimated for the records not compressed yet at the
ratio so far, so a file may pass SIZE a little), or (time) the current DURATION slot of the
local clock is over (slots are aligned: ``1h`` rotates on the hour, ``1d`` at midnight;
``15m`` at :00, :15, ...). A record is never split: every file starts with its format's
header and is readable alone. A file is closed when its slot ends even if no record comes
(the writer thread's idle tick); the next one opens with the next record, so no empty files
are made.

Room. With ``--record-max-total SIZE``, whenever a file is closed the oldest closed files of
this run (never another run's, never the one being written) are deleted until the closed
ones take at most SIZE less the rotation SIZE, so everything this run has on disk stays
within SIZE (plus at most one record); with a time rotation only, the closed files take at
most SIZE.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from agent.mirror.budget import format_size, parse_size
from agent.sinks.record.codec import SUFFIXES

__all__ = ["CHECK_EVERY", "MIN_ROTATE_BYTES", "FileWatch", "RecordFiles", "RecordPolicy",
           "Rotation", "Vanished", "create_numbered", "is_stdout", "numbered", "open_again",
           "parse_rotation"]

log = structlog.get_logger("agent.record")

MIN_ROTATE_BYTES = 1024
_MAX_NUMBER = 100_000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|min|h|d)")
_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_COMPRESSED = tuple(SUFFIXES.values())
#: Seconds between two looks at whether a recording file is still at its path (at most).
CHECK_EVERY = 1.0


@dataclass(frozen=True, slots=True)
class Rotation:
    """When a new file starts: past ``max_bytes``, at the end of each ``seconds`` slot."""

    max_bytes: int | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class RecordPolicy:
    """How a recording is split (``rotation``), trimmed (``max_total`` bytes) and compressed
    (``compress``: a name of :data:`agent.sinks.record.codec.COMPRESSIONS`)."""

    rotation: Rotation | None = None
    max_total: int | None = None
    compress: str | None = None


def parse_rotation(text: str) -> Rotation:
    """``SIZE``, ``DURATION`` or both, comma-separated (``256MiB``, ``1h``, ``1GiB,15m``).
    Durations: ``s``, ``m``/``min``, ``h``, ``d`` (lower case), at least 1 s; sizes as
    ``--memory-limit`` (``M`` is MiB), at least 1 KiB; a number needs its unit. ValueError
    saying why."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"{text!r} is not SIZE, DURATION or SIZE,DURATION (e.g. 256MiB, 1h, "
                         "256MiB,1h)")
    size: int | None = None
    seconds: float | None = None
    for part in parts:
        m = _DURATION.fullmatch(part)
        if m is not None and seconds is None:
            seconds = float(m.group(1)) * _SECONDS[m.group(2)]
            if seconds < 1:
                raise ValueError(f"{part!r}: rotate at most every second")
        elif m is None and size is None:
            if part.isdigit():
                raise ValueError(f"{part!r} has no unit: give a size (256MiB) or a duration "
                                 "(1h)")
            size = parse_size(part)
            if size < MIN_ROTATE_BYTES:
                raise ValueError(f"{part!r}: rotate at {MIN_ROTATE_BYTES} bytes or more")
        else:
            raise ValueError(f"{text!r} gives two {'durations' if m else 'sizes'}")
    return Rotation(size, seconds)


def numbered(path: Path, n: int) -> Path:
    """``STEM.N.SUFFIX`` of ``path`` (``rec.bin`` → ``rec.3.bin``), the number before a
    compression suffix (``rec.bin.gz`` → ``rec.3.bin.gz``)."""
    name = path.name
    tail = next((s for s in _COMPRESSED if name.endswith(s) and len(name) > len(s)), "")
    base = Path(name[: len(name) - len(tail)])
    return path.with_name(f"{base.stem}.{n}{base.suffix}{tail}")


def _exclusive(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_EXCL, 0o666)


def create_numbered(path: Path, start: int = 1) -> tuple[BinaryIO, int]:
    """The first ``STEM.N.SUFFIX`` with N >= ``start`` that does not exist yet, created
    exclusively (N = 0 is ``path`` itself), and its N. OSError if none can be made."""
    for n in range(start, _MAX_NUMBER):
        candidate = numbered(path, n) if n else path
        with contextlib.suppress(FileExistsError):
            return open(candidate, "wb", opener=_exclusive), n
    raise FileExistsError(errno.EEXIST, f"{numbered(path, start).name} to "
                          f".{_MAX_NUMBER - 1} all exist", str(path))


def _special(path: str) -> bool:
    """Does ``path`` name something written in place (a FIFO, a device, a stream)?"""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return path == "-"


def with_suffix(pattern: str, compress: str | None) -> str:
    """``pattern`` with the compression's suffix added unless it ends with it already."""
    suffix = SUFFIXES.get(compress or "", "")
    return pattern if not suffix or pattern.endswith(suffix) else pattern + suffix


def open_again(path: str) -> BinaryIO:
    """A new file at ``path``, whose file vanished: created, never over a file that is there
    now (then the next free ``STEM.N.SUFFIX``). OSError if it cannot be made (its directory
    is gone, say)."""
    return create_numbered(Path(path), 0)[0]


@dataclass(frozen=True, slots=True)
class Vanished:
    """How a watched file left its path: ``deleted`` (no name links to it any more, so what
    was written to it is gone) or not (moved or linked elsewhere: its bytes are there), and
    ``how``, in words."""

    deleted: bool
    how: str


def is_stdout(fd: int) -> bool:
    """Is ``fd`` stdout (fd 1, or the same file opened again, as ``/dev/stdout``)?"""
    if fd == 1:
        return True
    try:
        return os.path.samestat(os.fstat(fd), os.fstat(1))
    except OSError:
        return False


def _standard_stream(st: os.stat_result) -> bool:
    """Is ``st`` the file of stdin, stdout or stderr (a shell's redirection)?"""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.fstat(fd)):
                return True
    return False


class FileWatch:
    """Is the open file ``fd`` still the file at ``path``? :meth:`check` compares fstat of
    the descriptor with stat of the path; the writer looks when :meth:`due` says (at most
    once every :data:`CHECK_EVERY` seconds) and whenever it must know (a flush, before its
    rotation closes the file). Made by :meth:`of`, for regular files only."""

    def __init__(self, fd: int, path: str, st: os.stat_result) -> None:
        self.fd, self.path = fd, path
        self._id = (st.st_dev, st.st_ino)
        self.checked_at = time.monotonic()

    @classmethod
    def of(cls, fd: int | None, path: str) -> FileWatch | None:
        """A watch of ``fd`` if it is a regular file that ``path`` names now; None for what
        is written in place (no descriptor, a FIFO, a device, ``-``, ``/dev/...`` and
        ``/proc/...`` names, a standard stream even when redirected to a file) or a path
        that does not name it."""
        if fd is None or path == "-" or path.startswith(("/dev/", "/proc/")):
            return None
        try:
            st = os.fstat(fd)
            same = os.path.samestat(st, os.stat(path))
        except (OSError, ValueError):
            return None
        if not same or not stat.S_ISREG(st.st_mode) or _standard_stream(st):
            return None
        return cls(fd, path, st)

    def due(self, now: float) -> float:
        """Seconds until the next look is due (<= 0: due now)."""
        return self.checked_at + CHECK_EVERY - now

    def check(self) -> Vanished | None:
        """None if the file is still at its path (or that cannot be told: no claim), else
        how it left."""
        self.checked_at = time.monotonic()
        try:
            st = os.fstat(self.fd)
            try:
                at: os.stat_result | None = os.stat(self.path)
            except (FileNotFoundError, NotADirectoryError):
                at = None
        except OSError:
            return None  # a permission taken away, say: cannot tell
        if st.st_nlink and at is not None and (at.st_dev, at.st_ino) == self._id:
            return None
        deleted = st.st_nlink == 0
        if at is not None:
            how = "replaced by another file"
        elif not os.path.isdir(os.path.dirname(self.path) or "."):
            how = "its directory is gone"
        else:
            how = "deleted" if deleted else "moved away"
        return Vanished(deleted, how)


class RecordFiles:
    """The files of one recording, opened one after another (see the module docstring).

    The first file is opened by the caller (:class:`agent.cli.outputs.RunOutputs` checks and
    warns as for any output) and handed over with :meth:`adopt`, or by :meth:`next_file`.
    The record writer (:class:`~agent.sinks.record.output.Output`, on the writer thread)
    opens the next ones and says when one is closed (:meth:`file_closed`); :meth:`close`
    closes the file still open at the end. Counts ``rotated`` (files started after the
    first) and ``deleted`` (files removed for the total size).
    """

    def __init__(self, pattern: str, policy: RecordPolicy,
                 clock: Callable[[], float] = time.time) -> None:
        self.pattern = pattern if _special(pattern) else with_suffix(pattern, policy.compress)
        self.policy = policy
        self.clock = clock
        self.current: BinaryIO | None = None
        self.rotated = self.deleted = 0
        self._opened = 0
        self._numbers: dict[str, int] = {}  # expanded name → the last N this run used
        self._done: deque[tuple[str, int]] = deque()  # closed files of this run, oldest first
        self._done_bytes = 0
        self._delete_failed = False

    def name_at(self, when: float) -> str:
        """The file name the pattern gives at time ``when`` (strftime, local time)."""
        return time.strftime(self.pattern, time.localtime(when)) if "%" in self.pattern \
            else self.pattern

    def adopt(self, first: BinaryIO, name: str, number: int) -> None:
        """The first file, opened by the caller for the pattern's ``name`` as its ``number``
        (0: the name itself, N: ``STEM.N.SUFFIX``)."""
        self.current = first
        self._numbers[name] = number
        self._opened += 1

    def next_file(self) -> BinaryIO:
        """Create the next file (never an existing one) and make it the current one.
        OSError with ``filename`` set if it cannot be made."""
        name = self.name_at(self.clock())
        f, n = create_numbered(Path(name), self._numbers.get(name, -1) + 1)
        self._numbers[name] = n
        self.current = f
        if self._opened:
            self.rotated += 1
        self._opened += 1
        return f

    def reopen(self, name: str) -> BinaryIO:
        """The current file, ``name``, vanished: a new one at its name (:func:`open_again`)
        is the current one, not counted as rotated. OSError if it cannot be made."""
        self.current = None
        self.current = f = open_again(name)
        self._opened += 1
        return f

    def deadline(self, opened_at: float) -> float | None:
        """When a file opened at ``opened_at`` (clock time) is due to close: the end of its
        time slot; None without a time rotation."""
        rot = self.policy.rotation
        if rot is None or rot.seconds is None:
            return None
        offset = time.localtime(opened_at).tm_gmtoff  # slots follow the local clock
        slot = (opened_at + offset) // rot.seconds
        return (slot + 1) * rot.seconds - offset

    def file_closed(self, name: str, size: int) -> None:
        """The writer closed file ``name`` holding ``size`` bytes: keep the total in bounds."""
        self.current = None
        self._done.append((name, size))
        self._done_bytes += size
        max_total = self.policy.max_total
        if max_total is None:
            return
        rot = self.policy.rotation
        room = max_total - (rot.max_bytes or 0) if rot is not None else max_total
        while self._done and self._done_bytes > room:
            old, old_size = self._done.popleft()
            self._done_bytes -= old_size
            self._delete(old, old_size)

    def _delete(self, name: str, size: int) -> None:
        try:
            os.unlink(name)
        except FileNotFoundError:
            return  # someone else removed it
        except OSError as e:
            if not self._delete_failed:
                self._delete_failed = True
                log.warning("cannot delete an old recording file for --record-max-total; "
                            "the recording goes on", file=name, error=e.strerror)
            return
        self.deleted += 1
        log.info("deleted the oldest recording file to stay under --record-max-total",
                 file=name, size=format_size(size), max_total=format_size(
                     self.policy.max_total or 0))

    def close(self) -> None:
        """Close the file still open, if any (its writer has flushed it)."""
        f, self.current = self.current, None
        if f is not None:
            with contextlib.suppress(OSError, ValueError):
                f.close()

    def stats(self) -> dict[str, int]:
        """``record_files_rotated`` and ``record_files_deleted``."""
        return {"record_files_rotated": self.rotated, "record_files_deleted": self.deleted}
