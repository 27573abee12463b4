"""The one bounded hand-off between two threads: a FIFO of items with a byte budget.

Every thread boundary of the pipeline is one of these:

=================  =============================  ====================  =======================
boundary           producer → consumer            policy                budget
=================  =============================  ====================  =======================
ring drain         ``ring-drain`` → mirror        :attr:`Policy.PAUSE`  ``drain_backlog``
record writer      mirror → ``record-writer``     :attr:`Policy.DROP`   ``record_queue``
record nats        mirror → ``record-nats``       DROP; PAUSE offline   ``record_queue``
forward hand-over  mirror → ``forward`` loop      :attr:`Policy.DROP`   ``forward_total``
pcap ingest        ``pcap-reader`` → mirror       :attr:`Policy.PAUSE`  ``PcapIngest(budget=)``
flow pcap writer   mirror → ``flow-pcap-writer``  DROP; PAUSE offline   ``flow_pcap``
=================  =============================  ====================  =======================

Budgets: the fields of :class:`agent.mirror.budget.Budget`, all from one ``--memory-limit``.

Policies, chosen per use:

- ``PAUSE``: the producer waits for room (:meth:`Handoff.wait_for_room`, or inside
  :meth:`Handoff.put`). Used where the producer can leave the loss to someone who counts it
  exactly: the ring drain stops emptying the kernel's rings, whose own drops are counted and
  marked as gaps. "Room" means the bytes held are not over the budget, since a producer may not
  know an item's size before making it: the bytes held exceed the budget by at most one item.
- ``DROP``: the producer never waits. An item that does not fit is refused (``put`` returns
  False) and counted under the reason the producer names; the bytes held never exceed the
  budget. An item of size 0 always fits (control items: flushes, ends).

Bytes count against the budget from :meth:`~Handoff.put` until the consumer gives them back:
when taken (``release_on_take=True``), or by :meth:`~Handoff.release` once it no longer holds
them (a writer that has written them, a connection whose kernel took them).

Threads: exactly one producer thread and one consumer thread. Each counter is written by one
of them only (under the lock, so :meth:`~Handoff.stats` from any thread is consistent):

- producer: ``items``, ``bytes`` (handed over), ``dropped_*`` (refused, by reason; ``closed``
  for a put after :meth:`~Handoff.close`), ``pauses``, ``peak_queued_bytes``;
- consumer: ``taken_items``, ``taken_bytes``, ``released_bytes``, ``discarded_*``.

The bytes held (``queued_bytes``) are derived, ``bytes - released_bytes``, never written.

Shutdown: :meth:`~Handoff.close` (any thread) refuses further puts and wakes every waiter; the
consumer then takes what is still queued (a take on a closed, empty hand-off returns at once)
or :meth:`~Handoff.discard`\\ s it, counted. :meth:`~Handoff.fail` closes with an error that
the consumer's takes raise (a producer thread that died). :meth:`~Handoff.reopen` lets a
stopped pair start again (a writer thread restarted for the next run).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

__all__ = ["Handoff", "HandoffStats", "HasHandoffs", "Policy"]

T = TypeVar("T")


class Policy(enum.Enum):
    """What a producer does when the hand-off is full."""

    PAUSE = "pause"  # wait for room
    DROP = "drop"  # refuse the item, counted with a reason


@dataclass(frozen=True)
class HandoffStats:
    """A consistent snapshot of one hand-off's counters (see the module doc for owners)."""

    name: str
    policy: str
    budget_bytes: int
    items: int = 0
    bytes: int = 0
    taken_items: int = 0
    taken_bytes: int = 0
    released_bytes: int = 0
    queued_items: int = 0
    peak_queued_bytes: int = 0
    pauses: int = 0
    discarded_items: int = 0
    discarded_bytes: int = 0
    dropped_items: dict[str, int] = field(default_factory=dict)
    dropped_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def queued_bytes(self) -> int:
        """Bytes handed over and not given back yet (what counts against the budget)."""
        return self.bytes - self.released_bytes

    def as_dict(self) -> dict[str, int]:
        """Flat ``{key: value}``; reasons are suffixes (``dropped_bytes_<reason>``)."""
        out = {"items": self.items, "bytes": self.bytes, "taken_items": self.taken_items,
               "taken_bytes": self.taken_bytes, "queued_items": self.queued_items,
               "queued_bytes": self.queued_bytes, "peak_queued_bytes": self.peak_queued_bytes,
               "budget_bytes": self.budget_bytes, "pauses": self.pauses,
               "discarded_items": self.discarded_items, "discarded_bytes": self.discarded_bytes}
        out.update({f"dropped_items_{k}": v for k, v in self.dropped_items.items()})
        out.update({f"dropped_bytes_{k}": v for k, v in self.dropped_bytes.items()})
        return out


class Handoff(Generic[T]):
    """A bounded FIFO from one producer thread to one consumer thread (see the module doc).

    ``size`` is what an item counts against ``budget`` (its payload bytes); ``name`` labels
    its counters.
    """

    def __init__(self, name: str, budget: int, policy: Policy, *,
                 release_on_take: bool = True) -> None:
        if budget < 0:
            raise ValueError(f"hand-off {name}: budget must be >= 0, not {budget}")
        self.name = name
        self.budget = budget
        self.policy = policy
        self._release_on_take = release_on_take
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # consumer waits: an item, or closed
        self._room = threading.Condition(self._lock)  # PAUSE producer waits: room, or closed
        self._queue: deque[tuple[T, int]] = deque()
        self._closed = False
        self._error: BaseException | None = None
        self._takers = 0  # consumers waiting (0 or 1): put notifies only if someone waits
        # Producer's counters.
        self._items = 0
        self._bytes = 0
        self._peak = 0
        self._pauses = 0
        self._pausing = False
        self._dropped_items: Counter[str] = Counter()
        self._dropped_bytes: Counter[str] = Counter()
        # Consumer's counters.
        self._taken_items = 0
        self._taken_bytes = 0
        self._released = 0
        self._discarded_items = 0
        self._discarded_bytes = 0

    # ---------------------------------------------------------------- producer

    def put(self, item: T, size: int, reason: str = "full") -> bool:
        """Hand ``item`` (``size`` bytes) over. False if it was refused and counted under
        ``reason`` (DROP: it does not fit) or ``closed``. PAUSE waits for room first."""
        with self._lock:
            if self.policy is Policy.PAUSE:
                self._wait_room_locked(None)
            if self._closed:
                return self._refuse("closed", size)
            held = self._bytes - self._released + size
            if self.policy is Policy.DROP and held > self.budget:
                return self._refuse(reason, size)
            self._queue.append((item, size))
            self._items += 1
            self._bytes += size
            if held > self._peak:
                self._peak = held
            if self._takers:
                self._ready.notify()
            return True

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """PAUSE: wait up to ``timeout`` seconds until the bytes held are not over budget;
        True if so (and still open), False on timeout or once closed. A wait is counted in
        ``pauses`` once however many calls it takes."""
        with self._lock:
            return self._wait_room_locked(timeout)

    def fail(self, error: BaseException) -> None:
        """Close, with ``error`` for the consumer: its takes raise it from now on."""
        with self._lock:
            self._error = error
        self.close()

    def reopen(self) -> None:
        """Accept puts again after :meth:`close`, once the consumer has stopped (what it left
        queued stays, in order). Counters go on."""
        with self._lock:
            self._closed = False
            self._error = None

    # ---------------------------------------------------------------- any thread

    def close(self) -> None:
        """Refuse further puts and wake every waiter; what is queued stays for the consumer
        to take or :meth:`discard`. Idempotent."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            self._room.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_bytes(self) -> int:
        """Bytes counting against the budget now (handed over, not given back)."""
        with self._lock:
            return self._bytes - self._released

    def __len__(self) -> int:
        """Items queued, not taken yet."""
        return len(self._queue)

    def stats(self) -> HandoffStats:
        with self._lock:
            return HandoffStats(
                self.name, self.policy.value, self.budget, self._items, self._bytes,
                self._taken_items, self._taken_bytes, self._released, len(self._queue),
                self._peak, self._pauses, self._discarded_items, self._discarded_bytes,
                dict(self._dropped_items), dict(self._dropped_bytes))

    # ---------------------------------------------------------------- consumer

    def take(self, timeout: float | None = None) -> T | None:
        """The oldest item, waiting up to ``timeout`` seconds (None: until one comes or the
        hand-off closes); None if there is none. Raises the error given to :meth:`fail`."""
        with self._lock:
            self._wait_ready_locked(timeout)
            if not self._queue:
                return None
            item, size = self._queue.popleft()
            self._taken(1, size)
            return item

    def take_all(self, timeout: float | None = None) -> list[T]:
        """Every item queued (a batch, oldest first), waiting up to ``timeout`` seconds for
        one; empty on timeout or once closed and empty. Raises the error given to
        :meth:`fail`."""
        with self._lock:
            self._wait_ready_locked(timeout)
            return self._take_all_locked()

    def leftovers(self) -> list[T]:
        """Every item still queued, without waiting or raising (for a shutdown)."""
        with self._lock:
            return self._take_all_locked()

    def release(self, size: int) -> None:
        """Give back ``size`` bytes taken earlier (``release_on_take=False``): no longer
        held by the consumer, so they stop counting against the budget."""
        with self._lock:
            self._released += size
            if self.policy is Policy.PAUSE:
                self._room.notify()

    def discard(self) -> int:
        """Drop everything queued, counted (``discarded_*``); returns how many items."""
        with self._lock:
            n = len(self._queue)
            size = sum(s for _, s in self._queue)
            self._queue.clear()
            self._discarded_items += n
            self._discarded_bytes += size
            self._released += size
            self._room.notify_all()
            return n

    # ---------------------------------------------------------------- internals (locked)

    def _refuse(self, reason: str, size: int) -> bool:
        self._dropped_items[reason] += 1
        self._dropped_bytes[reason] += size
        return False

    def _wait_room_locked(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._bytes - self._released > self.budget and not self._closed:
            if not self._pausing:
                self._pausing = True
                self._pauses += 1
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._room.wait(left)
        self._pausing = False
        return not self._closed

    def _wait_ready_locked(self, timeout: float | None) -> None:
        if not self._queue and not self._closed and self._error is None and timeout != 0:
            self._takers += 1
            try:
                self._ready.wait_for(lambda: self._queue or self._closed, timeout)
            finally:
                self._takers -= 1
        if self._error is not None and not self._queue:
            raise self._error  # only once what came before the failure is taken

    def _take_all_locked(self) -> list[T]:
        if not self._queue:
            return []
        items = [item for item, _ in self._queue]
        self._taken(len(items), sum(size for _, size in self._queue))
        self._queue.clear()
        return items

    def _taken(self, n: int, size: int) -> None:
        self._taken_items += n
        self._taken_bytes += size
        if self._release_on_take:
            self._released += size
            if self.policy is Policy.PAUSE:
                self._room.notify()


@runtime_checkable
class HasHandoffs(Protocol):
    """A stage that owns hand-offs: the mirror collects their counters for the metrics."""

    def handoffs(self) -> list[HandoffStats]: ...
