"""New connections the reassembler refuses to track (load shedding), each refused whole.

While :attr:`Refusals.reason` is set (the memory guard sets ``"memory"``, from its own
thread: one reference is replaced), a segment that would open a flow opens none: the
connection is refused, counted once (``flows_refused[reason]``) and remembered, and its
bytes are counted (``refused_bytes[reason]``), never delivered. A refused connection stays
refused after the reason is cleared, until it goes quiet for ``ttl`` seconds or a new SYN
(another initial sequence number) starts a new connection on its addresses, so no
connection is ever picked up in the middle because shedding ended.

The table holds at most ``cap`` connections (~200 B each); past that the oldest refused
entry is forgotten (its connection, if it goes on, is then picked up mid-stream like one
that began before the agent started).

Pure: no I/O, no clock (time comes from the segments); one thread (the reassembler's) calls
everything but the :attr:`reason` setter.
"""

from __future__ import annotations

from agent.model import ACK, SYN, FlowKey, Segment
from agent.reassembly.flow import ReassemblyStats

__all__ = ["Refusals"]


class Refusals:
    """The refused connections of one reassembler, keyed by its direction-free flow key."""

    def __init__(self, stats: ReassemblyStats, cap: int, ttl: float) -> None:
        self.reason: str | None = None
        self._stats = stats
        self._cap = max(1, cap)
        self._ttl = ttl
        self._table: dict[FlowKey, tuple[float, str, int]] = {}  # last seen, reason, SYN seq

    def __len__(self) -> int:
        return len(self._table)

    @property
    def active(self) -> bool:
        """True if :meth:`refuse` may refuse anything (cheap: the hot path asks first)."""
        return self.reason is not None or bool(self._table)

    def refuse(self, key: FlowKey, seg: Segment) -> bool:
        """``seg`` would open a flow for ``key``: True (counted) if it must not."""
        table = self._table
        seen = table.get(key)
        flags = seg.flags
        new_syn = flags & SYN and not flags & ACK and (seen is None or seen[2] != seg.seq)
        if seen is not None and not new_syn:
            why = seen[1]
            table[key] = (seg.ts, why, seen[2])
        else:
            reason = self.reason
            if reason is None:
                if seen is not None:
                    del table[key]  # a new connection on a refused one's addresses
                return False
            why = reason
            self._add(key, (seg.ts, why, seg.seq if flags & SYN else -1))
        n = len(seg.payload) + seg.lost
        if n:
            self._stats.refused_bytes[why] = self._stats.refused_bytes.get(why, 0) + n
        return True

    def _add(self, key: FlowKey, entry: tuple[float, str, int]) -> None:
        table = self._table
        table.pop(key, None)
        while len(table) >= self._cap:
            del table[next(iter(table))]  # the oldest refusal is forgotten
        table[key] = entry
        flows = self._stats.flows_refused
        flows[entry[1]] = flows.get(entry[1], 0) + 1

    def expire(self, now: float) -> None:
        """Forget connections quiet for ``ttl`` seconds (the reassembler's sweep)."""
        dead_before = now - self._ttl
        for key in [k for k, e in self._table.items() if e[0] <= dead_before]:
            del self._table[key]

    def clear(self) -> None:
        """Forget every refused connection (end of input)."""
        self._table.clear()
