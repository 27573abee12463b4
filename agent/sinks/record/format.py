"""The native recording format's constants (see :mod:`agent.sinks.record`), and the JSON
lines object of a chunk."""

from __future__ import annotations

import base64
import struct

from agent.model import Direction, TrafficChunk

__all__ = ["BODY", "CHUNK", "DIRS", "DIR_OF", "END", "FILE_HEADER", "FORMATS", "FRAME", "MAGIC",
           "VERSION", "RecordError", "chunk_json"]

MAGIC = b"MIRRORAG"
VERSION = 1
FILE_HEADER = struct.Struct("<8sHHI")
FRAME = struct.Struct("<II")
BODY = struct.Struct("<BBHHHQdQ")
DIRS = {Direction.UNKNOWN: 0, Direction.TO_OBSERVED: 1, Direction.FROM_OBSERVED: 2}
DIR_OF = {v: k for k, v in DIRS.items()}
CHUNK, END = 1, 2
FORMATS = ("native", "jsonl", "pcapng")


class RecordError(Exception):
    """A recording cannot be read (not a recording, unknown version)."""


def chunk_json(chunk: TrafficChunk, data: bytes) -> dict[str, object]:
    """The JSON-lines object of one chunk: exactly flow, from, to, direction, seen_at, data,
    gap_bytes, and ``tunnel`` (the tunnel identity, e.g. ``vxlan:42``) for a flow that came
    through a tunnel. The native format has no room for it (version 1 readers take every
    byte after the addresses as data): there the flow id alone keeps tunnels apart."""
    obj: dict[str, object] = {
        "flow": chunk.flow_id,
        "from": chunk.from_addr,
        "to": chunk.to_addr,
        "direction": chunk.direction.value,
        "seen_at": chunk.seen_at,
        "data": base64.b64encode(data).decode("ascii"),
        "gap_bytes": chunk.gap_bytes,
    }
    if chunk.tunnel:
        obj["tunnel"] = chunk.tunnel
    return obj
