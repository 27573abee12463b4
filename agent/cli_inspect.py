"""``mirror-agent inspect``: print a native recording, and say what is wrong with it.

Exit status 0 for a clean recording; 3 (degraded) when it was read but is damaged (corrupt
records skipped, a truncated or unreadable tail, addresses that are not UTF-8), with one line
per problem on stderr. A file that is not a recording raises :class:`RecordError`; a closed
stdout, :class:`~agent.outputs.OutputError` (both exit 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agent.model import TrafficChunk
from agent.outputs import EXIT_DEGRADED, OutputError
from agent.sinks.record import NativeReader, RecordedChunk, RecordError, chunk_json

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
        try:
            reader = NativeReader(f)
        except RecordError as e:
            raise RecordError(f"{path}: {e}") from None
        count = 0
        for rec in reader:
            count += 1
            sys.stdout.write(_jsonl(rec) if fmt == "jsonl" else _text(rec))
        problems = reader.problems()
    for problem in problems:
        sys.stderr.write(f"mirror-agent: warning: {path}: {problem}; {count} records read\n")
    return EXIT_DEGRADED if problems else 0


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
