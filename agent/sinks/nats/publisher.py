"""The NATS recorder's I/O thread: an asyncio loop that takes records from the hand-off and
publishes them to JetStream, at most ``max_inflight`` unacknowledged at once.

States: *connecting* (records wait in the hand-off, bounded by its budget), *up* (records are
published; each is settled by its acknowledgement, an error, or a timeout), *down* (a connect
failed or the connection was lost: every record taken is dropped as ``broker_down``, and a
new connection is tried after a backoff of 0.1 s doubling up to 5 s). A server that refuses
the agent (a wrong credential, TLS that fails: :class:`~agent.sinks.nats.client.NatsAuthError`)
is *down* like one that cannot be reached, with the cause in the outage's log line; only the
first attempt's refusal is kept apart (:attr:`Publisher.refused`), for the recorder to stop
at start. nats-py's own reconnect
is off: this loop is the one place that (re)connects, so a lost connection is noticed at once
and what was in flight on it is settled at once (``unconfirmed``: it may or may not have been
stored).

A record that is dropped here is owed to its flow's next record as a gap
(:class:`~agent.sinks.nats.gaps.GapLedger`). Every counter here is written by this thread
only, and every key exists from the start (so a reader on another thread can copy them).

Connections (:class:`~agent.sinks.record.ledger.FlowLedger`, shared with the recorder, which
hands each record to it): every message is settled in it for its record's flow, by its
acknowledgement (written) or with the reason it is counted as dropped under; a chunk split
into pieces is settled once per piece sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import structlog

from agent.mirror.handoff import Handoff
from agent.model import FlowEnd, TrafficChunk
from agent.sinks.nats.client import NatsAuthError, connect, describe
from agent.sinks.nats.gaps import GapLedger
from agent.sinks.nats.message import encode_chunk, encode_end, piece_size
from agent.sinks.nats.url import NatsTarget
from agent.sinks.outage import OutageLog
from agent.sinks.record.ledger import FlowLedger

__all__ = ["CHUNK", "END", "REASONS", "Item", "Publisher", "Settings"]

log = structlog.get_logger("agent.record.nats")

CHUNK, END = 0, 1
#: A queued record: (CHUNK, TrafficChunk, data) or (END, FlowEnd, b"").
Item = tuple[int, object, bytes]
#: Why a record is not in the stream (``queue_full`` is counted by the producer).
REASONS = ("queue_full", "broker_down", "publish_failed", "unconfirmed", "shutdown")


#: The reconnect back-off's jitter: a generator of its own, so this thread never draws from
#: (or moves) the global ``random`` state the embedding program may have seeded.
_JITTER = random.Random()


@dataclass(frozen=True, slots=True)
class Settings:
    """Limits and times of a NATS recorder (seconds)."""

    max_inflight: int = 1024
    ack_timeout: float = 5.0
    drain_timeout: float = 5.0
    connect_timeout: float = 2.0
    backoff_min: float = 0.1
    backoff_max: float = 5.0


class _InFlight:
    """One published message until it is settled (``reason``: why it was cancelled)."""

    __slots__ = ("deadline", "end", "flow", "fut", "reason", "size")

    def __init__(self, size: int, deadline: float, flow: int, end: bool) -> None:
        self.size = size
        self.flow = flow
        self.end = end
        self.deadline = deadline
        self.reason = "unconfirmed"
        self.fut: asyncio.Future[Any] | None = None


class Publisher:
    """Publishes what a :class:`~agent.mirror.handoff.Handoff` holds to ``target`` (see the module
    doc). :meth:`run` is the thread's body; it returns once the hand-off is closed and
    everything was published and acknowledged, or dropped and counted, within
    ``drain_timeout`` of the close (plus a connect attempt)."""

    def __init__(self, target: NatsTarget, handoff: Handoff[Item], settings: Settings,
                 flows: FlowLedger | None = None) -> None:
        self._target = target
        #: The connections whose records this publisher settles.
        self.flows = flows if flows is not None else FlowLedger(REASONS)
        self._handoff = handoff
        self._s = settings
        self.counts: dict[str, int] = dict.fromkeys(
            ("records", "recorded_bytes", "nats_connects", "nats_connect_failures",
             "nats_disconnects", "nats_connected", "nats_inflight"), 0)
        for r in REASONS[1:]:
            self.counts[f"nats_dropped_records_{r}"] = 0
            self.counts[f"nats_dropped_bytes_{r}"] = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._wake: asyncio.Event | None = None
        self._idle = False
        self._ledger = GapLedger()
        self._inflight: deque[_InFlight] = deque()
        self._piece = piece_size(1 << 20)
        self._closing = False
        self._down = True  # no connection (yet)
        self._outage = OutageLog(log, "NATS recording: records dropped",
                                 "NATS recording: publishing again", target=target.url)
        #: Set once the first connection attempt is over (or the thread ended).
        self.first_attempt = threading.Event()
        #: Why the server refused the first attempt (:class:`NatsAuthError`), or None.
        self.refused: str | None = None
        self._watched = threading.Lock()
        self._start_watched = True  # someone waits for the first attempt's outcome

    def stop_watching_start(self) -> None:
        """Nobody waits for the first attempt any more: a refusal then is logged as any
        outage is (otherwise the one who waited reports it)."""
        with self._watched:
            self._start_watched = False

    # ---------------------------------------------------------------- any thread

    def wake(self, force: bool = False) -> None:
        """Records were queued: wake the loop if it waits for them (or always, ``force``)."""
        loop = self._loop
        if loop is not None and (self._idle or force):
            self._idle = False
            with contextlib.suppress(RuntimeError):  # the loop has ended
                loop.call_soon_threadsafe(self._set_wake)

    def run(self) -> None:
        """The I/O thread's body. A fault of this code (not of the broker) is kept in
        :attr:`error` and fails the hand-off, so the producer stops queueing."""
        self._idle = False
        try:
            asyncio.run(self._main())
        except BaseException as e:
            log.error("NATS recording failed", target=self._target.url, error=describe(e))
            self.error = e
            self._handoff.fail(e)
            for kind, obj, data in self._handoff.leftovers():
                self._handoff.release(len(data))
                self._count_drop("publish_failed", len(data))
                self.flows.done(_flow_of(obj), kind == END, "publish_failed")
        finally:
            self._loop = None
            self.first_attempt.set()

    # ---------------------------------------------------------------- the loop

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        backoff = self._s.backoff_min
        while True:
            conn = await self._connect()
            if conn is not None:
                backoff = self._s.backoff_min
                if await self._serve(*conn):
                    return
                continue  # lost: try again at once, then back off
            if await self._drop_for(backoff * _JITTER.uniform(0.8, 1.2)):
                return
            backoff = min(backoff * 2, self._s.backoff_max)

    def _finished(self) -> bool:
        return self._handoff.closed and not len(self._handoff)

    async def _next_batch(self, deadline: float) -> list[Item]:
        """What is queued; waits until ``deadline`` (monotonic) for something to come. Empty
        at the deadline, or at once when the hand-off is closed and empty."""
        assert self._wake is not None
        while True:
            batch = self._handoff.take_all(0)
            if batch or self._finished():
                return batch
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self._wake.clear()
            self._idle = True
            if len(self._handoff) or self._handoff.closed:
                self._idle = False
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
            self._idle = False

    async def _drop_for(self, seconds: float) -> bool:
        """Down: drop what comes for ``seconds``; True once the hand-off is closed and empty."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for item in await self._next_batch(deadline):
                self._drop_item(item, "broker_down")
            if self._finished():
                return True
        return self._finished()

    # ---------------------------------------------------------------- connection

    async def _connect(self) -> tuple[Any, Any] | None:
        """A connection and its JetStream context, the stream in place; or None (counted,
        logged once per outage)."""
        async def quiet(*_args: object) -> None:
            pass

        async def closed() -> None:
            self._down = True
            if not self._closing:
                self.counts["nats_disconnects"] += 1
                self._cancel_inflight("unconfirmed")  # frees a publish waiting for room
            self.wake(force=True)

        try:
            nc: Any = await connect(self._target, self._s.connect_timeout, "mirror-agent",
                                    disconnected_cb=quiet, closed_cb=closed,
                                    ping_interval=5, max_outstanding_pings=2)
        except ConnectionError as e:  # refused, timed out, not a NATS server, ...
            self.counts["nats_connect_failures"] += 1
            with self._watched:
                told = self._start_watched and not self.first_attempt.is_set()
                if told and isinstance(e, NatsAuthError):
                    self.refused = e.why  # the recorder stops at start and says why
                else:
                    self._outage.failed("broker_down", error=str(e))
                self.first_attempt.set()
            return None
        self.first_attempt.set()
        self._piece = piece_size(nc.max_payload)
        js = nc.jetstream(publish_async_max_pending=self._s.max_inflight,
                          timeout=self._s.ack_timeout)
        try:
            stream = await _ensure_stream(js, self._target)
        except Exception as e:  # JetStream off, no permission, a name taken: publishes fail
            log.error("NATS recording: no stream for the subject; publishing will fail",
                      target=self._target.url, stream=self._target.stream, error=describe(e))
            stream = "?"
        if not self.counts["nats_connects"]:
            log.info("NATS recording: connected", target=self._target.url, stream=stream)
        self.counts["nats_connects"] += 1
        self._down = False
        self._outage.recovered({"broker_down"})
        return nc, js

    async def _serve(self, nc: Any, js: Any) -> bool:
        """Up: publish until the connection is lost (False) or the hand-off is closed and
        drained (True; the connection is closed then)."""
        self.counts["nats_connected"] = 1
        sweeper = asyncio.create_task(self._sweep())
        try:
            while not nc.is_closed:
                batch = await self._next_batch(time.monotonic() + 0.5)
                if not batch and self._finished():
                    await self._drain()
                    return True
                for item in batch:
                    if nc.is_closed:
                        self._drop_item(item, "broker_down")
                    else:
                        await self._publish(js, item)
            return False
        finally:
            self.counts["nats_connected"] = 0
            sweeper.cancel()
            self._cancel_inflight("unconfirmed")
            self._closing = True
            with contextlib.suppress(Exception):  # already closed or broken: nothing to do
                await nc.close()
            self._closing = False

    # ---------------------------------------------------------------- publishing

    async def _publish(self, js: Any, item: Item) -> None:
        kind, obj, data = item
        if kind == END:
            assert isinstance(obj, FlowEnd)
            body, headers = encode_end(self._ledger.settle_end(obj))
            await self._send(js, body, headers, 0, obj.flow_id, True)
            return
        assert isinstance(obj, TrafficChunk)
        chunk = self._ledger.charge(obj)
        step = self._piece
        for at in range(0, max(len(data), 1), step):
            piece = data[at:at + step] if len(data) > step else data
            part = chunk if at == 0 else replace(chunk, gap_bytes=0)
            body, headers = encode_chunk(part, piece)
            if at:
                self.flows.more(chunk.flow_id)  # one more message to settle
            if not await self._send(js, body, headers, len(piece), chunk.flow_id):
                lost = len(data) - at
                self._handoff.release(lost - len(piece))  # the pieces never sent
                self._count_drop("broker_down" if self._down else "publish_failed",
                                 lost - len(piece), records=0)
                self._ledger.owe(part, lost)
                return

    async def _send(self, js: Any, body: bytes, headers: dict[str, str], size: int,
                    flow: int, end: bool = False) -> bool:
        """Publish one message of ``size`` data bytes of ``flow`` (``end``: its end record);
        False if it could not even be sent (counted as dropped and released here)."""
        entry = _InFlight(size, time.monotonic() + self._s.ack_timeout, flow, end)
        try:
            fut = await js.publish_async(self._target.subject, body, headers=headers)
        except Exception as e:  # the connection closed, or the client's buffer is full
            why = "broker_down" if self._down else "publish_failed"
            self._handoff.release(size)
            self._count_drop(why, size)
            self.flows.done(flow, end, why)
            self._outage.failed(why, error=describe(e))
            return False
        entry.fut = fut
        q = self._inflight
        while q and q[0].fut is not None and q[0].fut.done():
            q.popleft()  # settled: the sweeper need not look at it
        q.append(entry)
        self.counts["nats_inflight"] += 1
        fut.add_done_callback(lambda f: self._settled(entry, f))
        return True

    def _settled(self, entry: _InFlight, fut: asyncio.Future[Any]) -> None:
        self.counts["nats_inflight"] -= 1
        self._handoff.release(entry.size)
        if fut.cancelled():
            self._count_drop(entry.reason, entry.size)
            self.flows.done(entry.flow, entry.end, entry.reason)
        elif fut.exception() is not None:
            self._count_drop("publish_failed", entry.size)
            self.flows.done(entry.flow, entry.end, "publish_failed")
            self._outage.failed("publish_failed", error=describe(fut.exception()))
        else:
            self.counts["records"] += 1
            self.counts["recorded_bytes"] += entry.size
            self.flows.done(entry.flow, entry.end)
            if self._outage.failing:
                self._outage.recovered({"publish_failed"})

    async def _sweep(self) -> None:
        """Cancel what waited longer than ``ack_timeout`` for its acknowledgement."""
        while True:
            await asyncio.sleep(min(0.25, self._s.ack_timeout / 4))
            now = time.monotonic()
            q = self._inflight
            while q and (q[0].fut is None or q[0].fut.done() or q[0].deadline <= now):
                entry = q.popleft()
                if entry.fut is not None and not entry.fut.done():
                    entry.fut.cancel()  # reason: unconfirmed

    async def _drain(self) -> None:
        """Closing: wait up to ``drain_timeout`` for the acknowledgements still due; what
        is still unacknowledged then is counted as ``shutdown``."""
        deadline = time.monotonic() + self._s.drain_timeout
        while self.counts["nats_inflight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self._cancel_inflight("shutdown")

    def _cancel_inflight(self, reason: str) -> None:
        while self._inflight:
            entry = self._inflight.popleft()
            if entry.fut is not None and not entry.fut.done():
                entry.reason = reason
                entry.fut.cancel()

    # ---------------------------------------------------------------- accounting

    def _drop_item(self, item: Item, reason: str) -> None:
        """A record taken but not published: released, counted, owed to its flow."""
        kind, obj, data = item
        self._handoff.release(len(data))
        self._count_drop(reason, len(data))
        self.flows.done(_flow_of(obj), kind == END, reason)
        if kind == CHUNK:
            assert isinstance(obj, TrafficChunk)
            self._ledger.owe(self._ledger.charge(obj), len(data))
        else:
            assert isinstance(obj, FlowEnd)
            self._ledger.settle_end(obj)  # the flow is over: nothing is owed any more
        self._outage.failed(reason)

    def _count_drop(self, reason: str, size: int, records: int = 1) -> None:
        self.counts[f"nats_dropped_records_{reason}"] += records
        self.counts[f"nats_dropped_bytes_{reason}"] += size


def _flow_of(obj: object) -> int:
    """The flow of a queued record's chunk or flow end."""
    assert isinstance(obj, TrafficChunk | FlowEnd)
    return obj.flow_id


async def _ensure_stream(js: Any, target: NatsTarget) -> str:
    """The stream that captures the target's subject; created (file storage, the server's
    default limits) as :attr:`NatsTarget.stream` if none does."""
    from nats.js.api import StorageType
    from nats.js.errors import NotFoundError

    try:
        name: str = await js.find_stream_name_by_subject(target.subject)
        return name
    except NotFoundError:
        pass
    await js.add_stream(name=target.stream, subjects=[target.subject],
                        storage=StorageType.FILE)
    log.info("NATS recording: stream created", stream=target.stream, subject=target.subject)
    return target.stream

