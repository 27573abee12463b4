"""The files a run writes (``--record``, ``--stats-json``, the summary on stderr): checked
at start, never shared, never clobbered, and not left behind by a run that failed to start.

Every output path is checked before anything starts: it is not a directory, and its directory
exists and is writable, or it is an existing character device or FIFO that is writable (any
other kind of file is refused); the two outputs are not one file; and neither is an input
(a capture file being read: even with ``overwrite`` it is never written). Otherwise
:class:`OutputError` names the path (exit 2).

``-`` is stdout; ``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N`` and ``/proc/self/fd/N`` are
the caller's streams too, written in place through a copy of that descriptor, whatever they
are (a regular file after ``>``, a pipe, a terminal); a closed one is an error. A character
device or a FIFO is written in place. An existing regular file, empty or not, is
never written: every run creates its files (empty) at start, so an empty file may be another
run's that just started. The output goes to the next free ``STEM.N.SUFFIX`` (N = 1, 2, ...;
before a compression suffix: ``rec.1.bin.gz``) instead, created with ``O_EXCL`` so two runs
never share a file, and a warning names it. ``overwrite`` truncates instead.

The recording's path is a strftime pattern (expanded when a file opens); given a
:class:`~agent.sinks.record.RecordPolicy` (``--record-rotate``, ``--record-max-total``,
``--record-compress``) the recording is a :class:`~agent.sinks.record.RecordFiles` whose
first file is opened here (and the compression's suffix added to the name); rotation needs a
regular file, not a stream, a FIFO or a device (:class:`OutputError`).

A run that fails before it starts closes and removes the files it created; a run that fails
later removes a recording it created and never wrote.

``--record nats://HOST[:PORT]/SUBJECT`` is no file: the URL is checked here (a bad one is an
:class:`OutputError`) and :attr:`RunOutputs.record` is its
:class:`~agent.sinks.nats.NatsTarget`, which the mirror publishes to
(:class:`~agent.sinks.nats.NatsRecorder`; nothing is opened or left behind here), with the
``--nats-*`` files (``nats_auth``) checked here too: each readable, the CA and the client
certificate loadable, the token file one word, the creds file a creds file (OutputError
naming the flag). A broker that is down does not stop the run from starting: the recorder
counts what it drops (one that refuses the agent's credential does: exit 1).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import structlog

from agent.cli.summary import degradation, format_summary
from agent.sinks.nats.auth import NatsAuth
from agent.sinks.nats.url import NatsTarget, is_nats_url, parse_nats_url, redact_url
from agent.sinks.record.files import RecordFiles, RecordPolicy, create_numbered

__all__ = ["EXIT_DEGRADED", "EXIT_HELP", "EXIT_PIPE_CLOSED", "OutputError", "RunOutputs",
           "check_output_path", "open_output", "stdout_closed", "stream_fd"]

log = structlog.get_logger("agent.cli.outputs")

EXIT_DEGRADED = 3
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a filter killed by it
EXIT_HELP = """
exit status: 0 done; 1 failed (summary, then the cause); 2 bad usage or input, or an output
path that cannot be written; 3 degraded, said by the last line: a capture file was cut short,
a recording failed or could not keep up, or the forward sink dropped flows (with why), and
for inspect a damaged recording; 130 offline replay interrupted; 141 stdout's reader went away.
Existing output files are never written to: NAME.1.EXT, NAME.2.EXT, ... are used instead
(--overwrite truncates), and never an input file; devices, FIFOs and the caller's streams
(-, /dev/stdout, /dev/stderr) are written in place.
"""

_STD_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2}
_FD_PATH = re.compile(r"/(?:dev/fd|proc/(self|thread-self|\d+)/fd)/(\d+)")
_FLAG = {"recording": "--record", "stats file": "--stats-json"}


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


def _open_output(path: Path, what: str, overwrite: bool) -> tuple[BinaryIO, bool, int]:
    """:func:`open_output`, whether it created the file, and its N in ``STEM.N.SUFFIX`` (0:
    ``path`` itself)."""
    check_output_path(path, what)
    try:
        mode = _mode(path, what)
        if mode and not stat.S_ISREG(mode):  # a character device or a FIFO
            return open(path, "ab"), False, 0
        with contextlib.suppress(FileExistsError):  # if someone else just made it: renamed
            return open(path, "wb", opener=_exclusive), True, 0
        if overwrite:
            return open(path, "wb"), False, 0
        f, n = create_numbered(path, 1)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror}") from None
    log.warning(f"{what} exists; writing a new file instead (--overwrite replaces it)",
                path=str(path), new=f.name)
    return f, True, n


def _exclusive(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_EXCL, 0o666)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return a.resolve() == b.resolve()


def stream_fd(text: str) -> int | None:
    """The caller's file descriptor an output names: 1 for ``-``, ``/dev/stdout`` and
    ``/dev/fd/1``, 2 for ``/dev/stderr``, N for ``/dev/fd/N`` and ``/proc/self/fd/N``; None for
    any other path."""
    if text == "-":
        return 1
    norm = os.path.normpath(text)
    if norm in _STD_STREAMS:
        return _STD_STREAMS[norm]
    m = _FD_PATH.fullmatch(norm)
    if m is None:
        return None
    pid = m.group(1)
    if pid is not None and pid.isdigit() and int(pid) != os.getpid():
        return None  # another process's descriptor: a path like any other
    return int(m.group(2))


def _fd_name(fd: int) -> str:
    return {0: "stdin", 1: "stdout", 2: "stderr"}.get(fd, f"file descriptor {fd}")


def _check_stream(fd: int, text: str, what: str) -> None:
    """OutputError unless descriptor ``fd`` is open for writing."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise OutputError(f"cannot write {what} to {text}: {_fd_name(fd)} is closed") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise OutputError(f"cannot write {what} to {text}: {_fd_name(fd)} is open for reading "
                          "only")


def _output_stat(text: str) -> os.stat_result | None:
    """What an output names, if it exists yet (following links; a stream: its descriptor)."""
    fd = stream_fd(text)
    try:
        return os.fstat(fd) if fd is not None else os.stat(text)
    except OSError:
        return None


def _check_not_input(text: str, what: str, inputs: Sequence[Path]) -> None:
    """OutputError if output ``text`` is one of the ``inputs`` (same inode, or same path)."""
    st, fd = _output_stat(text), stream_fd(text)
    for inp in inputs:
        try:
            same = st is not None and os.path.samestat(st, os.stat(inp))
        except OSError:
            same = False
        if same or (fd is None and os.path.realpath(text) == os.path.realpath(inp)):
            via = "" if fd is None else f" ({_fd_name(fd)} is {inp})"
            raise OutputError(f"{_FLAG[what]} names the input file {text}{via}; write the "
                              "output elsewhere")


def _one_output(record: str, stats: str) -> bool:
    """Do ``--record`` and ``--stats-json`` name one file or stream?"""
    a, b = stream_fd(record), stream_fd(stats)
    if a is None and b is None:
        return _same_file(Path(record), Path(stats))
    if a is not None and a == b:
        return True
    sa, sb = _output_stat(record), _output_stat(stats)
    return sa is not None and sb is not None and os.path.samestat(sa, sb) and not (
        stat.S_ISCHR(sa.st_mode))  # two streams on one terminal (or /dev/null) is fine


def _on_stdout(text: str) -> bool:
    fd = stream_fd(text)
    if fd == 1:
        return True
    try:
        return fd is not None and os.path.samestat(os.fstat(fd), os.fstat(1))
    except OSError:
        return False


def _open_stream(fd: int, text: str) -> BinaryIO:
    """A file object writing to a copy of the caller's descriptor ``fd``, named ``text``."""
    f = os.fdopen(os.dup(fd), "wb")
    setattr(f.raw, "name", "stdout" if text == "-" else text)  # noqa: B010  (for messages)
    return f


class RunOutputs:
    """The recording and the stats file of one run, opened (or reserved) at start.

    ``record`` is None without ``--record``; ``-`` (like ``stats_json``) is stdout. No output
    may be one of ``inputs`` (the files the run reads). ``record_files``: how the recording
    is rotated, trimmed and compressed; then :attr:`record` is a
    :class:`~agent.sinks.record.RecordFiles` (its first file open), else the file itself.
    """

    def __init__(self, record: str | None, stats_json: str | None, overwrite: bool,
                 inputs: Sequence[Path] = (), record_files: RecordPolicy | None = None,
                 nats_auth: NatsAuth | None = None) -> None:
        nats: NatsTarget | None = None
        if record is not None and is_nats_url(record):
            nats, record = _nats_record(record, record_files, nats_auth), None
        files = None
        if record is not None:
            files = RecordFiles(record, record_files or RecordPolicy())
            if stream_fd(record) is None:  # a path: a strftime pattern, with the suffix
                record = files.name_at(files.clock())
            _check_rotatable(record, record_files)
        # Every path first, so that a bad one leaves no file behind.
        named = [(text, what) for text, what in ((record, "recording"),
                                                  (stats_json, "stats file")) if text is not None]
        for text, what in named:
            fd = stream_fd(text)
            if fd is not None:
                _check_stream(fd, text, what)
            else:
                check_output_path(Path(text), what)
            _check_not_input(text, what, inputs)
        if record is not None and stats_json is not None and _one_output(record, stats_json):
            where = "stdout" if stream_fd(record) == 1 else record
            raise OutputError(f"--record and --stats-json name the same file ({where}); "
                              "give each its own")
        self._created: set[str] = set()
        self.record: BinaryIO | RecordFiles | NatsTarget | None = nats
        self._first: BinaryIO | None = None  # the recording's first file
        self._stats: BinaryIO | None = None
        self._stats_on_stdout = stats_json is not None and _on_stdout(stats_json)
        try:
            if record is not None:
                self._first, number = self._open(record, "recording", overwrite)
                self.record = self._first
                if files is not None and record_files is not None:
                    files.adopt(self._first, record, number)
                    self.record = files
            if stats_json is not None:
                self._stats = self._open(stats_json, "stats file", overwrite)[0]
        except BaseException:
            self.finish(None, failed=True)
            raise

    def _open(self, text: str, what: str, overwrite: bool) -> tuple[BinaryIO, int]:
        """The output ``text`` names, opened, and its N (``STEM.N.SUFFIX``; 0: the name)."""
        fd = stream_fd(text)
        if fd is not None:
            return _open_stream(fd, text), 0
        f, created, number = _open_output(Path(text), what, overwrite)
        if created:
            self._created.add(f.name)
        return f, number

    def finish(self, stats: Mapping[str, float] | None, failed: bool = False) -> list[str]:
        """Close the recording (not stdout; its writer counted any error; a background
        writer must be closed first). Without ``stats`` (the run never started) close and
        remove every file this run created, and stop there. Given the run's stats: the
        summary on stderr, the stats file and, unless the run ``failed``, a "degraded" line
        if it was. Returns why it was degraded (see :func:`agent.cli.summary.degradation`; empty
        if it was not)."""
        if isinstance(self.record, RecordFiles):
            self.record.close()  # the file open now (the first, or the last rotated one)
        self._close(self._first, remove_if_empty=failed or stats is None)
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
                if isinstance(e, BrokenPipeError) and self._stats_on_stdout:
                    raise  # stdout's reader went away: stop quietly (exit 141)
                log.error("cannot write the stats file", file=self._stats.name,
                          error=e.strerror)
                reasons.append("the stats file could not be written")
        if reasons and not failed:
            sys.stderr.write(f"mirror-agent: degraded: {'; '.join(reasons)} (see the summary)\n")
        return reasons

    def _close(self, f: BinaryIO | None, remove_if_empty: bool) -> None:
        """Close ``f``; remove it if asked, this run created it and it is empty."""
        if f is None:
            return
        with contextlib.suppress(OSError):
            f.close()
        name = str(f.name)
        if remove_if_empty and name in self._created:
            with contextlib.suppress(OSError):
                if os.stat(name).st_size == 0:
                    os.unlink(name)
                    self._created.discard(name)


def _nats_record(url: str, policy: RecordPolicy | None,
                 nats_auth: NatsAuth | None = None) -> NatsTarget:
    """The NATS target ``--record`` names, with the ``--nats-*`` files; OutputError for a bad
    URL, a file that is not there or not what it should be, or with rotation or compression
    (a stream is no file)."""
    try:
        target = parse_nats_url(url)
    except ValueError as e:
        raise OutputError(f"--record {e}") from None
    try:
        target = target.with_flags(nats_auth)
        target.auth.check()
    except ValueError as e:
        raise OutputError(str(e)) from None
    if policy is not None:
        raise OutputError(f"--record-rotate, --record-max-total and --record-compress need a "
                          f"file: --record {redact_url(url)} publishes to a NATS stream")
    return target


def _check_rotatable(record: str, policy: RecordPolicy | None) -> None:
    """OutputError unless the recording can be rotated (if asked): a path, not a stream,
    a FIFO or a device."""
    if policy is None or policy.rotation is None:
        return
    fd = stream_fd(record)
    if fd is not None:
        raise OutputError(f"--record-rotate needs a file path: --record {record} is "
                          f"{_fd_name(fd)}")
    mode = _mode(Path(record), "recording")
    if mode and not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "a FIFO or a device"
        raise OutputError(f"--record-rotate needs a regular file: {record} is {what}")


def stdout_closed() -> int:
    """The reader of stdout went away (``| head``): returns the status to stop with quietly,
    as a filter killed by SIGPIPE does. stdout now points at /dev/null, so the interpreter's
    last flush of it cannot fail ("Exception ignored ...")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE_CLOSED
