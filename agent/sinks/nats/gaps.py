"""Keeping a recording honest when records are dropped: the bytes of a dropped chunk (and the
gap before it) are owed to the flow's next record, which carries them in its ``gap_bytes``
(a flow end in its trailing gap), exactly as :class:`agent.sinks.record.BackgroundWriter`
does. One ledger per thread that drops records."""

from __future__ import annotations

from dataclasses import replace

from agent.model import FlowEnd, TrafficChunk

__all__ = ["GapLedger"]


class GapLedger:
    """Bytes dropped per (flow, sender) and not yet accounted for in a later record."""

    __slots__ = ("_owed",)

    def __init__(self) -> None:
        self._owed: dict[tuple[int, str], int] = {}

    def __len__(self) -> int:
        return len(self._owed)

    def charge(self, chunk: TrafficChunk) -> TrafficChunk:
        """``chunk`` with what its flow owes added to its gap (the debt is cleared)."""
        if not self._owed:
            return chunk
        owed = self._owed.pop((chunk.flow_id, chunk.from_addr), 0)
        return replace(chunk, gap_bytes=chunk.gap_bytes + owed) if owed else chunk

    def owe(self, chunk: TrafficChunk, lost: int) -> None:
        """``chunk`` (already charged) was dropped with ``lost`` of its bytes: its gap and
        those bytes are owed to the next record of its flow and sender."""
        self._owed[(chunk.flow_id, chunk.from_addr)] = chunk.gap_bytes + lost

    def settle_end(self, end: FlowEnd) -> FlowEnd:
        """``end`` with everything its flow owes added to its trailing gap (cleared)."""
        if not self._owed:
            return end
        owed = {k: v for k, v in self._owed.items() if k[0] == end.flow_id}
        if not owed:
            return end
        for k in owed:
            del self._owed[k]
        return replace(end, trailing_gap=end.trailing_gap + sum(owed.values()))
