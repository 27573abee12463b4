"""``mirror-agent replay``: recorded connections replayed to a target (:mod:`agent.replay`).

Before anything replays, every source is opened and recognised, the targets must resolve
and ``--report-json`` must be writable and no input of the replay (else exit 2, one line);
``--loop`` needs sources that can be read again (files, not a pipe or standard input). Then
the sources are read while they replay, within a bounded memory (:mod:`agent.replay.feed`;
damage is reported with its position and the rest is kept), and the report printed: on
stdout (on stderr when ``--report-json -`` takes stdout). On a terminal a progress line on
stderr shows requests, rate, errors and ETA while it runs.

Exit status: 0 done; 3 degraded (a damaged source, connections cut at a recorded gap, or
connections to a target that failed); 130 interrupted by SIGINT/SIGTERM (report printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from agent.cli import args as a
from agent.cli.options import Options, ReplayOptions
from agent.cli.outputs import EXIT_DEGRADED, open_output, stream_fd
from agent.cli.parser import UsageError
from agent.replay.assemble import assemble
from agent.replay.conns import Connection
from agent.replay.diff import Differ
from agent.replay.feed import Feed
from agent.replay.report import Source, Tally, format_report, report_json
from agent.replay.runner import Replayer
from agent.replay.sources import SourceError, SourceReader, nats_url, open_sources
from agent.replay.spill import Spill
from agent.sinks.record import RecordedChunk
from agent.sources.files.capstream import STDIN, display

__all__ = ["load", "replay"]


def load(readers: Sequence[SourceReader]) -> tuple[list[Connection], Source]:
    """Every reader's records, as one stream (rotated files join up), into connections held
    whole in memory: for tests and tools (``replay`` itself streams)."""
    conns, unusable = assemble(r for reader in readers for r in reader.records())
    src = Source(names=[r.name for r in readers], unusable_records=unusable)
    for reader in readers:
        src.problems += reader.problems()
    src.connections = len(conns)
    src.requests = sum(c.requests for c in conns)
    src.client_bytes = sum(c.client_bytes for c in conns)
    src.cut_connections = sum(1 for c in conns if c.cut)
    return conns, src


class _Recording:
    """Every reader's records, as one stream, once per pass; the readers' problems as the
    first pass found them."""

    def __init__(self, readers: Sequence[SourceReader]) -> None:
        self.readers = readers
        self._passes = 0
        self._problems: list[str] | None = None

    def records(self) -> Iterator[RecordedChunk]:
        self._passes += 1
        first = self._passes == 1
        for reader in self.readers:
            yield from reader.records()
        if first:
            self._problems = self.problems()

    def problems(self) -> list[str]:
        if self._problems is not None:
            return list(self._problems)
        return [p for reader in self.readers for p in reader.problems()]


def _check(r: ReplayOptions) -> list[SourceReader]:
    for flag, addr in (("--target", r.plan.target), ("--baseline", r.plan.baseline)):
        if addr is None:
            continue
        try:
            a.resolve_target(addr)
        except ValueError as e:
            raise UsageError(str(e).replace("--target", flag)) from None
    _check_report(r.report_json, r.sources)
    if r.plan.loop:
        _check_loop(r.sources)
    try:
        return open_sources(r.sources, r.ports)
    except SourceError as e:
        raise UsageError(str(e)) from None


def _check_report(report: str | None, sources: Sequence[Path]) -> None:
    """UsageError if ``--report-json`` names one of the sources (the same file, by a link
    or another name too, or standard input's file): it would be written next to it, or with
    ``--overwrite`` over it."""
    if report is None or report == "-":
        return
    fd = stream_fd(report)
    try:
        out = os.fstat(fd) if fd is not None else os.stat(report)
    except OSError:
        return  # nothing there yet: no input
    if stat.S_ISCHR(out.st_mode):
        return  # a terminal or /dev/null on both sides is no clash
    for src in sources:
        if nats_url(src) is not None:
            continue
        try:
            st = os.fstat(0) if src == STDIN else os.stat(src)
        except OSError:
            continue
        if os.path.samestat(out, st):
            raise UsageError(f"--report-json {report} is the replay's input {display(src)}: "
                             "write the report elsewhere")


def _check_loop(sources: Sequence[Path]) -> None:
    """UsageError for a source ``--loop`` cannot read again (standard input, a pipe, a
    FIFO): the recording is not held in memory between passes."""
    for src in sources:
        if nats_url(src) is not None:
            continue
        try:
            regular = src != STDIN and stat.S_ISREG(os.stat(src).st_mode)
        except OSError:
            continue  # open_sources says why
        if not regular:
            raise UsageError(f"--loop reads the sources again for every pass, and "
                             f"{display(src)} can be read only once: save it to a file first")


def replay(opts: Options) -> int:
    """Run ``replay``; the exit status."""
    r = opts.replay
    assert r is not None, "replay options"
    readers = _check(r)
    out: IO[bytes] | None = None
    if r.report_json is not None and r.report_json != "-":
        out = open_output(Path(r.report_json), "report", r.overwrite)
    with out if out is not None else contextlib.nullcontext():
        rep, src, failed = _replay(readers, r)
        _emit(rep, r, out)
    if rep["interrupted"]:
        return 130
    return EXIT_DEGRADED if src.problems or src.cut_connections or failed else 0


def _replay(readers: Sequence[SourceReader],
            r: ReplayOptions) -> tuple[dict[str, Any], Source, bool]:
    plan = r.plan
    tally = Tally(plan.target)
    base = Tally(plan.baseline) if plan.baseline is not None else None
    differ = Differ(r.ignore_headers, with_baseline=base is not None)
    recording = _Recording(readers)
    spill = Spill()
    feed = Feed(recording.records, plan.speed, plan.max_wait, spill=spill)
    replayer = Replayer(feed, plan, tally, base, differ)
    try:
        asyncio.run(_run(replayer))
    finally:
        spill.close()
    src = feed.first
    src.names = [reader.name for reader in readers]
    src.problems = recording.problems()
    src.spilled_bytes = spill.written
    production = feed.answers_seen
    diff = differ.summary(production) if production or base is not None else None
    rep = report_json(src, tally, base, replayer.elapsed, diff, replayer.interrupted)
    failed = bool(tally.connections_failed or (base is not None and base.connections_failed))
    return rep, src, failed


async def _run(replayer: Replayer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, replayer.stop)
    tty = sys.stderr is not None and sys.stderr.isatty()

    def show(line: str) -> None:
        sys.stderr.write(f"\r\x1b[K{line}")
        sys.stderr.flush()

    try:
        await replayer.run(show if tty else None)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if tty:
            sys.stderr.write("\r\x1b[K")


def _emit(rep: dict[str, Any], r: ReplayOptions, out: IO[bytes] | None) -> None:
    text = format_report(rep)
    if r.report_json == "-":
        sys.stderr.write(text)
        sys.stdout.write(json.dumps(rep, indent=2) + "\n")
        sys.stdout.flush()
        return
    sys.stdout.write(text)
    sys.stdout.flush()
    if out is not None:
        out.write((json.dumps(rep, indent=2) + "\n").encode())
