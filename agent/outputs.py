"""The files a run writes (``--record``, ``--stats-json``, the summary on stderr): checked
at start, never clobbered.

Every output path is checked before anything starts: it is not a directory, and its directory
exists and is writable (or it is an existing device or FIFO that is writable); otherwise
:class:`OutputError` names the path. A regular file that exists and is not empty is never
truncated: the output goes to the next free ``STEM.N.SUFFIX`` (N = 1, 2, ...), created with
``O_EXCL`` so two runs never share a file, and a warning names it. ``overwrite`` truncates
instead.
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
path that cannot be written; 3 degraded: a sink failed or a capture file was cut short (see
the summary); 130 offline replay interrupted; 141 stdout's reader went away.
Existing non-empty output files are never overwritten: NAME.1.EXT, NAME.2.EXT, ... are used
instead (--overwrite truncates).
"""

_MAX_NUMBER = 10_000


class OutputError(Exception):
    """An output path cannot be written (one line naming it)."""


def check_output_path(path: Path, what: str) -> None:
    """Raise :class:`OutputError` unless ``path`` can be written (see the module docstring)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = 0
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {what} {path}: it is a directory")
    if mode and not stat.S_ISREG(mode):  # a device or a FIFO: written in place
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write {what} {path}: permission denied")
        return
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: directory {parent} is not writable")


def open_output(path: Path, what: str, overwrite: bool = False) -> BinaryIO:
    """Open ``path`` for writing without clobbering anything (see the module docstring).

    Its ``name`` is the path actually written. Raises :class:`OutputError`.
    """
    check_output_path(path, what)
    try:
        if overwrite:
            return open(path, "wb")
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # if someone else just made it: renamed
                return open(path, "wb", opener=_exclusive)
        elif not path.is_file() or path.stat().st_size == 0:
            return open(path, "ab")  # a device, a FIFO or an empty file: nothing to lose
        f = _open_numbered(path)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror}") from None
    log.warning(f"{what} exists and is not empty; writing a new file instead (--overwrite "
                "replaces it)", path=str(path), new=f.name)
    return f


def _open_numbered(path: Path) -> BinaryIO:
    """The first ``STEM.N.SUFFIX`` that does not exist yet, created exclusively."""
    for n in range(1, _MAX_NUMBER):
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        with contextlib.suppress(FileExistsError):
            return open(candidate, "wb", opener=_exclusive)
    raise FileExistsError(0, f"{path.stem}.1{path.suffix} to .{_MAX_NUMBER - 1} all exist")


def _exclusive(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_EXCL, 0o666)


class RunOutputs:
    """The recording and the stats file of one run, opened (or reserved) at start.

    ``record`` is None without ``--record``, stdout's binary stream for ``-``.
    """

    def __init__(self, record: str | None, stats_json: str | None, overwrite: bool) -> None:
        # Every path first, so that a bad one leaves no file behind.
        if record is not None and record != "-":
            check_output_path(Path(record), "recording")
        if stats_json is not None:
            check_output_path(Path(stats_json), "stats file")
        self.record: BinaryIO | None = None
        if record == "-":
            self.record = sys.stdout.buffer
        elif record is not None:
            self.record = open_output(Path(record), "recording", overwrite)
        self._stats: BinaryIO | None = None
        if stats_json is not None:
            self._stats = open_output(Path(stats_json), "stats file", overwrite)

    def finish(self, stats: dict[str, int] | None, failed: bool = False) -> list[str]:
        """Close the recording (not stdout; its writer counted any error), then, given the
        run's stats: the summary on stderr, the stats file and, unless the run ``failed``, a
        "degraded" line if it was. Returns why it was degraded (see
        :func:`agent.summary.degradation`; empty if it was not)."""
        if self.record is not None and self.record is not sys.stdout.buffer:
            with contextlib.suppress(OSError):
                self.record.close()
        if stats is None:
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


def stdout_closed() -> int:
    """The reader of stdout went away (``| head``): returns the status to stop with quietly,
    as a filter killed by SIGPIPE does. stdout now points at /dev/null, so the interpreter's
    last flush of it cannot fail ("Exception ignored ...")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE_CLOSED
