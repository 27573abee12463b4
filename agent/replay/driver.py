"""One recorded connection replayed over one new connection to a target.

:class:`ConnDriver` is an :class:`asyncio.Protocol`: sending is driven from the callbacks
(no task per request), which keeps the per-request cost to a write and a response parse.

- Burst *i* is written once its time is due (:class:`Pacing`) and, unless ``pipeline``, once
  every request of the earlier bursts was answered. With ``pipeline`` everything due is
  written at once.
- Responses are framed by :class:`~agent.replay.http.ResponseParser` and matched to the
  requests in order; a request's latency runs from the write of its last byte to the end of
  its response.
- The connection ends well once every burst is written and, for HTTP, every request is
  answered (then it is closed), or, for other bytes, once the target closes or stays quiet
  for ``quiet`` seconds after the last write (EOF is sent first). A target that refuses,
  resets, closes early or is silent for ``timeout`` seconds while answers are due ends it
  badly, with a reason; requests sent and not answered are ``unanswered``. Nothing raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent.config import parse_target
from agent.replay.conns import Connection
from agent.replay.http import Response, ResponseParser
from agent.replay.report import Tally
from agent.sinks.source_ports import NoSourcePort, connect_from_ports

__all__ = ["ConnDriver", "Pacing", "replay_connection"]

#: Recorded time → loop time at which it is due.
Pacing = Callable[[float], float]


class ConnDriver(asyncio.Protocol):
    """Replays ``conn`` on the transport it is connected to; ``done`` gets the failure
    reason ('' if it ended well)."""

    def __init__(self, conn: Connection, due: Pacing, tally: Tally, *, pipeline: bool,
                 timeout: float, keep_bodies: bool, quiet: float = 1.0) -> None:
        self.conn = conn
        self.answers: list[Response] = []
        self._keep = keep_bodies
        self._due = due
        self.tally = tally
        self._pipeline = pipeline
        self._timeout = timeout
        self._quiet = quiet
        self._http = bool(conn.requests)
        self._parser = ResponseParser([r.method for r in conn.requests], keep_bodies)
        self._next = 0  # next burst to write
        self._sent_at: list[float] = []  # per request written: when its last byte went
        self._received = 0
        self._eof_sent = False
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()  # last write or read
        self._timer: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[str] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None

    # ------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._watch = self._loop.call_later(self._timeout, self._check_idle)
        self._send()

    def data_received(self, data: bytes) -> None:
        now = self._last = self._loop.time()
        if not self._http:
            return
        got = self._parser.feed(data)
        if got:
            self._answered(got, now)
        elif self._parser.broken:
            self._end(f"bad response ({self._parser.broken})")

    def eof_received(self) -> bool:
        last = self._parser.close() if self._http else None
        if last is not None:
            self._answered([last], self._loop.time())
        if not self.done.done():
            self._end("" if self._all_done() else "closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self._end("" if self._all_done() else "closed")
        else:
            self._end("reset" if isinstance(exc, ConnectionResetError) else
                      f"error ({type(exc).__name__})")

    # ------------------------------------------------------------ sending

    def _send(self) -> None:
        """Write every burst that may go now; schedule the next look if one waits for its
        time; finish once all went and all were answered."""
        self._timer = None
        conn, bursts, out = self.conn, self.conn.bursts, []
        now = self._loop.time()
        while self._next < len(bursts):
            burst = bursts[self._next]
            if not self._pipeline and self._next and self._received < bursts[self._next - 1].done:
                break  # waits for answers: data_received calls again
            due = self._due(burst.at)
            if due > now + 0.0005:
                self._timer = self._loop.call_at(due, self._send)
                break
            out.append(burst.data)
            self.tally.bytes_sent += len(burst.data)
            first = len(self._sent_at)
            self._sent_at += [now] * (burst.done - first)
            self.tally.requests_sent += burst.done - first
            self._next += 1
        if out and self.transport is not None:
            self.transport.writelines(out)
            self._last = now
        if self._next == len(bursts) and not self._eof_sent and not conn.requests:
            self._eof_sent = True
            if self.transport is not None and self.transport.can_write_eof():
                self.transport.write_eof()
        if self._http and self._all_done():
            self._end("")

    def _answered(self, got: list[Response], now: float) -> None:
        tally, sent_at = self.tally, self._sent_at
        for resp in got:
            i = self._received
            tally.response(resp.status, now - sent_at[i] if i < len(sent_at) else 0.0)
            if self._keep:
                self.answers.append(resp)
            self._received = i + 1
        self._send()

    def _all_done(self) -> bool:
        """Every burst written and every request answered."""
        return (self._next == len(self.conn.bursts)
                and self._received >= len(self.conn.requests))

    def _check_idle(self) -> None:
        """Silence: for HTTP with answers due, ``timeout`` fails it; for other bytes, all
        written and ``quiet`` seconds without a byte ends it well."""
        if self.done.done():
            return
        idle = self._loop.time() - self._last
        waiting = self._timer is not None  # for a burst's time, not for the target
        if not self._http and self._eof_sent and idle >= self._quiet:
            self._end("")
        elif not waiting and idle >= self._timeout:
            self._end("timeout")
        else:
            left = self._quiet if not self._http and self._eof_sent else self._timeout
            self._watch = self._loop.call_later(max(0.01, left - idle), self._check_idle)

    # ------------------------------------------------------------ ending

    def _end(self, reason: str) -> None:
        if self.done.done():
            return
        for handle in (self._timer, self._watch):
            if handle is not None:
                handle.cancel()
        if reason:
            self.tally.unanswered += max(0, len(self._sent_at) - self._received)
        self.done.set_result(reason)
        if self.transport is not None:
            if reason:
                self.transport.abort()
            else:
                self.transport.close()

    def stop(self) -> None:
        """The replay stops: close at once (not a failure)."""
        if not self.done.done():
            self.tally.stopped += 1
            self.done.set_result("stopped")
            for handle in (self._timer, self._watch):
                if handle is not None:
                    handle.cancel()
            if self.transport is not None:
                self.transport.abort()


def _connect_failure(e: BaseException) -> str:
    if isinstance(e, NoSourcePort):
        return "no_source_port"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, TimeoutError):
        return "connect_timeout"
    return f"connect_failed ({type(e).__name__})"


async def replay_connection(driver: ConnDriver, target: str,
                            source_ports: tuple[int, int] | None, timeout: float) -> str:
    """Connect to ``target`` (from a port of ``source_ports``, or any with None), run
    ``driver`` to its end; the failure reason ('' if none, 'stopped' if cancelled)."""
    loop = asyncio.get_running_loop()
    host, port = parse_target(target)
    try:
        async with asyncio.timeout(timeout):
            if source_ports is None:
                await loop.create_connection(lambda: driver, host, port)
            else:
                sock = await connect_from_ports(host, port, source_ports)
                try:
                    await loop.create_connection(lambda: driver, sock=sock)
                except BaseException:
                    sock.close()
                    raise
    except asyncio.CancelledError:
        driver.stop()
        raise
    except (OSError, TimeoutError) as e:
        reason = _connect_failure(e)
        driver.tally.failed[reason] += 1
        return reason
    try:
        reason = await asyncio.shield(driver.done)
    except asyncio.CancelledError:
        driver.stop()
        raise
    if reason == "":
        driver.tally.connections_ok += 1
    elif reason != "stopped":
        driver.tally.failed[reason.split(" (")[0]] += 1
    return reason
