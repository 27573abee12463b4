"""Scheduling a replay: when each recorded connection starts, how many run at once, how
long it all goes on.

- Time: a recorded time *t* is due at ``start + offset(t)``, the offset being the recorded
  time since the first record, each idle gap cut to ``max_wait`` (if set), divided by
  ``speed`` (``inf``: ``--speed max``, everything due at once). Connections start when due;
  within one, bursts are paced the same way (:mod:`agent.replay.driver`).
- Concurrency: at most ``connections`` recorded connections replay at once; a connection
  that is due waits for a free slot (later ones wait behind it, in recorded order).
- ``loop``: start over once every connection of a pass has started; ``duration``: stop
  after that many seconds. Stopping (the duration, or :meth:`Replayer.stop` from a signal)
  closes the connections still running at once; they count as ``stopped``, not failed.
- With a baseline each recorded connection replays to the target and the baseline at once,
  and their responses go to the :class:`~agent.replay.diff.Differ` when both ended.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.replay.conns import Connection
from agent.replay.diff import Differ
from agent.replay.driver import ConnDriver, replay_connection
from agent.replay.report import Tally, progress_line

__all__ = ["Plan", "Replayer", "Timeline"]


@dataclass(frozen=True, slots=True)
class Plan:
    """How to replay (the ``replay`` command's options that the run needs)."""

    target: str
    baseline: str | None = None
    connections: int = 64
    speed: float = 1.0
    max_wait: float | None = None
    loop: bool = False
    duration: float | None = None
    timeout: float = 10.0
    pipeline: bool = False
    source_ports: tuple[int, int] | None = None


class Timeline:
    """Recorded time → seconds after the start of a pass (see the module docstring)."""

    def __init__(self, conns: Sequence[Connection], speed: float,
                 max_wait: float | None) -> None:
        self._offsets: dict[float, float] = {}
        self.length = 0.0
        if math.isinf(speed):
            return
        times = sorted({b.at for c in conns for b in c.bursts})
        acc, prev = 0.0, times[0] if times else 0.0
        for t in times:
            gap = max(0.0, t - prev)
            acc += gap if max_wait is None else min(gap, max_wait)
            self._offsets[t] = acc / speed
            prev = t
        self.length = acc / speed

    def offset(self, t: float) -> float:
        return self._offsets.get(t, 0.0)


class Replayer:
    """Replays ``conns`` by ``plan``; counts into ``tally`` (and ``base_tally`` for the
    baseline); compares responses in ``differ`` if given."""

    def __init__(self, conns: Sequence[Connection], plan: Plan, tally: Tally,
                 base_tally: Tally | None = None, differ: Differ | None = None) -> None:
        self.conns = conns
        self.plan = plan
        self.tally = tally
        self.base_tally = base_tally
        self.differ = differ
        self.timeline = Timeline(conns, plan.speed, plan.max_wait)
        self.total_requests = sum(len(c.requests) for c in conns)
        self.interrupted = False
        self.elapsed = 0.0
        self._stop: asyncio.Event | None = None
        self._started = 0.0

    def stop(self, interrupted: bool = True) -> None:
        """Stop now (from a signal handler: ``interrupted``)."""
        self.interrupted = self.interrupted or interrupted
        if self._stop is not None:
            self._stop.set()

    async def run(self, progress: Callable[[str], None] | None = None,
                  interval: float = 0.5) -> None:
        """Replay until done, ``plan.duration`` is up, or :meth:`stop`; ``progress`` gets a
        line every ``interval`` seconds."""
        loop = asyncio.get_running_loop()
        self._stop = stop = asyncio.Event()
        self._started = loop.time()
        timer = None
        if self.plan.duration is not None:
            timer = loop.call_later(self.plan.duration, self.stop, False)
        ticker = asyncio.create_task(self._progress(progress, interval)) if progress else None
        tasks: set[asyncio.Task[None]] = set()
        try:
            await self._schedule(tasks, stop)
            while tasks and not stop.is_set():
                waiter = asyncio.create_task(stop.wait())
                await asyncio.wait({*tasks, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            for task in (*tasks, *([ticker] if ticker else [])):
                task.cancel()
            await asyncio.gather(*tasks, *([ticker] if ticker else []),
                                 return_exceptions=True)
            if timer is not None:
                timer.cancel()
            self.elapsed = loop.time() - self._started

    async def _schedule(self, tasks: set[asyncio.Task[None]], stop: asyncio.Event) -> None:
        """Start every connection when due and a slot is free; again with ``loop``."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.plan.connections)

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            slots.release()

        while not stop.is_set():
            base = loop.time()
            for conn in self.conns:
                delay = base + self.timeline.offset(conn.start) - loop.time()
                if delay > 0 and await _stopped_within(stop, delay):
                    return
                if slots.locked():
                    if not await _acquired(slots, stop):
                        return
                else:
                    await slots.acquire()
                if stop.is_set():
                    slots.release()
                    return
                task = asyncio.create_task(self._one(conn, base))
                tasks.add(task)
                task.add_done_callback(finished)
            if not self.plan.loop or not self.conns:
                return
            await asyncio.sleep(0)

    async def _one(self, conn: Connection, base: float) -> None:
        plan, timeline = self.plan, self.timeline

        def due(t: float) -> float:
            return base + timeline.offset(t)

        keep = self.differ is not None
        drivers = [ConnDriver(conn, due, self.tally, pipeline=plan.pipeline,
                              timeout=plan.timeout, keep_bodies=keep)]
        runs = [replay_connection(drivers[0], plan.target, plan.source_ports, plan.timeout)]
        if plan.baseline is not None and self.base_tally is not None:
            drivers.append(ConnDriver(conn, due, self.base_tally, pipeline=plan.pipeline,
                                      timeout=plan.timeout, keep_bodies=keep))
            runs.append(replay_connection(drivers[1], plan.baseline, plan.source_ports,
                                          plan.timeout))
        await asyncio.gather(*runs)
        if self.differ is not None:
            base_answers = drivers[1].answers if len(drivers) > 1 else None
            self.differ.add(conn.requests, conn.production, drivers[0].answers, base_answers)

    def eta(self) -> float | None:
        """Seconds left, if that can be known."""
        loop = asyncio.get_running_loop()
        elapsed = loop.time() - self._started
        if self.plan.duration is not None:
            return max(0.0, self.plan.duration - elapsed)
        if self.plan.loop:
            return None
        if not math.isinf(self.plan.speed):
            return max(0.0, self.timeline.length - elapsed)
        sent = self.tally.requests_sent
        if not sent or elapsed <= 0:
            return None
        return max(0.0, self.total_requests - sent) / (sent / elapsed)

    async def _progress(self, out: Callable[[str], None], interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            out(progress_line(self.tally, loop.time() - self._started, self.eta()))


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _acquired(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Wait for a free slot (taken, True) or for ``stop`` (False)."""
    take = asyncio.create_task(slots.acquire())
    halt = asyncio.create_task(stop.wait())
    await asyncio.wait({take, halt}, return_when=asyncio.FIRST_COMPLETED)
    halt.cancel()
    if take.done() and not take.cancelled():
        if stop.is_set():
            slots.release()
            return False
        return True
    take.cancel()
    return False
