"""``mirror-agent inspect``: print a native recording, and say what is wrong with it.

The file may be compressed (gzip or zstd, told by its magic bytes, whatever its name): each
file of a rotated recording is read alone. Exit status 0 for a clean recording; 3 (degraded)
when it was read but is damaged (corrupt records skipped, a truncated or unreadable tail, a
compressed stream cut short or corrupt, addresses that are not UTF-8), with one line per
problem on stderr. A file that is not a native recording, or of a version this reader does
not know, raises :class:`RecordError` (a pcapng or JSON-lines recording says what to read
it with); a closed stdout, :class:`~agent.cli.outputs.OutputError` (both exit 2).

What was read is counted as the summary of the run that wrote it counts it (its ``record``
line, ``mirror_agent_record_records_total`` and ``..._written_bytes_total``): ``records``
are chunk records and ``written_bytes`` their payload bytes; the flow-end records, which
the summary does not count, are ``flow_ends``. The text format ends with that line; a
damaged file's warnings say it too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import BinaryIO

from agent.cli.outputs import EXIT_DEGRADED, OutputError
from agent.model import TrafficChunk
from agent.sinks.record import NativeReader, RecordedChunk, RecordError, chunk_json, decoded

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"

__all__ = ["inspect_recording"]


def inspect_recording(path: Path, fmt: str = "text") -> int:
    """Print every record of ``path`` on stdout (``fmt``: text or jsonl); the exit status."""
    if sys.stdout is None:  # started with fd 1 closed
        raise OutputError("inspect prints to stdout, and stdout is closed")
    try:
        f = path.open("rb")
    except OSError as e:
        raise RecordError(f"cannot read {path}: {e.strerror}") from None
    with f:
        src, dec = decoded(f)
        head = _peek(src)
        try:
            reader = NativeReader(src)
        except RecordError as e:
            raise RecordError(f"{path}: {_not_native(head, e)}") from None
        counts = _Counts()
        for rec in reader:
            counts.add(rec)
            sys.stdout.write(_jsonl(rec) if fmt == "jsonl" else _text(rec))
        problems = reader.problems()
        if dec is not None and dec.problem:
            problems.append(dec.problem)
    if fmt != "jsonl":
        sys.stdout.write(f"{counts}\n")
    for problem in problems:
        sys.stderr.write(f"mirror-agent: warning: {path}: {problem}; read: {counts}\n")
    return EXIT_DEGRADED if problems else 0


class _Counts:
    """What was read, named as the summary names what was written (see the module
    docstring)."""

    def __init__(self) -> None:
        self.records = self.written_bytes = self.flow_ends = 0

    def add(self, rec: RecordedChunk) -> None:
        if rec.kind == "chunk":
            self.records += 1
            self.written_bytes += len(rec.data)
        else:
            self.flow_ends += 1

    def __str__(self) -> str:
        return (f"records={self.records} written_bytes={self.written_bytes} "
                f"flow_ends={self.flow_ends}")


def _peek(src: BinaryIO) -> bytes:
    """The first bytes of ``src``, not consumed (a buffered reader's peek)."""
    peek = getattr(src, "peek", None)
    return bytes(peek(4)[:4]) if peek is not None else b""


def _not_native(head: bytes, error: RecordError) -> str:
    """Why the file is not read: the reader's ``error``, or the format it is in instead."""
    if head == PCAPNG_MAGIC:
        return "a pcapng recording (--record-format pcapng): read it with tshark or Wireshark"
    if head[:1] == b"{":
        return "a JSON-lines recording (--record-format jsonl): one JSON object per line"
    return str(error)


def _jsonl(rec: RecordedChunk) -> str:
    if rec.kind == "end":
        return ""
    chunk = TrafficChunk(rec.data, rec.from_addr, rec.to_addr, rec.direction, rec.seen_at,
                         rec.flow_id, rec.gap_bytes)
    return json.dumps(chunk_json(chunk, rec.data)) + "\n"


def _text(rec: RecordedChunk) -> str:
    if rec.kind == "end":
        missing = f", {rec.gap_bytes} bytes missing at the end" if rec.gap_bytes else ""
        return f"flow {rec.flow_id} ended ({rec.data.decode(errors='replace')}{missing})\n"
    gap = f" after a {rec.gap_bytes}-byte gap" if rec.gap_bytes else ""
    return (f"flow {rec.flow_id} {rec.from_addr} -> {rec.to_addr} {rec.direction.value} "
            f"{len(rec.data)} bytes at {rec.seen_at:.6f}{gap}\n" + _preview(rec.data))


def _preview(data: bytes, limit: int = 256) -> str:
    text = data[:limit].decode("latin-1")
    shown = "".join(c if c.isprintable() or c in "\r\n\t" else "." for c in text)
    shown = shown.replace("\r\n", "\n")
    tail = f"... ({len(data) - limit} more bytes)\n" if len(data) > limit else ""
    return "  " + shown.replace("\n", "\n  ").rstrip() + "\n" + tail
