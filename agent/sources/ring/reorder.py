"""Kernel-timestamp order across per-CPU rings, as a pure step (no I/O, no clock).

Each CPU has its own ring, so one drain can return a connection's later packets (from one
CPU) before its earlier ones (from another): without merging, the reassembler would trim a
connection's first request as a "retransmission" (found by the first live test). Every drain
is merged by timestamp, and segments newer than the caller's cutoff (the drain's start minus
a hold-back window) wait for the next drain, in case another CPU was still writing older
ones.
"""

from __future__ import annotations

import bisect
from operator import attrgetter

from agent.model import Segment

__all__ = ["Reorderer"]

_ts = attrgetter("ts")


class Reorderer:
    """Holds segments until :meth:`release` hands out, in timestamp order, those at or
    before a cutoff. Stable: segments with equal timestamps keep their arrival order."""

    def __init__(self) -> None:
        self._held: list[Segment] = []

    def add(self, segments: list[Segment]) -> None:
        self._held += segments

    def release(self, cutoff: float) -> list[Segment]:
        """Every held segment with ``ts <= cutoff``, oldest first."""
        held = self._held
        held.sort(key=_ts)
        i = bisect.bisect_right(held, cutoff, key=_ts)
        self._held = held[i:]
        return held[:i]

    def release_all(self) -> list[Segment]:
        return self.release(float("inf"))

    def __len__(self) -> int:
        return len(self._held)
