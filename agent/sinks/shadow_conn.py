"""One shadow connection: an asyncio protocol holding a captured connection's bytes, and
what the kernel says the target did with them.

A :class:`Conn` queues bytes until its socket is connected, then hands them straight to its
transport (no task per connection: the forward sink drives it from its callbacks and from one
periodic sweep). What the target acknowledged is read from the kernel
(``tcpi_bytes_acked``, which survives a reset, so a target that resets after taking 700 of
53,000 bytes is known to have taken 700). The counting is the forward sink's
(:mod:`agent.sinks.forward`); this module only reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from agent.mirror.config import Dial, parse_target
from agent.sinks.source_ports import (
    NoSourcePort,
    Slot,
    connect_from_ports,
    literal_infos,
    release_source_port,
)

__all__ = ["Conn", "Dialed", "Dialer", "bytes_acked", "close_transport", "connect_failure",
           "describe", "stop_io_loop"]

log = structlog.get_logger("agent.forward")

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked is the u64 at offset 120 (Linux >= 4.1). It
# counts the SYN and a FIN as one byte each.
_TCPI_BYTES_ACKED = 120
_TCP_INFO_LEN = 128
#: The transport's write buffer above which it tells the sink to look (pause_writing), so
#: bytes it passed to the kernel leave the forward budget without polling.
_WRITE_HIGH = 256 << 10


def bytes_acked(sock: Any) -> int | None:
    """Payload bytes the peer acknowledged on TCP socket ``sock`` (the SYN not counted; a FIN
    may be), or None if the kernel does not say (not TCP, closed)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    n: int = struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0]
    return max(0, n - 1)


class Dialed(asyncio.Protocol):
    """A protocol :class:`Dialer` connects: it holds its reserved source port until the
    dialer's :meth:`~Dialer.release`."""

    __slots__ = ("source",)

    def __init__(self) -> None:
        self.source: Slot | None = None  # the (address, port) it was dialed from


class Conn(Dialed):
    """One shadow connection of one captured flow, from dial to end.

    The sink's ``notify(conn)`` runs after every event that may move it on (connected, the
    target's data, EOF or loss, room in the transport). All state is the sink I/O thread's.
    """

    __slots__ = ("after_service", "answered", "budgeted", "closing", "counted", "deferred",
                 "done", "end_by", "ended", "fin_at", "flow_id", "lost", "notify", "outcome",
                 "progress_at", "pushed", "queue", "queued", "ready", "response_bytes",
                 "server_eof", "sock", "task", "transport", "waiting_since")

    def __init__(self, flow_id: int, notify: Callable[[Conn], None]) -> None:
        super().__init__()
        self.flow_id = flow_id
        self.notify = notify
        self.queue: deque[bytes] = deque()  # bytes waiting for the connect
        self.queued = 0
        self.pushed = 0  # bytes handed to the transport
        self.counted = 0  # of those, counted as forwarded (acknowledged)
        self.budgeted = 0  # bytes still held against the forward budget (queue + transport)
        self.response_bytes = 0  # answered since the sink last looked
        self.transport: asyncio.Transport | None = None
        self.ready = False  # dialed, queue flushed: bytes go straight to the transport
        self.sock: Any = None
        self.task: asyncio.Task[None] | None = None  # the dial, until connected
        self.ended = False  # takes no more bytes
        self.after_service = False  # the service closed first: let the target close first
        self.end_by: float | None = None  # every byte acknowledged by then, or stalled
        self.fin_at: float | None = None  # when our FIN was queued
        self.waiting_since: float | None = None  # all acknowledged, waiting for the target
        self.progress_at = 0.0  # last time the target acknowledged something
        self.server_eof = False
        self.answered = False
        self.closing = False  # closed by us; ``outcome`` says how it counts
        self.outcome: str | None = None  # "completed" or a drop reason, once decided
        self.lost: BaseException | bool | None = False  # connection_lost(exc); False: not yet
        self.deferred: str | None = None  # a buffer limit hit while dialing
        self.done = False  # counted

    # ------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        transport.set_write_buffer_limits(high=_WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        self.response_bytes += len(data)

    def eof_received(self) -> bool:
        self.server_eof = True
        self.notify(self)
        return True  # keep our side open: bytes may still be on their way

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc
        self.notify(self)  # the socket is still open here: its counters can be read

    def resume_writing(self) -> None:
        self.notify(self)

    # ------------------------------------------------------------ the sink's verbs

    @property
    def connected(self) -> bool:
        """Dialed, and the bytes queued meanwhile handed to the transport."""
        return self.ready

    def push(self, data: bytes, now: float) -> None:
        """Queue ``data`` (before the connect) or hand it to the transport."""
        self.budgeted += len(data)
        if not self.ready or self.transport is None:
            self.queue.append(data)
            self.queued += len(data)
            return
        if self.pushed == self.counted:
            self.progress_at = now  # nothing was outstanding: the stall clock starts now
        self.pushed += len(data)
        self.transport.write(data)

    def flush_queue(self, now: float) -> None:
        """Once connected: hand the queued bytes to the transport."""
        assert self.transport is not None
        self.ready = True
        self.progress_at = now
        if self.queue:
            self.transport.writelines(self.queue)
            self.pushed += self.queued
            self.queue.clear()
            self.queued = 0

    def held(self) -> int:
        """Bytes this connection holds in user space (queue and transport buffer)."""
        held = self.queued
        if self.transport is not None:
            held += self.transport.get_write_buffer_size()
        return held

    def acked(self) -> int:
        """Bytes of those pushed that the target acknowledged (without the kernel's word:
        those the transport passed on)."""
        n = bytes_acked(self.sock) if self.sock is not None else None
        if n is None:
            n = self.pushed - (self.transport.get_write_buffer_size() if self.transport else 0)
        return min(n, self.pushed)

    def send_fin(self, now: float) -> None:
        if self.fin_at is None and self.transport is not None and self.transport.can_write_eof():
            self.fin_at = now
            with contextlib.suppress(OSError):  # reset meanwhile: connection_lost follows
                self.transport.write_eof()

    def close(self, outcome: str, hard: bool) -> None:
        """Close, to be counted as ``outcome``; ``hard`` resets it (nothing more is sent, no
        TIME_WAIT or FIN_WAIT2 is left behind)."""
        self.outcome = outcome
        self.closing = True
        if self.transport is not None:
            close_transport(self.transport, self.sock, hard)


def close_transport(transport: asyncio.Transport, sock: Any, hard: bool) -> None:
    """Close ``transport``; ``hard``: with a reset (SO_LINGER 0), so nothing more is sent
    and no TIME_WAIT or FIN_WAIT2 is left behind."""
    if hard:
        if sock is not None and sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


def stop_io_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 shutdown: Coroutine[Any, Any, None], wait: float,
                 leftovers: Callable[[], None]) -> None:
    """A forward sink's close: run ``shutdown`` on its I/O ``loop`` (up to ``wait`` seconds),
    stop the loop and join its ``thread``; once the thread is gone, ``leftovers`` counts what
    the loop never got to (from this thread, now the only one) and the loop is closed."""
    fut = asyncio.run_coroutine_threadsafe(shutdown, loop)
    with contextlib.suppress(Exception):  # the loop is stopped below either way
        fut.result(wait)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    if not thread.is_alive():
        leftovers()
        loop.close()


# ---------------------------------------------------------------- dialing


class _DialJob:
    """A custom dial in a worker thread; if its caller gave up (connect timeout), the socket
    it still makes is closed rather than leaked."""

    def __init__(self, dial: Dial, target: str) -> None:
        self._dial = dial
        self._target = target
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._abandoned = False

    def __call__(self) -> socket.socket:
        sock = self._dial(self._target)
        with self._lock:
            if self._abandoned:
                sock.close()
                raise ConnectionAbortedError("dial abandoned")
            self._sock = sock
        return sock

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._sock is not None:
                self._sock.close()


async def _dial_in_thread(dial: Dial, target: str) -> socket.socket:
    """``dial(target)`` in the loop's executor; cancelling it closes what it returns later."""
    job = _DialJob(dial, target)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, job)
    except asyncio.CancelledError:
        job.abandon()
        raise


def connect_failure(e: BaseException) -> str:
    """The reason a failed connect drops its connection under."""
    if isinstance(e, NoSourcePort):
        return "no_source_port"
    return "connect_timeout" if isinstance(e, TimeoutError) else "connect_failed"


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class Dialer:
    """Connects :class:`Dialed` protocols (both forward sinks' connections) to ``target``:
    from a port of ``ports``, or with a custom ``dial`` (run off-thread), which picks its own
    source port and is warned about once if that port is outside ``ports``. Raises
    ValueError at once if ``target`` is not HOST:PORT."""

    def __init__(self, target: str, dial: Dial | None, ports: tuple[int, int],
                 addresses: tuple[str, ...] = ()) -> None:
        self._host, self._port = parse_target(target)
        self._infos = literal_infos(self._host, self._port)  # None: resolved per connect
        self._target = target
        self._dial = dial
        self._ports = ports
        self._addresses = addresses
        self._warned = False

    async def __call__(self, conn: Dialed) -> None:
        """Connect ``conn`` (its ``connection_made`` has run when this returns). Its source
        port stays taken until :meth:`release`."""
        if self._dial is None:
            sock, conn.source = await connect_from_ports(
                self._host, self._port, self._ports, self._infos, self._addresses)
        else:
            sock = await _dial_in_thread(self._dial, self._target)
        try:
            if self._dial is not None:
                self._check_port(sock.getsockname())
                sock.setblocking(False)
            await asyncio.get_running_loop().create_connection(lambda: conn, sock=sock)
        except BaseException:  # a cancelled connect must not leak its socket either
            sock.close()
            self.release(conn)
            raise

    def release(self, conn: Dialed) -> None:
        """``conn`` is over: its source port may be taken again."""
        if conn.source is not None:
            release_source_port(self._ports, conn.source, self._addresses)
            conn.source = None

    def _check_port(self, name: object) -> None:
        lo, hi = self._ports
        if self._warned or not isinstance(name, tuple) or lo <= name[1] <= hi:
            return
        self._warned = True
        log.warning("custom dial connected from a port outside the reserved source ports: "
                    "capture may see the agent's own forwarded traffic; bind with "
                    "bind_source_port()", port=name[1], source_ports=f"{lo}-{hi}")
