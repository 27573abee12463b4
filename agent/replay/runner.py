"""Scheduling a replay: when each recorded connection starts, how many run at once, how
long it all goes on.

- Time: a recorded time *t* is due at ``start + offset(t)``, the offset being the recorded
  time since the first record, each idle gap cut to ``max_wait`` (if set), divided by
  ``speed`` (``inf``: ``--speed max``, everything due at once):
  :class:`~agent.replay.assemble.Timeline`. Connections start when due, in the order of
  their first client byte, as the recording is read (:mod:`agent.replay.feed`); within one,
  bursts are paced the same way (:mod:`agent.replay.driver`).
- Concurrency: at most ``connections`` recorded connections replay at once; a connection
  that is due waits for a free slot (later ones wait behind it, in recorded order).
- ``loop``: read the sources again once every connection of a pass has started;
  ``duration``: stop after that many seconds. Stopping (the duration, or
  :meth:`Replayer.stop` from a signal) closes the connections still running at once; they
  count as ``stopped``, not failed, and their requests not answered yet as
  ``unanswered_at_stop``.
- With a baseline each recorded connection replays to the target and the baseline at once;
  responses are compared (:class:`~agent.replay.diff.Pairing`) as they come.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from agent.replay.conns import Connection
from agent.replay.diff import Differ, Pairing
from agent.replay.driver import ConnDriver, replay_connection
from agent.replay.feed import Feed, Pass
from agent.replay.report import Tally, progress_line

__all__ = ["Plan", "Replayer"]

_T = TypeVar("_T")


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


class Replayer:
    """Replays the recording of ``feed`` by ``plan``; counts into ``tally`` (and
    ``base_tally`` for the baseline); compares responses in ``differ`` if given (when the
    recording holds responses, or there is a baseline)."""

    def __init__(self, feed: Feed, plan: Plan, tally: Tally,
                 base_tally: Tally | None = None, differ: Differ | None = None) -> None:
        self.feed = feed
        self.plan = plan
        self.tally = tally
        self.base_tally = base_tally if plan.baseline is not None else None
        self.differ = differ
        self.interrupted = False
        self.elapsed = 0.0
        self._stop: asyncio.Event | None = None
        self._started = 0.0
        self._pass: Pass | None = None

    def stop(self, interrupted: bool = True) -> None:
        """Stop now (from a signal handler: ``interrupted``)."""
        self.interrupted = self.interrupted or interrupted
        if self._stop is not None:
            self._stop.set()

    async def run(self, progress: Callable[[str], None] | None = None,
                  interval: float = 0.5) -> None:
        """Replay until done, ``plan.duration`` is up, or :meth:`stop`; ``progress`` gets a
        line every ``interval`` seconds. Raises what reading the sources raised."""
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
            stop.set()  # connections still running are stopped, not failed
            self.feed.close()
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
            self._pass = p = self.feed.begin()
            started = 0
            while (conn := await _unless(stop, p.next())) is not None:
                delay = base + conn.due - loop.time()
                if delay > 0 and await _stopped_within(stop, delay):
                    return
                if not await _acquired(slots, stop):
                    return
                task = asyncio.create_task(self._one(conn, base))
                tasks.add(task)
                task.add_done_callback(finished)
                started += 1
            if not self.plan.loop or not started:
                return
            await asyncio.sleep(0)

    async def _one(self, conn: Connection, base: float) -> None:
        plan, differ = self.plan, self.differ
        sides = 1 if self.base_tally is None else 2
        pairing = None
        if differ is not None and (sides == 2 or self.feed.answers_seen):
            pairing = Pairing(differ, sides, self.feed.window.hold)
        cursors = conn.begin(sides, pairing)
        runs = []
        for side, (tally, target) in enumerate(((self.tally, plan.target),
                                                (self.base_tally, plan.baseline))[:sides]):
            assert tally is not None and target is not None
            driver = ConnDriver(cursors[side], base, tally, pipeline=plan.pipeline,
                                timeout=plan.timeout, pairing=pairing, side=side)
            runs.append(replay_connection(driver, target, plan.source_ports, plan.timeout))
        try:
            await asyncio.gather(*runs)
        finally:
            if pairing is None and differ is not None and conn.server_data:
                differ.not_compared += conn.requests  # its responses came too late to pair
            conn.finish()
            conn.feeder.settle(conn, self._stop is not None and not self._stop.is_set())

    def eta(self) -> float | None:
        """Seconds left, if that can be known (the whole recording read)."""
        loop = asyncio.get_running_loop()
        elapsed = loop.time() - self._started
        if self.plan.duration is not None:
            return max(0.0, self.plan.duration - elapsed)
        p = self._pass
        if self.plan.loop or p is None or not p.eof:
            return None
        if not math.isinf(self.plan.speed):
            return max(0.0, p.asm.timeline.length - elapsed)
        sent, total = self.tally.requests_sent, self.feed.first.requests
        if not sent or elapsed <= 0:
            return None
        return max(0.0, total - sent) / (sent / elapsed)

    async def _progress(self, out: Callable[[str], None], interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            out(progress_line(self.tally, loop.time() - self._started, self.eta()))


async def _unless(stop: asyncio.Event, what: Awaitable[_T]) -> _T | None:
    """``what``'s result, or None if ``stop`` is set first."""
    if stop.is_set():
        return None
    task = asyncio.ensure_future(what)
    halt = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, halt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        halt.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _acquired(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Wait for a free slot (taken, True) or for ``stop`` (False)."""
    if stop.is_set():
        return False
    if not slots.locked():
        await slots.acquire()
        return True
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
