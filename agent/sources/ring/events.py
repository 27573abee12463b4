"""``struct mirror_event`` records (``bpf/mirror_event.h``) → Segments, in-order data coalesced.

The Python reference of the native ring path (``ring_decode.c``, :mod:`agent.sources.ring.native`)
and its fallback where no C compiler is at hand: the same ring walks (perf: records that wrap
the data area's end, LOST records; the BPF ring buffer: busy and discarded records) and the
same coalescing, kept equal by a differential test (tests/unit/test_native_ring.py).

A record whose payload continues the previous payload record of its direction (same 4-tuple
and tunnel, sequence number right after it, no SYN/FIN/RST, no loss, open window) is appended
to that record's Segment instead of making its own, so under load the reassembler, hooks and
sinks see one Segment per direction per drain instead of one per packet. The kernel delivers a
direction's packets in order on one CPU, so a run of such records is exactly what the
reassembler would have joined anyway.

Unlike the C walk, the ring positions here are read and written with plain loads and stores:
CPython's are program-ordered on x86-64 (TSO), the architecture this fallback runs on.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable

from agent.model import FIN, RST, SYN, Segment
from agent.sources.ebpf.layout import EVENT, EVENT_SIZE, EVENT_TUNNEL, tunnel_name

__all__ = ["EVENT", "EVENT_SIZE", "EventDecoder"]

_MASK = 0xFFFFFFFF
_BOUNDARY = SYN | FIN | RST
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_PERF_REC = struct.Struct("<IHH")  # perf_event_header: type, misc, size
_PERF_HEAD = 1024  # offsetof(struct perf_event_mmap_page, data_head)
_PERF_TAIL = 1032
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
RB_BUSY = 1 << 31
RB_DISCARD = 1 << 30
RB_HDR = 8
_TUNNEL = EVENT_TUNNEL.unpack_from


def _memory(addr: int, size: int) -> memoryview:
    """``size`` bytes at ``addr`` (a ring's mapping) as a byte view."""
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


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
        self._runs: dict[tuple[bytes, int, bytes, int, str], _Run] = {}
        self._out: list[Segment] = []
        self.events = 0
        self.coalesced = 0  # records appended to an earlier record's Segment
        self.filtered = 0
        self.lost_samples = 0  # perf: samples the kernel could not write (ring full)
        self.discarded = 0  # ring buffer: records the producer discarded
        self.malformed = 0  # records too short for what they claim (ring bytes skipped)
        self.no_slot = 0  # always 0: the open runs here are a dict, never full

    def drain_perf(self, ctrl: int, data: int, size: int) -> tuple[int, int]:
        """Decode the perf ring whose ``perf_event_mmap_page`` is at ``ctrl`` and whose
        ``size``-byte data area is at ``data``, release what was read; returns (bytes
        released, bytes waiting when read). As ``md_perf`` in ring_decode.c."""
        page = _memory(ctrl, _PERF_TAIL + 8)
        head = _U64.unpack_from(page, _PERF_HEAD)[0]
        tail = _U64.unpack_from(page, _PERF_TAIL)[0]
        if head != tail:
            new = self.walk_perf(_memory(data, size), size, tail, head)
            _U64.pack_into(page, _PERF_TAIL, new)
        else:
            new = tail
        return new - tail, head - tail

    def walk_perf(self, view: memoryview, size: int, tail: int, head: int) -> int:
        """Decode the perf records of the data area ``view`` (``size`` bytes, a power of
        two) from ``tail`` to ``head``, free-running positions; returns the new tail."""
        mask = size - 1
        rec = _PERF_REC.unpack_from
        if head - tail > size:  # cannot happen with a sane kernel: skip it all
            self.malformed += 1
            return head
        while tail != head:
            pos = tail & mask
            typ, _misc, length = rec(view, pos)  # 8-aligned: a header never wraps
            if length < 8 or length > head - tail:
                self.malformed += 1  # no size, no next record: skip to the head
                return head
            if pos + length > size:  # the record that wraps the end: make it contiguous
                data: bytes | memoryview = bytes(view[pos:size]) + bytes(
                    view[:pos + length - size])
                off = 0
            else:
                data, off = view, pos
            if typ == PERF_RECORD_SAMPLE:
                raw = _U32.unpack_from(data, off + 8)[0] if length >= 12 else 0
                if length < 12 or raw > length - 12 or raw < EVENT_SIZE:
                    self.malformed += 1
                else:
                    self.record(data, off + 12, raw)
            elif typ == PERF_RECORD_LOST and length >= 24:
                self.lost_samples += _U64.unpack_from(data, off + 16)[0]
            tail += length
        return tail

    def drain_ringbuf(self, cons: int, prod: int, data: int, size: int) -> tuple[int, int]:
        """Decode the BPF ring buffer whose consumer page is at ``cons``, producer page at
        ``prod`` and doubly mapped ``size``-byte data area at ``data``; as :meth:`drain_perf`
        (``md_ringbuf`` in ring_decode.c)."""
        cons_page = _memory(cons, 8)
        start = _U64.unpack_from(cons_page, 0)[0]
        end = _U64.unpack_from(_memory(prod, 8), 0)[0]
        pos = self.walk_ringbuf(_memory(data, 2 * size), size, start, end)
        _U64.pack_into(cons_page, 0, pos)
        return pos - start, end - start

    def walk_ringbuf(self, view: memoryview, size: int, pos: int, end: int) -> int:
        """Decode the ring buffer records of the doubly mapped data area ``view`` from
        ``pos`` to ``end``, stopping at one still being written; returns the new position."""
        mask = size - 1
        u32 = _U32.unpack_from
        while pos != end:
            off = pos & mask
            hdr = u32(view, off)[0]
            if hdr & RB_BUSY:
                break  # still being written; the records after it wait for it
            length = hdr & ~(RB_BUSY | RB_DISCARD)
            step = length + RB_HDR + 7 & ~7
            if step > end - pos:  # cannot happen with a sane kernel: skip it all
                self.malformed += 1
                return end
            if hdr & RB_DISCARD:
                self.discarded += 1
            elif length < EVENT_SIZE:
                self.malformed += 1
            else:
                self.record(view, off + RB_HDR, length)
            pos += step
        return pos

    def record(self, raw: bytes | memoryview, off: int, size: int) -> None:
        """One mirror_event and its payload piece at ``raw[off:off + size]``."""
        (ts, _ifi, _hook, fam, flags, elided, saddr, daddr, sport, dport, seq, ack, win, plen,
         poff, paylen, lost) = EVENT.unpack_from(raw, off)
        if EVENT_SIZE + plen > size:  # the piece would run past the record
            self.malformed += 1
            return
        tid, kind = _TUNNEL(raw, off + EVENT.size)
        tun = tunnel_name(kind, tid) if kind else ""
        self.events += 1
        if fam == 4:
            saddr, daddr = saddr[:4], daddr[:4]
        if poff + plen + lost < paylen and not elided:
            flags &= ~(FIN | RST)  # FIN/RST belong after the packet's last byte
        start = off + EVENT_SIZE
        payload = bytes(raw[start:start + plen])
        key = (saddr, sport, daddr, dport, tun)
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
                          ts / 1e9 + self._clock, win, lost, tun)
            runs[key] = _Run(seg, (seq + plen) & _MASK)
            self._out.append(seg)
            return
        # A boundary (or a record that cannot join): later data of this connection, in
        # either direction, must come after it, so both directions' runs end here.
        if runs:
            for k in (key, (daddr, dport, saddr, sport, tun)):
                run = runs.pop(k, None)
                if run is not None:
                    run.close()
        seg = Segment(saddr, sport, daddr, dport, seq, ack, flags, payload,
                      ts / 1e9 + self._clock, win, lost, tun)
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

    def close(self) -> None:
        """Nothing to free (the interface of NativeDecoder)."""
