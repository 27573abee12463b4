"""TCP reassembly: :class:`~agent.model.Segment` in, chunks, direction and flow ends out.

The flow table: connections keyed by their 4-tuple, opened by a SYN or their first data,
closed by RST, by the second FIN reached in sequence, by the idle sweep or by a limit. Each
direction's bytes are ordered by a :class:`~agent.streambuf.StreamBuffer`; the table decides
when a hole is given up on (``hole_timeout``, memory limits, the connection's end) and turns
what the buffers release into :class:`~agent.model.TrafficChunk` objects.

Pure: no I/O and no clock of its own; time comes from the segments (``Segment.ts``) or from
:meth:`Reassembler.advance`. Every byte that is not delivered is counted in
:class:`ReassemblyStats` or reported as ``gap_bytes`` on the next chunk (or as the
``trailing_gap`` of the :class:`~agent.model.FlowEnd`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from agent.model import (
    ACK,
    FIN,
    RST,
    SYN,
    Direction,
    DirectionEnd,
    FlowEnd,
    FlowKey,
    Segment,
    TrafficChunk,
    flow_key,
    format_addr,
)
from agent.streambuf import Ready, StreamBuffer

__all__ = ["HOLE_TIMEOUT", "Output", "Reassembler", "ReassemblyConfig", "ReassemblyStats"]

_MASK = 0xFFFFFFFF

Output = list[TrafficChunk | DirectionEnd | FlowEnd]
Classifier = Callable[[int, int], Direction]


def _unknown(_src_port: int, _dst_port: int) -> Direction:
    return Direction.UNKNOWN


#: Seconds a hole may hold later data back before it is skipped as a gap: TCP fills a real
#: one within its retransmission timeout (~0.2-1 s); a live source's ring overflow never fills.
HOLE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class ReassemblyConfig:
    """Limits. A limit that hits flushes the affected flow with its gap marked, and counts."""

    idle_timeout: float = 600.0
    """Seconds without a segment before a flow is flushed (checked every ``idle_timeout/2``)."""
    max_flows: int = 100_000
    """Connections tracked at once; past it the oldest of a few old flows is evicted."""
    max_flow_buffer: int = 4 << 20
    """Out-of-order bytes held for one direction of one connection before its hole is skipped."""
    max_total_buffer: int = 256 << 20
    """Out-of-order bytes held across all connections before the largest hole is skipped."""
    max_lifetime: float = 0.0
    """Seconds a connection may be tracked before it is ended and restarted (0: no limit)."""
    tombstone_ttl: float = 120.0
    """Seconds a closed 4-tuple keeps dropping late segments (unless a new SYN reopens it)."""
    hole_timeout: float = HOLE_TIMEOUT
    """Seconds a hole may hold later data, or the FIN, back without progress before it is
    skipped as a gap (0: only the limits and the flow's end skip holes). A live source cannot
    say where a ring overflow left a hole, and TCP fills real ones within its retransmission
    timeout (~0.2-1 s)."""

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        if self.max_flows < 1 or self.max_flow_buffer < 1 or self.max_total_buffer < 1:
            raise ValueError("reassembly limits must be >= 1")
        if self.max_lifetime < 0:
            raise ValueError("max_lifetime must be >= 0")
        if self.hole_timeout < 0:
            raise ValueError("hole_timeout must be >= 0")


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
    flows_closed: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in asdict(self).items() if k != "flows_closed"}
        out.update({f"flows_closed_{k}": v for k, v in sorted(self.flows_closed.items())})
        return out


class _Half(StreamBuffer):
    """One direction of one connection: its stream and what the table knows about it."""

    __slots__ = ("chunk_dir", "done", "flow", "from_addr", "isn", "peer", "since", "to_addr",
                 "untracked")

    def __init__(self, flow: _Flow, from_addr: str, to_addr: str, direction: Direction,
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
        self.peer: _Half = self


class _Flow:
    __slots__ = ("a", "b", "created", "flow_id", "key", "last_seen")

    def __init__(self, flow_id: int, key: FlowKey, ts: float) -> None:
        self.flow_id = flow_id
        self.key = key
        self.created = ts
        self.last_seen = ts
        self.a: _Half
        self.b: _Half


class Reassembler:
    """Reassembles every TCP connection seen in a stream of segments.

    Feed segments in capture order with :meth:`feed`; chunks, :class:`DirectionEnd` (a
    direction reached its FIN in sequence, or gave up on the bytes before it) and
    :class:`FlowEnd` notices are appended to the output list you pass. In-order data is
    delivered at once. Call :meth:`flush` at end of input. ``classify(src_port, dst_port)``
    sets each chunk's direction. Directions in ``untracked`` are followed for their
    SYN/FIN/RST only: their payload is ignored (and may be absent, elided by the source).
    """

    def __init__(
        self,
        config: ReassemblyConfig | None = None,
        classify: Classifier = _unknown,
        anonymize: Callable[[bytes], bytes] | None = None,
        untracked: frozenset[Direction] = frozenset(),
    ) -> None:
        self.config = config or ReassemblyConfig()
        self.stats = ReassemblyStats()
        self._classify = classify
        self._anonymize = anonymize
        self._untracked = untracked
        self._halves: dict[tuple[bytes, int, bytes, int], _Half] = {}
        self._flows: dict[int, _Flow] = {}
        self._tombstones: dict[FlowKey, float] = {}
        self._buffering: set[_Half] = set()  # halves with a hole: StreamBuffer.waiting
        self._total_pending = 0
        self._ready: Ready = []
        self._next_id = 1
        self._sweep_every = self.config.idle_timeout / 2
        self._next_hole_check = 0.0
        self._next_sweep: float | None = None
        self._now = 0.0

    # ----------------------------------------------------------------- public API

    @property
    def flow_count(self) -> int:
        return len(self._flows)

    @property
    def buffered_bytes(self) -> int:
        return self._total_pending

    def process(self, segments: Iterable[Segment]) -> Output:
        """Feed many segments; return everything they produced."""
        out: Output = []
        for seg in segments:
            self.feed(seg, out)
        return out

    def feed(self, seg: Segment, out: Output) -> None:
        """Account for one segment; append resulting chunks / flow ends to ``out``."""
        stats = self.stats
        stats.segments += 1
        ts = seg.ts
        if self._next_sweep is None:
            self._next_sweep = ts + self._sweep_every
        elif ts >= self._next_sweep:
            self.advance(ts, out)
        if ts > self._now:
            self._now = ts
        if self._buffering and ts >= self._next_hole_check and self.config.hole_timeout:
            self._expire_holes(ts, out)
        half = self._halves.get((seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port))
        flags = seg.flags
        if half is None:
            half = self._open(seg, out)
            if half is None:
                return
        elif flags & SYN and half.isn != seg.seq and not self._is_own_syn(half, seg):
            # A new connection on a 4-tuple we still track: the old one is over.
            self._end(half.flow, "reused", out)
            half = self._open(seg, out)
            if half is None:
                return
        flow = half.flow
        flow.last_seen = ts
        if seg.window == 0:
            half.peer.blocked = True
        elif half.peer.blocked:
            half.peer.blocked = False
        if flags & RST:
            self._end(flow, "rst", out)
            self._tombstones[flow.key] = ts
            return
        if half.untracked:
            stats.untracked_segments += 1
            if flags & SYN:
                half.isn = seg.seq
            if flags & FIN:
                half.fin = half.nxt = 0  # this half is done; nothing in it is awaited
            elif half.nxt is None:
                half.nxt = seg.seq  # started: a later SYN is a new connection's
        else:
            self._track(half, seg, ts, out)
        if half.fin is not None and half.nxt is not None and half.nxt >= half.fin:
            if not half.done:
                self._direction_end(half, out)
            if self._finished(half.peer, out):
                self._end(flow, "fin", out)

    def advance(self, now: float, out: Output) -> None:
        """Let time pass: skip timed-out holes, end idle flows (and over-age ones), expire
        tombstones."""
        if now > self._now:
            self._now = now
        if self._buffering and self.config.hole_timeout:
            self._expire_holes(now, out)
        if self._next_sweep is not None and now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every
        cfg = self.config
        idle_before = now - cfg.idle_timeout
        born_before = now - cfg.max_lifetime if cfg.max_lifetime else None
        for flow in list(self._flows.values()):
            if flow.last_seen <= idle_before:
                self._end(flow, "idle", out)
            elif born_before is not None and flow.created <= born_before:
                self._end(flow, "lifetime", out)
        dead_before = now - cfg.tombstone_ttl
        for key in [k for k, t in self._tombstones.items() if t <= dead_before]:
            del self._tombstones[key]

    def flush(self, out: Output) -> None:
        """End every flow, delivering buffered data past its holes (end of input)."""
        for flow in list(self._flows.values()):
            self._end(flow, "flush", out)
        self._tombstones.clear()

    # ----------------------------------------------------------------- data

    def _track(self, half: _Half, seg: Segment, ts: float, out: Output) -> None:
        """The data path of :meth:`feed` for a tracked half (not RST)."""
        flags = seg.flags
        payload = seg.payload
        nxt = half.nxt
        if nxt is None:
            if flags & SYN:
                half.isn = seg.seq
                nxt = half.nxt = seg.seq + 1
            else:
                nxt = half.nxt = seg.seq  # started mid-stream: begin at the first byte seen
        pos = half.unwrap(seg.seq + 1 if flags & SYN else seg.seq)
        if pos == nxt and payload and not (half.pending or half.probe or half.blocked
                                           or seg.lost or half.fin is not None):
            # Fast path: the next bytes, in order, nothing held, no FIN known.
            half.nxt = pos + len(payload)
            half.last = (pos, payload)
            gap = half.gap
            if gap:
                half.gap = 0
            self._emit(half, payload, gap, ts, out)
        elif payload or seg.lost:
            self._add(half, pos, payload, seg.lost, ts, out)
        if flags & FIN and half.fin is None:
            held = half.held
            half.set_fin(pos + len(payload) + seg.lost)
            self._total_pending += half.held - held
            self._wait(half, False)  # the bytes before the FIN, if missing, are a hole

    def _add(self, half: _Half, pos: int, payload: bytes, lost: int, ts: float,
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

    def _wait(self, half: _Half, moved: bool) -> None:
        """Keep :attr:`_buffering` and the hole clock: a hole starts when a half begins to
        wait, and again whenever its next byte moved."""
        if half.waiting:
            if moved or half not in self._buffering:
                half.since = self._now
                self._buffering.add(half)
        else:
            self._buffering.discard(half)

    def _skip(self, half: _Half, ts: float, out: Output) -> None:
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

    def _deliver(self, half: _Half, ready: Ready, ts: float, out: Output) -> None:
        for gap, data in ready:
            self._emit(half, data, gap, ts, out)
        ready.clear()

    def _emit(self, half: _Half, data: bytes, gap: int, ts: float, out: Output) -> None:
        stats = self.stats
        if gap:
            stats.gap_bytes += gap
        stats.chunks += 1
        stats.bytes_delivered += len(data)
        out.append(
            TrafficChunk(
                data, half.from_addr, half.to_addr, half.chunk_dir, ts, half.flow.flow_id, gap
            )
        )

    # ----------------------------------------------------------------- flows

    def _is_own_syn(self, half: _Half, seg: Segment) -> bool:
        """A SYN for a half that started from data: its own late or retransmitted SYN?"""
        if half.isn is not None or half.nxt is None:
            return half.nxt is None
        # Started mid-stream; a SYN right below the first byte is this connection's.
        delta = ((half.nxt - seg.seq - 1) & _MASK)
        if delta < (1 << 24):
            half.isn = seg.seq
            return True
        return False

    def _open(self, seg: Segment, out: Output) -> _Half | None:
        flags = seg.flags
        key = flow_key(seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port)
        if not flags & SYN:
            if key in self._tombstones:
                if seg.payload:
                    self.stats.late_segments += 1
                    self.stats.late_bytes += len(seg.payload)
                return None
            if flags & RST or not (seg.payload or flags & FIN or seg.lost):
                return None  # a bare RST or ACK of a connection we never saw: nothing to do
        elif flags & ACK and key in self._tombstones:
            # A SYN-ACK retransmitted for a connection already closed.
            return None
        self._tombstones.pop(key, None)
        if len(self._flows) >= self.config.max_flows:
            self._evict(out)
        flow = _Flow(self._next_id, key, seg.ts)
        self._next_id += 1
        anon = self._anonymize
        src = format_addr(seg.src_ip, seg.src_port, anon)
        dst = format_addr(seg.dst_ip, seg.dst_port, anon)
        stats = self.stats
        a = _Half(flow, src, dst, self._classify(seg.src_port, seg.dst_port), stats)
        b = _Half(flow, dst, src, self._classify(seg.dst_port, seg.src_port), stats)
        a.peer, b.peer = b, a
        a.untracked = a.chunk_dir in self._untracked
        b.untracked = b.chunk_dir in self._untracked
        flow.a, flow.b = a, b
        self._flows[flow.flow_id] = flow
        self._halves[(seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port)] = a
        self._halves[(seg.dst_ip, seg.dst_port, seg.src_ip, seg.src_port)] = b
        stats.flows_opened += 1
        return a

    def _finished(self, half: _Half, out: Output) -> bool:
        """Has ``half`` reached its FIN in sequence? (Announced once with DirectionEnd.)"""
        if not half.complete:
            return False
        if not half.done:
            self._direction_end(half, out)
        return True

    def _close_if_finished(self, flow: _Flow, out: Output) -> None:
        """End ``flow`` by ``fin`` once both directions are complete (a hole skipped outside
        :meth:`feed`, by time or by another flow's limit, may complete the second one)."""
        if self._finished(flow.a, out) and self._finished(flow.b, out):
            self._end(flow, "fin", out)

    @staticmethod
    def _direction_end(half: _Half, out: Output) -> None:
        half.done = True
        out.append(DirectionEnd(half.flow.flow_id, half.chunk_dir, half.from_addr))

    def _evict(self, out: Output) -> None:
        """Make room: end the least recently active of the few oldest flows."""
        oldest: _Flow | None = None
        for i, flow in enumerate(self._flows.values()):
            if oldest is None or flow.last_seen < oldest.last_seen:
                oldest = flow
            if i >= 7:
                break
        if oldest is not None:
            self._end(oldest, "evicted", out)

    def _end(self, flow: _Flow, reason: str, out: Output) -> None:
        trailing = 0
        ready = self._ready
        for half in (flow.a, flow.b):
            if half.pending:
                held = half.held
                half.release_all(ready)
                self._total_pending += half.held - held
                self._deliver(half, ready, self._now, out)
                self._finished(half, out)  # releasing the last hole may complete it
            half.probe = None  # never confirmed: not data
            self._buffering.discard(half)
            trailing += half.trailing()  # with no chunk left to carry it
        self.stats.gap_bytes += trailing
        self.stats.flows_closed[reason] = self.stats.flows_closed.get(reason, 0) + 1
        del self._flows[flow.flow_id]
        k = flow.key  # (ip, port, ip, port): one direction's 4-tuple as it stands
        self._halves.pop(k, None)
        self._halves.pop((k[2], k[3], k[0], k[1]), None)
        if reason == "fin":
            self._tombstones[k] = self._now
        out.append(FlowEnd(flow.flow_id, reason, trailing))
