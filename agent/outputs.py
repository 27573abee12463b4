"""The files a run writes (``--record``, ``--stats-json``, the summary on stderr): checked
at start, never shared, never clobbered, and not left behind by a run that failed to start.

Every output path is checked before anything starts: it is not a directory, and its directory
exists and is writable, or it is an existing character device or FIFO that is writable (any
other kind of file is refused); and the two outputs are not one file. Otherwise
:class:`OutputError` names the path (exit 2).

A character device or a FIFO is written in place. An existing regular file, empty or not, is
never written: every run creates its files (empty) at start, so an empty file may be another
run's that just started. The output goes to the next free ``STEM.N.SUFFIX`` (N = 1, 2, ...)
instead, created with ``O_EXCL`` so two runs never share a file, and a warning names it.
``overwrite`` truncates instead.

A run that fails before it starts closes and removes the files it created; a run that fails
later removes a recording it created and never wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO

import structlog

from agent.summary import degradation, format_summary

__all__ = ["EXIT_DEGRADED", "EXIT_HELP", "EXIT_PIPE_CLOSED", "OutputError", "RunOutputs",
           "check_output_path", "open_output", "stdout_closed"]

log = structlog.get_logger("agent.outputs")

EXIT_DEGRADED = 3
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a filter killed by it
EXIT_HELP = """
exit status: 0 done; 1 failed (summary, then the cause); 2 bad usage or input, or an output
path that cannot be written; 3 degraded, said by the last line: a capture file was cut short,
a recording failed or could not keep up, or the forward sink dropped flows (with why), and
for inspect a damaged recording; 130 offline replay interrupted; 141 stdout's reader went away.
Existing output files are never written to: NAME.1.EXT, NAME.2.EXT, ... are used instead
(--overwrite truncates); devices and FIFOs are written in place.
"""

_MAX_NUMBER = 10_000


class OutputError(Exception):
    """An output path cannot be written (one line naming it)."""


def _mode(path: Path, what: str) -> int:
    """``path``'s file type and mode (following links), 0 if there is nothing there."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror}") from None


def check_output_path(path: Path, what: str) -> None:
    """Raise :class:`OutputError` unless ``path`` can be written (see the module docstring)."""
    mode = _mode(path, what)
    if stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {what} {path}: it is a directory")
    if mode and not stat.S_ISREG(mode):
        if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            raise OutputError(f"cannot write {what} {path}: not a regular file, a character "
                              "device or a FIFO")
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write {what} {path}: permission denied")
        return
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: directory {parent} is not writable")


def open_output(path: Path, what: str, overwrite: bool = False) -> BinaryIO:
    """Open ``path`` for writing without sharing or clobbering a file (see the module
    docstring). Its ``name`` is the path actually written. Raises :class:`OutputError`."""
    return _open_output(path, what, overwrite)[0]


def _open_output(path: Path, what: str, overwrite: bool) -> tuple[BinaryIO, bool]:
    """:func:`open_output`, and whether it created the file."""
    check_output_path(path, what)
    try:
        mode = _mode(path, what)
        if mode and not stat.S_ISREG(mode):  # a character device or a FIFO
            return open(path, "ab"), False
        with contextlib.suppress(FileExistsError):  # if someone else just made it: renamed
            return open(path, "wb", opener=_exclusive), True
        if overwrite:
            return open(path, "wb"), False
        f = _open_numbered(path)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror}") from None
    log.warning(f"{what} exists; writing a new file instead (--overwrite replaces it)",
                path=str(path), new=f.name)
    return f, True


def _open_numbered(path: Path) -> BinaryIO:
    """The first ``STEM.N.SUFFIX`` that does not exist yet, created exclusively."""
    for n in range(1, _MAX_NUMBER):
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        with contextlib.suppress(FileExistsError):
            return open(candidate, "wb", opener=_exclusive)
    raise FileExistsError(0, f"{path.stem}.1{path.suffix} to .{_MAX_NUMBER - 1} all exist")


def _exclusive(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_EXCL, 0o666)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return a.resolve() == b.resolve()


class RunOutputs:
    """The recording and the stats file of one run, opened (or reserved) at start.

    ``record`` is None without ``--record``, stdout's binary stream for ``-``.
    """

    def __init__(self, record: str | None, stats_json: str | None, overwrite: bool) -> None:
        # Every path first, so that a bad one leaves no file behind.
        named = [(Path(record), "recording")] if record not in (None, "-") else []
        if stats_json is not None:
            named.append((Path(stats_json), "stats file"))
        for path, what in named:
            check_output_path(path, what)
        if len(named) == 2 and _same_file(named[0][0], named[1][0]):
            raise OutputError(f"--record and --stats-json name the same file {named[0][0]}; "
                              "give each its own")
        self._created: set[str] = set()
        self.record: BinaryIO | None = None
        self._stats: BinaryIO | None = None
        try:
            if record == "-":
                self.record = sys.stdout.buffer
            elif record is not None:
                self.record = self._open(Path(record), "recording", overwrite)
            if stats_json is not None:
                self._stats = self._open(Path(stats_json), "stats file", overwrite)
        except BaseException:
            self.finish(None, failed=True)
            raise

    def _open(self, path: Path, what: str, overwrite: bool) -> BinaryIO:
        f, created = _open_output(path, what, overwrite)
        if created:
            self._created.add(f.name)
        return f

    def finish(self, stats: dict[str, int] | None, failed: bool = False) -> list[str]:
        """Close the recording (not stdout; its writer counted any error; a background
        writer must be closed first). Without ``stats`` (the run never started) close and
        remove every file this run created, and stop there. Given the run's stats: the
        summary on stderr, the stats file and, unless the run ``failed``, a "degraded" line
        if it was. Returns why it was degraded (see :func:`agent.summary.degradation`; empty
        if it was not)."""
        self._close(self.record, remove_if_empty=failed or stats is None)
        if stats is None:
            self._close(self._stats, remove_if_empty=True)
            return []
        sys.stderr.write(format_summary(stats))
        reasons = degradation(stats)
        if self._stats is not None:
            try:
                with self._stats as f:
                    f.write((json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())
            except OSError as e:
                log.error("cannot write the stats file", file=self._stats.name,
                          error=e.strerror)
                reasons.append("the stats file could not be written")
        if reasons and not failed:
            sys.stderr.write(f"mirror-agent: degraded: {'; '.join(reasons)} (see the summary)\n")
        return reasons

    def _close(self, f: BinaryIO | None, remove_if_empty: bool) -> None:
        """Close ``f`` (not stdout); remove it if asked, this run created it and it is empty."""
        if f is None or f is sys.stdout.buffer:
            return
        with contextlib.suppress(OSError):
            f.close()
        name = str(f.name)
        if remove_if_empty and name in self._created:
            with contextlib.suppress(OSError):
                if os.stat(name).st_size == 0:
                    os.unlink(name)
                    self._created.discard(name)


def stdout_closed() -> int:
    """The reader of stdout went away (``| head``): returns the status to stop with quietly,
    as a filter killed by SIGPIPE does. stdout now points at /dev/null, so the interpreter's
    last flush of it cannot fail ("Exception ignored ...")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE_CLOSED
