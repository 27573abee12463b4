"""IP defragmentation (IPv4 and IPv6), bounded in memory and time.

Policy
------
- A datagram is keyed by its IP version, addresses, identification, (IPv4) protocol and the
  tunnel identity it came through, so tenants never mix.
- Overlaps: the first copy of a byte wins. Bytes seen again count as ``overlap_bytes``;
  those that differ from the first copy as ``conflict_bytes`` (should be 0). A last
  fragment that disagrees with the length already known, and bytes past that length, are
  conflicts too.
- A datagram completes when the last fragment fixed its length and every byte up to it
  was declared by some fragment. A fragment cut by the capture's snap length still declares
  its bytes: they are lost, not awaited.
- Memory: the bytes held, plus :data:`PIECE_COST` per fragment held and
  :data:`DATAGRAM_COST` per datagram, stay under ``max_bytes``; past it the oldest datagram
  is given up (``memory``).
- Time: a datagram whose first fragment arrived ``timeout`` seconds ago is given up
  (``timeout``); so is every one left at the end of input (``end_of_input``).
- A datagram given up is never a silent hole: if its first fragment is there, the bytes up
  to the first hole are decoded as if the capture had cut the datagram there, and the rest
  (up to the length known, or the furthest byte seen) is reported as lost on that segment,
  a gap on its flow. Bytes after the first hole count as ``discarded_bytes{after_hole}``
  (they are inside that gap). Without the first fragment no flow can be named: its bytes
  count as ``discarded_bytes{no_first_fragment}``.

Pure: no clock of its own; time comes from the fragments and :meth:`Defragmenter.expire`.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["DATAGRAM_COST", "DEFRAG_BYTES", "DEFRAG_TIMEOUT", "PIECE_COST", "Datagram",
           "DefragStats", "Defragmenter", "FragmentKey"]

#: The default memory bound: Linux's own (``net.ipv4.ipfrag_high_thresh``, 4 MiB).
DEFRAG_BYTES = 4 << 20
#: Seconds a datagram may wait for its fragments: Linux's ``ipfrag_time`` (RFC 791 suggests
#: 15 s, RFC 8200 60 s). The reassembler skips a hole after its own ``hole_timeout``; a
#: datagram completed later arrives as a retransmission of bytes already given up on.
DEFRAG_TIMEOUT = 30.0
#: What a held fragment and a pending datagram cost besides their bytes (Python objects:
#: a tuple and a bytes object per fragment; the entry, its list and key per datagram).
PIECE_COST = 128
DATAGRAM_COST = 512
#: The largest IP payload a datagram may have (a 16-bit length, 13-bit offset in 8s).
MAX_DATAGRAM = 65535

#: (tunnel identity, IP version, source, destination, identification, IPv4 protocol or -1)
FragmentKey = tuple[str, int, bytes, bytes, int, int]


@dataclass(slots=True)
class DefragStats:
    """Counters of the defragmenter (plain ints; see the module doc for the policy)."""

    fragments: int = 0
    reassembled: int = 0
    overlap_bytes: int = 0
    conflict_bytes: int = 0
    held_bytes: int = 0
    incomplete: Counter[str] = field(default_factory=Counter)
    discarded_bytes: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        """The stats keys (``defrag_*``); empty until a fragment was seen."""
        if not self.fragments:
            return {}
        out = {"defrag_fragments": self.fragments, "defrag_reassembled": self.reassembled,
               "defrag_overlap_bytes": self.overlap_bytes,
               "defrag_conflict_bytes": self.conflict_bytes,
               "defrag_held_bytes": self.held_bytes}
        out.update({f"defrag_incomplete_{k}": v for k, v in self.incomplete.items()})
        out.update({f"defrag_discarded_bytes_{k}": v for k, v in self.discarded_bytes.items()})
        return out


@dataclass(slots=True)
class Datagram:
    """A datagram out of the defragmenter: ``data``, its payload from byte 0 up to the
    first byte not held (all of it when ``complete``); ``length``, its length (known from
    the last fragment, else the furthest byte any fragment declared): ``length - len(data)``
    bytes are lost. ``proto`` is the upper layer's protocol (from the first fragment);
    ``depth``/``encaps`` are where the fragments were found."""

    key: FragmentKey
    proto: int
    data: bytes
    length: int
    complete: bool
    ts: float
    depth: int
    encaps: tuple[str, ...]


class _Pending:
    """A datagram being reassembled: its fragments as ``(start, declared end, bytes)``,
    sorted, their declared ranges disjoint (the bytes may be shorter: a snap-length cut)."""

    __slots__ = ("covered", "depth", "encaps", "first_ts", "last_ts", "pieces", "proto",
                 "total")

    def __init__(self, ts: float, depth: int, encaps: tuple[str, ...]) -> None:
        self.pieces: list[tuple[int, int, bytes]] = []
        self.covered = 0
        self.total: int | None = None
        self.proto = -1
        self.first_ts = self.last_ts = ts
        self.depth = depth
        self.encaps = encaps


class Defragmenter:
    """Reassembles IP datagrams from their fragments (see the module doc for the policy).

    :meth:`add` returns a datagram its fragment completed; datagrams given up (memory,
    timeout, end of input) with their first fragment are appended to :attr:`given_up` for
    the caller to decode and clear. :attr:`deadline` is when :meth:`expire` next has work.
    """

    def __init__(self, max_bytes: int = DEFRAG_BYTES, timeout: float = DEFRAG_TIMEOUT,
                 stats: DefragStats | None = None) -> None:
        if max_bytes < MAX_DATAGRAM + DATAGRAM_COST + PIECE_COST:
            raise ValueError(f"defragmentation needs at least {MAX_DATAGRAM + 640} bytes")
        if timeout <= 0:
            raise ValueError("the defragmentation timeout must be > 0")
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.stats = stats if stats is not None else DefragStats()
        self.given_up: list[Datagram] = []
        self.deadline = math.inf
        self._pending: dict[FragmentKey, _Pending] = {}

    @property
    def pending(self) -> int:
        """Datagrams waiting for fragments."""
        return len(self._pending)

    def add(self, key: FragmentKey, offset: int, size: int, data: bytes, more: bool,
            proto: int, ts: float, depth: int = 0,
            encaps: tuple[str, ...] = ()) -> Datagram | str | None:
        """One fragment: ``size`` payload bytes declared at ``offset`` of which ``data``
        were captured, ``more`` fragments after it, carrying ``proto``. Returns the datagram
        it completes, None while it is held, or ``bad_fragment`` (not held) when it would
        end past the largest datagram."""
        end = offset + size
        if end > MAX_DATAGRAM:
            return "bad_fragment"
        st = self.stats
        st.fragments += 1
        self._make_room(DATAGRAM_COST + PIECE_COST + len(data))
        p = self._pending.get(key)
        if p is None:
            p = self._pending[key] = _Pending(ts, depth, encaps)
            st.held_bytes += DATAGRAM_COST
            if len(self._pending) == 1:
                self.deadline = ts + self.timeout
        p.last_ts = ts
        if p.proto < 0 or offset == 0:
            p.proto = proto
        end = self._limit(p, offset, end, more)
        self._insert(p, offset, end, data[: end - offset])
        if p.total is None or p.covered != p.total:
            return None
        st.reassembled += 1
        return self._remove(key, complete=True)

    def expire(self, now: float) -> None:
        """Give up every datagram whose first fragment came ``timeout`` seconds before
        ``now``."""
        while self._pending and self.deadline <= now:
            self.give_up(next(iter(self._pending)), "timeout")

    def finish(self) -> None:
        """End of input: give up every datagram still waiting."""
        for key in list(self._pending):
            self.give_up(key, "end_of_input")

    def give_up(self, key: FragmentKey, reason: str) -> None:
        """Stop waiting for ``key``'s missing fragments; count why (see the module doc)."""
        self.stats.incomplete[reason] += 1
        dg = self._remove(key, complete=False)
        if dg is not None:
            self.given_up.append(dg)

    def _make_room(self, cost: int) -> None:
        st = self.stats
        while self._pending and st.held_bytes + cost > self.max_bytes:
            self.give_up(next(iter(self._pending)), "memory")

    def _limit(self, p: _Pending, offset: int, end: int, more: bool) -> int:
        """Where a fragment's bytes end once the datagram's length is settled: the first
        claim of a length wins unless bytes past it are held already."""
        st = self.stats
        if not more:
            held_end = p.pieces[-1][1] if p.pieces else 0
            if p.total is None and held_end <= end:
                p.total = end
            elif p.total is None:  # bytes past the length it claims are held already
                st.conflict_bytes += held_end - end
            elif end < p.total:  # a longer claim is cut below, and counted there
                st.conflict_bytes += p.total - end
        if p.total is not None and end > p.total:
            st.conflict_bytes += end - max(offset, p.total)
            end = max(offset, p.total)
        return end

    def _insert(self, p: _Pending, start: int, end: int, data: bytes) -> None:
        """Hold what the fragment ``[start, end)`` adds; overlapped bytes: the first copy
        wins."""
        pieces = p.pieces
        i = bisect.bisect_left(pieces, (start,))
        if i and pieces[i - 1][1] > start:
            i -= 1
        new: list[tuple[int, int, bytes]] = []
        cur = start
        while i < len(pieces) and pieces[i][0] < end:
            s, e, d = pieces[i]
            if s > cur:
                new.append((cur, s, data[cur - start : s - start]))
            lo, hi = max(s, cur), min(e, end)
            if hi > lo:
                self._overlap(d[lo - s : hi - s], data[lo - start : hi - start], hi - lo)
            cur = max(cur, e)
            i += 1
        if cur < end:
            new.append((cur, end, data[cur - start :]))
        for piece in new:
            bisect.insort(pieces, piece)
            p.covered += piece[1] - piece[0]
            self.stats.held_bytes += PIECE_COST + len(piece[2])

    def _overlap(self, first: bytes, again: bytes, size: int) -> None:
        st = self.stats
        st.overlap_bytes += size
        if first != again:
            st.conflict_bytes += sum(a != b for a, b in zip(first, again, strict=False))

    def _remove(self, key: FragmentKey, complete: bool) -> Datagram | None:
        """Take ``key`` out (its memory released); its datagram, or None without its first
        fragment (those bytes counted as discarded)."""
        p = self._pending.pop(key)
        st = self.stats
        held = sum(len(d) for _s, _e, d in p.pieces)
        st.held_bytes -= DATAGRAM_COST + PIECE_COST * len(p.pieces) + held
        self.deadline = (next(iter(self._pending.values())).first_ts + self.timeout
                         if self._pending else math.inf)
        parts: list[bytes] = []
        pos = 0
        for s, e, d in p.pieces:
            if s != pos:
                break
            parts.append(d)
            pos = s + len(d)
            if pos < e:  # cut by the snap length
                break
        if not parts:
            st.discarded_bytes["no_first_fragment"] += held
            return None
        data = b"".join(parts)
        if held > len(data):
            st.discarded_bytes["after_hole"] += held - len(data)
        length = p.total if p.total is not None else p.pieces[-1][1]
        return Datagram(key, p.proto, data, length, complete and len(data) == length,
                        p.last_ts, p.depth, p.encaps)
