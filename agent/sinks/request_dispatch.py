"""The I/O thread of the request-level forward sink (:mod:`agent.sinks.request_forward`):
each flow's bytes framed into requests (:mod:`agent.sinks.http_request`), each request given a
pooled keep-alive connection (:mod:`agent.sinks.request_pool`) when one is free, its response
read whole, and every request counted once, completed or dropped with its reason.

Everything here runs on the sink's event loop thread, which alone writes :attr:`Dispatcher.
counts`: the request counters, one increment per change.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable

import structlog

from agent.metrics import FORWARD_REQUEST_DROP_REASONS as DROP_REASONS
from agent.mirror.config import ForwardConfig
from agent.sinks.http_request import Dropped, Framed, Request, RequestFramer
from agent.sinks.http_response import BadResponse
from agent.sinks.outage import OutageLog
from agent.sinks.request_pool import PoolConn
from agent.sinks.shadow_conn import Dialer, connect_failure, describe

__all__ = ["IDLE_CLOSE", "OP_DATA", "OP_END", "OP_LOST", "Dispatcher", "Op"]

log = structlog.get_logger("agent.forward")

OP_DATA, OP_LOST, OP_END = range(3)
#: A hand-over from the mirror thread: (kind, flow id, data, gap before it, bytes refused,
#: request lines in them).
Op = tuple[int, int, bytes, int, int, int]
_CONNECT_REASONS = frozenset({"connect_failed", "connect_timeout", "no_source_port"})
_SWEEP = 0.1  # seconds between looks at stalls, waits and idle connections
#: Seconds an idle pooled connection is kept (under common servers' keep-alive timeouts).
IDLE_CLOSE = 4.0


class _Flow:
    """One captured connection's requests: framed, in order; the first is waiting for a
    pooled connection (``waiting``) or on one (``conn``)."""

    __slots__ = ("conn", "ended", "flow_id", "framer", "in_ready", "queue", "waiting")

    def __init__(self, flow_id: int, framer: RequestFramer) -> None:
        self.flow_id = flow_id
        self.framer = framer
        self.queue: deque[Request] = deque()
        self.waiting = False  # its first request waits for a pooled connection
        self.in_ready = False  # it is in the ready queue (maybe no longer waiting)
        self.conn: PoolConn | None = None
        self.ended = False


class Dispatcher:
    """Frames, sends and counts (see the module doc). ``release`` gives bytes back to the
    hand-off's budget; ``dead``: flows whose bytes the mirror thread may drop at once (this
    adds them, and discards them at their end)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: ForwardConfig,
                 dialer: Dialer, release: Callable[[int], None], dead: set[int],
                 outages: OutageLog) -> None:
        self.config = config
        self.counts: Counter[str] = Counter()
        self._loop = loop
        self._dialer = dialer
        self._release_bytes = release
        self._dead = dead
        self._outages = outages
        self._flows: dict[int, _Flow] = {}
        self._ready: deque[_Flow] = deque()  # flows whose first request waits, oldest first
        self._idle: list[PoolConn] = []
        self._conns: set[PoolConn] = set()  # connected or dialing
        self._dialing = 0
        self._sweeping: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- intake

    def apply(self, op: Op) -> None:
        """Frame one hand-over: data, refused bytes, or the flow's end."""
        kind, flow_id, data, gap, lost, starts = op
        flow = self._flows.get(flow_id)
        if flow is None:
            cfg = self.config
            framer = RequestFramer(max_request=cfg.max_flow_buffer)
            flow = self._flows[flow_id] = _Flow(flow_id, framer)
        framer = flow.framer
        if gap:
            self._framed(flow, framer.hole(gap, "gap"))
        if kind == OP_DATA:
            self._framed(flow, framer.feed(data))
        elif kind == OP_LOST:
            self._framed(flow, framer.hole(lost, "total_buffer", starts))
        else:
            self._framed(flow, framer.end())
            flow.ended = True
            self._dead.discard(flow_id)
            self._forget(flow)
            return
        if framer.dead:
            self._dead.add(flow_id)

    def fail_op(self, op: Op) -> None:
        """A fault of ours while framing ``op`` (called in its ``except``): the flow is given
        up, its held bytes and ``op``'s dropped, counted as one request (``error``)."""
        log.exception("forwarding error", flow_id=op[1])
        flow = self._flows.get(op[1])
        lost = len(op[2]) + (flow.framer.give_up() if flow is not None else 0)
        self.counts["bytes_dropped"] += lost
        self._release_bytes(lost)
        self.counts["requests"] += 1
        self.counts["requests_dropped_error"] += 1
        if flow is not None and op[0] != OP_END:
            self._dead.add(op[1])

    def _framed(self, flow: _Flow, items: list[Framed]) -> None:
        """Count what the framer made: queue whole requests, drop the rest."""
        counts = self.counts
        for item in items:
            if type(item) is Dropped:
                if item.size:
                    counts["bytes_dropped"] += item.size
                    self._release_bytes(item.size)
                if item.reason is not None:
                    counts["requests"] += 1
                    counts[f"requests_dropped_{item.reason}"] += 1
                    self._outages.failed(item.reason, 1, flow_id=flow.flow_id)
                continue
            assert isinstance(item, Request)
            counts["requests"] += 1
            flow.queue.append(item)
            if len(flow.queue) == 1 and flow.conn is None:
                self._make_ready(flow)

    def _make_ready(self, flow: _Flow, first: bool = False) -> None:
        """``flow``'s first request waits for a pooled connection (``first``: before all, a
        retry: its wait goes on from when it began)."""
        flow.waiting = True
        if not first:
            flow.queue[0].ready_at = self._loop.time()
        if not flow.in_ready:
            flow.in_ready = True
            if first:
                self._ready.appendleft(flow)
            else:
                self._ready.append(flow)

    def _forget(self, flow: _Flow) -> None:
        if flow.ended and not flow.queue and flow.conn is None:
            self._flows.pop(flow.flow_id, None)
            flow.waiting = False

    # ---------------------------------------------------------------- the pool

    def pump(self) -> None:
        """Give waiting requests the idle connections; dial more while some wait and the
        pool has room."""
        ready, idle = self._ready, self._idle
        while ready and idle:
            flow = ready.popleft()
            flow.in_ready = False
            if flow.waiting and flow.queue:
                self._dispatch(idle.pop(), flow)
        while len(ready) > self._dialing and len(self._conns) < self.config.pool_size:
            self._start_dial()

    def _dispatch(self, conn: PoolConn, flow: _Flow) -> None:
        flow.waiting = False
        flow.conn = conn
        try:
            conn.send(flow.queue[0], flow.flow_id, self._loop.time())
        except Exception as e:  # a fault of ours: counted, never raised into the loop
            log.exception("forwarding error", flow_id=flow.flow_id)
            self._fail(conn, "error", e)

    def _start_dial(self) -> None:
        conn = PoolConn(self)
        self._conns.add(conn)
        self._dialing += 1
        conn.task = self._loop.create_task(self._dial(conn))

    async def _dial(self, conn: PoolConn) -> None:
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await self._dialer(conn)
        except asyncio.CancelledError:
            self._dial_over(conn)
            raise
        except Exception as e:  # whatever a custom dial raises
            self._dial_over(conn)
            self._conns.discard(conn)
            self._dial_failed(connect_failure(e), e)
            return
        self._dial_over(conn)
        if not conn.lost and not conn.closing:
            self._outages.recovered(_CONNECT_REASONS)
            self._to_idle(conn)
        self.pump()

    def _dial_over(self, conn: PoolConn) -> None:
        if conn.task is not None:
            conn.task = None
            self._dialing -= 1

    def _dial_failed(self, why: str, error: Exception) -> None:
        """A dial failed: the oldest waiting request is dropped for it; every waiting one if
        no connection is open or being made (the shadow is unreachable)."""
        unreachable = not self._dialing and not any(c.connected for c in self._conns)
        while self._ready:
            flow = self._ready.popleft()
            flow.in_ready = False
            if flow.waiting and flow.queue:
                self._next(flow, why, error=describe(error))
                if not unreachable:
                    break
        self.pump()

    def _to_idle(self, conn: PoolConn) -> None:
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        self.arm_sweep()

    # ---------------------------------------------------------------- PoolConn events

    def conn_made(self, conn: PoolConn) -> None:
        self.counts["pool_connections"] += 1

    def response_data(self, conn: PoolConn, data: bytes) -> None:
        self.counts["response_bytes"] += len(data)
        conn.progress_at = self._loop.time()
        conn.answered = True
        if conn.closing:
            return
        try:
            whole = conn.framer.feed(data)
        except BadResponse as e:
            self._fail(conn, "bad_response", e)
            return
        if whole:
            self._answered(conn)

    def response_eof(self, conn: PoolConn) -> None:
        if conn.request is not None and conn.framer.eof():
            self._answered(conn)  # a body read to the close

    def conn_lost(self, conn: PoolConn, exc: Exception | None) -> None:
        """The connection is gone: a request still on it is dropped (``reset``), or sent
        once more if the connection had served others and nothing of this one's response
        came (the shadow closed it as the request went out)."""
        self._release(conn)
        if conn.connected:
            self.counts["pool_connections_closed"] += 1
        request = conn.request
        if request is not None and not conn.closing:
            conn.request = None
            flow = self._flows[conn.flow_id]
            flow.conn = None
            if conn.served and not conn.answered and not request.retried:
                request.retried = True
                self.counts["requests_retried"] += 1
                self._make_ready(flow, first=True)
            else:
                why = describe(exc) if exc is not None else "closed by the shadow"
                self._next(flow, "reset", error=why)
        self.pump()

    def _answered(self, conn: PoolConn) -> None:
        """The awaited response is whole: the request is completed; the connection takes
        the next one, or closes if the shadow said so."""
        conn.served += 1
        request, conn.request = conn.request, None
        flow = self._flows[conn.flow_id]
        flow.conn = None
        self._next(flow, None)
        if conn.framer.reusable and not conn.lost and not (request and request.close):
            self._to_idle(conn)
        else:
            self._close(conn, hard=False)
        self.pump()

    def _fail(self, conn: PoolConn, why: str, error: Exception) -> None:
        """Give up on ``conn``: its request is dropped for ``why``, the connection reset."""
        request = conn.request
        if request is not None:
            conn.request = None
            flow = self._flows[conn.flow_id]
            flow.conn = None
            self._next(flow, why, error=describe(error))
        self._close(conn, hard=True)
        self.pump()

    def _close(self, conn: PoolConn, hard: bool) -> None:
        self._release(conn)
        conn.close(hard)

    def _release(self, conn: PoolConn) -> None:
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._dialer.release(conn)

    # ---------------------------------------------------------------- counting

    def _next(self, flow: _Flow, why: str | None, **detail: object) -> None:
        """``flow``'s first request is over (completed if ``why`` is None); its next one, if
        any, waits for a pooled connection."""
        request = flow.queue.popleft()
        self._count(request, why, flow_id=flow.flow_id, **detail)
        flow.waiting = False
        if flow.queue:
            self._make_ready(flow)
        else:
            self._forget(flow)

    def _count(self, request: Request, why: str | None, **detail: object) -> None:
        counts = self.counts
        if why is None:
            counts["requests_completed"] += 1
            counts["bytes_forwarded"] += request.size
            self._outages.recovered()
        else:
            counts[f"requests_dropped_{why}"] += 1
            counts["bytes_dropped"] += request.size
            self._outages.failed(why, 1, **detail)
        self._release_bytes(request.size)

    def in_flight(self) -> int:
        c = self.counts
        dropped = sum(c.get(f"requests_dropped_{r}", 0) for r in DROP_REASONS)
        return c.get("requests", 0) - c.get("requests_completed", 0) - dropped

    def shed_largest(self, nbytes: int, why: str) -> None:
        """Drop the queued requests (not one on a connection) of the largest flows."""
        flows = sorted(self._flows.values(), key=lambda f: sum(r.size for r in f.queue),
                       reverse=True)
        for flow in flows:
            if nbytes <= 0:
                break
            keep = 1 if flow.conn is not None else 0
            while len(flow.queue) > keep:
                request = flow.queue.pop()
                nbytes -= request.size
                self._count(request, why, flow_id=flow.flow_id)
            if not flow.queue:
                flow.waiting = False
                self._forget(flow)

    def drop_all(self, why: str) -> None:
        """Every request still queued or awaiting its response is dropped as ``why``."""
        for conn in list(self._conns):
            conn.request = None
            self._close(conn, hard=True)
        for flow in list(self._flows.values()):
            while flow.queue:
                self._count(flow.queue.popleft(), why, flow_id=flow.flow_id)
            flow.conn = None
            flow.waiting = False
            self._forget(flow)
        self._ready.clear()
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None

    def end_all(self) -> None:
        """Every flow ends now (what a framer still holds is dropped)."""
        for flow in list(self._flows.values()):
            self._framed(flow, flow.framer.end())
            flow.ended = True
            self._forget(flow)

    # ---------------------------------------------------------------- time

    def arm_sweep(self) -> None:
        if self._sweeping is None and not self._loop.is_closed():
            self._sweeping = self._loop.call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        """Stalled requests, requests waiting too long, idle connections kept too long."""
        self._sweeping = None
        now = self._loop.time()
        limit = self.config.response_timeout
        for conn in list(self._conns):
            if conn.request is not None:
                if not conn.moved(now) and now - conn.progress_at > limit:
                    self._fail(conn, "stalled", TimeoutError(f"no answer in {limit:g} s"))
            elif conn in self._idle and now - conn.idle_since > IDLE_CLOSE:
                self._close(conn, hard=False)
        ready = self._ready  # oldest first: only its front can have waited too long
        while ready:
            flow = ready[0]
            waited = now - flow.queue[0].ready_at if flow.waiting and flow.queue else -1.0
            if 0 <= waited <= limit:
                break
            ready.popleft()
            flow.in_ready = False
            if waited > limit:
                self._next(flow, "overload", waited=round(waited, 3))
        if self._conns or self._flows:
            self.arm_sweep()
        self.pump()
