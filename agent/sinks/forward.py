"""Forwarding to a shadow target: one TCP connection per captured connection.

The mirror thread only queues work (:meth:`ForwardSink.send`, :meth:`end`) and hands it over
once per batch (:meth:`ForwardSink.commit`); an asyncio loop in its own thread dials, writes,
reads and discards the target's responses. Nothing here can block capture: a flow whose
buffered bytes pass ``max_flow_buffer`` (target stalls), or any flow while all flows together
hold more than ``max_total_buffer``, is dropped whole and counted. A target that refuses,
times out or resets costs only that flow (dropped, counted, logged once per kind of failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, deque

import structlog

from agent.config import Dial, ForwardConfig, parse_target

__all__ = ["ForwardSink"]

log = structlog.get_logger("agent.forward")

_DATA, _END, _RESET = 0, 1, 2


class _Conn:
    __slots__ = ("buffered", "ended", "queue", "task", "wake")

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.buffered = 0
        self.ended = False
        self.wake: asyncio.Event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class ForwardSink:
    """Forwards each captured connection's bytes over its own connection to ``target``."""

    def __init__(self, target: str, dial: Dial | None = None,
                 config: ForwardConfig | None = None) -> None:
        self.target = target
        self._host, self._port = parse_target(target)
        self._dial = dial
        self.config = config or ForwardConfig()
        self.stats: Counter[str] = Counter()
        self._ops: list[tuple[int, int, bytes]] = []
        self._lock = threading.Lock()
        self._queued_total = 0  # bytes handed over and not yet written (guarded by _lock)
        # Flows given up on. Mirror thread: adds, reads. I/O thread: adds while the flow is
        # open, discards when its end arrives (set operations are atomic under the GIL).
        self._dropped: set[int] = set()
        self._open: set[int] = set()  # mirror thread: flows that sent data and did not end
        self._logged: set[str] = set()
        self._current: dict[int, _Conn] = {}  # I/O thread: flow id → its shadow connection
        self._live: set[_Conn] = set()  # I/O thread: connections whose task still runs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forward",
                                        daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- mirror thread

    def send(self, flow_id: int, data: bytes, gap: int = 0) -> None:
        """Queue ``data`` of ``flow_id``. A ``gap`` before it restarts the shadow connection,
        since the target would otherwise see a corrupted stream."""
        if flow_id in self._dropped:
            self.stats["bytes_dropped"] += len(data)
            return
        if flow_id in self._open:
            if gap:
                self._ops.append((_RESET, flow_id, b""))
                self.stats["gap_resets"] += 1
        else:
            self._open.add(flow_id)
        if self._queued_total + len(data) > self.config.max_total_buffer:
            self._dropped.add(flow_id)
            self.stats["flows_dropped"] += 1
            self.stats["flows_dropped_total_buffer"] += 1
            self.stats["bytes_dropped"] += len(data)
            self._ops.append((_RESET, flow_id, b""))
            self._log_once("total_buffer", flow_id=flow_id)
            return
        self._ops.append((_DATA, flow_id, data))

    def end(self, flow_id: int) -> None:
        """The captured connection is over: close its shadow connection once written."""
        if flow_id in self._open:
            self._open.discard(flow_id)
            self._ops.append((_END, flow_id, b""))

    def commit(self) -> None:
        """Hand the queued work to the I/O thread (once per batch)."""
        if not self._ops:
            return
        ops, self._ops = self._ops, []
        with self._lock:
            self._queued_total += sum(len(d) for _k, _f, d in ops)
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

    # ---------------------------------------------------------------- I/O thread

    def _apply(self, ops: list[tuple[int, int, bytes]]) -> None:
        for kind, flow_id, data in ops:
            conn = self._current.get(flow_id)
            if kind == _DATA:
                if conn is not None and conn.ended:  # aborted: count, do not queue
                    self._discard_bytes(len(data))
                    continue
                if conn is None:
                    conn = self._current[flow_id] = _Conn()
                    self._live.add(conn)
                    conn.task = self._loop.create_task(self._run(flow_id, conn))
                    self.stats["connections"] += 1
                conn.queue.append(data)
                conn.buffered += len(data)
                if conn.buffered > self.config.max_flow_buffer:
                    self._abort(flow_id, conn, "flow_buffer")
                conn.wake.set()
                continue
            if kind == _END:
                self._dropped.discard(flow_id)
            if conn is None:
                continue
            # End or reset: this connection takes no more data; a later send opens another.
            del self._current[flow_id]
            if kind == _RESET and flow_id in self._dropped and not conn.ended:
                self._abort(flow_id, conn, None)
            conn.ended = True
            conn.wake.set()

    def _discard_bytes(self, n: int) -> None:
        self.stats["bytes_dropped"] += n
        with self._lock:
            self._queued_total -= n

    def _abort(self, flow_id: int, conn: _Conn, why: str | None, **log_kw: object) -> None:
        """Give up on a connection: discard what it holds (counted), cancel its task, and
        drop the rest of the flow."""
        if why is not None:
            self.stats["flows_dropped"] += 1
            self.stats[f"flows_dropped_{why}"] += 1
            self._log_once(why, flow_id=flow_id, **log_kw)
        if self._current.get(flow_id) is conn:
            self._dropped.add(flow_id)
        self._discard_bytes(conn.buffered)
        conn.queue.clear()
        conn.buffered = 0
        conn.ended = True
        if conn.task is not None and conn.task is not asyncio.current_task():
            conn.task.cancel()

    async def _open_conn(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._dial is None:
            return await asyncio.open_connection(self._host, self._port)
        sock = await self._loop.run_in_executor(None, self._dial, self.target)
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock)

    async def _run(self, flow_id: int, conn: _Conn) -> None:
        try:
            reader, writer = await asyncio.wait_for(self._open_conn(),
                                                    self.config.connect_timeout)
        except (OSError, TimeoutError) as e:
            why = "connect_timeout" if isinstance(e, TimeoutError) else "connect_failed"
            self._abort(flow_id, conn, why, error=str(e) or type(e).__name__)
            self._live.discard(conn)
            return
        if self._logged - {"total_buffer", "flow_buffer"}:
            self._logged.clear()
            log.info("target reachable again", target=self.target)
        reader_task = self._loop.create_task(self._discard(reader))
        try:
            while True:
                while conn.queue:
                    data = conn.queue.popleft()
                    writer.write(data)
                    await writer.drain()
                    conn.buffered -= len(data)
                    with self._lock:
                        self._queued_total -= len(data)
                    self.stats["bytes_forwarded"] += len(data)
                if conn.ended:
                    break
                conn.wake.clear()
                await conn.wake.wait()
            if writer.can_write_eof():
                writer.write_eof()
            # Give the target a moment to answer and close first, so it sees a clean end.
            await asyncio.wait({reader_task}, timeout=2.0)
            self.stats["connections_completed"] += 1
        except (OSError, ConnectionError) as e:
            self._abort(flow_id, conn, "reset", error=str(e) or type(e).__name__)
        finally:
            reader_task.cancel()
            writer.close()
            self._live.discard(conn)

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(65536):
                self.stats["response_bytes"] += len(data)
        except (OSError, ConnectionError):
            pass

    async def _shutdown(self) -> None:
        tasks = [c.task for c in self._live if c.task is not None]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=self.config.close_timeout)
        for conn in list(self._live):
            if conn.task in pending:
                self._abort(0, conn, "shutdown")
        if pending:
            await asyncio.wait(pending, timeout=1)

    def _log_once(self, why: str, **kw: object) -> None:
        if why in self._logged:
            return
        self._logged.add(why)
        log.warning("forwarding failed; flow dropped", target=self.target, reason=why, **kw)
