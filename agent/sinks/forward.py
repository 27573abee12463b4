"""Forwarding to a shadow target: one TCP connection per captured connection.

The mirror thread only queues work (:meth:`ForwardSink.send`, :meth:`end`) and hands it over
once per batch (:meth:`ForwardSink.commit`); an asyncio loop in its own thread dials (from a
reserved source port, see :mod:`agent.sinks.source_ports`), writes, reads and discards the
target's responses. Nothing here can block capture: a flow whose buffered bytes pass
``max_flow_buffer`` (target stalls), or any flow while all flows together hold more than
``max_total_buffer``, is dropped whole and counted. A target that refuses, times out, resets
or stops reading costs only that flow (dropped, counted, logged once per outage).

Accounting: ``bytes_forwarded`` are bytes the target acknowledged; every other byte handed to
the sink is in ``bytes_dropped``. A dropped flow is counted once, in ``flows_dropped`` and
``flows_dropped_<reason>``, the reason being the root cause: a buffer limit hit while the
connection is still being made is charged to the connect (``connect_timeout``,
``connect_failed``) unless it then succeeds. ``connections_completed`` counts connections
whose bytes were all acknowledged and whose target then answered or closed;
``connections_unconfirmed`` those whose target did neither within ``end_grace`` (a shadow that
never reads).

Each counter is written by one thread only (mirror: :attr:`_mcounts`, I/O: :attr:`_counts`);
:attr:`stats` adds them up.
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

import structlog

from agent.config import Dial, ForwardConfig, parse_target
from agent.sinks.outage import OutageLog
from agent.sinks.source_ports import NoSourcePort, bind_source_port, connect_from_ports

__all__ = ["ForwardSink", "NoSourcePort", "bind_source_port"]

log = structlog.get_logger("agent.forward")

_DATA, _END, _RESET, _DROP = 0, 1, 2, 3
_BUFFER_REASONS = frozenset({"flow_buffer", "total_buffer"})
_CONNECT_REASONS = frozenset({"connect_failed", "connect_timeout", "no_source_port"})

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Conn:
    """One shadow connection (I/O thread only)."""

    __slots__ = ("answered", "buffered", "counted", "deferred", "dialing", "ended", "pushed",
                 "queue", "task", "wake")

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.buffered = 0  # bytes in queue
        self.pushed = 0  # bytes handed to the transport
        self.counted = 0  # of those, counted as forwarded (acknowledged) or dropped
        self.ended = False
        self.dialing = True
        self.deferred: str | None = None  # a buffer limit hit while dialing
        self.answered = False
        self.wake: asyncio.Event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


def _connect_failure(e: BaseException) -> str:
    if isinstance(e, NoSourcePort):
        return "no_source_port"
    return "connect_timeout" if isinstance(e, TimeoutError) else "connect_failed"


def _kernel_unacked(fd: int, fin_queued: bool) -> int:
    """Payload bytes in a TCP socket's send queue not yet acknowledged (SIOCOUTQ)."""
    try:
        n: int = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0
    return max(0, n - 1) if fin_queued else n  # a queued FIN takes one sequence number


def _in_flight(writer: asyncio.StreamWriter, eof: bool) -> int | None:
    """Bytes handed to ``writer`` and not acknowledged; None once its socket is gone."""
    sock = writer.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return None
    buffered = writer.transport.get_write_buffer_size()
    return buffered + _kernel_unacked(fd, fin_queued=eof and not buffered)


class ForwardSink:
    """Forwards each captured connection's bytes over its own connection to ``target``.

    With a custom ``dial``, that dial picks the source port (see :func:`bind_source_port`);
    a connection from outside ``config.source_ports`` is warned about once.
    """

    def __init__(self, target: str, dial: Dial | None = None,
                 config: ForwardConfig | None = None) -> None:
        self.target = target
        self._host, self._port = parse_target(target)
        self._dial = dial
        self.config = config or ForwardConfig()
        self._mcounts: Counter[str] = Counter()  # mirror thread's counters
        self._counts: Counter[str] = Counter()  # I/O thread's counters
        self._ops: list[tuple[int, int, bytes]] = []
        self._uncommitted = 0  # bytes in _ops
        self._lock = threading.Lock()
        self._queued_total = 0  # bytes handed over and not yet written (guarded by _lock)
        # Flows given up on. Mirror thread: adds, reads. I/O thread: adds while the flow is
        # open, discards when its end arrives (set operations are atomic under the GIL).
        self._dropped: set[int] = set()
        self._open: set[int] = set()  # mirror thread: flows that sent data and did not end
        self._current: dict[int, _Conn] = {}  # I/O thread: flow id → its shadow connection
        self._live: set[_Conn] = set()  # I/O thread: connections whose task still runs
        self._dialing = 0  # I/O thread: connections not connected yet
        self._awaiting = 0  # I/O thread: flows dropped meanwhile, charged to their outcome
        self._warned_port = False
        self._outages = OutageLog(log, "forwarding failed", "target reachable again",
                                  self.config.log_interval, target=target)
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
        if flow_id in self._open:
            if gap:
                self._ops.append((_RESET, flow_id, b""))
                counts["gap_resets"] += 1
        else:
            self._open.add(flow_id)
        size = len(data)
        if self._queued_total + self._uncommitted + size > self.config.max_total_buffer:
            self._dropped.add(flow_id)
            counts["bytes_dropped"] += size
            self._ops.append((_DROP, flow_id, b""))
            return
        self._uncommitted += size
        self._ops.append((_DATA, flow_id, data))

    def end(self, flow_id: int) -> None:
        """The client finished (or the connection is over): close the shadow connection
        once its bytes are written. A later :meth:`send` would open a new one."""
        if flow_id in self._open:
            self._open.discard(flow_id)
            self._ops.append((_END, flow_id, b""))

    def commit(self) -> None:
        """Hand the queued work to the I/O thread (once per batch)."""
        if not self._ops:
            return
        ops, self._ops = self._ops, []
        with self._lock:
            self._queued_total += self._uncommitted
        self._uncommitted = 0
        self._loop.call_soon_threadsafe(self._apply, ops)

    def close(self) -> None:
        """Deliver what is queued (up to ``close_timeout`` seconds), then close everything."""
        for flow_id in list(self._open):
            self.end(flow_id)
        self.commit()
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):  # the loop is stopped below either way
            fut.result(self.config.close_timeout + 2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def queued_bytes(self) -> int:
        return self._queued_total

    @property
    def stats(self) -> Counter[str]:
        """Every counter (a snapshot; ``dict()`` of a Counter copies it under the GIL)."""
        total = Counter(dict(self._mcounts))
        total.update(dict(self._counts))
        return total

    # ---------------------------------------------------------------- I/O thread

    def _apply(self, ops: list[tuple[int, int, bytes]]) -> None:
        for kind, flow_id, data in ops:
            conn = self._current.get(flow_id)
            if kind == _DATA:
                self._queue(flow_id, conn, data)
            elif kind == _DROP:
                self._drop_over_total(flow_id, conn)
            else:
                if kind == _END:
                    self._dropped.discard(flow_id)
                if conn is not None:
                    # This connection takes no more data; a later send opens another.
                    del self._current[flow_id]
                    conn.ended = True
                    conn.wake.set()

    def _queue(self, flow_id: int, conn: _Conn | None, data: bytes) -> None:
        if conn is not None and conn.ended:  # aborted: count, do not queue
            self._discard_bytes(len(data))
            return
        if conn is None:
            conn = self._current[flow_id] = _Conn()
            self._dialing += 1
            self._live.add(conn)
            conn.task = self._loop.create_task(self._run(flow_id, conn))
            conn.task.add_done_callback(lambda _t: self._live.discard(conn))  # even unstarted
            self._counts["connections"] += 1
        conn.queue.append(data)
        conn.buffered += len(data)
        if conn.buffered > self.config.max_flow_buffer:
            self._abort(flow_id, conn, "flow_buffer")
        conn.wake.set()

    def _drop_over_total(self, flow_id: int, conn: _Conn | None) -> None:
        """The mirror thread dropped the flow: all flows together hold too much."""
        if conn is not None:
            if not conn.ended:
                self._abort(flow_id, conn, "total_buffer")
        elif self._dialing:  # the buffers are full while connects hang: they decide
            self._awaiting += 1
        else:
            self._count_drop("total_buffer", flow_id=flow_id)

    def _count_drop(self, why: str, n: int = 1, /, **detail: object) -> None:
        self._counts["flows_dropped"] += n
        self._counts[f"flows_dropped_{why}"] += n
        self._outages.failed(why, n, **detail)

    def _discard_bytes(self, n: int) -> None:
        self._counts["bytes_dropped"] += n
        with self._lock:
            self._queued_total -= n

    def _abort(self, flow_id: int, conn: _Conn, why: str, **detail: object) -> None:
        """Give up on a connection: discard what it holds (counted), cancel its task, drop the
        rest of the flow, count ``why``. A buffer limit hit while still dialing is not counted
        yet and the dial goes on: its outcome names the cause (see :meth:`_connect`)."""
        deferred = why in _BUFFER_REASONS and conn.dialing
        if deferred:
            conn.deferred = conn.deferred or why
        else:
            self._count_drop(why, flow_id=flow_id, **detail)
        if self._current.get(flow_id) is conn:
            self._dropped.add(flow_id)
        self._discard_bytes(conn.buffered)
        conn.queue.clear()
        conn.buffered = 0
        conn.ended = True
        if not deferred and conn.task is not None and conn.task is not asyncio.current_task():
            self._dial_over(conn)
            conn.task.cancel()

    def _dial_over(self, conn: _Conn) -> None:
        if conn.dialing:
            conn.dialing = False
            self._dialing -= 1

    async def _run(self, flow_id: int, conn: _Conn) -> None:
        streams = await self._connect(flow_id, conn)
        if streams is not None:
            await self._exchange(flow_id, conn, *streams)

    async def _connect(self, flow_id: int, conn: _Conn) -> Streams | None:
        """Dial the target; None (counted) if that failed or the flow was given up meanwhile
        (a connection made for a flow already given up is closed unused)."""
        try:
            streams = await asyncio.wait_for(self._open_conn(), self.config.connect_timeout)
        except (OSError, TimeoutError) as e:
            self._dial_over(conn)
            why = _connect_failure(e)
            self._abort(flow_id, conn, why, error=str(e) or type(e).__name__)
            self._settle_awaiting(why)
            return None
        self._dial_over(conn)
        self._outages.recovered(_CONNECT_REASONS)
        self._settle_awaiting("total_buffer")
        if conn.deferred is not None:
            self._count_drop(conn.deferred, flow_id=flow_id)
            streams[1].close()
            return None
        return streams

    def _settle_awaiting(self, why: str) -> None:
        if self._awaiting:
            self._count_drop(why, self._awaiting)
            self._awaiting = 0

    async def _open_conn(self) -> Streams:
        if self._dial is None:
            sock = await connect_from_ports(self._host, self._port, self.config.source_ports)
        else:
            sock = await self._loop.run_in_executor(None, self._dial, self.target)
            self._check_source_port(sock)
            sock.setblocking(False)
        return await asyncio.open_connection(sock=sock)

    def _check_source_port(self, sock: socket.socket) -> None:
        """Warn once if a custom dial connected from outside the reserved source ports."""
        name = sock.getsockname()
        lo, hi = self.config.source_ports
        if self._warned_port or not isinstance(name, tuple) or lo <= name[1] <= hi:
            return
        self._warned_port = True
        log.warning("custom dial connected from a port outside the reserved source ports: "
                    "capture may see the agent's own forwarded traffic; bind with "
                    "bind_source_port()", port=name[1], source_ports=f"{lo}-{hi}")

    async def _exchange(self, flow_id: int, conn: _Conn, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        """Write the flow's bytes until it ends, half-close, wait for the answer, count."""
        reader_task = self._loop.create_task(self._discard(reader, conn))
        eof = False
        try:
            await self._pump(conn, writer)
            if writer.can_write_eof():
                writer.write_eof()
                eof = True
            # Give the target a moment to answer and close first, so it sees a clean end.
            await asyncio.wait({reader_task}, timeout=self.config.end_grace)
            self._conclude(flow_id, conn, writer, eof, reader_task.done())
        except OSError as e:
            self._abort(flow_id, conn, "reset", error=str(e) or type(e).__name__)
        finally:
            reader_task.cancel()
            self._settle(conn, writer, eof, final=True)
            writer.close()

    async def _pump(self, conn: _Conn, writer: asyncio.StreamWriter) -> None:
        """Write what the flow queues, as it comes, until it ends."""
        while True:
            if conn.queue:
                batch = list(conn.queue)
                conn.queue.clear()
                size = conn.buffered
                conn.buffered = 0
                conn.pushed += size
                with self._lock:
                    self._queued_total -= size
                writer.writelines(batch)
                await writer.drain()
                self._settle(conn, writer, eof=False)
            elif conn.ended:
                return
            else:
                conn.wake.clear()
                await conn.wake.wait()

    def _settle(self, conn: _Conn, writer: asyncio.StreamWriter, eof: bool,
                final: bool = False) -> int:
        """Count bytes the target acknowledged since the last call as forwarded; with
        ``final`` count the rest as dropped. Returns the bytes not acknowledged."""
        uncounted = conn.pushed - conn.counted
        in_flight = _in_flight(writer, eof)
        unacked = uncounted if in_flight is None else min(uncounted, in_flight)
        self._counts["bytes_forwarded"] += uncounted - unacked
        conn.counted += uncounted - unacked
        if final and unacked:
            self._counts["bytes_dropped"] += unacked
            conn.counted = conn.pushed
        return unacked

    def _conclude(self, flow_id: int, conn: _Conn, writer: asyncio.StreamWriter, eof: bool,
                  closed: bool) -> None:
        """Count a finished connection by what the target did with its bytes."""
        unacked = self._settle(conn, writer, eof, final=True)
        if unacked:
            self._abort(flow_id, conn, "stalled", unacked_bytes=unacked)
        elif closed or conn.answered:
            self._counts["connections_completed"] += 1
            self._outages.recovered()
        else:
            self._counts["connections_unconfirmed"] += 1
            self._outages.failed("unconfirmed", end_grace=self.config.end_grace)

    async def _discard(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        try:
            while data := await reader.read(65536):
                conn.answered = True
                self._counts["response_bytes"] += len(data)
        except OSError:
            pass

    async def _shutdown(self) -> None:
        tasks = [c.task for c in self._live if c.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.config.close_timeout)
            for conn in list(self._live):
                if conn.task in pending:
                    self._abort(0, conn, "close_timeout")
            if pending:
                await asyncio.wait(pending, timeout=1)
        self._settle_awaiting("total_buffer")
