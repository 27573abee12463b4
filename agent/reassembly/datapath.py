"""The data path of every flow: what happens to a segment's bytes once the flow table
(:class:`~agent.reassembly.table.Reassembler`) has found its :class:`~agent.reassembly.flow.Half`.

:class:`DataPath` moves the bytes through the half's
:class:`~agent.reassembly.stream.StreamBuffer` into :class:`~agent.model.TrafficChunk`
objects, keeps the memory limits and the hole clocks, and says when a direction is complete.
It never ends a flow itself: when a hole it gives up on outside the table's own call (by time,
or by another flow's memory limit) completes a flow, it hands the flow to the table's
``finished`` callback, which ends it.

Merged output: inside :meth:`DataPath.merging`, a chunk that follows its flow's latest chunk
in the same direction with no gap is appended to it instead of coming out on its own (the
bytes are joined when the block ends), so a batch of small in-order segments makes one chunk
per run, with no second pass over the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from agent.model import FIN, SYN, DirectionEnd, TrafficChunk
from agent.reassembly.flow import Flow, Half, OpenChunk, Output, ReassemblyStats
from agent.reassembly.stream import Ready

if TYPE_CHECKING:
    from agent.reassembly.table import ReassemblyConfig

__all__ = ["DataPath"]

_MASK = 0xFFFFFFFF
_HALF = 0x80000000


class DataPath:
    """The data path of every flow (see the module docstring). ``finished(flow, out)`` ends a
    flow whose both directions it completed outside a call of the table's; ``now`` is the
    table's clock (the latest segment time, or the time it was advanced to)."""

    __slots__ = ("_merged", "_ready", "buffering", "config", "finished", "next_hole_check",
                 "now", "stats", "total_pending")

    def __init__(self, config: ReassemblyConfig, stats: ReassemblyStats,
                 finished: Callable[[Flow, Output], None]) -> None:
        self.config = config
        self.stats = stats
        self.finished = finished
        #: Halves with a hole (StreamBuffer.waiting), in the order they began to wait: a set
        #: that iterates the same way every run, so ties (the biggest hole) break the same way.
        self.buffering: dict[Half, None] = {}
        #: Out-of-order bytes held across all flows (and SYN data awaiting its answer).
        self.total_pending = 0
        self.next_hole_check = 0.0
        self.now = 0.0
        self._ready: Ready = []
        self._merged: list[OpenChunk] | None = None  # inside merging(): every chunk made

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

    def track(self, half: Half, flags: int, seq: int, payload: bytes, lost: int, ts: float,
               out: Output) -> None:
        """The data path of a segment of a tracked half (not RST)."""
        if ((half.nxt is None or flags & SYN)
                and not self._start(half, flags, seq, payload, lost, ts, out)):
            return
        pos = half.unwrap(seq)
        if payload or lost:
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
                self.total_pending += len(payload)  # held: in buffered_bytes until settled
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

    def syn_answered(self, half: Half, ack: int, ts: float, out: Output) -> None:
        """The receiver's SYN-ACK acknowledged ``ack``: settle ``half``'s held SYN data, unless
        ``ack`` is not one its sender accepts (then the sender's next segment settles it)."""
        assert half.syn_data is not None and half.isn is not None
        payload, lost, fin = half.syn_data
        taken = (ack - half.isn - 1) & _MASK
        if taken <= len(payload) + lost + fin:
            self._syn_settle(half, taken, ts, out)
            self.direction_done(half, out)

    def _syn_settle(self, half: Half, taken: int, ts: float, out: Output) -> None:
        """Start ``half`` after its SYN; deliver the first ``taken`` sequence numbers of the
        SYN's data (and its FIN, if taken too): what the receiving stack delivered. The rest
        is counted as refused: a refused sender sends it again after the handshake."""
        assert half.syn_data is not None and half.isn is not None
        payload, lost, fin = half.syn_data
        half.syn_data = None
        self.total_pending -= len(payload)
        start = half.nxt = half.isn + 1
        size = len(payload) + lost
        took = min(taken, size)
        self.stats.syn_data_bytes += min(took, len(payload))
        self.stats.syn_data_refused_bytes += max(0, len(payload) - took)
        fin_taken = fin and taken > size
        if took or fin_taken:
            self.track(half, FIN if fin_taken else 0, start, payload[:took],
                        max(0, took - len(payload)), ts, out)

    def _fin(self, half: Half, pos: int) -> None:
        """``half``'s FIN is at ``pos``; the bytes before it, if missing, are a hole."""
        held = half.held
        half.set_fin(pos)
        self.total_pending += half.held - held
        self._wait(half, False)

    def _add(self, half: Half, pos: int, payload: bytes, lost: int, ts: float,
             out: Output) -> None:
        """Hand data to ``half``'s buffer; emit what it releases; apply the memory limits."""
        nxt, held = half.nxt, half.held
        ready = self._ready
        half.add(pos, payload, lost, ready)
        self.total_pending += half.held - held
        if ready:
            self._deliver(half, ready, ts, out)
        self._wait(half, half.nxt != nxt)
        cfg = self.config
        while half.pending and half.held > cfg.max_flow_buffer:
            self.stats.limit_skips += 1
            self._skip(half, ts, out)
        while self.buffering and self.total_pending > cfg.max_total_buffer:
            self.stats.limit_skips += 1
            biggest = max(self.buffering, key=lambda h: h.held)
            self._skip(biggest, ts, out)
            if biggest.flow is not half.flow:  # the table ends this one once it is done
                self._close_if_finished(biggest.flow, out)

    def _wait(self, half: Half, moved: bool) -> None:
        """Keep :attr:`_buffering` and the hole clock: a hole starts when a half begins to
        wait, and again whenever its next byte moved."""
        if half.waiting:
            if moved or half not in self.buffering:
                half.since = self.now
                self.buffering[half] = None
        else:
            self.buffering.pop(half, None)

    def _skip(self, half: Half, ts: float, out: Output) -> None:
        """Give up on ``half``'s first hole (a gap); that may complete the direction."""
        nxt, held = half.nxt, half.held
        ready = self._ready
        half.skip_hole(ready)
        self.total_pending += half.held - held
        if ready:
            self._deliver(half, ready, ts, out)
        self._wait(half, half.nxt != nxt)
        self.direction_done(half, out)

    def expire_holes(self, now: float, out: Output) -> None:
        timeout = self.config.hole_timeout
        self.next_hole_check = now + timeout / 4
        for half in [h for h in self.buffering if now - h.since >= timeout]:
            if half in self.buffering:  # not ended with its flow earlier in this loop
                self.stats.hole_timeouts += 1
                self._skip(half, now, out)
                self._close_if_finished(half.flow, out)

    def _deliver(self, half: Half, ready: Ready, ts: float, out: Output) -> None:
        for gap, data in ready:
            self.emit(half, data, gap, ts, out)
        ready.clear()

    def emit(self, half: Half, data: bytes, gap: int, ts: float, out: Output) -> None:
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

    def direction_done(self, half: Half, out: Output) -> bool:
        """Has ``half`` reached its FIN in sequence? (Announced once with DirectionEnd.)"""
        if not half.complete:
            return False
        if not half.done:
            self.direction_end(half, out)
        return True

    def _close_if_finished(self, flow: Flow, out: Output) -> None:
        """Hand ``flow`` to ``finished`` once both directions are complete (a hole skipped
        outside the table's call, by time or by another flow's limit, may complete the
        second one)."""
        if self.direction_done(flow.a, out) and self.direction_done(flow.b, out):
            self.finished(flow, out)

    @staticmethod
    def direction_end(half: Half, out: Output) -> None:
        half.done = True
        flow = half.flow
        flow.open = None  # nothing merges across it
        out.append(DirectionEnd(flow.flow_id, half.chunk_dir, half.from_addr))

    def release(self, flow: Flow, out: Output) -> int:
        """Deliver what ``flow`` holds past its holes (its end is near); the bytes then
        known missing at its end (both halves)."""
        trailing = 0
        ready = self._ready
        for half in (flow.a, flow.b):
            if half.syn_data is not None:  # never answered: the receiver took none of it
                size = len(half.syn_data[0])
                self.stats.syn_data_refused_bytes += size
                self.total_pending -= size
                half.syn_data = None
            if half.pending:
                held = half.held
                half.release_all(ready)
                self.total_pending += half.held - held
                self._deliver(half, ready, self.now, out)
                self.direction_done(half, out)  # releasing the last hole may complete it
            half.probe = None  # never confirmed: not data
            self.buffering.pop(half, None)
            trailing += half.trailing()  # with no chunk left to carry it
        flow.open = None
        return trailing
