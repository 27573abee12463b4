"""Reading the recording while it replays, within a bounded memory.

A :class:`Pass` is one reading of the sources: a thread of its own iterates the records
(files are read and decompressed there, so the event loop keeps sending) and hands them over
in batches through a queue of :data:`_QUEUE` batches; on the event loop they are assembled
into connections (:class:`~agent.replay.assemble.Assembler`), which the scheduler takes in
order (:meth:`Pass.next`). :class:`Feed` holds what the passes share: the memory
:class:`~agent.replay.conns.Window` (:data:`WINDOW` bytes by default), the file records are
set aside in when it is full (:class:`~agent.replay.spill.Spill`) and who waits for the
reader.

Reading stops once half the window is used, unless someone waits for it: a replaying
connection that has sent everything read of it, or the scheduler wanting the next
connection. Then it goes on, and what it reads for connections that do not replay yet goes
to disk. Once all of the window is used it stops again while replaying connections still
have bursts to send (they free memory as they go); only when none has does it go on, what
it reads for connections that do not wait for it going to disk. So memory stays near the
window, whatever the size of the recording, and nothing waits on something that waits on
it. A replay that stops early leaves the reader thread behind (a daemon: it ends with the
process).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator

import structlog

from agent.replay.assemble import Assembler, Timeline
from agent.replay.conns import Connection, Window
from agent.replay.report import Source
from agent.replay.spill import Spill
from agent.sinks.record import RecordedChunk

__all__ = ["WINDOW", "Feed", "Pass"]

log = structlog.get_logger("agent.replay")

#: Bytes of the recording held in memory at most, about (bursts not sent, responses not
#: compared), before records go to disk.
WINDOW = 32 << 20
_BATCH_RECORDS = 512
_BATCH_BYTES = 256 << 10
_QUEUE = 4  # batches read ahead by the thread

Records = Callable[[], Iterator[RecordedChunk]]
_Item = list[RecordedChunk] | BaseException | None


class Feed:
    """The recording (``records`` makes an iterator of every record, once per pass) paced
    by ``speed`` and ``max_wait`` (see :class:`~agent.replay.assemble.Timeline`)."""

    def __init__(self, records: Records, speed: float, max_wait: float | None,
                 budget: int = WINDOW, spill: Spill | None = None) -> None:
        self._records = records
        self.speed = speed
        self.max_wait = max_wait
        self.window = Window(budget, self._poke)
        self.spill = spill
        self.hungry = 0
        self.passes: list[Pass] = []
        self.answers_seen = False  # a service→client record was read, in any pass
        self._wake: asyncio.Event | None = None

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def hunger(self, delta: int) -> None:
        """``delta`` more (or fewer) wait for the reader."""
        self.hungry += delta
        if delta > 0:
            self._poke()

    def begin(self) -> Pass:
        """A new pass over the sources (on the running event loop)."""
        if self._wake is None:
            self._wake = asyncio.Event()
        p = Pass(self)
        self.passes.append(p)
        return p

    @property
    def first(self) -> Source:
        """What the first pass read (so far)."""
        return self.passes[0].asm.stats if self.passes else Source()

    def close(self) -> None:
        """Stop reading."""
        for p in self.passes:
            p.cancel()

    def blocked(self) -> bool:
        """Does the reader wait (see the module docstring)?"""
        w = self.window
        if w.used < w.half:
            return False
        return not self.hungry or (w.used >= w.budget and w.sendable > 0)


class Pass:
    """One reading of the sources; see the module docstring."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.eof = False
        self.error: BaseException | None = None
        self._ready = asyncio.Event()
        self.asm = Assembler(Timeline(feed.speed, feed.max_wait), feed.window, feed.spill,
                             feed.hunger, self._ready.set)
        self._queue: queue.Queue[_Item] = queue.Queue(_QUEUE)
        loop = asyncio.get_running_loop()

        def arrived() -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody reads any more
                loop.call_soon_threadsafe(feed._poke)

        threading.Thread(target=_read, args=(feed._records, self._queue, arrived),
                         name="replay-reader", daemon=True).start()
        self._task = asyncio.create_task(self._pump())

    async def next(self) -> Connection | None:
        """The next connection, in order of its first client byte; None after the last.
        Raises what reading the sources raised."""
        waiting = False
        try:
            while True:
                if self.asm.ready:
                    return self.asm.ready.popleft()
                if self.error is not None:
                    raise self.error
                if self.eof:
                    return None
                if not waiting:
                    waiting = True
                    self.feed.hunger(1)
                self._ready.clear()
                await self._ready.wait()
        finally:
            if waiting:
                self.feed.hunger(-1)

    def cancel(self) -> None:
        self._task.cancel()

    async def _pump(self) -> None:
        feed, asm = self.feed, self.asm
        wake = feed._wake
        assert wake is not None
        spilled = feed.spill.records if feed.spill is not None else 0
        try:
            while True:
                item = _EMPTY if feed.blocked() else _take(self._queue)
                if item is _EMPTY:  # blocked, or nothing read yet: until that changes
                    wake.clear()
                    await wake.wait()
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, list)
                for rec in item:
                    asm.add(rec)
                feed.answers_seen = feed.answers_seen or asm.answers_seen
                spilled = _said_spilled(feed, spilled)
                await asyncio.sleep(0)  # the replay goes on between batches
            asm.end_of_input()
            self.eof = True
        except Exception as e:  # reading failed: the scheduler raises it
            self.error = e
        finally:
            self._ready.set()


_EMPTY: list[RecordedChunk] = []


def _take(q: queue.Queue[_Item]) -> _Item:
    """The next item, or :data:`_EMPTY` if none is there yet."""
    try:
        return q.get_nowait()
    except queue.Empty:
        return _EMPTY


def _said_spilled(feed: Feed, before: int) -> int:
    """Log once when records first go to disk; the count so far."""
    now = feed.spill.records if feed.spill is not None else 0
    if now and not before:
        log.info("replay look-ahead is full: records of connections not replaying yet go "
                 "to a temporary file", window_mib=feed.window.budget >> 20)
    return now


def _read(records: Records, q: queue.Queue[_Item], arrived: Callable[[], None]) -> None:
    """The reader thread: every record, in batches; then None (or what was raised)."""
    try:
        batch: list[RecordedChunk] = []
        size = 0
        for rec in records():
            batch.append(rec)
            size += len(rec.data)
            if len(batch) >= _BATCH_RECORDS or size >= _BATCH_BYTES:
                q.put(batch)
                arrived()
                batch, size = [], 0
        if batch:
            q.put(batch)
        q.put(None)
    except BaseException as e:
        q.put(e)
    arrived()
