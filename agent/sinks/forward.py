"""Forwarding to a shadow target: one TCP connection per captured connection.

The mirror thread only hands work over (:meth:`ForwardSink.send`, :meth:`end`; an
:class:`agent.mirror.handoff.Handoff` with the drop policy) and wakes the I/O thread once per batch
(:meth:`ForwardSink.commit`). An asyncio loop in that thread dials (from a reserved source
port, see :mod:`agent.sinks.source_ports`) and drives each connection
(:class:`agent.sinks.shadow_conn.Conn`, a protocol: no task per connection once connected)
from its callbacks and from one periodic sweep; a short connection costs a dial, a write, a
look at the kernel's acknowledgement counter and a close.

Accounting, the contract: every shadow connection ends exactly once, **completed** (the
target acknowledged every byte at the TCP level, then answered or closed) or **dropped**
with one reason:

==================  ======================================================================
``connect_failed``  refused, unreachable, or a custom dial raised
``connect_timeout`` no connection within ``connect_timeout``
``no_source_port``  every reserved source port is taken for the target
``flow_buffer``     the flow held more than ``max_flow_buffer`` bytes in user space
``total_buffer``    all flows together held the hand-off's whole budget
``overload``        a new flow that waited more than ``overload_lag`` for one of the
                    :data:`MAX_DIALING` dial slots (the loop cannot keep up)
``stalled``         no acknowledgement for ``stall_timeout``, or not all within ``end_timeout``
``reset``           the target reset (or the connection failed) before taking every byte
``unconfirmed``     every byte acknowledged, but the target neither answered nor closed within
                    ``end_grace`` (a shadow that never reads or never accepts)
``shutdown``        still going when :meth:`ForwardSink.close` stopped waiting
``memory``          shed by the memory guard (:meth:`ForwardSink.shed`): the process neared its
                    memory limit and this connection held the most bytes
``error``           a fault of the sink itself
==================  ======================================================================

so ``connections == completed + dropped + in_flight`` at every look (``connections_in_flight``
is derived, never written). A buffer limit hit while dialing is charged to the dial unless it
succeeds. ``bytes_forwarded`` are bytes the target acknowledged; every other byte handed to the
sink is in ``bytes_dropped``. A dropped connection is reset, so nothing counted as dropped
reaches the target later. Each counter is written by one thread only (mirror:
:attr:`_mcounts`, I/O: :attr:`_counts`).

Closing order: the side that closes first keeps the connection's TIME_WAIT (60 s), which is
what bounds connections per second to one target from a fixed port range. When the captured
service closed first (``after_service``: HTTP ``Connection: close``), the shadow is given
``end_grace`` to close first too, so the agent keeps no TIME_WAIT; otherwise the FIN goes
out with the last byte, as the client's did. A finished connection whose target answered but
keeps it open is reset rather than left in FIN_WAIT2.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from typing import Any

import structlog

from agent.metrics import FORWARD_DROP_REASONS as DROP_REASONS
from agent.mirror.config import Dial, ForwardConfig, parse_target
from agent.mirror.handoff import Handoff, HandoffStats, Policy
from agent.sinks.outage import OutageLog
from agent.sinks.shadow_conn import Conn, Dialer, connect_failure, describe, stop_io_loop
from agent.sinks.source_ports import NoSourcePort, bind_source_port, forward_capacity

__all__ = ["DROP_REASONS", "ForwardSink", "NoSourcePort", "bind_source_port"]

log = structlog.get_logger("agent.forward")


_DATA, _END, _END_AFTER_SERVICE, _RESET, _DROP = range(5)
_BUFFER_REASONS = frozenset({"flow_buffer", "total_buffer"})
_CONNECT_REASONS = frozenset({"connect_failed", "connect_timeout", "no_source_port"})
#: Dials under way at most; a new flow beyond them waits for a slot, first come first served,
#: and is shed (``overload``) once it waited ``overload_lag``. A dial to a healthy shadow takes
#: well under 1 ms of loop time, so 256 of them are ~0.1 s of backlog at the 3,000 new
#: connections/s this loop sustains with room to spare; more at once only makes every dial
#: late (they then all time out). Waiting instead of shedding at once lets a burst through:
#: the backlog of a paused process (SIGSTOP, a CPU quota) arrives as one batch.
MAX_DIALING = 256
_SWEEP_MIN, _SWEEP_MAX = 0.01, 0.25  # seconds between sweeps over the open connections


class ForwardSink:
    """Forwards each captured connection's bytes over its own connection to ``target``.

    With a custom ``dial``, that dial picks the source port (see :func:`bind_source_port`);
    a connection from outside ``config.source_ports`` is warned about once.
    """

    def __init__(self, target: str, dial: Dial | None = None,
                 config: ForwardConfig | None = None) -> None:
        self.target = target
        self.config = config or ForwardConfig()
        self._dialer = Dialer(target, dial, self.config.source_ports, self.config.source_addrs)
        self._mcounts: Counter[str] = Counter()  # mirror thread's counters
        self._counts: Counter[str] = Counter()  # I/O thread's counters
        # Operations from the mirror thread to the I/O thread. Its budget, max_total_buffer
        # (the memory budget's forward_total, agent/mirror/budget.py: 128 MiB for a 1 GiB cgroup;
        # ForwardConfig alone says 256 << 20: 32 flows at their 8 MiB max_flow_buffer, or ~0.5 s
        # of 4 Gbit/s for a shadow that takes nothing), covers every byte handed over and not
        # yet passed to the kernel or discarded. The kernel's socket buffers are outside it.
        self._ops: Handoff[tuple[int, int, bytes]] = Handoff(
            "forward", self.config.max_total_buffer, Policy.DROP, release_on_take=False)
        self._uncommitted = False  # mirror thread: ops put since the last commit()
        # Flows given up on. Mirror thread: adds, reads. I/O thread: adds while the flow is
        # open, discards when its end arrives (set operations are atomic under the GIL).
        self._dropped: set[int] = set()
        self._open: set[int] = set()  # mirror thread: flows that sent data and did not end
        self._current: dict[int, Conn] = {}  # I/O thread: flow id → its shadow connection
        self._live: set[Conn] = set()  # I/O thread: connections not counted yet
        self._dialing = 0  # I/O thread: connections with a dial under way
        #: I/O thread: new connections waiting for a dial slot, with when they began to wait.
        self._waiting: deque[tuple[Conn, float]] = deque()
        self._awaiting: list[int] = []  # I/O thread: refused flows charged to a dial's outcome
        s = self.config
        self._sweep_every = min(_SWEEP_MAX, max(_SWEEP_MIN, min(
            s.stall_timeout, s.end_grace or _SWEEP_MAX, s.end_timeout or _SWEEP_MAX) / 4))
        self._sweeping: asyncio.TimerHandle | None = None
        self._outages = OutageLog(log, "forwarding failed", "target reachable again",
                                  self.config.log_interval, target=target)
        self._stop_wait = asyncio.Event()  # set: close() stops waiting for the shadow
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forward",
                                        daemon=True)
        self._thread.start()
        #: What the reserved source ports allow to this target (logged; on ``/status``).
        self.capacity = forward_capacity(self.config.source_ports, parse_target(target)[0],
                                         max(1, len(self.config.source_addrs)))
        log.info("forwarding", target=target, **self.capacity)

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

    def end(self, flow_id: int, after_service: bool = False) -> None:
        """The client finished (or the connection is over): close the shadow connection
        once its bytes are written. ``after_service``: the service had closed its side
        first (the target is then given the chance to close first too). A later
        :meth:`send` would open a new one."""
        if flow_id in self._open:
            self._open.discard(flow_id)
            self._ops.put((_END_AFTER_SERVICE if after_service else _END, flow_id, b""), 0)
            self._uncommitted = True

    def commit(self) -> None:
        """Wake the I/O thread for the work queued (once per batch)."""
        if self._uncommitted:
            self._uncommitted = False
            self._loop.call_soon_threadsafe(self._take_ops)

    def close(self) -> None:
        """Deliver what is queued (up to ``close_timeout`` seconds), then close everything;
        what is still going then is dropped as ``shutdown``."""
        for flow_id in list(self._open):
            self.end(flow_id)
        self.commit()
        self._ops.close()  # the I/O thread still takes what is queued
        stop_io_loop(self._loop, self._thread, self._shutdown(),
                     self.config.close_timeout + 2, self._count_leftovers)

    def stop_waiting(self) -> None:
        """Cut :meth:`close`'s wait for the shadow short; callable from any thread or a
        signal handler. What the shadow has not taken is dropped and counted
        (``shutdown``)."""
        self._loop.call_soon_threadsafe(self._stop_wait.set)

    def shed(self, nbytes: int, why: str = "memory") -> None:
        """Any thread: drop (as ``why``) the shadow connections holding the most bytes in
        user space, largest first, until ``nbytes`` are freed or none holds any. For the
        memory guard (:mod:`agent.mirror.memory_guard`); each is counted like any other drop."""
        self._loop.call_soon_threadsafe(self._shed_largest, nbytes, why)

    @property
    def queued_bytes(self) -> int:
        return self._ops.queued_bytes

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.mirror.handoff.HasHandoffs`: this stage's hand-off."""
        return [self.handoff_stats()]

    def handoff_stats(self) -> HandoffStats:
        """The hand-over's counters (see :mod:`agent.mirror.handoff`)."""
        return self._ops.stats()

    @property
    def stats(self) -> Counter[str]:
        """Every counter, and ``connections_in_flight`` derived from them (a snapshot:
        ``dict()`` of a Counter copies it under the GIL, so the equation holds in it)."""
        io = dict(self._counts)
        total = Counter(dict(self._mcounts))
        total.update(io)
        dropped = sum(io.get(f"connections_dropped_{r}", 0) for r in DROP_REASONS)
        total["connections_dropped"] = dropped
        total["connections_in_flight"] = (io.get("connections", 0)
                                          - io.get("connections_completed", 0) - dropped)
        return total

    # ---------------------------------------------------------------- I/O thread: operations

    def _take_ops(self) -> None:
        now = self._loop.time()
        for kind, flow_id, data in self._ops.take_all(0):
            conn = self._current.get(flow_id)
            if kind == _DATA:
                if conn is None:
                    conn = self._new_conn(flow_id, now)
                self._push(conn, data, now)
            elif kind == _DROP:
                self._drop_over_total(flow_id, conn)
            elif kind == _RESET and conn is not None and conn.ended:
                continue  # given up on: a gap does not revive it (its bytes are discarded)
            elif conn is not None:  # an end, or a gap: this connection takes no more bytes
                del self._current[flow_id]
                self._finish(conn, kind == _END_AFTER_SERVICE, now)
            if kind in (_END, _END_AFTER_SERVICE):
                self._dropped.discard(flow_id)

    def _new_conn(self, flow_id: int, now: float) -> Conn:
        """A new flow's connection: dialed now if a slot is free, else it waits for one."""
        conn = self._current[flow_id] = Conn(flow_id, self._advance)
        self._live.add(conn)
        self._counts["connections"] += 1
        if self._dialing < MAX_DIALING and not self._waiting:
            self._start_dial(conn)
        else:
            self._waiting.append((conn, now))
        self._arm_sweep()
        return conn

    def _start_dial(self, conn: Conn) -> None:
        conn.task = self._loop.create_task(self._dial(conn))
        self._dialing += 1

    def _admit_waiting(self, now: float) -> None:
        """Dial waiting connections, oldest first, while slots are free; one that waited
        longer than ``overload_lag`` is shed (``overload``): the loop cannot keep up."""
        waiting = self._waiting
        while waiting and self._dialing < MAX_DIALING:
            conn, since = waiting.popleft()
            if conn.done:  # given up on while it waited (a limit, the memory guard)
                continue
            if now - since > self.config.overload_lag:
                self._abort(conn, "overload", waited=round(now - since, 3))
            else:
                self._start_dial(conn)

    def _shed_waiting(self, now: float) -> None:
        """Shed waiting connections past ``overload_lag`` even while no slot frees (every
        dial hangs): their wait, and the bytes they hold, stay bounded."""
        waiting = self._waiting
        while waiting and (waiting[0][0].done or now - waiting[0][1] > self.config.overload_lag):
            conn, since = waiting.popleft()
            if not conn.done:
                self._abort(conn, "overload", waited=round(now - since, 3))

    def _shed(self, flow_id: int, why: str) -> Conn:
        """A new flow the loop will not dial (it is stopping): dropped at once, no socket."""
        conn = self._current[flow_id] = Conn(flow_id, self._advance)
        self._counts["connections"] += 1
        self._abort(conn, why)
        return conn

    def _count_leftovers(self) -> None:
        """After the loop stopped (this thread is now the only one): whatever it did not get
        to, taken or not, is dropped as ``shutdown``, so the counts add up at exit."""
        for _kind, flow_id, data in self._ops.take_all(0):
            conn = self._current.get(flow_id) or self._shed(flow_id, "shutdown")
            if data:
                self._push(conn, data, 0.0)
        for conn in list(self._live):
            self._abort(conn, "shutdown")
        self._settle_awaiting("shutdown")

    def _push(self, conn: Conn, data: bytes, now: float) -> None:
        if conn.ended or conn.done:  # given up on, or over (reset): count, do not queue
            self._discard_bytes(len(data))
            return
        conn.push(data, now)
        if self._sync(conn) > self.config.max_flow_buffer:
            self._abort(conn, "flow_buffer")

    def _finish(self, conn: Conn, after_service: bool, now: float) -> None:
        """The flow's end (or a gap): every byte must be acknowledged within end_timeout."""
        if conn.ended:
            return
        conn.ended = True
        conn.after_service = after_service
        conn.end_by = now + self.config.end_timeout
        self._advance(conn)

    def _drop_over_total(self, flow_id: int, conn: Conn | None) -> None:
        """The mirror thread dropped the flow: all flows together hold too much."""
        if conn is not None:
            self._abort(conn, "total_buffer")
            return
        # Its first bytes did not fit: a connection that never was, counted as one. While
        # dials hang and hold the budget, they are the cause: the next outcome names it.
        self._counts["connections"] += 1
        if self._dialing:
            self._awaiting.append(flow_id)
        else:
            self._count(None, "total_buffer", flow_id=flow_id)

    # ---------------------------------------------------------------- I/O thread: a connection

    async def _dial(self, conn: Conn) -> None:
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await self._dialer(conn)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # whatever a custom dial raises
            self._dial_over(conn)
            why = connect_failure(e)
            self._abort(conn, why, error=describe(e))
            self._settle_awaiting(why)
            return
        self._dial_over(conn)
        self._outages.recovered(_CONNECT_REASONS)
        self._settle_awaiting("total_buffer")
        try:
            if conn.deferred is not None:  # given up on while dialing: its cause is now known
                self._abort(conn, conn.deferred)
                return
            conn.flush_queue(self._loop.time())
        except Exception as e:
            log.exception("forwarding error", flow_id=conn.flow_id)
            self._abort(conn, "error", error=describe(e))
            return
        self._advance(conn)

    def _dial_over(self, conn: Conn) -> None:
        if conn.task is not None:
            conn.task = None
            self._dialing -= 1
            if self._waiting:
                self._admit_waiting(self._loop.time())

    def _settle_awaiting(self, why: str) -> None:
        """Count the connection-less flows refused while dials hung, by the dials' outcome."""
        for flow_id in self._awaiting:
            self._count(None, why, flow_id=flow_id)
        self._awaiting.clear()

    def _advance(self, conn: Conn) -> None:
        """Move ``conn`` on after an event (or a sweep): count what the target took, end it
        when it is over. Never raises: a fault of ours drops the connection as ``error``."""
        if conn.done:
            return
        try:
            self._step(conn, self._loop.time())
        except Exception as e:
            log.exception("forwarding error", flow_id=conn.flow_id)
            self._abort(conn, "error", error=describe(e))

    def _step(self, conn: Conn, now: float) -> None:
        if conn.response_bytes:
            self._counts["response_bytes"] += conn.response_bytes
            conn.response_bytes = 0
        if conn.lost is not False:  # the socket is gone (we closed it, or the target did)
            self._conclude(conn)
            return
        if not conn.connected:
            return
        self._sync(conn)
        all_acked = self._settle(conn, now)
        if conn.ended and not conn.closing:
            self._end_step(conn, all_acked, now)

    def _end_step(self, conn: Conn, all_acked: bool, now: float) -> None:
        """A finished flow: the FIN follows its last byte at once, as the client's did,
        unless the service closed first. Once every byte is acknowledged, close when the
        target closed, or answered, or had ``end_grace`` to do either."""
        if not conn.after_service:
            conn.send_fin(now)
        if not all_acked:
            return
        if conn.server_eof:  # the target closed first: it keeps the TIME_WAIT
            conn.close("completed", hard=False)
            return
        if conn.waiting_since is None:
            conn.waiting_since = now
        if now - conn.waiting_since < self.config.end_grace:
            return
        if conn.answered:  # it answered and keeps the connection open: no FIN_WAIT2 left
            conn.close("completed", hard=True)
        elif conn.fin_at is None:  # the service closed first, the target waits for a FIN
            conn.send_fin(now)
            conn.waiting_since = now
        else:
            self._abort(conn, "unconfirmed", end_grace=self.config.end_grace)

    def _settle(self, conn: Conn, now: float) -> bool:
        """Count newly acknowledged bytes as forwarded; True if every byte pushed is."""
        acked = conn.acked()
        if acked > conn.counted:
            self._counts["bytes_forwarded"] += acked - conn.counted
            conn.counted = acked
            conn.progress_at = now
        return conn.counted == conn.pushed and not conn.queued

    def _sync(self, conn: Conn) -> int:
        """Give back to the budget what ``conn``'s transport passed to the kernel; return the
        bytes it still holds."""
        held = conn.held()
        if held < conn.budgeted:
            self._ops.release(conn.budgeted - held)
            conn.budgeted = held
        return held

    def _conclude(self, conn: Conn) -> None:
        """The socket is gone: count the connection by what the target took."""
        self._settle(conn, self._loop.time())
        if conn.outcome is not None:  # we closed it, having decided
            self._count(conn, conn.outcome)
        elif (conn.counted < conn.pushed or conn.queued or not conn.ended
              or not (conn.answered or conn.server_eof)):
            lost = conn.lost
            why = describe(lost) if isinstance(lost, BaseException) else "closed"
            self._count(conn, "reset", error=why)
        else:
            self._count(conn, "completed")

    def _abort(self, conn: Conn, why: str, **detail: object) -> None:
        """Give up on ``conn``: reset it (nothing more reaches the target), count ``why``,
        drop the rest of its flow. A buffer limit hit while still dialing waits for the
        dial's outcome, which names the cause (see :meth:`_dial`)."""
        if conn.done:
            return
        if self._current.get(conn.flow_id) is conn:
            self._dropped.add(conn.flow_id)
        conn.ended = True
        if why in _BUFFER_REASONS and conn.task is not None:
            conn.deferred = conn.deferred or why
            self._discard_queue(conn)
            return
        if conn.task is not None:
            conn.task.cancel()
            self._dial_over(conn)
        if conn.transport is not None and conn.lost is False:
            # Connected, or made but not yet flushed (a limit hit during the dial that then
            # succeeded): either way the socket holds the source port until it is closed.
            if conn.connected:
                self._settle(conn, self._loop.time())
            conn.close(why, hard=True)  # connection_lost follows, and finds conn done
        self._count(conn, why, **detail)

    def _shed_largest(self, nbytes: int, why: str) -> None:
        for conn in sorted(self._live, key=lambda c: c.budgeted, reverse=True):
            if nbytes <= 0 or not conn.budgeted:
                break
            nbytes -= conn.budgeted
            self._abort(conn, why)

    def _discard_queue(self, conn: Conn) -> None:
        self._counts["bytes_dropped"] += conn.queued
        conn.queue.clear()
        conn.queued = 0
        self._sync(conn)

    def _discard_bytes(self, n: int) -> None:
        """Bytes handed over for a connection given up on: counted, no longer held."""
        self._counts["bytes_dropped"] += n
        self._ops.release(n)

    def _count(self, conn: Conn | None, outcome: str, **detail: object) -> None:
        """Count a connection's end, once; free what it still holds."""
        if conn is not None:
            if conn.done:
                return
            conn.done = True
            self._live.discard(conn)  # it stays the flow's current one until the flow ends
            self._dialer.release(conn)
            lost = conn.pushed - conn.counted + conn.queued
            self._counts["bytes_dropped"] += lost
            self._ops.release(conn.budgeted)
            conn.budgeted = conn.queued = 0
            conn.counted = conn.pushed
            detail.setdefault("flow_id", conn.flow_id)
            if lost and outcome != "completed":
                detail["unacked_bytes"] = lost
        if outcome == "completed":
            self._counts["connections_completed"] += 1
            self._outages.recovered()
        else:
            self._counts[f"connections_dropped_{outcome}"] += 1
            self._outages.failed(outcome, 1, **detail)

    # ---------------------------------------------------------------- I/O thread: time

    def _arm_sweep(self) -> None:
        if self._sweeping is None:
            self._sweeping = self._loop.call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        """Look at every open connection: acknowledgements, stalls, deadlines, grace."""
        self._sweeping = None
        now = self._loop.time()
        self._shed_waiting(now)
        stall = self.config.stall_timeout
        for conn in list(self._live):
            if conn.done or not conn.connected or conn.closing:
                continue
            self._advance(conn)
            if conn.done or conn.closing:
                continue
            if conn.end_by is not None and now >= conn.end_by and conn.counted < conn.pushed:
                self._abort(conn, "stalled", end_timeout=self.config.end_timeout)
            elif conn.counted < conn.pushed and now - conn.progress_at >= stall:
                self._abort(conn, "stalled", stall_timeout=stall)
        if self._live:
            self._arm_sweep()

    async def _shutdown(self) -> None:
        """Wait (up to close_timeout, or until stop_waiting) for every connection to end;
        drop the rest as ``shutdown``."""
        if self._live:
            stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop_wait.wait())
            deadline = self._loop.time() + self.config.close_timeout
            while self._live and not stop.done() and self._loop.time() < deadline:
                await asyncio.wait({stop}, timeout=min(0.02, self.config.close_timeout))
            stop.cancel()
            for conn in list(self._live):
                self._abort(conn, "shutdown")
            await asyncio.sleep(0)
        self._settle_awaiting("total_buffer")  # let the resets go out
