"""``mirror-agent replay``: recorded connections replayed to a target (:mod:`agent.replay`).

Before anything replays, every source is opened and recognised, the targets must resolve
and ``--report-json`` must be writable (else exit 2, one line). Then the sources are read
into connections (damage is reported with its position and the rest is kept), replayed, and
the report printed: on stdout (on stderr when ``--report-json -`` takes stdout). On a
terminal a progress line on stderr shows requests, rate, errors and ETA while it runs.

Exit status: 0 done; 3 degraded (a damaged source, connections cut at a recorded gap, or
connections to a target that failed); 130 interrupted by SIGINT/SIGTERM (report printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import structlog

from agent import cli_args as a
from agent.cli_parser import UsageError
from agent.options import Options, ReplayOptions
from agent.outputs import EXIT_DEGRADED, open_output
from agent.replay.conns import Connection, assemble
from agent.replay.diff import Differ
from agent.replay.report import Source, Tally, format_report, report_json
from agent.replay.runner import Plan, Replayer
from agent.replay.sources import SourceError, SourceReader, open_sources

__all__ = ["load", "replay"]

log = structlog.get_logger("agent.replay")


def load(readers: Sequence[SourceReader]) -> tuple[list[Connection], Source]:
    """Every reader's records, as one stream (rotated files join up), into connections."""
    src = Source(names=[r.name for r in readers])

    def records() -> Any:
        for reader in readers:
            yield from reader.records()

    conns, src.unusable_records = assemble(records())
    for reader in readers:
        src.problems += reader.problems()
    src.connections = len(conns)
    src.requests = sum(len(c.requests) for c in conns)
    src.client_bytes = sum(c.client_bytes for c in conns)
    src.cut_connections = sum(1 for c in conns if c.cut)
    return conns, src


def _check(r: ReplayOptions) -> list[SourceReader]:
    for flag, addr in (("--target", r.target), ("--baseline", r.baseline)):
        if addr is None:
            continue
        try:
            a.resolve_target(addr)
        except ValueError as e:
            raise UsageError(str(e).replace("--target", flag)) from None
    try:
        return open_sources(r.sources, r.ports)
    except SourceError as e:
        raise UsageError(str(e)) from None


def replay(opts: Options) -> int:
    """Run ``replay``; the exit status."""
    r = opts.replay
    assert r is not None, "replay options"
    readers = _check(r)
    out: IO[bytes] | None = None
    if r.report_json is not None and r.report_json != "-":
        out = open_output(Path(r.report_json), "report", r.overwrite)
    with out if out is not None else contextlib.nullcontext():
        begun = time.monotonic()
        conns, src = load(readers)
        log.info("replay loaded", connections=src.connections, requests=src.requests,
                 client_bytes=src.client_bytes, seconds=round(time.monotonic() - begun, 2))
        for problem in src.problems:
            log.warning("source damaged: the rest replays", problem=problem)
        rep, failed = _replay(conns, src, r)
        _emit(rep, r, out)
    if rep["interrupted"]:
        return 130
    return EXIT_DEGRADED if src.problems or src.cut_connections or failed else 0


def _replay(conns: list[Connection], src: Source,
            r: ReplayOptions) -> tuple[dict[str, Any], bool]:
    plan = Plan(target=r.target, baseline=r.baseline, connections=r.connections,
                speed=r.speed, max_wait=r.max_wait, loop=r.loop, duration=r.duration,
                timeout=r.timeout, pipeline=r.pipeline, source_ports=r.source_ports)
    tally = Tally(r.target)
    base = Tally(r.baseline) if r.baseline is not None else None
    production = any(c.production is not None for c in conns)
    differ = (Differ(r.ignore_headers, with_baseline=base is not None)
              if production or base is not None else None)
    replayer = Replayer(conns, plan, tally, base, differ)
    asyncio.run(_run(replayer))
    diff = differ.summary(production) if differ is not None else None
    rep = report_json(src, tally, base, replayer.elapsed, diff, replayer.interrupted)
    failed = bool(tally.connections_failed or (base is not None and base.connections_failed))
    return rep, failed


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
