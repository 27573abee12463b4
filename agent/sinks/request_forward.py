"""Request-level forwarding (``--forward-mode request``): each captured HTTP/1.x request, after
the forward hooks, on a bounded pool of keep-alive connections to the shadow.

For HTTP/1.x only: the flow's bytes are framed into whole requests
(:mod:`agent.sinks.http_request`, which also says what is not sent, and why); a flow that is
not HTTP/1.x from its start is dropped (``not_http``), and its bytes with it. Connection mode
(:mod:`agent.sinks.forward`) is the one for any other protocol. Service-side connection churn
costs the shadow nothing here: at most ``pool_size`` connections are open to it, each carrying
one request at a time and reading its response whole (:mod:`agent.sinks.http_response`)
before the next; a flow's requests go in order, one at a time, each on whichever pooled
connection is free.

Per request, byte-exact as the hooks passed it, except: an HTTP/1.1 request's ``Connection:
close`` token is removed (the header goes if nothing is left), so the pooled connection stays
open. An HTTP/1.0 request goes as it is, and one without ``keep-alive`` closes its pooled
connection after its response, as does a shadow that says ``Connection: close`` or reads a
body to the close: that costs a reconnect, nothing else. Idle pooled connections are closed
after :data:`~agent.sinks.request_dispatch.IDLE_CLOSE` seconds. ``CONNECT`` and ``Upgrade:``
requests are not forwarded: a tunnel cannot share a pooled connection, so the request and the
rest of its flow are dropped (``upgrade``); use connection mode for such services.

Accounting, the contract: every request handed to the sink (framed whole, or cut) ends
exactly once, **completed** (its whole response was read) or **dropped** with one reason:

==================  ======================================================================
``connect_failed``  no pooled connection: refused, unreachable, or a custom dial raised
``connect_timeout`` no pooled connection within ``connect_timeout``
``no_source_port``  every reserved source port is taken for the target
``reset``           the shadow closed or reset the connection before the whole response
``bad_response``    the shadow's answer is not an HTTP/1.x response
``stalled``         the shadow neither took nor answered anything for ``response_timeout``
``overload``        waited for a free pooled connection longer than ``response_timeout``
``flow_buffer``     the request is larger than ``max_flow_buffer``
``total_buffer``    the hand-off's budget was full: the request's bytes were refused
``memory``          shed by the memory guard (:meth:`RequestForwardSink.shed`)
``shutdown``        still queued or awaiting its response when :meth:`close` stopped waiting
``gap``             bytes of it are missing from the capture
``not_http``        no HTTP/1.x request where one must start
``unframed``        header block too large, or a body length that is none
``upgrade``         ``CONNECT`` or ``Upgrade:`` (the rest of the flow is dropped with it)
``incomplete``      the captured connection ended inside it
``error``           a fault of the sink itself
==================  ======================================================================

so ``requests == completed + dropped + in_flight`` at every look: every request counter is
written by the I/O thread only, each change is one increment, :attr:`stats` copies them at
once, and ``requests_in_flight`` is derived, never written. A request whose pooled connection
closes before any byte of its response, after serving others (the shadow closed an idle
keep-alive connection as the request went out), is sent once more on another
(``requests_retried``); so a shadow that reads a request and then closes without a word may
see it twice. Requests wholly inside bytes the hand-off refused are counted
(``total_buffer``) by their request lines, since they are never framed.

``bytes_forwarded``: stream bytes of completed requests; ``bytes_dropped``: every other byte
handed over (a request's bytes are counted as captured, before the ``Connection`` rewrite).
``pool_connections`` (opened) and ``pool_connections_open``; ``response_bytes`` read.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter

import structlog

from agent.metrics import FORWARD_REQUEST_DROP_REASONS as DROP_REASONS
from agent.mirror.config import Dial, ForwardConfig
from agent.mirror.handoff import Handoff, HandoffStats, Policy
from agent.sinks.outage import OutageLog
from agent.sinks.request_dispatch import OP_DATA, OP_END, OP_LOST, Dispatcher, Op
from agent.sinks.shadow_conn import Dialer, stop_io_loop

__all__ = ["DROP_REASONS", "RequestForwardSink"]

log = structlog.get_logger("agent.forward")

#: Request lines at the start of a refused piece or of a line in it (counted, not framed).
_STARTS = re.compile(rb"(?:^|\n)[A-Z]{3,12} \S+ HTTP/1\.[01]\r\n")


class RequestForwardSink:
    """Forwards each captured HTTP/1.x request to ``target`` over a pool of keep-alive
    connections; the forward sink's interface (:class:`agent.sinks.forward.ForwardSink`).
    The mirror thread only hands bytes over (a :class:`~agent.mirror.handoff.Handoff` with the drop
    policy, never waiting); an asyncio loop in the ``forward`` thread does the rest
    (:class:`~agent.sinks.request_dispatch.Dispatcher`)."""

    def __init__(self, target: str, dial: Dial | None = None,
                 config: ForwardConfig | None = None) -> None:
        self.target = target
        self.config = cfg = config or ForwardConfig()
        dialer = Dialer(target, dial, cfg.source_ports, cfg.source_addrs)
        self._mcounts: Counter[str] = Counter()  # mirror thread's: refused bytes
        self._ops: Handoff[Op] = Handoff("forward", cfg.max_total_buffer, Policy.DROP,
                                         release_on_take=False)
        self._uncommitted = False  # mirror thread: ops put since the last commit()
        self._open: set[int] = set()  # mirror thread: flows that sent data, not ended
        self._dead: set[int] = set()  # the I/O thread adds and discards; the mirror reads
        self._stop_wait = asyncio.Event()
        self._loop = asyncio.new_event_loop()
        outages = OutageLog(log, "forwarding failed", "target reachable again",
                            cfg.log_interval, target=target)
        self._io = Dispatcher(self._loop, cfg, dialer, self._ops.release, self._dead, outages)
        self._thread = threading.Thread(target=self._loop.run_forever, name="forward",
                                        daemon=True)
        self._thread.start()
        log.info("forwarding requests", target=target, pool_size=cfg.pool_size,
                 response_timeout=cfg.response_timeout)

    # ---------------------------------------------------------------- mirror thread

    def send(self, flow_id: int, data: bytes, gap: int = 0) -> None:
        """Queue ``data`` of ``flow_id`` (``gap`` bytes missing before it). Bytes the budget
        refuses are a hole in the flow: the requests they hold or cut are dropped
        (``total_buffer``); those wholly inside are counted by their request lines."""
        if flow_id in self._dead:
            self._mcounts["bytes_dropped"] += len(data)
            return
        self._open.add(flow_id)
        self._uncommitted = True
        if not self._ops.put((OP_DATA, flow_id, data, gap, 0, 0), len(data), "total_buffer"):
            self._mcounts["bytes_dropped"] += len(data)
            starts = len(_STARTS.findall(data))
            self._ops.put((OP_LOST, flow_id, b"", gap, len(data), starts), 0)

    def end(self, flow_id: int, after_service: bool = False) -> None:
        """The flow is over: a request it left unfinished is dropped (``incomplete``).
        ``after_service`` is the connection sink's concern, not this one's."""
        if flow_id in self._open:
            self._open.discard(flow_id)
            self._ops.put((OP_END, flow_id, b"", 0, 0, 0), 0)
            self._uncommitted = True

    def commit(self) -> None:
        """Wake the I/O thread for the work queued (once per batch)."""
        if self._uncommitted:
            self._uncommitted = False
            self._loop.call_soon_threadsafe(self._take_ops)

    def close(self) -> None:
        """Deliver what is queued (up to ``close_timeout`` seconds); what is still queued or
        awaiting its response then is dropped as ``shutdown``."""
        for flow_id in list(self._open):
            self.end(flow_id)
        self.commit()
        self._ops.close()
        stop_io_loop(self._loop, self._thread, self._shutdown(),
                     self.config.close_timeout + 2, self._count_leftovers)

    def stop_waiting(self) -> None:
        """Cut :meth:`close`'s wait short (any thread, or a signal handler)."""
        self._loop.call_soon_threadsafe(self._stop_wait.set)

    def shed(self, nbytes: int, why: str = "memory") -> None:
        """Any thread: drop (as ``why``) the queued requests of the flows holding the most
        bytes, until ``nbytes`` are freed (for the memory guard)."""
        self._loop.call_soon_threadsafe(self._io.shed_largest, nbytes, why)

    @property
    def queued_bytes(self) -> int:
        return self._ops.queued_bytes

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.mirror.handoff.HasHandoffs`: this stage's hand-off."""
        return [self._ops.stats()]

    def handoff_stats(self) -> HandoffStats:
        return self._ops.stats()

    @property
    def stats(self) -> Counter[str]:
        """Every counter; ``requests_in_flight`` and ``pool_connections_open`` derived from
        one copy of the I/O thread's counters, so the equation holds in every snapshot."""
        io = dict(self._io.counts)  # one C-level copy under the GIL
        total = Counter(dict(self._mcounts))
        total.update(io)
        dropped = sum(io.get(f"requests_dropped_{r}", 0) for r in DROP_REASONS)
        total["requests"] += 0
        total["requests_completed"] += 0
        total["requests_dropped"] = dropped
        total["requests_in_flight"] = (io.get("requests", 0)
                                       - io.get("requests_completed", 0) - dropped)
        total["pool_connections_open"] = (io.get("pool_connections", 0)
                                          - total.pop("pool_connections_closed", 0))
        return total

    # ---------------------------------------------------------------- I/O thread

    def _take_ops(self) -> None:
        io = self._io
        for op in self._ops.take_all(0):
            try:
                io.apply(op)
            except Exception:  # a fault of ours: that flow is given up, counted
                io.fail_op(op)
        io.pump()
        io.arm_sweep()

    async def _shutdown(self) -> None:
        """Wait (up to close_timeout, or until stop_waiting) for every request to end; drop
        the rest as ``shutdown``."""
        self._take_ops()
        stop: asyncio.Future[object] = asyncio.ensure_future(self._stop_wait.wait())
        deadline = self._loop.time() + self.config.close_timeout
        while self._io.in_flight() and not stop.done() and self._loop.time() < deadline:
            await asyncio.wait({stop}, timeout=0.02)
        stop.cancel()
        self._io.drop_all("shutdown")
        await asyncio.sleep(0)  # let the resets go out

    def _count_leftovers(self) -> None:
        """After the loop stopped (this thread is now the only one): hand-overs it did not
        take are framed and their requests dropped as ``shutdown``, so the counts add up."""
        for op in self._ops.leftovers():
            self._io.apply(op)
        self._io.end_all()
        self._io.drop_all("shutdown")
