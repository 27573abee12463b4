"""One pooled keep-alive connection to the shadow, for the request-level forward sink
(:mod:`agent.sinks.request_forward`), and how it is dialed.

A :class:`PoolConn` carries one request at a time: :meth:`~PoolConn.send` writes it and arms
its :class:`~agent.sinks.http_response.ResponseFramer`; what the shadow answers is parsed and
discarded as it comes, and every event goes to the sink (:class:`PoolEvents`), which does the
counting. All of it runs on the sink's I/O thread.

Dialing (:class:`agent.sinks.shadow_conn.Dialer`, as for connection mode) binds a port of
the reserved source-port range
(:func:`agent.sinks.source_ports.connect_from_ports`), so the capture skips the agent's own
connections; a custom ``dial`` runs in a worker thread and picks its own port.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import structlog

from agent.sinks.http_request import Request
from agent.sinks.http_response import ResponseFramer
from agent.sinks.shadow_conn import Dialed, close_transport

__all__ = ["PoolConn", "PoolEvents"]

log = structlog.get_logger("agent.forward")


class PoolEvents(Protocol):
    """What a :class:`PoolConn` tells its sink."""

    def conn_made(self, conn: PoolConn) -> None: ...

    def response_data(self, conn: PoolConn, data: bytes) -> None: ...

    def response_eof(self, conn: PoolConn) -> None: ...

    def conn_lost(self, conn: PoolConn, exc: Exception | None) -> None: ...


class PoolConn(Dialed):
    """A keep-alive connection of the pool; its state is the sink's I/O thread's."""

    __slots__ = ("answered", "buffered", "closing", "connected", "events", "flow_id",
                 "framer", "idle_since", "lost", "progress_at", "request", "served",
                 "sock", "task", "transport")

    def __init__(self, events: PoolEvents) -> None:
        super().__init__()
        self.events = events
        self.transport: asyncio.Transport | None = None
        self.sock: Any = None
        self.framer = ResponseFramer()
        self.request: Request | None = None  # the request whose response is awaited
        self.flow_id = 0  # the flow that request is of
        self.served = 0  # responses read whole
        self.answered = False  # the awaited response began
        self.progress_at = 0.0  # last time the shadow took or sent something
        self.buffered = 0  # bytes in the transport's write buffer at the last look
        self.idle_since = 0.0
        self.task: asyncio.Task[None] | None = None  # the dial, until connected
        self.connected = False
        self.closing = False  # closed by the sink
        self.lost = False  # connection_lost ran

    # ------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        self.connected = True
        self.events.conn_made(self)

    def data_received(self, data: bytes) -> None:
        self.events.response_data(self, data)

    def eof_received(self) -> bool:
        self.events.response_eof(self)
        return False  # close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.events.conn_lost(self, exc)

    # ------------------------------------------------------------ the sink's verbs

    def send(self, request: Request, flow_id: int, now: float) -> None:
        """Write ``request`` (of ``flow_id``); its response is awaited from now."""
        assert self.transport is not None
        self.request = request
        self.flow_id = flow_id
        self.answered = False
        self.progress_at = now
        self.framer.expect(request.head_only)
        self.transport.write(request.data)
        self.buffered = self.transport.get_write_buffer_size()

    def moved(self, now: float) -> bool:
        """Whether the shadow took request bytes since the last look (for stall checks)."""
        if self.transport is None:
            return False
        buffered = self.transport.get_write_buffer_size()
        moved = buffered < self.buffered
        self.buffered = buffered
        if moved:
            self.progress_at = now
        return moved

    def close(self, hard: bool) -> None:
        """Close; ``hard`` resets it (no TIME_WAIT, nothing more reaches the shadow)."""
        self.closing = True
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            close_transport(self.transport, self.sock, hard)
