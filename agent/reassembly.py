"""TCP reassembly: :class:`~agent.model.Segment` in, chunks, direction and flow ends out.

Pure: no I/O and no clock of its own; time comes from the segments (``Segment.ts``) or from
:meth:`Reassembler.advance`. Every byte that is not delivered is counted in
:class:`ReassemblyStats` or reported as ``gap_bytes`` on the next chunk.

Sequence numbers are *unwrapped*: a position is an unbounded int congruent to the 32-bit
sequence number, so wraparound needs no special case after :func:`_unwrap`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from operator import itemgetter

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

__all__ = ["Output", "Reassembler", "ReassemblyConfig", "ReassemblyStats"]

_MASK = 0xFFFFFFFF
_HALF = 0x80000000
_start = itemgetter(0)

Output = list[TrafficChunk | DirectionEnd | FlowEnd]
Classifier = Callable[[int, int], Direction]


def _unknown(_src_port: int, _dst_port: int) -> Direction:
    return Direction.UNKNOWN


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
    hole_timeout: float = 0.0
    """Seconds a hole may hold later data back before it is skipped as a gap (0: only the
    limits and the flow's end skip holes). A live source cannot say where a ring overflow
    left a hole, and TCP fills real ones within its retransmission timeout (~0.2-1 s)."""

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
    """Data segments of a connection already closed (after RST or FIN), dropped."""
    late_bytes: int = 0
    limit_skips: int = 0
    hole_timeouts: int = 0
    untracked_segments: int = 0
    """Segments of an untracked direction (responses nobody consumes): SYN/FIN/RST only."""
    """Holes skipped because later data waited longer than ``hole_timeout``."""
    flows_closed: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in asdict(self).items() if k != "flows_closed"}
        out.update({f"flows_closed_{k}": v for k, v in sorted(self.flows_closed.items())})
        return out


class _Half:
    """One direction of one connection."""

    __slots__ = (
        "blocked",
        "chunk_dir",
        "done",
        "fin",
        "flow",
        "from_addr",
        "gap",
        "isn",
        "last",
        "nxt",
        "peer",
        "pending",
        "pending_bytes",
        "probe",
        "since",
        "to_addr",
        "untracked",
    )

    def __init__(self, flow: _Flow, from_addr: str, to_addr: str, direction: Direction) -> None:
        self.flow = flow
        self.from_addr = from_addr
        self.to_addr = to_addr
        self.chunk_dir = direction
        self.nxt: int | None = None  # position of the next byte to deliver; None = not started
        self.isn: int | None = None
        self.fin: int | None = None  # position of the FIN, once seen
        self.done = False  # FIN reached in sequence, DirectionEnd sent
        self.gap = 0  # bytes skipped, to report on the next chunk
        # Out-of-order data: sorted, non-overlapping [start, end, bytes | None (lost)].
        self.pending: list[list[object]] = []
        self.pending_bytes = 0
        self.since = 0.0  # when the current hole started holding data back
        self.untracked = False  # payload ignored; only SYN/FIN/RST are followed
        self.last: tuple[int, bytes] | None = None  # last delivered piece, for conflict checks
        self.blocked = False  # the peer advertised a zero window
        self.probe: tuple[int, bytes] | None = None  # a held zero-window probe byte
        self.peer: _Half = self

    def unwrap(self, seq: int) -> int:
        """Position of 32-bit ``seq`` nearest to the next expected byte."""
        nxt = self.nxt
        assert nxt is not None
        return nxt + (((seq - nxt + _HALF) & _MASK) - _HALF)


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
    direction reached its FIN in sequence) and :class:`FlowEnd` notices are appended to the
    output list you pass. In-order data is delivered at once. Call
    :meth:`flush` at end of input. ``classify(src_port, dst_port)`` sets each chunk's direction.
    Directions in ``untracked`` are followed for their SYN/FIN/RST only: their payload is
    ignored (and may be absent, elided by the source).
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
        self._buffering: set[_Half] = set()
        self._total_pending = 0
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
                                           or seg.lost):
            # Fast path: the next bytes, in order, nothing held.
            half.nxt = pos + len(payload)
            half.last = (pos, payload)
            self._emit(half, payload, ts, out)
        elif payload or seg.lost:
            self._data(half, pos, payload, seg.lost, ts, out)
        if flags & FIN:
            half.fin = pos + len(payload) + seg.lost

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

    def _expire_holes(self, now: float, out: Output) -> None:
        timeout = self.config.hole_timeout
        self._next_hole_check = now + timeout / 4
        for half in [h for h in self._buffering if now - h.since >= timeout]:
            self.stats.hole_timeouts += 1
            self._skip_holes(half, now, out, once=True)

    def flush(self, out: Output) -> None:
        """End every flow, delivering buffered data past its holes (end of input)."""
        for flow in list(self._flows.values()):
            self._end(flow, "flush", out)
        self._tombstones.clear()

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
        a = _Half(flow, src, dst, self._classify(seg.src_port, seg.dst_port))
        b = _Half(flow, dst, src, self._classify(seg.dst_port, seg.src_port))
        a.peer, b.peer = b, a
        a.untracked = a.chunk_dir in self._untracked
        b.untracked = b.chunk_dir in self._untracked
        flow.a, flow.b = a, b
        self._flows[flow.flow_id] = flow
        self._halves[(seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port)] = a
        self._halves[(seg.dst_ip, seg.dst_port, seg.src_ip, seg.src_port)] = b
        self.stats.flows_opened += 1
        return a

    def _finished(self, half: _Half, out: Output) -> bool:
        """Has ``half`` reached its FIN in sequence? (Announced once with DirectionEnd.)"""
        if half.fin is None or half.nxt is None or half.nxt < half.fin:
            return False
        if not half.done:
            self._direction_end(half, out)
        return True

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
        for half in (flow.a, flow.b):
            if half.pending:
                self._skip_holes(half, self._now, out)
            if half.probe is not None:
                half.probe = None  # never confirmed: not data
            if half.fin is not None and half.nxt is not None and half.nxt < half.fin:
                trailing += half.fin - half.nxt
            trailing += half.gap  # skipped bytes with no chunk left to carry them
        self.stats.gap_bytes += trailing
        self.stats.flows_closed[reason] = self.stats.flows_closed.get(reason, 0) + 1
        del self._flows[flow.flow_id]
        k = flow.key  # (ip, port, ip, port): one direction's 4-tuple as it stands
        self._halves.pop(k, None)
        self._halves.pop((k[2], k[3], k[0], k[1]), None)
        if reason == "fin":
            self._tombstones[k] = self._now
        out.append(FlowEnd(flow.flow_id, reason, trailing))

    # ----------------------------------------------------------------- data

    def _data(
        self, half: _Half, pos: int, payload: bytes, lost: int, ts: float, out: Output
    ) -> None:
        """Place ``payload`` (then ``lost`` missing bytes) at ``pos`` in ``half``'s stream."""
        stats = self.stats
        if half.probe is not None:
            self._settle_probe(half, pos, ts, out)
        nxt = half.nxt
        assert nxt is not None
        size = len(payload)
        end = pos + size
        if end + lost <= nxt:
            if pos == nxt - 1 and size <= 1:
                stats.keepalives += 1
            else:
                stats.retransmitted_bytes += size
                self._check_conflict(half, pos, payload)
            return
        if pos < nxt:
            cut = min(nxt - pos, size)
            if cut:
                stats.retransmitted_bytes += cut
                self._check_conflict(half, pos, payload[:cut])
                payload = payload[cut:]
                size -= cut
            lost -= (nxt - pos) - cut
            pos = nxt
        pending = half.pending
        # Fast path: in order and ending before any held data (else merge via the buffer).
        if pos == nxt and (not pending or pending[0][0] > end + lost):  # type: ignore[operator]
            if half.blocked and size == 1 and not lost:
                # A one-byte zero-window probe: hold it until we know the receiver took it.
                half.probe = (pos, payload)
                stats.zero_window_probes += 1
                return
            if size:
                half.nxt = end
                half.last = (pos, payload)
                self._emit(half, payload, ts, out)
            if lost:
                half.nxt = end + lost
                half.gap += lost
                if pending:
                    self._drain(half, ts, out)
            return
        self._insert(half, pos, payload, lost)
        if pending[0][0] <= nxt:  # type: ignore[operator]
            self._drain(half, ts, out)
            return
        cfg = self.config
        while half.pending and half.pending_bytes > cfg.max_flow_buffer:
            stats.limit_skips += 1
            self._skip_holes(half, ts, out, once=True)
        while self._buffering and self._total_pending > cfg.max_total_buffer:
            stats.limit_skips += 1
            biggest = max(self._buffering, key=lambda h: h.pending_bytes)
            self._skip_holes(biggest, ts, out, once=True)

    def _settle_probe(self, half: _Half, pos: int, ts: float, out: Output) -> None:
        """A segment follows a held probe byte: at nxt+1 the receiver took it, else drop it."""
        assert half.probe is not None
        ppos, pbyte = half.probe
        half.probe = None
        if pos == ppos + 1:
            half.nxt = pos
            half.last = (ppos, pbyte)
            self._emit(half, pbyte, ts, out)

    def _check_conflict(self, half: _Half, pos: int, data: bytes) -> None:
        """Count bytes of a retransmission that differ from the copy already delivered."""
        last = half.last
        if last is None or not data:
            return
        lpos, ldata = last
        lo = max(pos, lpos)
        hi = min(pos + len(data), lpos + len(ldata))
        if lo < hi and data[lo - pos : hi - pos] != ldata[lo - lpos : hi - lpos]:
            a = data[lo - pos : hi - pos]
            b = ldata[lo - lpos : hi - lpos]
            self.stats.conflict_bytes += sum(1 for x, y in zip(a, b, strict=True) if x != y)

    def _insert(self, half: _Half, pos: int, payload: bytes, lost: int) -> None:
        """Add [pos, pos+len+lost) to the pending list; bytes already held win (first copy)."""
        pending = half.pending
        end = pos + len(payload)
        pieces: list[list[object]] = []
        i = bisect.bisect_left(pending, pos, key=_start)
        if i > 0 and pending[i - 1][1] > pos:  # type: ignore[operator]
            i -= 1
        cur = pos
        j = i
        total_end = end + lost
        while j < len(pending) and pending[j][0] < total_end:  # type: ignore[operator]
            s, e, held = pending[j]
            assert isinstance(s, int) and isinstance(e, int)
            if s > cur:
                self._piece(pieces, cur, s, pos, payload, end)
            lo, hi = max(cur, s), min(end, e)
            if lo < hi and isinstance(held, bytes):
                mine = payload[lo - pos : hi - pos]
                theirs = held[lo - s : hi - s]
                if mine != theirs:
                    self.stats.conflict_bytes += sum(
                        1 for x, y in zip(mine, theirs, strict=True) if x != y
                    )
            self.stats.retransmitted_bytes += max(0, hi - lo)
            cur = max(cur, e)
            j += 1
        if cur < total_end:
            self._piece(pieces, cur, total_end, pos, payload, end)
        if pieces:
            if i == j:  # no overlap with held data: the common case, O(1) at the tail
                pending[i:i] = pieces
            else:  # interleave with the held pieces it overlapped
                pending[i:j] = sorted(pending[i:j] + pieces, key=_start)
            added = sum(int(p[1]) - int(p[0]) for p in pieces if p[2] is not None)  # type: ignore[call-overload]
            half.pending_bytes += added
            self._total_pending += added
            if half not in self._buffering:
                half.since = self._now
                self._buffering.add(half)

    @staticmethod
    def _piece(
        pieces: list[list[object]], lo: int, hi: int, pos: int, payload: bytes, end: int
    ) -> None:
        """Append the part [lo, hi) of a new segment: real bytes up to ``end``, lost after."""
        if lo < end:
            pieces.append([lo, min(hi, end), payload[lo - pos : min(hi, end) - pos]])
        if hi > end:
            pieces.append([max(lo, end), hi, None])

    def _drain(self, half: _Half, ts: float, out: Output) -> None:
        """Deliver pending pieces that now start at or before ``nxt``, as one chunk."""
        pending = half.pending
        nxt = half.nxt
        assert nxt is not None
        parts: list[bytes] = []
        released = 0
        k = 0
        while k < len(pending) and pending[k][0] <= nxt:  # type: ignore[operator]
            s, e, data = pending[k]
            k += 1
            assert isinstance(s, int) and isinstance(e, int)
            if data is not None:
                released += e - s
            if e <= nxt:
                continue
            if data is None:
                if parts:
                    self._emit(half, b"".join(parts), ts, out)
                    parts = []
                half.gap += e - nxt
            else:
                assert isinstance(data, bytes)
                piece = data[nxt - s :] if s < nxt else data
                parts.append(piece)
                half.last = (max(s, nxt), piece)
            nxt = e
        del pending[:k]
        half.nxt = nxt
        half.pending_bytes -= released
        self._total_pending -= released
        if not pending:
            self._buffering.discard(half)
        else:
            half.since = self._now  # what is left waits on a new hole
        if parts:
            self._emit(half, parts[0] if len(parts) == 1 else b"".join(parts), ts, out)

    def _skip_holes(self, half: _Half, ts: float, out: Output, once: bool = False) -> None:
        """Give up on the hole(s) before pending data: count them as a gap, deliver the rest."""
        while half.pending:
            start = half.pending[0][0]
            assert isinstance(start, int) and half.nxt is not None
            if start > half.nxt:
                half.gap += start - half.nxt
                half.nxt = start
            self._drain(half, ts, out)
            if once:
                break
        self._finished(half, out)  # skipping the last hole may complete the direction

    def _emit(self, half: _Half, data: bytes, ts: float, out: Output) -> None:
        gap = half.gap
        if gap:
            self.stats.gap_bytes += gap
            half.gap = 0
        self.stats.chunks += 1
        self.stats.bytes_delivered += len(data)
        out.append(
            TrafficChunk(
                data, half.from_addr, half.to_addr, half.chunk_dir, ts, half.flow.flow_id, gap
            )
        )
