"""TCP reassembly: :class:`~agent.model.Segment` in, chunks, direction and flow ends out.

The flow table: connections keyed by their 4-tuple, opened by a SYN or their first data,
closed by RST, by the second FIN reached in sequence, by the idle sweep or by a limit. Each
direction's bytes are ordered by a :class:`~agent.reassembly.stream.StreamBuffer`; the
:class:`~agent.reassembly.datapath.DataPath` decides when a hole is given up on
(``hole_timeout``, memory limits, the connection's end), turns what the buffers release into
:class:`~agent.model.TrafficChunk` objects and hands back flows it completed; the table ends
them. In-order data, the common case, takes a fast path in the feeding loop itself, under
the one predicate :attr:`~agent.reassembly.stream.StreamBuffer.streaming`.

Resets and SYN data follow what the receiving stack delivers (Linux; each counted):

- A RST ends its flow only if its receiver takes it: RFC 5961 §3.2, at the receiver's
  RCV.NXT, i.e. the next byte the mirror expects from the RST's sender (also where the
  receiver may be though the capture is not: the end of held data, the FIN's number and the
  one after, see :meth:`~agent.reassembly.stream.StreamBuffer.reset_verdict`). Any other RST is
  counted (``rst_ignored_in_window``: answered with a challenge ACK;
  ``rst_ignored_out_of_window``: dropped) and ignored, window field too: the connection
  goes on. A RST whose sender's sequence numbers the mirror never followed (the answer to
  a refused SYN, a pickup mid-stream, a side not captured or untracked) cannot be checked
  and is taken (``rst_unchecked``). A RST never opens, reuses or feeds a flow, even with SYN.
- Data on a RST is never delivered (``rst_payload_bytes``): Linux checks the RST first and
  resets, or drops the segment, without queueing its data.
- Data on a SYN (TCP Fast Open) is held until the receiver's SYN-ACK acknowledges part of
  it: the acknowledged part is delivered (``syn_data_bytes``), the rest is not
  (``syn_data_refused_bytes``): a refused client sends it again after the handshake, where
  it is delivered once. An ACK number the sender would reject settles nothing; then the
  sender's next segment with data or FIN settles it by where it starts (at the SYN data's
  start: refused). A flow that ends before either delivers none of it. A SYN again (same
  ISN) adds nothing: its receiver takes nothing from it.

Pure: no I/O and no clock of its own; time comes from the segments (``Segment.ts``) or from
:meth:`Reassembler.advance`. Every byte that is not delivered is counted in
:class:`ReassemblyStats` or reported as ``gap_bytes`` on the next chunk (or as the
``trailing_gap`` of the :class:`~agent.model.FlowEnd`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.model import (
    ACK,
    FIN,
    RST,
    SYN,
    Direction,
    EndReason,
    FlowEnd,
    FlowKey,
    Segment,
    flow_key,
    format_addr,
)
from agent.reassembly.datapath import DataPath
from agent.reassembly.flow import Flow, Half, Output, ReassemblyStats
from agent.reassembly.refusal import Refusals

__all__ = ["HOLE_TIMEOUT", "Output", "Reassembler", "ReassemblyConfig", "ReassemblyStats"]

_MASK = 0xFFFFFFFF

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


class Reassembler:
    """Reassembles every TCP connection seen in a stream of segments.

    Feed segments in capture order with :meth:`feed`; chunks, :class:`DirectionEnd` (a
    direction reached its FIN in sequence, or gave up on the bytes before it) and
    :class:`FlowEnd` notices are appended to the output list you pass. In-order data is
    delivered at once. :meth:`feed_batch` feeds many and merges the chunks they make. Call
    :meth:`flush` at end of input. ``classify(src_port, dst_port)`` sets each chunk's
    direction. Directions in ``untracked`` are followed for their SYN/FIN/RST only: their
    payload is ignored (and may be absent, elided by the source).
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
        self._path = DataPath(self.config, self.stats, self._end_finished)
        self._classify = classify
        self._anonymize = anonymize
        self._untracked = untracked
        self._halves: dict[FlowKey, Half] = {}  # (src, sport, dst, dport, tunnel)
        self._flows: dict[int, Flow] = {}
        self._tombstones: dict[FlowKey, float] = {}
        self._tunnels: Counter[str] = Counter()  # open flows per tunnel identity
        self._tunnels_changed = False
        self._tunnels_seen: dict[str, int] = {}  # the snapshot other threads read
        #: New connections refused whole while ``refusals.reason`` is set (the memory guard).
        self.refusals = Refusals(self.stats, max(1024, self.config.max_flows // 4),
                                 self.config.tombstone_ttl)
        self._next_id = 1
        self._sweep_every = self.config.idle_timeout / 2
        self._next_sweep = -math.inf  # the first segment (or advance) starts the clock

    # ----------------------------------------------------------------- public API

    @property
    def flow_count(self) -> int:
        return len(self._flows)

    def flows_by_tunnel(self) -> dict[str, int]:
        """Open flows per tunnel identity (``vxlan:42`` ...; flows outside tunnels left out),
        as of the end of the latest feed call. Safe from another thread: it returns a copy
        of a snapshot the feeding thread replaces whole, never the live table."""
        return dict(self._tunnels_seen)

    @property
    def now(self) -> float:
        """The reassembler's clock: the latest segment time, or the time it was advanced to."""
        return self._path.now

    @property
    def buffered_bytes(self) -> int:
        return self._path.total_pending

    def process(self, segments: Iterable[Segment]) -> Output:
        """Feed many segments; return everything they produced (chunks not merged)."""
        out: Output = []
        self._feed(segments, out)
        return out

    def feed(self, seg: Segment, out: Output) -> None:
        """Account for one segment; append resulting chunks / flow ends to ``out``."""
        self._feed((seg,), out)

    def feed_batch(self, segments: Iterable[Segment], out: Output) -> None:
        """Feed many segments; the chunks they make come out merged (see
        :mod:`agent.reassembly.datapath`): consecutive ones of a flow and direction with no
        gap between them are one chunk, as :func:`agent.mirror.driver.coalesce` would make them."""
        with self._path.merging():
            self._feed(segments, out)

    def feed_tapped(self, segments: Iterable[Segment], out: Output,
                    flow_ids: list[int]) -> None:
        """:meth:`feed_batch`, and for each segment, the id of the flow it went into appended
        to ``flow_ids`` (0: none; a late segment, a bare ACK or RST of no tracked flow), for a
        per-flow packet tap. A segment that ends its flow belongs to it; a SYN that replaces
        a flow, to the new one. Slower than :meth:`feed_batch` (one segment at a time)."""
        find = self._halves.get
        with self._path.merging():
            for seg in segments:
                key = (seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port, seg.tunnel)
                before = find(key)
                self._feed((seg,), out)
                half = find(key) or before
                flow_ids.append(half.flow.flow_id if half is not None else 0)

    def _feed(self, segments: Iterable[Segment], out: Output) -> None:
        """Each segment in turn: in-order data on the fast path here, anything else (and
        time passing) by the methods it calls."""
        stats = self.stats
        path = self._path
        emit = path.emit
        find = self._halves.get
        hole_timeout = self.config.hole_timeout
        for seg in segments:
            stats.segments += 1
            ts = seg.ts
            if ts >= self._next_sweep or (path.buffering and ts >= path.next_hole_check
                                          and hole_timeout):
                self.advance(ts, out)
            elif ts > path.now:
                path.now = ts
            half = find((seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port, seg.tunnel))
            flags = seg.flags
            if half is None or flags & SYN:
                half = self._find(half, seg, out)
                if half is None:
                    continue
            half.flow.last_seen = ts
            if seg.window == 0:
                if not flags & RST:  # a RST's window means nothing (and it may be ignored)
                    half.peer.blocked = True
            elif half.peer.blocked and not flags & RST:
                half.peer.blocked = False
            payload = seg.payload
            nxt = half.nxt
            if (payload and nxt is not None and not flags & (SYN | FIN | RST) and not seg.lost
                    and seg.seq == nxt & _MASK and half.streaming and not half.untracked):
                # Fast path: the next bytes, in order; nothing held, skipped or ending.
                half.nxt = nxt + len(payload)
                half.last = (nxt, payload)
                emit(half, payload, 0, ts, out)
            else:
                self._segment(half, seg, ts, out)
        if self._tunnels_changed:
            self._publish_tunnels()

    def _publish_tunnels(self) -> None:
        """Replace the snapshot :meth:`flows_by_tunnel` reads (one assignment: atomic)."""
        self._tunnels_changed = False
        self._tunnels_seen = dict(self._tunnels)

    def _segment(self, half: Half, seg: Segment, ts: float, out: Output) -> None:
        """:meth:`feed` for every segment but in-order data: RST, SYN, FIN, data out of
        order or of an untracked direction; ends what it completes."""
        flags = seg.flags
        if flags & RST:
            self._reset(half, seg, ts, out)
            return
        if flags & SYN and flags & ACK and half.peer.syn_data is not None:
            self._path.syn_answered(half.peer, seg.ack, ts, out)
        if half.untracked:
            self._follow(half, seg)
        else:
            self._path.track(half, flags, seg.seq, seg.payload, seg.lost, ts, out)
        if half.complete:
            if not half.done:
                self._path.direction_end(half, out)
            if self._path.direction_done(half.peer, out):
                self._end(half.flow, EndReason.FIN, out)

    def _reset(self, half: Half, seg: Segment, ts: float, out: Output) -> None:
        """A RST from ``half``'s sender: the flow ends if its receiver would take it (see the
        module docstring), else it is counted and ignored. Its payload is never delivered."""
        stats = self.stats
        stats.rst_payload_bytes += len(seg.payload) + seg.lost
        if half.untracked or half.nxt is None:
            stats.rst_unchecked += 1  # the sender's sequence numbers were never followed
        else:
            verdict = half.reset_verdict(seg.seq)
            if verdict == "in_window":
                stats.rst_ignored_in_window += 1
                return
            if verdict == "out_of_window":
                stats.rst_ignored_out_of_window += 1
                return
        self._end(half.flow, EndReason.RST, out)
        self._tombstones[half.flow.key] = ts

    def advance(self, now: float, out: Output) -> None:
        """Let time pass: skip timed-out holes, end idle flows (and over-age ones), expire
        tombstones."""
        path = self._path
        if now > path.now:
            path.now = now
        if path.buffering and self.config.hole_timeout:
            path.expire_holes(now, out)
        if now >= self._next_sweep:
            self._sweep(now, out)
        if self._tunnels_changed:
            self._publish_tunnels()

    def _sweep(self, now: float, out: Output) -> None:
        """End idle and over-age flows, forget old tombstones (every ``idle_timeout/2``)."""
        self._next_sweep = now + self._sweep_every
        cfg = self.config
        idle_before = now - cfg.idle_timeout
        born_before = now - cfg.max_lifetime if cfg.max_lifetime else None
        for flow in list(self._flows.values()):
            if flow.last_seen <= idle_before:
                self._end(flow, EndReason.IDLE, out)
            elif born_before is not None and flow.created <= born_before:
                self._end(flow, EndReason.LIFETIME, out)
        dead_before = now - cfg.tombstone_ttl
        for key in [k for k, t in self._tombstones.items() if t <= dead_before]:
            del self._tombstones[key]
        self.refusals.expire(now)

    def flush(self, out: Output) -> None:
        """End every flow, delivering buffered data past its holes (end of input)."""
        for flow in list(self._flows.values()):
            self._end(flow, EndReason.FLUSH, out)
        self._tombstones.clear()
        self.refusals.clear()
        self._publish_tunnels()

    # ----------------------------------------------------------------- flows

    def _find(self, half: Half | None, seg: Segment, out: Output) -> Half | None:
        """The half of a segment of no known flow (a new flow, or None if it opens none),
        or of a SYN (a new connection on a 4-tuple still tracked ends the old one). A RST
        opens nothing and ends nothing here, even with SYN set (RST is checked first)."""
        if seg.flags & RST:
            if half is None:  # of no connection tracked (or one closed): nothing to end
                self.stats.rst_payload_bytes += len(seg.payload) + seg.lost
            return half
        if half is None:
            return self._open(seg, out)
        if half.isn != seg.seq and not self._is_own_syn(half, seg):
            self._end(half.flow, EndReason.REUSED, out)
            return self._open(seg, out)
        return half

    def _follow(self, half: Half, seg: Segment) -> None:
        """An untracked half: only its SYN and FIN matter (and where it started)."""
        self.stats.untracked_segments += 1
        if seg.flags & SYN:
            half.isn = seg.seq
        if seg.flags & FIN:
            half.fin = half.nxt = 0  # this half is done; nothing in it is awaited
        elif half.nxt is None:
            half.nxt = seg.seq  # started: a later SYN is a new connection's

    def _is_own_syn(self, half: Half, seg: Segment) -> bool:
        """A SYN with another ISN than ``half``'s: its own late SYN (the half started from
        data, or has not started), or a new connection's?"""
        if half.isn is not None:
            return False  # its SYN is known: this one is another connection's
        if half.nxt is None:
            return True
        # Started mid-stream; a SYN right below the first byte is this connection's.
        delta = ((half.nxt - seg.seq - 1) & _MASK)
        if delta < (1 << 24):
            half.isn = seg.seq
            return True
        return False

    def _open(self, seg: Segment, out: Output) -> Half | None:
        flags = seg.flags
        key = flow_key(seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port, seg.tunnel)
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
        if self.refusals.active and self.refusals.refuse(key, seg):
            return None  # shed (counted in flows_refused / refused_bytes)
        self._tombstones.pop(key, None)
        if len(self._flows) >= self.config.max_flows:
            self._evict(out)
        flow = Flow(self._next_id, key, seg.ts)
        self._next_id += 1
        anon = self._anonymize
        src = format_addr(seg.src_ip, seg.src_port, anon)
        dst = format_addr(seg.dst_ip, seg.dst_port, anon)
        stats = self.stats
        a = Half(flow, src, dst, self._classify(seg.src_port, seg.dst_port), stats)
        b = Half(flow, dst, src, self._classify(seg.dst_port, seg.src_port), stats)
        a.peer, b.peer = b, a
        a.untracked = a.chunk_dir in self._untracked
        b.untracked = b.chunk_dir in self._untracked
        flow.a, flow.b = a, b
        self._flows[flow.flow_id] = flow
        if key[4]:
            self._tunnels[key[4]] += 1
            self._tunnels_changed = True
        self._halves[(seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port, seg.tunnel)] = a
        self._halves[(seg.dst_ip, seg.dst_port, seg.src_ip, seg.src_port, seg.tunnel)] = b
        stats.flows_opened += 1
        return a

    def _evict(self, out: Output) -> None:
        """Make room: end the least recently active of the few oldest flows."""
        oldest: Flow | None = None
        for i, flow in enumerate(self._flows.values()):
            if oldest is None or flow.last_seen < oldest.last_seen:
                oldest = flow
            if i >= 7:
                break
        if oldest is not None:
            self._end(oldest, EndReason.EVICTED, out)

    def _end_finished(self, flow: Flow, out: Output) -> None:
        """The data path completed ``flow`` outside :meth:`_feed`'s own step."""
        self._end(flow, EndReason.FIN, out)

    def _end(self, flow: Flow, reason: EndReason, out: Output) -> None:
        trailing = self._path.release(flow, out)
        self.stats.gap_bytes += trailing
        self.stats.flows_closed[reason] = self.stats.flows_closed.get(reason, 0) + 1
        del self._flows[flow.flow_id]
        k = flow.key  # (ip, port, ip, port, tunnel): one direction's as it stands
        if k[4]:
            self._tunnels[k[4]] -= 1
            if not self._tunnels[k[4]]:
                del self._tunnels[k[4]]
            self._tunnels_changed = True
        self._halves.pop(k, None)
        self._halves.pop((k[2], k[3], k[0], k[1], k[4]), None)
        if reason is EndReason.FIN:
            self._tombstones[k] = self._path.now
        out.append(FlowEnd(flow.flow_id, reason, trailing))
