"""One shadow connection: its state, and the socket-level work under the forward sink's
accounting: connecting, what the target acknowledged, waits that give up when it stops taking
bytes, and a close that sends nothing more.

Used by :mod:`agent.sinks.forward`, in its I/O thread; the counting stays there.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable

import structlog

from agent.config import Dial, parse_target
from agent.sinks.source_ports import NoSourcePort, connect_from_ports

__all__ = ["Conn", "Dialer", "Flow", "Stalled", "Streams", "connect_failure", "describe",
           "hard_close", "in_flight", "progressing", "read_answers", "wait_acked"]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

log = structlog.get_logger("agent.forward")

_POLL_FIRST, _POLL_MAX = 0.01, 0.25  # seconds between looks at the send queue


class Stalled(Exception):
    """The target acknowledged nothing for ``stall_timeout`` seconds."""


def _kernel_unacked(fd: int, fin_queued: bool) -> int:
    """Payload bytes in a TCP socket's send queue not yet acknowledged (SIOCOUTQ)."""
    try:
        n: int = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0
    return max(0, n - 1) if fin_queued else n  # a queued FIN takes one sequence number


def in_flight(writer: asyncio.StreamWriter, eof: bool) -> int | None:
    """Bytes handed to ``writer`` and not acknowledged; None once its socket is gone."""
    sock = writer.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return None
    buffered = writer.transport.get_write_buffer_size()
    return buffered + _kernel_unacked(fd, fin_queued=eof and not buffered)


async def progressing(make: Callable[[], Awaitable[object]], writer: asyncio.StreamWriter,
                      stall_timeout: float) -> None:
    """``await make()`` while the target acknowledges bytes (it is awaited anew every quarter
    of ``stall_timeout`` to look); :class:`Stalled` once bytes in flight saw no progress for
    ``stall_timeout``. With nothing in flight it waits as long as ``make()`` takes."""
    loop = asyncio.get_running_loop()
    before = in_flight(writer, eof=False)
    progress_at = loop.time()
    while True:
        try:
            await asyncio.wait_for(make(), None if before == 0 else stall_timeout / 4)
            return
        except TimeoutError:
            after = in_flight(writer, eof=False)
            if before is not None and after is not None and after < before:
                progress_at = loop.time()
            elif loop.time() - progress_at >= stall_timeout:
                raise Stalled from None
            before = after


async def wait_acked(writer: asyncio.StreamWriter, eof: bool, stall_timeout: float,
                     closed: asyncio.Future[None]) -> None:
    """Until the target acknowledged every byte written to ``writer`` or it closed
    (``closed`` done); :class:`Stalled` once none was acknowledged for ``stall_timeout``."""
    loop = asyncio.get_running_loop()
    pending = in_flight(writer, eof)
    progress_at = loop.time()
    poll = _POLL_FIRST
    while pending and not closed.done():
        await asyncio.wait({closed}, timeout=poll)
        now = in_flight(writer, eof)
        if now is not None and now < pending:
            progress_at = loop.time()
        elif loop.time() - progress_at >= stall_timeout:
            raise Stalled
        pending = now
        poll = min(poll * 2, _POLL_MAX)


def hard_close(writer: asyncio.StreamWriter) -> None:
    """Close at once, discarding unsent bytes (the target gets a RST), so that no byte counted
    as dropped is delivered after all."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


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


async def dial_in_thread(dial: Dial, target: str) -> socket.socket:
    """``dial(target)`` in the loop's executor; cancelling it closes what it returns later."""
    job = _DialJob(dial, target)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, job)
    except asyncio.CancelledError:
        job.abandon()
        raise


class Flow:
    """A captured flow. Its shadow connections share it (a gap starts another), so the flow
    is counted as dropped once."""

    __slots__ = ("dropped", "flow_id")

    def __init__(self, flow_id: int) -> None:
        self.flow_id = flow_id
        self.dropped = False


class Conn:
    """One shadow connection: the bytes it holds and what became of those it wrote."""

    __slots__ = ("answered", "buffered", "counted", "deferred", "dialing", "ended", "flow",
                 "in_transport", "limit", "pushed", "queue", "task", "wake", "writer")

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.queue: deque[bytes] = deque()
        self.buffered = 0  # bytes in queue
        self.in_transport = 0  # bytes written that the transport still held when last asked
        self.pushed = 0  # bytes written to the transport
        self.counted = 0  # of those, counted as forwarded (acknowledged) or dropped
        self.ended = False  # takes no more bytes
        self.limit: asyncio.Timeout | None = None  # end_timeout, once ended, while exchanging
        self.dialing = True
        self.deferred: str | None = None  # a buffer limit hit while dialing
        self.answered = False
        self.wake: asyncio.Event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.writer: asyncio.StreamWriter | None = None

    def finish(self, end_timeout: float) -> None:
        """Take no more bytes; those written must be acknowledged within ``end_timeout``."""
        self.ended = True
        if self.limit is not None and self.limit.when() is None:
            self.limit.reschedule(asyncio.get_running_loop().time() + end_timeout)
        self.wake.set()

    def take(self, size: int) -> list[bytes]:
        """About ``size`` bytes from the queue, to write (they count as in the transport)."""
        batch: list[bytes] = []
        taken = 0
        while self.queue and taken < size:
            batch.append(self.queue.popleft())
            taken += len(batch[-1])
        self.buffered -= taken
        self.in_transport += taken
        self.pushed += taken
        return batch

    def passed_on(self) -> int:
        """Bytes the transport passed on to the kernel since the last call (no longer held
        by us)."""
        held = self.writer.transport.get_write_buffer_size() if self.writer is not None else 0
        if held >= self.in_transport:
            return 0
        passed, self.in_transport = self.in_transport - held, held
        return passed

    def settle(self, eof: bool, final: bool = False) -> tuple[int, int]:
        """(bytes acknowledged since the last call, bytes lost): with ``final`` every byte
        written and not acknowledged is lost, else none is yet."""
        uncounted = self.pushed - self.counted
        flying = in_flight(self.writer, eof) if self.writer is not None else None
        unacked = uncounted if flying is None else min(uncounted, flying)
        self.counted += uncounted - unacked
        if not final:
            return uncounted - unacked, 0
        self.counted = self.pushed
        return uncounted - unacked, unacked


async def read_answers(reader: asyncio.StreamReader, conn: Conn, counts: Counter[str]) -> None:
    """Read and discard what the target answers (``response_bytes``) until it closes."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            conn.answered = True
            counts["response_bytes"] += len(data)


def connect_failure(e: BaseException) -> str:
    """The reason a failed connect drops its flow under."""
    if isinstance(e, NoSourcePort):
        return "no_source_port"
    return "connect_timeout" if isinstance(e, TimeoutError) else "connect_failed"


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class Dialer:
    """Connects to ``target``: from a port of ``ports``, or with a custom ``dial`` (run
    off-thread), which picks its own source port and is warned about once if that port is
    outside ``ports``. Raises ValueError at once if ``target`` is not HOST:PORT."""

    def __init__(self, target: str, dial: Dial | None, ports: tuple[int, int]) -> None:
        self._host, self._port = parse_target(target)
        self._target = target
        self._dial = dial
        self._ports = ports
        self._warned = False

    async def __call__(self) -> Streams:
        if self._dial is None:
            sock = await connect_from_ports(self._host, self._port, self._ports)
        else:
            sock = await dial_in_thread(self._dial, self._target)
        try:
            if self._dial is not None:
                self._check_port(sock.getsockname())
                sock.setblocking(False)
            return await asyncio.open_connection(sock=sock)
        except BaseException:  # a cancelled connect must not leak its socket either
            sock.close()
            raise

    def _check_port(self, name: object) -> None:
        lo, hi = self._ports
        if self._warned or not isinstance(name, tuple) or lo <= name[1] <= hi:
            return
        self._warned = True
        log.warning("custom dial connected from a port outside the reserved source ports: "
                    "capture may see the agent's own forwarded traffic; bind with "
                    "bind_source_port()", port=name[1], source_ports=f"{lo}-{hi}")
