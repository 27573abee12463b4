"""Heartbeats: how ``GET /healthz`` knows that a thread still makes progress.

A loop that must keep turning (the mirror loop, the ring-drain thread, the pcap reader)
owns one :class:`Heartbeat`: :meth:`~Heartbeat.start` when it begins (from its own thread, or
naming the thread), :meth:`~Heartbeat.beat` every turn, :meth:`~Heartbeat.stop` when it ends
on purpose. :meth:`~Heartbeat.problem` (any thread) says what is wrong, or None:

- not started, or stopped on purpose: None (nothing is expected of it);
- its thread is no longer alive while it should run: ``"<name>: thread is dead"``;
- its last beat is older than ``max_silence`` seconds: ``"<name>: no progress for 12.3 s
  (limit 10 s)"``.

No dependencies beyond the standard library, so any stage may own one. A beat is two
attribute writes: cheap enough for every batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["Heartbeat", "problems"]


class Heartbeat:
    """The progress of one loop (see the module doc). ``clock`` is monotonic seconds."""

    def __init__(self, name: str, max_silence: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_silence <= 0:
            raise ValueError(f"heartbeat {name}: max_silence must be > 0, not {max_silence}")
        self.name = name
        self.max_silence = max_silence
        self._clock = clock
        self._last = 0.0
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self, thread: threading.Thread | None = None) -> None:
        """The loop runs from now, on ``thread`` (default: the calling thread)."""
        self._thread = thread or threading.current_thread()
        self._last = self._clock()
        self._running = True

    def beat(self) -> None:
        """The loop made a turn."""
        self._last = self._clock()

    def stop(self) -> None:
        """The loop ended on purpose: nothing is expected of it any more."""
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def silence(self) -> float:
        """Seconds since the last beat (or the start)."""
        return max(0.0, self._clock() - self._last)

    def problem(self) -> str | None:
        """What is wrong with the loop, or None if nothing is (see the module doc)."""
        if not self._running:
            return None
        if self._thread is not None and not self._thread.is_alive():
            return f"{self.name}: thread is dead"
        quiet = self.silence()
        if quiet > self.max_silence:
            return f"{self.name}: no progress for {quiet:.1f} s (limit {self.max_silence:g} s)"
        return None


def problems(beats: Iterable[Heartbeat]) -> list[str]:
    """Every problem of ``beats``, in order (empty: all healthy)."""
    return [p for p in (b.problem() for b in beats) if p is not None]
