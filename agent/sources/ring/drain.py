"""The ``ring-drain`` thread of the Python decoder: empties the kernel's rings on a timer (or
when the kernel wakes it) and hands the decoded segments to the mirror thread, so the time the
mirror spends on a batch is not time the kernel has to hold the bytes. (With the native decoder
the thread is C, ``pump.py``: same loop, same counters, but it never waits for the GIL.)

Hand-off policy: *pause* (an :class:`agent.mirror.handoff.Handoff`, :attr:`Policy.PAUSE`). Drained
payload waits in user space up to ``budget`` bytes; past that the drain stops emptying the
rings until the mirror takes what is waiting, and the kernel's own drops (counted there,
reported as gaps) take over. Pausing, not dropping, keeps the loss where it is counted exactly
and marked in the stream.

Health: the thread owns a :class:`~agent.mirror.heartbeat.Heartbeat` (``ring-drain``), started with
the thread, beaten every turn (at least every ``interval``, paused or not) and stopped by
:meth:`RingDrain.stop`; a thread that died of an error shows as ``ring-drain: thread is
dead`` on ``/healthz``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from agent.mirror.handoff import Handoff, HandoffStats, Policy
from agent.mirror.heartbeat import Heartbeat
from agent.model import Segment

__all__ = ["DRAIN_SILENCE", "Ring", "RingDrain"]

#: Seconds the drain may go without a turn before ``/healthz`` fails: it turns at least
#: every ``interval`` (~20 ms), so this is a stuck thread, never a quiet one.
DRAIN_SILENCE = 10.0


class Ring(Protocol):
    """What the drain needs of a ring reader (``PerfReader``, ``RingBufReader``)."""

    def wait(self, timeout: float) -> None: ...

    def consume(self) -> int: ...


class RingDrain:
    """Drains ``ring`` at least ``interval`` seconds apart; ``take()`` yields what the
    decoder made of it. Drain errors are raised by :meth:`take` on the mirror thread.

    Threads: the ``ring-drain`` thread is the hand-off's producer and writes
    :attr:`gap_max`; the mirror thread (:meth:`take`, :meth:`stop`) is its consumer.
    :attr:`heartbeat` is read from any thread (see the module doc).
    """

    def __init__(self, ring: Ring, decoded: Callable[[], list[Segment]], interval: float,
                 budget: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ring = ring
        self._decoded = decoded
        self._interval = interval
        self._clock = clock
        self.budget = budget
        # One item per drain: its segments and clock() at its start; sized by payload bytes.
        # The live source passes the memory budget's drain_backlog (agent/mirror/budget.py: 128 MiB
        # for a 1 GiB cgroup): at 4 Gbit/s (~500 MB/s) the mirror may lag ~0.25 s before the
        # drain pauses; at most one drain (a ring's worth, up to
        # --buffer-mib per CPU) more is held past it. Decoded Segments cost more than their
        # payload (~100 B of object each): the budget's slack covers them.
        self._handoff: Handoff[tuple[list[Segment], float]] = Handoff(
            "ring_drain", budget, Policy.PAUSE)
        self._drained_at = 0.0  # mirror thread: start of the latest drain taken
        self._stop = False
        self._thread: threading.Thread | None = None
        self.heartbeat = Heartbeat("ring-drain", DRAIN_SILENCE, clock)
        #: Longest time between the starts of two drains, seconds: how long the kernel
        #: had to hold bytes at worst.
        self.gap_max = 0.0

    @property
    def peak_bytes(self) -> int:
        """0: the ring reader measures its own peak (``PerfReader.peak_bytes``)."""
        return 0

    @property
    def pauses(self) -> int:
        """Times the drain paused because the mirror had not taken ``budget`` bytes yet."""
        return self._handoff.stats().pauses

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.mirror.handoff.HasHandoffs`: this stage's hand-off."""
        return [self.handoff_stats()]

    def handoff_stats(self) -> HandoffStats:
        """The hand-off's counters (see :mod:`agent.mirror.handoff`)."""
        return self._handoff.stats()

    def start(self) -> None:
        """Start the thread (and its heartbeat)."""
        self._thread = threading.Thread(target=self._run, name="ring-drain", daemon=True)
        self._thread.start()
        self.heartbeat.start(self._thread)

    def take(self, timeout: float) -> tuple[list[Segment], float]:
        """What was drained since the last call (waiting up to ``timeout`` for something),
        and when the latest drain started; unpauses the drain."""
        return self._joined(self._handoff.take_all(timeout))

    def stop(self) -> list[Segment]:
        """Stop and join the thread; returns what it drained and nobody took yet."""
        self.heartbeat.stop()
        if self._thread is not None:
            self._stop = True
            self._thread.join()
            self._thread = None
        self._handoff.close()
        return self._joined(self._handoff.leftovers())[0]

    def _joined(self, drains: list[tuple[list[Segment], float]]) -> tuple[list[Segment], float]:
        if not drains:
            return [], self._drained_at
        self._drained_at = drains[-1][1]
        if len(drains) == 1:
            return drains[0][0], self._drained_at
        return [seg for segs, _ in drains for seg in segs], self._drained_at

    def _run(self) -> None:
        last = self._clock()
        beat = self.heartbeat.beat
        try:
            while not self._stop:
                beat()
                wait = last + self._interval - self._clock()
                if wait > 0:
                    self._ring.wait(wait)
                # Pause while over budget (looking at _stop every interval); the kernel
                # keeps the bytes meanwhile, and counts what it cannot keep.
                while not self._handoff.wait_for_room(self._interval):
                    beat()
                    if self._stop or self._handoff.closed:
                        return
                started = self._clock()
                self.gap_max = max(self.gap_max, started - last)
                last = started
                self._ring.consume()
                segs = self._decoded()
                self._handoff.put((segs, started), sum(len(seg.payload) for seg in segs))
        except BaseException as e:  # handed to the mirror thread by take()
            self._handoff.fail(e)
