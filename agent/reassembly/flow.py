"""What the reassembler keeps per connection: :class:`Flow` and its two :class:`Half`
objects, the chunk a flow is merging into (:class:`OpenChunk`), and the counters
(:class:`ReassemblyStats`) where every byte not delivered is counted."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from agent.model import Direction, DirectionEnd, FlowEnd, FlowKey, TrafficChunk
from agent.reassembly.stream import StreamBuffer

__all__ = ["Flow", "Half", "OpenChunk", "Output", "ReassemblyStats"]

Output = list[TrafficChunk | DirectionEnd | FlowEnd]
"""What the reassembler appends to: chunks, direction ends and flow ends, in order."""


@dataclass(slots=True)
class ReassemblyStats:
    """Counters; plain ints so the hot path only adds. Every byte not delivered is in one."""

    segments: int = 0
    chunks: int = 0
    bytes_delivered: int = 0
    flows_opened: int = 0
    gap_bytes: int = 0
    """Bytes given up on (holes skipped, lost by the source, missing at a connection's end)."""
    retransmitted_bytes: int = 0
    conflict_bytes: int = 0
    """Bytes of a later copy that differed from the first copy (which wins)."""
    keepalives: int = 0
    zero_window_probes: int = 0
    late_segments: int = 0
    """Data segments of a connection already closed (after RST or FIN), or with bytes past
    their direction's FIN, dropped."""
    late_bytes: int = 0
    limit_skips: int = 0
    hole_timeouts: int = 0
    """Holes skipped because later data (or the FIN) waited longer than ``hole_timeout``."""
    untracked_segments: int = 0
    """Segments of an untracked direction (responses nobody consumes): SYN/FIN/RST only."""
    rst_ignored_in_window: int = 0
    """RSTs not at the receiver's next expected byte but within its window: it answers
    with a challenge ACK and the connection goes on (RFC 5961 §3.2)."""
    rst_ignored_out_of_window: int = 0
    """RSTs outside the receiver's window: dropped, the connection goes on."""
    rst_unchecked: int = 0
    """RSTs that ended a flow without a sequence check: the mirror had not followed the
    sender's sequence numbers (a refused SYN's answer, a side never seen or untracked)."""
    rst_payload_bytes: int = 0
    """Bytes carried on RSTs: never delivered (the receiving stack discards them)."""
    syn_data_bytes: int = 0
    """Bytes carried on a SYN (TCP Fast Open) that the receiver acknowledged: delivered."""
    syn_data_refused_bytes: int = 0
    """Bytes carried on a SYN that the receiver did not acknowledge (Fast Open refused, or
    no answer before the flow ended): not delivered from the SYN; a refused client sends
    them again after the handshake, and they are delivered from there."""
    flows_closed: dict[str, int] = field(default_factory=dict)
    flows_refused: dict[str, int] = field(default_factory=dict)
    """New connections not tracked at all, by reason (``memory``: the memory guard shed
    them, see :attr:`~agent.reassembly.Reassembler.refusals`)."""
    refused_bytes: dict[str, int] = field(default_factory=dict)
    """Payload bytes of those connections (never delivered), by reason."""

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in asdict(self).items()
               if k not in ("flows_closed", "flows_refused", "refused_bytes")}
        out.update({f"flows_closed_{k}": v for k, v in sorted(self.flows_closed.items())})
        out.update({f"flows_refused_{k}": v for k, v in sorted(self.flows_refused.items())})
        out.update({f"refused_bytes_{k}": v for k, v in sorted(self.refused_bytes.items())})
        return out


class Half(StreamBuffer):
    """One direction of one connection: its stream and what the table knows about it."""

    __slots__ = ("chunk_dir", "done", "flow", "from_addr", "isn", "peer", "since", "syn_data",
                 "to_addr", "untracked")

    def __init__(self, flow: Flow, from_addr: str, to_addr: str, direction: Direction,
                 stats: ReassemblyStats) -> None:
        super().__init__(stats)
        self.flow = flow
        self.from_addr = from_addr
        self.to_addr = to_addr
        self.chunk_dir = direction
        self.isn: int | None = None
        self.done = False  # FIN reached in sequence, DirectionEnd sent
        self.since = 0.0  # when the current hole started holding data (or the FIN) back
        self.untracked = False  # payload ignored; only SYN/FIN/RST are followed
        self.peer: Half = self
        # Payload, lost bytes and FIN of this half's SYN, held (``nxt`` None) until its
        # receiver's answer says what it took (DataPath._syn_settle).
        self.syn_data: tuple[bytes, int, bool] | None = None


class Flow:
    """One connection: its halves ``a`` (the direction that opened it) and ``b``."""

    __slots__ = ("a", "b", "created", "flow_id", "key", "last_seen", "open")

    def __init__(self, flow_id: int, key: FlowKey, ts: float) -> None:
        self.flow_id = flow_id
        self.key = key
        self.created = ts
        self.last_seen = ts
        self.a: Half
        self.b: Half
        self.open: OpenChunk | None = None  # while merging: its latest item, if a chunk


class OpenChunk:
    """While merging: a flow's latest chunk (nothing of the flow came after it), its half,
    and its data so far, in pieces joined when merging ends."""

    __slots__ = ("chunk", "flow", "half", "parts")

    def __init__(self, chunk: TrafficChunk, half: Half) -> None:
        self.chunk = chunk
        self.half = half
        self.flow = half.flow
        self.parts = [chunk.data]
