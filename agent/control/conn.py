"""One control connection on the event loop (:class:`Conn`) and what connections share
(:class:`Hub`): the API, the limits, the admission table and the worker threads.

A connection goes through phases: ``head`` (reading the request line and headers, within
``head_timeout`` of connecting), ``body`` (within ``body_timeout`` of the head), ``work``
(being answered), ``write`` (the answer leaving), ``linger`` (after an early answer, what the
client still sends is read and dropped for a moment, so that closing does not reset the
connection before the client reads the answer). The whole connection lives at most
``deadline`` seconds. Nothing in a phase blocks the loop: reading is a buffer append, the
probe routes (:meth:`agent.control.api.Api.quick`) are answered on the loop, every other
route runs on a worker thread (``/metrics`` rendering, ``POST /pcap``, ``PUT /ports``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
from dataclasses import dataclass
from typing import cast

import structlog

from agent.control import http1
from agent.control.admission import Admission, client_key
from agent.control.api import Api, Request, Response, error

__all__ = ["BUSY", "Conn", "Hub", "Limits"]

log = structlog.get_logger("agent.control")

_BUSY_BODY = b'{"error": "too many control connections"}\n'
#: The answer to a connection refused at once (every held connection is being answered).
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nRetry-After: 1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
#: Bytes read and dropped after an early answer before giving up on the client.
LINGER_BYTES = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Per-connection time limits (seconds) and shared capacity limits."""

    head_timeout: float = 5.0
    body_timeout: float = 5.0
    deadline: float = 10.0
    linger: float = 1.0
    #: Requests with a body buffered at once (each ≤ 64 KiB: 32 x 64 KiB = 2 MiB at most).
    bodies: int = 32
    #: Requests queued for or running on the worker threads at once.
    pending: int = 64


class Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"
    WORK = "work"
    WRITE = "write"
    LINGER = "linger"
    CLOSED = "closed"


class Hub:
    """What every connection of one server shares. Loop thread only, except ``pool``."""

    def __init__(self, api: Api, limits: Limits, admission: Admission,
                 pool: concurrent.futures.Executor) -> None:
        self.api = api
        self.limits = limits
        self.admission = admission
        self.pool = pool
        self.bodies = 0
        self.pending = 0
        #: Connections closed by a time limit or turned away busy, by reason. Fixed keys:
        #: any thread may read them.
        self.counts = dict.fromkeys(("head_timeout", "body_timeout", "deadline", "busy"), 0)

    def sweep(self, now: float) -> None:
        """Close every connection past its phase's time limit or its deadline."""
        for conn in self.admission:
            cast(Conn, conn).expire(now)


class Conn(asyncio.Protocol):
    """One connection: at most one request, then closed (see the module doc)."""

    def __init__(self, hub: Hub, loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.loop = loop
        self.phase = Phase.HEAD
        self.key = ""
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._need = 0
        self._req: Request | None = None
        self._body_slot = False
        self._lingered = 0
        self._future: asyncio.Future[Response] | None = None
        born = loop.time()
        self._deadline = born + hub.limits.deadline
        self._phase_end = born + hub.limits.head_timeout

    @property
    def sheddable(self) -> bool:
        return self.phase is not Phase.WORK

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.key = client_key(str(peer[0])) if peer else ""
        if not self.hub.admission.admit(self):
            self.phase = Phase.CLOSED
            self.transport.write(BUSY)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.HEAD:
            self._more_head(data)
        elif self.phase is Phase.BODY:
            self._buf += data
            if len(self._buf) >= self._need:
                assert self._req is not None
                body, self._buf = bytes(self._buf[:self._need]), bytearray()
                self._dispatch(Request(self._req.method, self._req.path, self._req.headers,
                                       body))
        elif self.phase is Phase.LINGER:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self._close()

    def eof_received(self) -> bool:
        """A half-close keeps the connection for the answer once the request is whole."""
        return self.phase in (Phase.WORK, Phase.WRITE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        if self._future is not None:
            self._future.cancel()  # the client is gone: its queued request need not run
        self.hub.admission.release(self)
        if self._body_slot:
            self._body_slot = False
            self.hub.bodies -= 1

    # ------------------------------------------------------------ limits

    def shed(self) -> None:
        """Closed to make room for another connection."""
        self._close(abort=self.phase is Phase.WRITE)

    def expire(self, now: float) -> None:
        """Close if past the deadline or the phase's time limit (counted by reason)."""
        timed = self.phase in (Phase.HEAD, Phase.BODY, Phase.LINGER)
        if now >= self._deadline:
            why = "deadline"
        elif timed and now >= self._phase_end:
            why = f"{self.phase.value}_timeout"
        else:
            return
        if self.phase is not Phase.LINGER:
            self.hub.counts[why] += 1
        self._close(abort=self.phase in (Phase.WRITE, Phase.WORK))

    def _close(self, abort: bool = False) -> None:
        self.phase = Phase.CLOSED
        if self._future is not None:
            self._future.cancel()  # not run at all if it was still queued
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    # ------------------------------------------------------------ the request

    def _more_head(self, data: bytes) -> None:
        start = len(self._buf)
        self._buf += data
        end = http1.head_end(self._buf, start)
        too_big = http1.oversized(self._buf if end < 0 else self._buf[:end])
        if too_big is not None:
            self._answer(too_big, linger=True)
            return
        if end < 0:
            return
        head, rest = self._buf[:end], self._buf[end:]
        self._buf = bytearray()
        parsed = http1.parse_head(head)
        if isinstance(parsed, Response):
            self._answer(parsed, linger=True)
            return
        self._req = parsed
        early = self.hub.api.precheck(parsed)
        if early is not None:
            self._answer(early, linger=parsed.headers.get("content-length", "0").strip()
                         not in ("", "0"))
            return
        self._need = int(parsed.headers.get("content-length", "0").strip() or "0")
        if self._need == 0:
            self._dispatch(parsed)
        elif self.hub.bodies >= self.hub.limits.bodies:
            self.hub.counts["busy"] += 1
            self._answer(error(503, "too many control requests with a body at once",
                               ("Retry-After", "1")), linger=True)
        else:
            self.hub.bodies += 1
            self._body_slot = True
            self.phase = Phase.BODY
            self._phase_end = self.loop.time() + self.hub.limits.body_timeout
            self.data_received(bytes(rest))

    def _dispatch(self, req: Request) -> None:
        """Answer ``req``: on the loop if it is a probe, else on a worker thread."""
        assert self.transport is not None
        self.phase = Phase.WORK
        self.transport.pause_reading()
        if self._body_slot:
            self._body_slot = False
            self.hub.bodies -= 1
        if self.hub.api.quick(req):
            self._answer(_handle(self.hub.api, req))
            return
        if self.hub.pending >= self.hub.limits.pending:
            self.hub.counts["busy"] += 1
            self._answer(error(503, "control server busy", ("Retry-After", "1")))
            return
        self.hub.pending += 1
        self._future = self.loop.run_in_executor(self.hub.pool, _handle, self.hub.api, req)
        self._future.add_done_callback(self._worked)

    def _worked(self, future: asyncio.Future[Response]) -> None:
        self.hub.pending -= 1
        self._future = None
        if self.phase is Phase.WORK and not future.cancelled():
            self._answer(future.result())  # else closed meanwhile (deadline, stopping)

    def _answer(self, resp: Response, linger: bool = False) -> None:
        """Send ``resp`` and close; with ``linger``, first read what the client still
        sends (it may not have read the answer otherwise)."""
        assert self.transport is not None
        head_only = self._req is not None and self._req.method == "HEAD"
        self.transport.write(http1.render(resp, head_only=head_only))
        log.debug("control request", client=self.key, status=resp.status,
                  line=f"{self._req.method} {self._req.path}" if self._req else None)
        if not linger:
            self.phase = Phase.WRITE
            self.transport.close()
            return
        self.phase = Phase.LINGER
        self._phase_end = self.loop.time() + self.hub.limits.linger
        self._buf = bytearray()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()


def _handle(api: Api, req: Request) -> Response:
    """The API's answer; 500 (logged) if it raised."""
    try:
        return api.handle(req)
    except Exception:
        log.exception("control request failed", method=req.method, path=req.path)
        return error(500, "internal error (see the agent's log)")
