"""One connection inside the reassembler: its two halves, and what happens to a segment's
bytes once the flow table (:mod:`agent.reassembly`) has found its flow.

:class:`Half` is one direction: a :class:`~agent.streambuf.StreamBuffer` with its addresses,
chunk direction and end state. :class:`FlowData`, the base of
:class:`~agent.reassembly.Reassembler`, moves a segment's bytes through its half into
:class:`~agent.model.TrafficChunk` objects, keeps the memory limits and the hole clocks, and
says when a direction is complete. Ending a flow (and keeping the table) is the
Reassembler's.

Merged output: inside :meth:`FlowData.merging`, a chunk that follows its flow's latest chunk
in the same direction with no gap is appended to it instead of coming out on its own (the
bytes are joined when the block ends), so a batch of small in-order segments makes one chunk
per run, with no second pass over the output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from agent.model import FIN, SYN, Direction, DirectionEnd, FlowEnd, FlowKey, TrafficChunk
from agent.streambuf import Ready, StreamBuffer

if TYPE_CHECKING:
    from agent.reassembly import ReassemblyConfig

__all__ = ["Flow", "FlowData", "Half", "OpenChunk", "Output", "ReassemblyStats"]

Output = list[TrafficChunk | DirectionEnd | FlowEnd]

_MASK = 0xFFFFFFFF
_HALF = 0x80000000


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
    them, see :attr:`~agent.reassembly.Reassembler.refuse_new`)."""
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
        # receiver's answer says what it took (FlowData._syn_settle).
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


class FlowData:
    """The data path of every flow (see the module docstring); the flow table subclasses it
    and provides :meth:`_end`."""

    def __init__(self, config: ReassemblyConfig) -> None:
        self.config = config
        self.stats = ReassemblyStats()
        # Halves with a hole (StreamBuffer.waiting), in the order they began to wait: a set
        # that iterates the same way every run, so ties (the biggest hole) break the same way.
        self._buffering: dict[Half, None] = {}
        self._total_pending = 0
        self._ready: Ready = []
        self._next_hole_check = 0.0
        self._now = 0.0
        self._merged: list[OpenChunk] | None = None  # inside merging(): every chunk made

    def _end(self, flow: Flow, reason: str, out: Output) -> None:
        raise NotImplementedError

    @contextmanager
    def merging(self) -> Iterator[None]:
        """Merge chunks output inside the block (see the module docstring); their bytes are
        joined when it ends."""
        merged: list[OpenChunk] = []
        self._merged = merged
        try:
            yield
        finally:
            self._merged = None
            for o in merged:
                o.flow.open = None
                if len(o.parts) > 1:
                    o.chunk.data = b"".join(o.parts)

    # ----------------------------------------------------------------- data

    def _track(self, half: Half, flags: int, seq: int, payload: bytes, lost: int, ts: float,
               out: Output) -> None:
        """The data path of a segment of a tracked half (not RST)."""
        nxt = half.nxt
        if nxt is None or flags & SYN:
            if not self._start(half, flags, seq, payload, lost, ts, out):
                return
            nxt = half.nxt
            assert nxt is not None
        pos = half.unwrap(seq)
        if pos == nxt and payload and not (half.pending or half.probe or half.blocked
                                           or lost or half.fin is not None):
            # In order, nothing held, no FIN known: the next bytes.
            half.nxt = pos + len(payload)
            half.last = (pos, payload)
            gap = half.gap
            if gap:
                half.gap = 0
            self._emit(half, payload, gap, ts, out)
        elif payload or lost:
            self._add(half, pos, payload, lost, ts, out)
        if flags & FIN and half.fin is None:
            self._fin(half, pos + len(payload) + lost)

    def _start(self, half: Half, flags: int, seq: int, payload: bytes, lost: int, ts: float,
               out: Output) -> bool:
        """A SYN, or a segment of a half not started: start the stream, hold a SYN's data,
        or settle held SYN data by where the half's stream went on. False: the segment has
        nothing more for the stream (a SYN, a bare ACK while SYN data waits)."""
        if flags & SYN:
            if half.nxt is not None or half.syn_data is not None:
                # The SYN again: its receiver takes nothing from it (RFC 5961 §4).
                self.stats.retransmitted_bytes += len(payload)
                return False
            half.isn = seq
            if payload or lost:
                half.syn_data = (payload, lost, bool(flags & FIN))
                self._total_pending += len(payload)  # held: in buffered_bytes until settled
            else:
                half.nxt = seq + 1
                if flags & FIN:
                    self._fin(half, seq + 1)
            return False
        syn_data = half.syn_data
        if syn_data is None:
            half.nxt = seq  # started mid-stream: begin at the first byte seen
        elif payload or lost or flags & FIN:
            # No answer seen to the SYN: the sender went on from the end of what was taken.
            assert half.isn is not None
            taken = (seq - half.isn - 1) & _MASK
            self._syn_settle(half, 0 if taken >= _HALF else taken, ts, out)
        else:
            return False  # a bare ACK: its number may be past data that was refused
        return True

    def _syn_answered(self, half: Half, ack: int, ts: float, out: Output) -> None:
        """The receiver's SYN-ACK acknowledged ``ack``: settle ``half``'s held SYN data, unless
        ``ack`` is not one its sender accepts (then the sender's next segment settles it)."""
        assert half.syn_data is not None and half.isn is not None
        payload, lost, fin = half.syn_data
        taken = (ack - half.isn - 1) & _MASK
        if taken <= len(payload) + lost + fin:
            self._syn_settle(half, taken, ts, out)
            self._finished(half, out)

    def _syn_settle(self, half: Half, taken: int, ts: float, out: Output) -> None:
        """Start ``half`` after its SYN; deliver the first ``taken`` sequence numbers of the
        SYN's data (and its FIN, if taken too): what the receiving stack delivered. The rest
        is counted as refused: a refused sender sends it again after the handshake."""
        assert half.syn_data is not None and half.isn is not None
        payload, lost, fin = half.syn_data
        half.syn_data = None
        self._total_pending -= len(payload)
        start = half.nxt = half.isn + 1
        size = len(payload) + lost
        took = min(taken, size)
        self.stats.syn_data_bytes += min(took, len(payload))
        self.stats.syn_data_refused_bytes += max(0, len(payload) - took)
        fin_taken = fin and taken > size
        if took or fin_taken:
            self._track(half, FIN if fin_taken else 0, start, payload[:took],
                        max(0, took - len(payload)), ts, out)

    def _fin(self, half: Half, pos: int) -> None:
        """``half``'s FIN is at ``pos``; the bytes before it, if missing, are a hole."""
        held = half.held
        half.set_fin(pos)
        self._total_pending += half.held - held
        self._wait(half, False)

    def _add(self, half: Half, pos: int, payload: bytes, lost: int, ts: float,
             out: Output) -> None:
        """Hand data to ``half``'s buffer; emit what it releases; apply the memory limits."""
        nxt, held = half.nxt, half.held
        ready = self._ready
        half.add(pos, payload, lost, ready)
        self._total_pending += half.held - held
        if ready:
            self._deliver(half, ready, ts, out)
        self._wait(half, half.nxt != nxt)
        cfg = self.config
        while half.pending and half.held > cfg.max_flow_buffer:
            self.stats.limit_skips += 1
            self._skip(half, ts, out)
        while self._buffering and self._total_pending > cfg.max_total_buffer:
            self.stats.limit_skips += 1
            biggest = max(self._buffering, key=lambda h: h.held)
            self._skip(biggest, ts, out)
            if biggest.flow is not half.flow:  # feed() closes this one once it is done
                self._close_if_finished(biggest.flow, out)

    def _wait(self, half: Half, moved: bool) -> None:
        """Keep :attr:`_buffering` and the hole clock: a hole starts when a half begins to
        wait, and again whenever its next byte moved."""
        if half.waiting:
            if moved or half not in self._buffering:
                half.since = self._now
                self._buffering[half] = None
        else:
            self._buffering.pop(half, None)

    def _skip(self, half: Half, ts: float, out: Output) -> None:
        """Give up on ``half``'s first hole (a gap); that may complete the direction."""
        nxt, held = half.nxt, half.held
        ready = self._ready
        half.skip_hole(ready)
        self._total_pending += half.held - held
        if ready:
            self._deliver(half, ready, ts, out)
        self._wait(half, half.nxt != nxt)
        self._finished(half, out)

    def _expire_holes(self, now: float, out: Output) -> None:
        timeout = self.config.hole_timeout
        self._next_hole_check = now + timeout / 4
        for half in [h for h in self._buffering if now - h.since >= timeout]:
            if half in self._buffering:  # not ended with its flow earlier in this loop
                self.stats.hole_timeouts += 1
                self._skip(half, now, out)
                self._close_if_finished(half.flow, out)

    def _deliver(self, half: Half, ready: Ready, ts: float, out: Output) -> None:
        for gap, data in ready:
            self._emit(half, data, gap, ts, out)
        ready.clear()

    def _emit(self, half: Half, data: bytes, gap: int, ts: float, out: Output) -> None:
        stats = self.stats
        stats.bytes_delivered += len(data)
        flow = half.flow
        merged = self._merged
        if merged is not None:
            o = flow.open
            if o is not None and o.half is half and not gap:
                o.parts.append(data)
                o.chunk.seen_at = ts
                return
        if gap:
            stats.gap_bytes += gap
        stats.chunks += 1
        chunk = TrafficChunk(data, half.from_addr, half.to_addr, half.chunk_dir, ts,
                             flow.flow_id, gap, tunnel=flow.key[4])
        out.append(chunk)
        if merged is not None:
            flow.open = o = OpenChunk(chunk, half)
            merged.append(o)

    # ----------------------------------------------------------------- ends

    def _finished(self, half: Half, out: Output) -> bool:
        """Has ``half`` reached its FIN in sequence? (Announced once with DirectionEnd.)"""
        if not half.complete:
            return False
        if not half.done:
            self._direction_end(half, out)
        return True

    def _close_if_finished(self, flow: Flow, out: Output) -> None:
        """End ``flow`` by ``fin`` once both directions are complete (a hole skipped outside
        ``feed``, by time or by another flow's limit, may complete the second one)."""
        if self._finished(flow.a, out) and self._finished(flow.b, out):
            self._end(flow, "fin", out)

    @staticmethod
    def _direction_end(half: Half, out: Output) -> None:
        half.done = True
        flow = half.flow
        flow.open = None  # nothing merges across it
        out.append(DirectionEnd(flow.flow_id, half.chunk_dir, half.from_addr))

    def _release(self, flow: Flow, out: Output) -> int:
        """Deliver what ``flow`` holds past its holes (its end is near); the bytes then
        known missing at its end (both halves)."""
        trailing = 0
        ready = self._ready
        for half in (flow.a, flow.b):
            if half.syn_data is not None:  # never answered: the receiver took none of it
                size = len(half.syn_data[0])
                self.stats.syn_data_refused_bytes += size
                self._total_pending -= size
                half.syn_data = None
            if half.pending:
                held = half.held
                half.release_all(ready)
                self._total_pending += half.held - held
                self._deliver(half, ready, self._now, out)
                self._finished(half, out)  # releasing the last hole may complete it
            half.probe = None  # never confirmed: not data
            self._buffering.pop(half, None)
            trailing += half.trailing()  # with no chunk left to carry it
        flow.open = None
        return trailing
