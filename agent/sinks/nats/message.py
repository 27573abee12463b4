"""One recorded chunk (or flow end) as one NATS message: the body is exactly one record of
the native format (frame, header, data: :mod:`agent.sinks.record`), the headers repeat the
flow's metadata so that a consumer can route or filter without parsing the body.

Headers (all text)::

    Mirror-Kind       chunk | end
    Mirror-Flow       the flow id (decimal)
    Mirror-From       "ip:port" the bytes came from (empty for an end)
    Mirror-To         "ip:port" they went to (empty for an end)
    Mirror-Direction  to_observed | from_observed | unknown
    Mirror-Gap        bytes missing right before this chunk (an end: at the flow's end)

The body is authoritative (it carries a CRC); :func:`decode` checks it and that the headers
agree with it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record.format import BODY, CHUNK, DIR_OF, DIRS, END, FRAME
from agent.sinks.record.reader import RecordedChunk

__all__ = ["BadMessage", "decode", "encode_chunk", "encode_end", "piece_size"]

KIND, FLOW, FROM, TO, DIRECTION, GAP = ("Mirror-Kind", "Mirror-Flow", "Mirror-From",
                                        "Mirror-To", "Mirror-Direction", "Mirror-Gap")
#: Room left in a message for the headers and the record's own header.
_OVERHEAD = 4096


class BadMessage(ValueError):
    """A message that is not one whole native record (or whose headers disagree with it)."""


def _frame(head: bytes, data: bytes) -> bytes:
    body = head + data
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def piece_size(max_payload: int) -> int:
    """The most chunk data one message may carry under the server's ``max_payload``."""
    return max(max_payload - _OVERHEAD, 1024)


def encode_chunk(chunk: TrafficChunk, data: bytes) -> tuple[bytes, dict[str, str]]:
    """The body (one native chunk record) and headers of ``chunk`` carrying ``data``."""
    fa, ta = chunk.from_addr.encode(), chunk.to_addr.encode()
    head = BODY.pack(CHUNK, DIRS[chunk.direction], len(fa), len(ta), 0, chunk.flow_id,
                     chunk.seen_at, chunk.gap_bytes) + fa + ta
    return _frame(head, data), {
        KIND: "chunk", FLOW: str(chunk.flow_id), FROM: chunk.from_addr, TO: chunk.to_addr,
        DIRECTION: chunk.direction.value, GAP: str(chunk.gap_bytes)}


def encode_end(end: FlowEnd) -> tuple[bytes, dict[str, str]]:
    """The body (one native flow-end record, the reason as its data) and headers of ``end``."""
    head = BODY.pack(END, 0, 0, 0, 0, end.flow_id, 0.0, end.trailing_gap)
    return _frame(head, end.reason.encode()), {
        KIND: "end", FLOW: str(end.flow_id), FROM: "", TO: "",
        DIRECTION: Direction.UNKNOWN.value, GAP: str(end.trailing_gap)}


def decode(body: bytes, headers: Mapping[str, str] | None) -> RecordedChunk:
    """The record a message carries; :class:`BadMessage` if the body is not exactly one
    whole native record with a good CRC, or its ``Mirror-Kind``/``Mirror-Flow`` headers
    (when present) say otherwise."""
    if len(body) < FRAME.size + BODY.size:
        raise BadMessage(f"body of {len(body)} bytes is too short for a record")
    size, crc = FRAME.unpack_from(body)
    rec = body[FRAME.size:]
    if size != len(rec):
        raise BadMessage(f"record length {size} but {len(rec)} bytes follow the frame")
    if zlib.crc32(rec) != crc:
        raise BadMessage("record CRC mismatch")
    kind, d, flen, tlen, _r, flow_id, seen_at, gap = BODY.unpack_from(rec)
    if kind not in (CHUNK, END) or BODY.size + flen + tlen > len(rec):
        raise BadMessage(f"not a chunk or flow-end record (type {kind})")
    p = BODY.size
    name = "chunk" if kind == CHUNK else "end"
    if headers is not None and (headers.get(KIND, name) != name
                                or headers.get(FLOW, str(flow_id)) != str(flow_id)):
        raise BadMessage("headers disagree with the record (kind or flow id)")
    return RecordedChunk(
        name, flow_id, DIR_OF.get(d, Direction.UNKNOWN), seen_at, gap,
        rec[p:p + flen].decode(errors="replace"), rec[p + flen:p + flen + tlen].decode(
            errors="replace"), rec[p + flen + tlen:])
