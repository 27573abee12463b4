"""Forwarding to a shadow target: one TCP connection per captured connection.

The mirror thread only hands work over (:meth:`ForwardSink.send`, :meth:`end`; an
:class:`agent.handoff.Handoff` with the drop policy) and wakes the I/O thread once per batch
(:meth:`ForwardSink.commit`); an asyncio loop in that thread dials (from a reserved source
port, see :mod:`agent.sinks.source_ports`), writes, reads and discards the target's responses
(per-connection work: :mod:`agent.sinks.shadow_conn`). Nothing here can block capture: a flow
holding more than ``max_flow_buffer`` bytes (queued, or in its transport until the kernel
takes them), or any flow while all together hold more than ``max_total_buffer`` (the hand-off's
budget: bytes stay in it until the kernel took them or they were discarded), is dropped whole
and counted (``total_buffer``). A target that refuses, times out, resets
or stops reading costs only that flow (dropped, counted, logged once per outage); one that
acknowledges nothing for ``stall_timeout``, or not all of a finished flow within
``end_timeout``, is ``stalled`` and its connection reset.

Accounting: ``bytes_forwarded`` are bytes the target acknowledged; every other byte handed to
the sink is in ``bytes_dropped``. A dropped flow is counted once (a gap may have restarted its
connection), in ``flows_dropped`` and ``flows_dropped_<reason>``, the reason being the root
cause: a buffer limit hit while dialing is charged to the connect (``connect_timeout``,
``connect_failed``) unless it succeeds; ``error`` is a fault of the sink itself.
``connections_completed`` counts connections whose bytes were all acknowledged and whose
target then answered or closed; ``connections_unconfirmed`` those whose target did neither
within ``end_grace`` (a shadow that never reads). Each counter is written by one thread only
(mirror: :attr:`_mcounts`, I/O: :attr:`_counts`); :attr:`stats` adds them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from typing import Any

import structlog

from agent.config import Dial, ForwardConfig
from agent.handoff import Handoff, HandoffStats, Policy
from agent.sinks.outage import OutageLog
from agent.sinks.shadow_conn import (
    Conn,
    Dialer,
    Flow,
    Stalled,
    Streams,
    connect_failure,
    describe,
    hard_close,
    progressing,
    read_answers,
    wait_acked,
)
from agent.sinks.source_ports import NoSourcePort, bind_source_port

__all__ = ["ForwardSink", "NoSourcePort", "bind_source_port"]

log = structlog.get_logger("agent.forward")

_DATA, _END, _RESET, _DROP = 0, 1, 2, 3
_BUFFER_REASONS = frozenset({"flow_buffer", "total_buffer"})
_CONNECT_REASONS = frozenset({"connect_failed", "connect_timeout", "no_source_port"})
_PIECE = 256 << 10  # bytes handed to a transport at once (the rest stays queued)


class ForwardSink:
    """Forwards each captured connection's bytes over its own connection to ``target``.

    With a custom ``dial``, that dial picks the source port (see :func:`bind_source_port`);
    a connection from outside ``config.source_ports`` is warned about once.
    """

    def __init__(self, target: str, dial: Dial | None = None,
                 config: ForwardConfig | None = None) -> None:
        self.target = target
        self.config = config or ForwardConfig()
        self._dialer = Dialer(target, dial, self.config.source_ports)
        self._mcounts: Counter[str] = Counter()  # mirror thread's counters
        self._counts: Counter[str] = Counter()  # I/O thread's counters
        # Operations from the mirror thread to the I/O thread. Its budget, max_total_buffer
        # (the memory budget's forward_total, agent/budget.py: 128 MiB for a 1 GiB cgroup;
        # ForwardConfig alone says 256 << 20: 32 flows at their 8 MiB max_flow_buffer, or ~0.5 s
        # of 4 Gbit/s for a shadow that takes nothing), covers every byte handed over
        # and not yet taken by the kernel or discarded: queued here, in a connection's queue,
        # or in a transport. The kernel's socket buffers are outside it.
        self._ops: Handoff[tuple[int, int, bytes]] = Handoff(
            "forward", self.config.max_total_buffer, Policy.DROP, release_on_take=False)
        self._uncommitted = False  # mirror thread: ops put since the last commit()
        # Flows given up on. Mirror thread: adds, reads. I/O thread: adds while the flow is
        # open, discards when its end arrives (set operations are atomic under the GIL).
        self._dropped: set[int] = set()
        self._open: set[int] = set()  # mirror thread: flows that sent data and did not end
        self._flows: dict[int, Flow] = {}  # I/O thread: flows with a connection, until end
        self._current: dict[int, Conn] = {}  # I/O thread: flow id → its shadow connection
        self._live: set[Conn] = set()  # I/O thread: connections whose task still runs
        self._dialing = 0  # I/O thread: connections not connected yet
        self._awaiting = 0  # I/O thread: flows dropped meanwhile, charged to their outcome
        self._outages = OutageLog(log, "forwarding failed", "target reachable again",
                                  self.config.log_interval, target=target)
        self._stop_wait = asyncio.Event()  # set: close() stops waiting for the shadow
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forward",
                                        daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- mirror thread

    def send(self, flow_id: int, data: bytes, gap: int = 0) -> None:
        """Queue ``data`` of ``flow_id``. A ``gap`` before it restarts the shadow connection,
        since the target would otherwise see a corrupted stream."""
        counts = self._mcounts
        if flow_id in self._dropped:
            counts["bytes_dropped"] += len(data)
            return
        self._uncommitted = True
        if flow_id in self._open:
            if gap:
                self._ops.put((_RESET, flow_id, b""), 0)
                counts["gap_resets"] += 1
        else:
            self._open.add(flow_id)
        if not self._ops.put((_DATA, flow_id, data), len(data), "total_buffer"):
            self._dropped.add(flow_id)  # all flows hold too much: this one goes, whole
            counts["bytes_dropped"] += len(data)
            self._ops.put((_DROP, flow_id, b""), 0)

    def end(self, flow_id: int) -> None:
        """The client finished (or the connection is over): close the shadow connection
        once its bytes are written. A later :meth:`send` would open a new one."""
        if flow_id in self._open:
            self._open.discard(flow_id)
            self._ops.put((_END, flow_id, b""), 0)
            self._uncommitted = True

    def commit(self) -> None:
        """Wake the I/O thread for the work queued (once per batch)."""
        if self._uncommitted:
            self._uncommitted = False
            self._loop.call_soon_threadsafe(self._take_ops)

    def close(self) -> None:
        """Deliver what is queued (up to ``close_timeout`` seconds), then close everything."""
        for flow_id in list(self._open):
            self.end(flow_id)
        self.commit()
        self._ops.close()  # the I/O thread still takes what is queued
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):  # the loop is stopped below either way
            fut.result(self.config.close_timeout + 2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def stop_waiting(self) -> None:
        """Cut :meth:`close`'s wait for the shadow short; callable from any thread or a
        signal handler. What the shadow has not taken is dropped and counted
        (``close_timeout``)."""
        self._loop.call_soon_threadsafe(self._stop_wait.set)

    @property
    def queued_bytes(self) -> int:
        return self._ops.queued_bytes

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.handoff.HasHandoffs`: this stage's hand-off."""
        return [self.handoff_stats()]

    def handoff_stats(self) -> HandoffStats:
        """The hand-over's counters (see :mod:`agent.handoff`)."""
        return self._ops.stats()

    @property
    def stats(self) -> Counter[str]:
        """Every counter (a snapshot; ``dict()`` of a Counter copies it under the GIL)."""
        total = Counter(dict(self._mcounts))
        total.update(dict(self._counts))
        return total

    # ---------------------------------------------------------------- I/O thread: flows

    def _take_ops(self) -> None:
        for kind, flow_id, data in self._ops.take_all(0):
            conn = self._current.get(flow_id)
            if kind == _DATA:
                self._queue(flow_id, conn, data)
            elif kind == _DROP:
                self._drop_over_total(flow_id, conn)
            elif kind == _RESET and conn is not None and conn.ended:
                continue  # given up on: a gap does not revive it (its bytes are discarded)
            else:
                if kind == _END:
                    self._dropped.discard(flow_id)
                    self._flows.pop(flow_id, None)
                if conn is not None:
                    # This connection takes no more data; a later send opens another.
                    del self._current[flow_id]
                    conn.finish(self.config.end_timeout)

    def _queue(self, flow_id: int, conn: Conn | None, data: bytes) -> None:
        if conn is not None and conn.ended:  # aborted: count, do not queue
            self._discard_bytes(len(data))
            return
        if conn is None:
            conn = self._new_conn(flow_id)
        conn.queue.append(data)
        conn.buffered += len(data)
        if conn.buffered + self._sync(conn) > self.config.max_flow_buffer:
            self._abort(conn, "flow_buffer")
        conn.wake.set()

    def _new_conn(self, flow_id: int) -> Conn:
        conn = self._current[flow_id] = Conn(self._flows.setdefault(flow_id, Flow(flow_id)))
        self._dialing += 1
        self._live.add(conn)
        conn.task = self._loop.create_task(self._run(conn))
        conn.task.add_done_callback(lambda _t: self._live.discard(conn))  # even unstarted
        self._counts["connections"] += 1
        return conn

    def _drop_over_total(self, flow_id: int, conn: Conn | None) -> None:
        """The mirror thread dropped the flow: all flows together hold too much."""
        if conn is not None:
            if not conn.ended:
                self._abort(conn, "total_buffer")
            return
        flow = self._flows.get(flow_id) or Flow(flow_id)
        if flow.dropped:
            return
        if self._dialing:  # the buffers are full while connects hang: they decide
            flow.dropped = True
            self._awaiting += 1
        else:
            self._count_drop("total_buffer", flow)

    def _count_drop(self, why: str, flow: Flow | None, n: int = 1, /,
                    **detail: object) -> None:
        if flow is not None:
            if flow.dropped:
                return
            flow.dropped = True
            detail["flow_id"] = flow.flow_id
        self._counts["flows_dropped"] += n
        self._counts[f"flows_dropped_{why}"] += n
        self._outages.failed(why, n, **detail)

    def _discard_bytes(self, n: int) -> None:
        self._counts["bytes_dropped"] += n
        self._ops.release(n)  # no longer held

    def _sync(self, conn: Conn) -> int:
        """Release the bytes ``conn``'s transport passed on; return those it still holds."""
        self._ops.release(conn.passed_on())
        return conn.in_transport

    def _abort(self, conn: Conn, why: str, **detail: object) -> None:
        """Give up on a connection: discard what it holds (counted), cancel its task, drop the
        rest of the flow, count ``why``. A buffer limit hit while still dialing is not counted
        yet and the dial goes on: its outcome names the cause (see :meth:`_connect`)."""
        deferred = why in _BUFFER_REASONS and conn.dialing
        if deferred:
            conn.deferred = conn.deferred or why
        else:
            self._count_drop(why, conn.flow, **detail)
        if self._current.get(conn.flow.flow_id) is conn:
            self._dropped.add(conn.flow.flow_id)
        self._discard_bytes(conn.buffered)
        conn.queue.clear()
        conn.buffered = 0
        conn.ended = True
        if not deferred and conn.task is not None and conn.task is not asyncio.current_task():
            self._dial_over(conn)
            conn.task.cancel()

    def _dial_over(self, conn: Conn) -> None:
        if conn.dialing:
            conn.dialing = False
            self._dialing -= 1

    # ---------------------------------------------------------------- I/O thread: a connection

    async def _run(self, conn: Conn) -> None:
        try:
            streams = await self._connect(conn)
            if streams is not None:
                await self._exchange(conn, *streams)
        except Exception as e:  # a fault of ours: still count the flow and free its bytes
            log.exception("forwarding error", flow_id=conn.flow.flow_id)
            self._abort(conn, "error", error=describe(e))
        finally:  # normally nothing is left by now; after a fault, whatever is gets freed
            self._dial_over(conn)
            self._discard_bytes(conn.buffered)
            self._ops.release(conn.in_transport)
            conn.buffered = conn.in_transport = 0
            conn.queue.clear()

    async def _connect(self, conn: Conn) -> Streams | None:
        """Dial the target; None (counted) if that failed or the flow was given up meanwhile
        (a connection made for a flow already given up is closed unused)."""
        try:
            streams = await asyncio.wait_for(self._dialer(), self.config.connect_timeout)
        except Exception as e:  # whatever a custom dial raises
            self._dial_over(conn)
            why = connect_failure(e)
            self._abort(conn, why, error=describe(e))
            self._settle_awaiting(why)
            return None
        self._dial_over(conn)
        self._outages.recovered(_CONNECT_REASONS)
        self._settle_awaiting("total_buffer")
        if conn.deferred is not None:
            self._count_drop(conn.deferred, conn.flow)
            streams[1].close()
            return None
        conn.writer = streams[1]
        return streams

    def _settle_awaiting(self, why: str) -> None:
        if self._awaiting:
            self._count_drop(why, None, self._awaiting)
            self._awaiting = 0

    async def _exchange(self, conn: Conn, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        """Write the flow's bytes until it ends, half-close, wait until the target took them
        and for its answer, count. Every wait is bounded (``stall_timeout``, ``end_timeout``,
        ``end_grace``); a connection given up on is reset, so nothing counted as dropped
        still reaches the target."""
        reader_task = self._loop.create_task(read_answers(reader, conn, self._counts))
        eof = clean = False
        try:
            # Bounded from the client's end on (from the connect if that came later).
            end_by = self._loop.time() + self.config.end_timeout if conn.ended else None
            async with asyncio.timeout_at(end_by) as conn.limit:
                await self._pump(conn, writer)
                if writer.can_write_eof():
                    writer.write_eof()
                    eof = True
                await wait_acked(writer, eof, self.config.stall_timeout, reader_task)
            conn.limit = None
            # Give the target a moment to answer and close first, so it sees a clean end.
            await asyncio.wait({reader_task}, timeout=self.config.end_grace)
            clean = self._conclude(conn, eof, reader_task.done())
        except (Stalled, TimeoutError):  # TimeoutError: end_timeout (before OSError: a subclass)
            self._abort(conn, "stalled", unacked_bytes=self._settle(conn, eof, True))
        except OSError as e:
            self._abort(conn, "reset", error=describe(e))
        finally:
            conn.limit = None
            reader_task.cancel()
            self._settle(conn, eof, final=True)
            if clean:
                writer.close()
            else:
                hard_close(writer)
            self._sync(conn)

    async def _pump(self, conn: Conn, writer: asyncio.StreamWriter) -> None:
        """Write what the flow queues, as it comes, until it ends (:class:`Stalled` if the
        target stops acknowledging meanwhile)."""
        stall = self.config.stall_timeout
        while True:
            if conn.queue:
                writer.writelines(conn.take(_PIECE))
                self._sync(conn)
                await progressing(writer.drain, writer, stall)
                self._sync(conn)
                self._settle(conn, eof=False)
            elif conn.ended:
                return
            else:
                conn.wake.clear()
                await progressing(conn.wake.wait, writer, stall)

    def _settle(self, conn: Conn, eof: bool, final: bool = False) -> int:
        """Count bytes the target acknowledged since the last call as forwarded; with
        ``final`` count the rest as dropped and return how many."""
        acked, lost = conn.settle(eof, final)
        self._counts["bytes_forwarded"] += acked
        self._counts["bytes_dropped"] += lost
        return lost

    def _conclude(self, conn: Conn, eof: bool, closed: bool) -> bool:
        """Count a finished connection by what the target did with its bytes; True if it
        took them all."""
        unacked = self._settle(conn, eof, final=True)
        if unacked:  # the target closed before taking everything
            self._abort(conn, "stalled", unacked_bytes=unacked)
            return False
        if closed or conn.answered:
            self._counts["connections_completed"] += 1
            self._outages.recovered()
        else:
            self._counts["connections_unconfirmed"] += 1
            self._outages.failed("unconfirmed", end_grace=self.config.end_grace)
        return True

    async def _shutdown(self) -> None:
        tasks = [c.task for c in self._live if c.task is not None]
        if tasks:
            stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop_wait.wait())
            every: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.wait([every, stop], timeout=self.config.close_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            pending = {t for t in tasks if not t.done()}
            for conn in list(self._live):
                if conn.task in pending:
                    self._abort(conn, "close_timeout")
            if pending:
                await asyncio.wait(pending, timeout=1)
        self._settle_awaiting("total_buffer")
