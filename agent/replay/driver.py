"""One recorded connection replayed over one new connection to a target.

:class:`ConnDriver` is an :class:`asyncio.Protocol`: sending is driven from the callbacks
(no task per request), which keeps the per-request cost to a write and a response parse.

- The bursts come from the recorded connection as it is read (a
  :class:`~agent.replay.conns.Cursor`). A burst is written once its time is due (``base``,
  the loop time the pass started, plus its ``due``) and, unless ``pipeline``, once every
  request sent before it was answered if it came after an answer (or the recording holds
  none). With ``pipeline`` everything due is written at once. A burst not read yet is
  waited for, without counting against ``timeout``.
- Responses are framed by :class:`~agent.replay.http.ResponseParser` and matched to the
  requests in order; a request's latency runs from the write of its last byte to the end of
  its response. With a :class:`~agent.replay.diff.Pairing` every response goes to it too.
- The connection ends well once every burst is written and, for HTTP, every request is
  answered (then it is closed), or, for other bytes, once the target closes or stays quiet
  for ``quiet`` seconds after the last write (EOF is sent first). A target that refuses,
  resets, closes early or is silent for ``timeout`` seconds while answers are due ends it
  badly, with a reason; requests sent and not answered are ``unanswered``. Stopped (the
  replay's end: a signal, ``--duration``) it is closed at once and counted ``stopped``; its
  requests sent and not answered by then, ``unanswered_at_stop``. So every request sent is
  answered, unanswered or unanswered at stop. Nothing raises.
"""

from __future__ import annotations

import asyncio
from collections import deque

from agent.mirror.config import parse_target
from agent.replay.conns import Cursor
from agent.replay.diff import Pairing
from agent.replay.http import Response, ResponseParser
from agent.replay.report import Tally
from agent.sinks.source_ports import (
    NoSourcePort,
    Slot,
    connect_from_ports,
    release_source_port,
)

__all__ = ["ConnDriver", "replay_connection"]


class ConnDriver(asyncio.Protocol):
    """Replays the connection of ``cursor`` on the transport it is connected to; ``done``
    gets the failure reason ('' if it ended well, 'stopped' if stopped). ``side``: its
    place in ``pairing`` (0 the target, 1 the baseline)."""

    def __init__(self, cursor: Cursor, base: float, tally: Tally, *, pipeline: bool,
                 timeout: float, pairing: Pairing | None = None, side: int = 0,
                 quiet: float = 1.0) -> None:
        self.cursor = cursor
        self.tally = tally
        self._base = base
        self._pipeline = pipeline
        self._timeout = timeout
        self._quiet = quiet
        self._pairing = pairing
        self._side = side
        self._parser = ResponseParser((), keep_bodies=pairing is not None)
        self._inflight: deque[float] = deque()  # per request sent, not answered: when
        self._eof_sent = False
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()  # last write or read
        self._timer: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[str] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None

    @property
    def _http(self) -> bool:
        return self.cursor.conn.requests > 0

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

    def _wake(self) -> None:
        self._loop.call_soon(self._send)

    def _send(self) -> None:
        """Write every burst that may go now; schedule the next look if one waits for its
        time, or ask for more if none was read yet; finish once all went and all were
        answered."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.done.done():
            return
        cursor, out, now = self.cursor, [], self._loop.time()
        while True:
            burst = cursor.peek()
            if burst is None:
                if cursor.exhausted or not cursor.want(self._wake):
                    break
                continue
            if self._inflight and not self._pipeline and (
                    burst.after_answer or not cursor.conn.feeder.answers_seen):
                break  # waits for answers: data_received calls again
            due = self._base + burst.due
            if due > now + 0.0005:
                self._timer = self._loop.call_at(due, self._send)
                break
            out.append(burst.data)
            self.tally.bytes_sent += len(burst.data)
            for req in burst.requests:
                self._inflight.append(now)
                self._parser.expect(req.method)
            self.tally.requests_sent += len(burst.requests)
            cursor.advance()
        if out and self.transport is not None:
            self.transport.writelines(out)
            self._last = now
        if cursor.exhausted:
            self._finish_sending()

    def _finish_sending(self) -> None:
        """Every burst went: EOF for bytes that are not HTTP; the end for HTTP answered."""
        if self._http:
            if not self._inflight:
                self._end("")
        elif not self._eof_sent:
            self._eof_sent = True
            if self.transport is not None and self.transport.can_write_eof():
                self.transport.write_eof()

    def _answered(self, got: list[Response], now: float) -> None:
        tally, inflight, pairing = self.tally, self._inflight, self._pairing
        for resp in got:
            tally.response(resp.status, now - inflight.popleft() if inflight else 0.0)
            if pairing is not None:
                pairing.answer(self._side, resp)
        self._send()

    def _all_done(self) -> bool:
        """Every burst written and every request answered."""
        return self.cursor.exhausted and not self._inflight

    def _check_idle(self) -> None:
        """Silence: for HTTP with answers due, ``timeout`` fails it; for other bytes, all
        written and ``quiet`` seconds without a byte ends it well. Waiting for a burst's
        time, or for the recording to be read on, is no silence."""
        if self.done.done():
            return
        idle = self._loop.time() - self._last
        if not self._http and self._eof_sent and idle >= self._quiet:
            self._end("")
        elif self._inflight and idle >= self._timeout:
            self._end("timeout")
        else:
            left = self._quiet if not self._http and self._eof_sent else self._timeout
            self._watch = self._loop.call_later(max(0.01, left - idle), self._check_idle)

    # ------------------------------------------------------------ ending

    def _cancel_timers(self) -> None:
        for handle in (self._timer, self._watch):
            if handle is not None:
                handle.cancel()

    def _let_go(self) -> None:
        """This side is over: the bursts it would still send and its answers to come."""
        self.cursor.close()
        if self._pairing is not None:
            self._pairing.side_end(self._side)

    def _end(self, reason: str) -> None:
        if self.done.done():
            return
        self._cancel_timers()
        if reason:
            self.tally.unanswered += len(self._inflight)
        self.done.set_result(reason)
        self._let_go()
        if self.transport is not None:
            if reason:
                self.transport.abort()
            else:
                self.transport.close()

    def stop(self) -> None:
        """The replay stops: close at once (not a failure); what was sent and not answered
        is counted ``unanswered_at_stop``."""
        if not self.done.done():
            self.tally.stopped += 1
            self.tally.unanswered_at_stop += len(self._inflight)
            self.done.set_result("stopped")
            self._cancel_timers()
            self._let_go()
            if self.transport is not None:
                self.transport.abort()

    def failed_to_connect(self) -> None:
        """It never connected: nothing was sent."""
        if not self.done.done():
            self.done.set_result("not connected")
            self._let_go()


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
    ``driver`` to its end; the failure reason ('' if none, 'stopped' if cancelled). A port of
    ``source_ports`` is given back to the pool when the connection is over."""
    slot: Slot | None = None
    try:
        slot = await _connect(driver, target, source_ports, timeout)
    except (OSError, TimeoutError) as e:
        reason = _connect_failure(e)
        driver.tally.failed[reason] += 1
        driver.failed_to_connect()
        return reason
    try:
        reason = await asyncio.shield(driver.done)
    except asyncio.CancelledError:
        driver.stop()
        raise
    finally:
        if slot is not None and source_ports is not None:
            release_source_port(source_ports, slot)
    if reason == "":
        driver.tally.connections_ok += 1
    elif reason != "stopped":
        driver.tally.failed[reason.split(" (")[0]] += 1
    return reason


async def _connect(driver: ConnDriver, target: str, source_ports: tuple[int, int] | None,
                   timeout: float) -> Slot | None:
    """Connect ``driver`` to ``target`` within ``timeout``; the source slot taken, if any."""
    loop = asyncio.get_running_loop()
    host, port = parse_target(target)
    try:
        async with asyncio.timeout(timeout):
            if source_ports is None:
                await loop.create_connection(lambda: driver, host, port)
                return None
            sock, slot = await connect_from_ports(host, port, source_ports)
            try:
                await loop.create_connection(lambda: driver, sock=sock)
            except BaseException:
                sock.close()
                release_source_port(source_ports, slot)
                raise
            return slot
    except asyncio.CancelledError:
        driver.stop()
        raise
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
