"""``struct mirror_event`` records (``bpf/mirror_event.h``) → Segments, in-order data coalesced.

This is the capture's per-record hot path, so it does the least it can per record: one
``unpack_from``, one dict lookup, one payload copy. A record whose payload continues the
previous payload record of its direction (same 4-tuple, sequence number right after it, no
SYN/FIN/RST, no loss, open window) is appended to that record's Segment instead of making
its own, so under load the reassembler, hooks and sinks see one Segment per direction per
drain instead of one per packet. The kernel delivers a direction's packets in order on one
CPU, so a run of such records is exactly what the reassembler would have joined anyway.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

from agent.capture.layout import EVENT, EVENT_SIZE
from agent.capture.perfbuf import consume_ring
from agent.model import FIN, RST, SYN, Segment

__all__ = ["EVENT", "EVENT_SIZE", "EventDecoder"]

_MASK = 0xFFFFFFFF
_BOUNDARY = SYN | FIN | RST



class _Run:
    """An open run: its Segment, the sequence number of its next byte, its payload pieces."""

    __slots__ = ("next", "parts", "seg")

    def __init__(self, seg: Segment, nxt: int) -> None:
        self.seg = seg
        self.next = nxt
        self.parts = [seg.payload]

    def close(self) -> None:
        if len(self.parts) > 1:
            self.seg.payload = b"".join(self.parts)


class EventDecoder:
    """Decodes records handed to :meth:`record`; :meth:`take` returns the Segments so far.

    ``clock`` converts kernel timestamps (CLOCK_MONOTONIC) to epoch seconds. With a
    ``segment_filter`` nothing is coalesced: the filter (a tcpdump expression) may look at a
    packet's length or flags, so it must see every packet as it was.

    Contract: ``record(raw, off, size)`` may be given a view into a ring that the caller
    reuses once the call returns; the payload is copied before it returns. Segments from
    :meth:`take` are in the order of their first record; a Segment's ``ts`` is its first
    record's and its ``ack``/``window`` are its last record's.
    """

    def __init__(self, clock: float, segment_filter: Callable[[Segment], bool] | None = None
                 ) -> None:
        self._clock = clock
        self._filter = segment_filter
        self._coalesce = segment_filter is None
        self._runs: dict[tuple[bytes, int, bytes, int], _Run] = {}
        self._out: list[Segment] = []
        self.events = 0
        self.coalesced = 0  # records appended to an earlier record's Segment
        self.filtered = 0
        self.lost_samples = 0  # perf: samples the kernel could not write (ring full)

    def consume_perf(self, ring: bytes | bytearray | memoryview | mmap.mmap, base: int,
                     size: int, tail: int, head: int) -> int:
        """A PerfReader ``consume`` function: decode a perf ring's records, return new tail."""
        return consume_ring(ring, base, size, tail, head, self.record, self._lost)

    def _lost(self, count: int) -> None:
        self.lost_samples += count

    def record(self, raw: bytes | memoryview, off: int, _size: int) -> None:
        """One mirror_event and its payload piece at ``raw[off:]``."""
        (ts, _ifi, _hook, fam, flags, elided, saddr, daddr, sport, dport, seq, ack, win, plen,
         poff, paylen, lost) = EVENT.unpack_from(raw, off)
        self.events += 1
        if fam == 4:
            saddr, daddr = saddr[:4], daddr[:4]
        if poff:  # a later piece of a big packet: its own position, no SYN
            seq = (seq + poff + (1 if flags & SYN else 0)) & _MASK
            flags &= ~SYN
        if poff + plen + lost < paylen and not elided:
            flags &= ~(FIN | RST)  # FIN/RST belong after the packet's last byte
        start = off + EVENT_SIZE
        payload = bytes(raw[start:start + plen])
        key = (saddr, sport, daddr, dport)
        runs = self._runs
        if plen and win and not lost and not flags & _BOUNDARY and self._coalesce:
            run = runs.get(key)
            if run is not None and run.next == seq:
                run.parts.append(payload)
                run.next = (seq + plen) & _MASK
                seg = run.seg
                seg.ack = ack
                seg.window = win
                self.coalesced += 1
                return
            if run is not None:
                run.close()
            seg = Segment(saddr, sport, daddr, dport, seq, ack, flags, payload,
                          ts / 1e9 + self._clock, win, lost)
            runs[key] = _Run(seg, (seq + plen) & _MASK)
            self._out.append(seg)
            return
        # A boundary (or a record that cannot join): later data of this connection, in
        # either direction, must come after it, so both directions' runs end here.
        if runs:
            for k in (key, (daddr, dport, saddr, sport)):
                run = runs.pop(k, None)
                if run is not None:
                    run.close()
        seg = Segment(saddr, sport, daddr, dport, seq, ack, flags, payload,
                      ts / 1e9 + self._clock, win, lost)
        if self._filter is not None and not self._filter(seg):
            self.filtered += 1
            return
        self._out.append(seg)

    def take(self) -> list[Segment]:
        """The Segments decoded since the last call (every open run is closed)."""
        for run in self._runs.values():
            run.close()
        self._runs.clear()
        out, self._out = self._out, []
        return out
