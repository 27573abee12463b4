"""Recorded records → the connections to replay, as the records are read
(:class:`Assembler`); each record's time → when it is due (:class:`Timeline`).

A connection is keyed by its flow id and address pair, so rotated files of one recording
join up and another recording's flow with the same id stays apart; a flow-end record closes
its key (a later chunk with that id is a new connection), and so does the end of the input.
Connections come out (:attr:`Assembler.ready`) in the order of their first client byte.

Client bytes after a gap (bytes the recording lost) would corrupt the stream: the connection
is replayed up to the gap and says so (``cut``). Production responses are parsed up to a gap
in theirs.

What is held stays near the :class:`~agent.replay.conns.Window`: once half of it is used,
the records of connections not replaying yet go to disk (:mod:`agent.replay.spill`), to be
read back when they start; the reader stops reading ahead at half unless a replaying
connection or the scheduler waits for it, and at all of it while replaying connections have
bursts to send (:mod:`agent.replay.feed`). Nothing is held per connection but its flow
state, what it has not sent yet and the responses it has not compared yet.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable

from agent.model import Direction
from agent.replay.conns import Burst, Connection, Window
from agent.replay.report import Source
from agent.replay.spill import Spill, Spilled
from agent.sinks.record import RecordedChunk

__all__ = ["Assembler", "Timeline", "assemble"]

#: A replaying connection whose queue ran dry reads this much back from disk at a time.
REFILL = 256 << 10
_TO, _FROM = Direction.TO_OBSERVED, Direction.FROM_OBSERVED


class Timeline:
    """Recorded time → seconds after the start of a pass: the recorded time since the first
    record, each idle gap cut to ``max_wait`` (if set), divided by ``speed`` (``inf``:
    everything at once). Times come in the order read; one earlier than the latest (records
    a little out of order) is placed that much before it."""

    def __init__(self, speed: float, max_wait: float | None) -> None:
        self._inf = math.isinf(speed)
        self._speed = speed
        self._max_wait = max_wait
        self._last: float | None = None
        self._acc = 0.0

    def due(self, t: float) -> float:
        if self._inf:
            return 0.0
        if self._last is None:
            self._last = t
        gap = t - self._last
        if gap > 0:
            self._acc += gap if self._max_wait is None else min(gap, self._max_wait)
            self._last = t
            return self._acc / self._speed
        back = -gap if self._max_wait is None else min(-gap, self._max_wait)
        return max(0.0, self._acc - back) / self._speed

    @property
    def length(self) -> float:
        """Seconds from the first to the latest record read."""
        return 0.0 if math.isinf(self._speed) else self._acc / self._speed


class Assembler:
    """Records (:meth:`add`, then :meth:`end_of_input`) → connections. ``stats`` counts what
    was read; ``answers_seen``: a service→client record was read."""

    def __init__(self, timeline: Timeline, window: Window, spill: Spill | None = None,
                 hunger: Callable[[int], None] | None = None,
                 ready: Callable[[], None] | None = None) -> None:
        self.timeline = timeline
        self.window = window
        self.spill = spill
        self.stats = Source()
        self.ready: deque[Connection] = deque()
        self.answers_seen = False
        self._open: dict[tuple[int, str, str], Connection] = {}
        self._by_id: dict[int, list[tuple[int, str, str]]] = {}
        self._hunger = hunger
        self._on_ready = ready

    # ------------------------------------------------------------ Feeder

    def hunger(self, delta: int) -> None:
        if self._hunger is not None:
            self._hunger(delta)

    def refill(self, conn: Connection, roomy: bool = False) -> bool:
        """Read ``conn``'s records back from disk: :data:`REFILL` bytes of bursts more, or
        (``roomy``) while the window is not full; all of them for a connection that
        finished (for the counts). False if nothing was read."""
        spill, window = self.spill, self.window
        if spill is None:
            return False
        until, read = conn.queued + REFILL, False
        while conn.chain.count and (conn.finished or (
                window.used < window.budget if roomy else conn.queued < until)):
            read = True
            rec = spill.pop(conn.chain)
            if rec.end:
                self._close(conn)
            else:
                self._chunk(conn, rec.direction, rec.seen_at, rec.due, rec.gap, rec.data)
        return read

    def settle(self, conn: Connection, read_on: bool) -> None:
        if self.spill is not None and conn.chain.count:
            if read_on:
                self.refill(conn)
            else:
                self.spill.drop(conn.chain)

    # ------------------------------------------------------------ reading

    def add(self, rec: RecordedChunk) -> None:
        if rec.kind != "chunk":
            for key in self._by_id.pop(rec.flow_id, []):
                self._end(self._open.pop(key))
            return
        if rec.direction is Direction.UNKNOWN:
            self.stats.unusable_records += 1
            return
        due = self.timeline.due(rec.seen_at)
        a, b = rec.from_addr, rec.to_addr
        key = (rec.flow_id, a, b) if a <= b else (rec.flow_id, b, a)
        conn = self._open.get(key)
        if conn is None:
            conn = self._open[key] = Connection(rec.flow_id, self, self.window)
            self._by_id.setdefault(rec.flow_id, []).append(key)
        if rec.direction is _TO and not conn.registered:
            self._register(conn, rec, due)
        if conn.chain.count and conn.started:
            self.refill(conn, roomy=True)  # back from disk, if there is room now
        if self.spill is not None and (conn.chain.count or (
                not conn.started and self.window.used >= self.window.half)):
            self.spill.push(conn.chain, Spilled(False, rec.direction, rec.seen_at, due,
                                                rec.gap_bytes, rec.data))
            return
        self._chunk(conn, rec.direction, rec.seen_at, due, rec.gap_bytes, rec.data)

    def end_of_input(self) -> None:
        """Every connection still open ends here."""
        for conn in self._open.values():
            self._end(conn)
        self._open.clear()
        self._by_id.clear()

    def _register(self, conn: Connection, rec: RecordedChunk, due: float) -> None:
        conn.registered = True
        conn.client, conn.server = rec.from_addr, rec.to_addr
        conn.start, conn.due = rec.seen_at, due
        self.stats.connections += 1
        self.ready.append(conn)
        if self._on_ready is not None:
            self._on_ready()

    def _end(self, conn: Connection) -> None:
        if self.spill is not None and conn.chain.count:
            self.spill.push(conn.chain, Spilled(True, Direction.UNKNOWN, 0.0, 0.0, 0, b""))
        else:
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        if conn.server_data and not conn.server_gap:
            last = conn.parser.close()
            if last is not None:
                conn.production(last)
        conn.production_end()
        conn.close()

    def _chunk(self, conn: Connection, d: Direction, seen_at: float, due: float, gap: int,
               data: bytes) -> None:
        if d is _TO:
            self._client(conn, due, gap, data)
            return
        self.answers_seen = conn.answered = True
        if gap and conn.server_data:
            conn.server_gap = True
        if conn.server_gap or conn.parser.broken:
            conn.production_end()
            return
        conn.server_data = True
        for resp in conn.parser.feed(data):
            conn.production(resp)

    def _client(self, conn: Connection, due: float, gap: int, data: bytes) -> None:
        if conn.client_gap or (gap and conn.client_data):
            if not conn.client_gap:
                conn.client_gap = True
                conn.cut = "a gap in the recorded client bytes"
                self.stats.cut_connections += 1
            return
        conn.client_data = True
        requests = conn.framer.feed(data)
        for req in requests:
            conn.parser.expect(req.method)
        conn.requests += len(requests)
        conn.client_bytes += len(data)
        self.stats.requests += len(requests)
        self.stats.client_bytes += len(data)
        after_answer, conn.answered = conn.answered, False
        conn.push(Burst(due, data, tuple(requests), after_answer))


def assemble(records: Iterable[RecordedChunk], speed: float = math.inf,
             max_wait: float | None = None) -> tuple[list[Connection], int]:
    """Every connection of ``records``, whole, in memory (for tests and small inputs), in
    the order of their first client byte; and how many records were of no use (direction
    unknown)."""
    asm = Assembler(Timeline(speed, max_wait), Window(1 << 62))
    for rec in records:
        asm.add(rec)
    asm.end_of_input()
    return list(asm.ready), asm.stats.unusable_records
