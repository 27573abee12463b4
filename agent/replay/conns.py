"""A recorded connection as the replay holds it: its client bytes in bursts, handed to the
connection(s) replaying it as they are read (:class:`Connection`), within one memory
:class:`Window` for everything read ahead.

A *burst* is one recorded client chunk: it goes when its time is due and, unless
pipelining is asked for, once every request sent before it was answered if it came
``after_answer`` (the service answered since the client's previous chunk), or if the
recording holds no answers at all: a client that waited for each response is replayed
waiting, one that pipelined (sent on without an answer between) stays pipelined.

A connection is read while it replays: the replaying side takes its bursts through a
:class:`Cursor` (two with a baseline) and a burst is let go once every cursor passed it.
When a cursor finds nothing yet and the connection is not ``closed`` (its recorded end, or
the end of the input, not read yet) it asks for more (:meth:`Cursor.want`): records set aside
on disk are read back, or the reader goes on; the cursor's waker is called when there is
more or the connection closed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.replay.diff import Pairing, size
from agent.replay.http import Request, RequestFramer, Response, ResponseParser
from agent.replay.spill import Chain

__all__ = ["Burst", "Connection", "Cursor", "Window"]

Waker = Callable[[], None]


@dataclass(slots=True)
class Burst:
    """Client bytes sent together: when they are due (seconds after the pass started), the
    bytes, the requests whose last byte they hold, and whether the service answered since
    the client's previous chunk."""

    due: float
    data: bytes
    requests: tuple[Request, ...] = ()
    after_answer: bool = False


class Window:
    """The bytes held in memory for what was read ahead: bursts not sent yet, responses
    not compared yet; ``sendable``: the bursts of connections that replay. ``freed`` is
    called when ``used`` goes under half the ``budget`` or under all of it, and when no
    replaying connection has a burst left."""

    def __init__(self, budget: int, freed: Callable[[], None] | None = None) -> None:
        self.budget = budget
        self.half = budget // 2
        self.used = 0
        self.sendable = 0
        self.peak = 0
        self.freed = freed

    def hold(self, n: int, sendable: bool = False) -> None:
        """``n`` bytes more (or, negative, fewer); ``sendable``: bursts of a connection that
        replays."""
        was = self.used
        self.used = used = was + n
        if sendable:
            self.sendable += n
            if self.sendable <= 0 < self.sendable - n and self.freed is not None:
                self.freed()  # no replaying connection has a burst left
                return
        if n > 0:
            if used > self.peak:
                self.peak = used
        elif self.freed is not None and (used < self.half <= was or used < self.budget <= was):
            self.freed()


class Feeder(Protocol):
    """What a connection asks of the one that reads its records. ``answers_seen``: a
    service→client record was read."""

    answers_seen: bool

    def refill(self, conn: Connection) -> bool:
        """Records of ``conn`` set aside on disk read back; False if none were."""
        ...

    def hunger(self, delta: int) -> None:
        """One more (or fewer) connection waits for the reader."""
        ...

    def settle(self, conn: Connection, read_on: bool) -> None:
        """``conn`` stopped replaying: its records on disk are read for the counts
        (``read_on``) or forgotten."""
        ...


class Connection:
    """One recorded connection: the flow state the reader keeps, and the bursts read and
    not sent yet. ``registered``: its first client byte was read (before that it is no
    connection to replay); ``started``: it replays; ``finished``: it stopped replaying
    (what is read of it from then on is only counted)."""

    __slots__ = ("_cursors", "_first", "_wakers", "_window", "answered", "backlog", "bursts",
                 "chain", "client", "client_bytes", "client_data", "client_gap", "closed", "cut",
                 "due", "feeder", "finished", "flow_id", "framer", "hungry", "pairing", "parser",
                 "production_ended", "queued", "registered", "requests", "server",
                 "server_data", "server_gap", "start", "started")

    def __init__(self, flow_id: int, feeder: Feeder, window: Window) -> None:
        self.flow_id = flow_id
        self.client = self.server = ""
        self.start = 0.0  # recorded time of the first client byte
        self.due = 0.0  # when that is due, seconds after the pass started
        self.bursts: deque[Burst] = deque()
        self.queued = 0  # bytes in bursts
        self.requests = 0  # requests framed
        self.client_bytes = 0
        self.cut = ""  # why the client bytes stop early ('' if whole)
        self.registered = self.started = self.finished = self.closed = False
        self.hungry = False
        self.chain = Chain()
        self.framer = RequestFramer()
        self.parser = ResponseParser()  # production's responses
        self.client_data = self.client_gap = self.server_data = self.server_gap = False
        self.answered = False  # the service answered since the last client chunk
        self.pairing: Pairing | None = None
        self.backlog: list[Response] = []  # production's, before it started
        self.production_ended = False
        self._first = 0  # index of bursts[0] among every burst of the connection
        self._cursors: list[Cursor] = []
        self._wakers: list[Waker] = []
        self.feeder = feeder
        self._window = window

    # ------------------------------------------------------------ the reader's side

    def push(self, burst: Burst) -> None:
        """A burst read: held for the cursors (dropped once the connection finished), its
        requests given to the pairing; whoever waits for it is woken."""
        if self.finished:
            return
        self.bursts.append(burst)
        self.queued += len(burst.data)
        self._window.hold(len(burst.data), self.started)
        if self.pairing is not None:
            for req in burst.requests:
                self.pairing.request(req)
        self.wake()

    def production(self, resp: Response) -> None:
        """One of production's responses: to the pairing, or held until the connection
        starts; dropped if it started without one (no comparison) or finished."""
        if self.finished or self.production_ended:
            return
        if self.pairing is not None:
            self.pairing.production(resp)
        elif not self.started:
            self.backlog.append(resp)
            self._window.hold(size(resp))

    def production_end(self) -> None:
        """No more of production's responses will come."""
        self.production_ended = True
        if self.pairing is not None:
            self.pairing.production_end()

    def close(self) -> None:
        """Nothing more of it will be read."""
        self.closed = True
        self.wake()

    def wake(self) -> None:
        """There is more to read, or the end: the cursors waiting are called."""
        if self.hungry:
            self.hungry = False
            self.feeder.hunger(-1)
        wakers, self._wakers = self._wakers, []
        for waker in wakers:
            waker()

    # ------------------------------------------------------------ the replaying side

    def begin(self, sides: int, pairing: Pairing | None) -> list[Cursor]:
        """It starts replaying on ``sides`` connections; ``pairing`` compares responses."""
        self.started = True
        self._window.sendable += self.queued
        self.pairing = pairing
        if pairing is not None:
            for burst in self.bursts:
                for req in burst.requests:
                    pairing.request(req)
            for resp in self.backlog:
                self._window.hold(-size(resp))
                pairing.production(resp)
            if self.production_ended:
                pairing.production_end()
        else:
            self._window.hold(-sum(size(r) for r in self.backlog))
        self.backlog.clear()
        self._cursors = [Cursor(self) for _ in range(sides)]
        return list(self._cursors)

    def finish(self) -> None:
        """It stopped replaying: let go of what it holds."""
        self.finished = True
        if self.pairing is not None:
            self.pairing.finish()
        self._window.hold(-self.queued, self.started)
        self._window.hold(-sum(size(r) for r in self.backlog))
        self.bursts.clear()
        self.backlog.clear()
        self.queued = 0
        self.wake()

    def _release(self) -> None:
        """Let go of the bursts every open cursor passed."""
        cursors = self._cursors
        if len(cursors) == 1:
            low = cursors[0].pos if cursors[0].open else self._first + len(self.bursts)
        else:
            low = min((c.pos for c in cursors if c.open),
                      default=self._first + len(self.bursts))
        bursts, hold, started = self.bursts, self._window.hold, self.started
        while self._first < low and bursts:
            n = len(bursts.popleft().data)
            self._first += 1
            self.queued -= n
            hold(-n, started)

    def _want(self, waker: Waker) -> bool:
        """More bursts now (True), or ``waker`` called when there are."""
        if self.feeder.refill(self):
            return True
        if self.closed or self.finished:
            return False
        self._wakers.append(waker)
        if not self.hungry:
            self.hungry = True
            self.feeder.hunger(1)
        return False


class Cursor:
    """Where one replaying side is in a connection's bursts."""

    __slots__ = ("conn", "open", "pos")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pos = 0
        self.open = True

    def peek(self) -> Burst | None:
        """The next burst, if it was read."""
        conn = self.conn
        i = self.pos - conn._first
        return conn.bursts[i] if i < len(conn.bursts) else None

    def advance(self) -> None:
        """The burst from :meth:`peek` went."""
        self.pos += 1
        self.conn._release()

    def want(self, waker: Waker) -> bool:
        """Nothing to :meth:`peek` at: True if there is now; else ``waker`` is called once
        there is, or the connection closed."""
        return self.conn._want(waker)

    @property
    def exhausted(self) -> bool:
        """Every burst the connection will ever have went."""
        conn = self.conn
        return conn.closed and not conn.chain.count and self.peek() is None

    def close(self) -> None:
        """This side stopped: it holds no burst back."""
        self.open = False
        self.conn._release()
