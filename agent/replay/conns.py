"""Recorded records → the connections to replay, each with its client bytes in bursts.

A connection is keyed by its flow id and address pair, so rotated files of one recording
join up and another recording's flow with the same id stays apart; a flow-end record closes
its key (a later chunk with that id is a new connection).

A *burst* is the client bytes sent between two pieces of the service's answer: consecutive
client→service chunks with no service→client chunk between them. Without recorded responses
each chunk is a burst. Replay sends a burst when its recorded time comes and, unless
pipelining is asked for, only once every request of the earlier bursts was answered; so a
client that waited for each response is replayed waiting, and one that pipelined stays
pipelined.

Client bytes after a gap (bytes the recording lost) would corrupt the stream: the connection
is replayed up to the gap and says so (``cut``). Production responses are parsed up to a gap
in theirs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.model import Direction
from agent.replay.http import Request, Response, ResponseParser, frame_requests
from agent.sinks.record import RecordedChunk

__all__ = ["Burst", "Connection", "assemble"]


@dataclass(slots=True)
class Burst:
    """Client bytes sent together: the recorded time of the first, the bytes, and how many
    requests are complete once they are sent (counted from the connection's start)."""

    at: float
    data: bytes
    done: int = 0


@dataclass(slots=True)
class Connection:
    """One recorded connection, ready to replay."""

    flow_id: int
    client: str
    server: str
    start: float
    bursts: list[Burst] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    """HTTP requests of the client bytes (empty if they are not HTTP/1.x)."""
    production: list[Response] | None = None
    """The service's recorded responses, or None if the recording has none."""
    cut: str = ""
    """Why the client bytes stop early ('' if they are whole)."""

    @property
    def client_bytes(self) -> int:
        return sum(len(b.data) for b in self.bursts)


class _Flow:
    __slots__ = ("answered", "chunks", "client", "client_gap", "server", "server_data",
                 "server_gap", "start")

    def __init__(self, rec: RecordedChunk) -> None:
        self.start = rec.seen_at
        self.client = self.server = ""
        self.chunks: list[tuple[float, bytes, bool]] = []  # (time, data, after an answer)
        self.server_data: list[bytes] = []
        self.answered = False  # a service→client chunk since the last client chunk
        self.client_gap = self.server_gap = False


def _add(flow: _Flow, rec: RecordedChunk) -> None:
    if rec.direction is Direction.TO_OBSERVED:
        flow.client, flow.server = rec.from_addr, rec.to_addr
        if flow.client_gap or (rec.gap_bytes and flow.chunks):
            flow.client_gap = True
            return
        flow.chunks.append((rec.seen_at, rec.data, flow.answered))
        flow.answered = False
    elif rec.direction is Direction.FROM_OBSERVED:
        if rec.gap_bytes and flow.server_data:
            flow.server_gap = True
        if not flow.server_gap:
            flow.server_data.append(rec.data)
        flow.answered = True


def _bursts(flow: _Flow) -> list[Burst]:
    """Client chunks → bursts: joined between two answers, or one each if the recording has
    no answers."""
    if not flow.server_data:
        return [Burst(at, data) for at, data, _ in flow.chunks]
    out: list[tuple[float, list[bytes]]] = []
    for at, data, after_answer in flow.chunks:
        if after_answer or not out:
            out.append((at, [data]))
        else:
            out[-1][1].append(data)
    return [Burst(at, b"".join(parts)) for at, parts in out]


def _finish(flow_id: int, flow: _Flow) -> Connection | None:
    if not flow.chunks:
        return None
    bursts = _bursts(flow)
    conn = Connection(flow_id, flow.client, flow.server, bursts[0].at, bursts)
    if flow.client_gap:
        conn.cut = "a gap in the recorded client bytes"
    requests, _whole = frame_requests(b"".join(b.data for b in bursts))
    conn.requests = requests
    offset = k = 0
    for burst in bursts:
        offset += len(burst.data)
        while k < len(requests) and requests[k].end <= offset:
            k += 1
        burst.done = k
    if flow.server_data and requests:
        parser = ResponseParser([r.method for r in requests])
        answers = parser.feed(b"".join(flow.server_data))
        last = parser.close()
        conn.production = answers + ([last] if last is not None else [])
    return conn


def assemble(records: Iterable[RecordedChunk]) -> tuple[list[Connection], int]:
    """The connections in ``records`` (in order of their first client byte), and how many
    records were of no use (direction unknown)."""
    open_: dict[tuple[int, str, str], _Flow] = {}
    by_id: dict[int, list[tuple[int, str, str]]] = {}
    done: list[tuple[int, _Flow]] = []
    unusable = 0
    for rec in records:
        if rec.kind != "chunk":
            for key in by_id.pop(rec.flow_id, []):
                done.append((key[0], open_.pop(key)))
            continue
        if rec.direction is Direction.UNKNOWN:
            unusable += 1
            continue
        a, b = rec.from_addr, rec.to_addr
        key = (rec.flow_id, a, b) if a <= b else (rec.flow_id, b, a)
        flow = open_.get(key)
        if flow is None:
            flow = open_[key] = _Flow(rec)
            by_id.setdefault(rec.flow_id, []).append(key)
        _add(flow, rec)
    done += [(key[0], flow) for key, flow in open_.items()]
    conns = [c for c in (_finish(fid, f) for fid, f in done) if c is not None]
    conns.sort(key=lambda c: c.start)
    return conns, unusable
