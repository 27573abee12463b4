"""The ``ring-drain`` thread: empties the kernel's rings on a timer (or when the kernel wakes
it) and hands the decoded segments to the mirror thread, so the time the mirror spends on a
batch is not time the kernel has to hold the bytes.

Hand-off policy: *pause*. Drained payload waits in user space up to ``budget`` bytes; past
that the drain stops emptying the rings until the mirror takes what is waiting, and the
kernel's own drops (counted there, reported as gaps) take over. Pausing, not dropping, keeps
the loss where it is counted exactly and marked in the stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from agent.model import Segment

__all__ = ["Ring", "RingDrain"]


class Ring(Protocol):
    """What the drain needs of a ring reader (``PerfReader``, ``RingBufReader``)."""

    def wait(self, timeout: float) -> None: ...

    def consume(self) -> int: ...


class RingDrain:
    """Drains ``ring`` at least ``interval`` seconds apart; ``take()`` yields what the
    decoder made of it. Drain errors are raised by :meth:`take` on the mirror thread."""

    def __init__(self, ring: Ring, decoded: Callable[[], list[Segment]], interval: float,
                 budget: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ring = ring
        self._decoded = decoded
        self._interval = interval
        self._budget = budget
        self._clock = clock
        self._cv = threading.Condition()
        self._inbox: list[Segment] = []  # drained, not yet taken
        self._backlog = 0  # payload bytes in _inbox
        self._drained_at = 0.0  # clock() at the start of the latest drain handed over
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        #: Longest time between the starts of two drains, seconds: how long the kernel
        #: had to hold bytes at worst.
        self.gap_max = 0.0
        #: Times the drain paused because the mirror had not taken ``budget`` bytes yet.
        self.pauses = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ring-drain", daemon=True)
        self._thread.start()

    def take(self, timeout: float) -> tuple[list[Segment], float]:
        """What was drained since the last call (waiting up to ``timeout`` for something),
        and when the latest drain started; unpauses the drain."""
        with self._cv:
            if not self._inbox and self._error is None:
                self._cv.wait(timeout)
            if self._error is not None:
                raise self._error
            segs, self._inbox, self._backlog = self._inbox, [], 0
            self._cv.notify_all()
            return segs, self._drained_at

    def stop(self) -> list[Segment]:
        """Stop and join the thread; returns what it drained and nobody took yet."""
        if self._thread is not None:
            with self._cv:
                self._stop = True
                self._cv.notify_all()
            self._thread.join()
            self._thread = None
        with self._cv:
            segs, self._inbox, self._backlog = self._inbox, [], 0
        return segs

    def _run(self) -> None:
        last = self._clock()
        try:
            while not self._stop:
                wait = last + self._interval - self._clock()
                if wait > 0:
                    self._ring.wait(wait)
                if not self._wait_for_room():
                    break
                started = self._clock()
                self.gap_max = max(self.gap_max, started - last)
                last = started
                self._ring.consume()
                segs = self._decoded()
                size = sum(len(seg.payload) for seg in segs)
                with self._cv:
                    self._inbox += segs
                    self._backlog += size
                    self._drained_at = started
                    self._cv.notify_all()
        except BaseException as e:  # handed to the mirror thread by take()
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _wait_for_room(self) -> bool:
        """Pause while the backlog is over budget; False once stopped."""
        with self._cv:
            if self._backlog > self._budget:
                self.pauses += 1
            while self._backlog > self._budget and not self._stop:
                self._cv.wait(self._interval)
            return not self._stop
