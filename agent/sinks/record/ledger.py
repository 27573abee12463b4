"""Per-connection accounting of a record sink (files and NATS): every flow handed to the
sink ends exactly once, completed or dropped with one reason, and is in flight until then.

A flow is one connection from its first record handed to the sink (:meth:`FlowLedger.hand`).
Every record handed is *pending* until it is settled (:meth:`FlowLedger.done`): written (to
the file, or acknowledged by JetStream) or lost with a reason. The flow is

* **dropped** (``connections_dropped_<reason>``) at its first lost record, with that record's
  reason; its later records are still settled, never counted again;
* **completed** (``connections_completed``) once its end record is settled and no record of
  it is pending, none having been lost;
* **in flight** otherwise; :meth:`FlowLedger.shutdown` (the sink's close) drops every flow
  still in flight as ``shutdown``.

So ``connections == completed + dropped + in_flight`` in every :meth:`FlowLedger.stats`, from
any thread: every change and the snapshot hold one lock (``connections_in_flight`` is
derived, never written). A settle of a flow the ledger no longer tracks (settled after a
shutdown) is ignored; a record of a flow it no longer tracks is a new connection.

A file recording counts its records in a :class:`Tally`, which settles them here; records
written to a file that is watched for vanishing are settled once the file is seen in place
after them (or lost as ``vanished``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

__all__ = ["FILE_REASONS", "FlowLedger", "Tally"]

#: Why a file recording drops a connection: queue_full (the writer thread could not keep
#: up), memory (refused near the memory limit), write_failed (the file failed), vanished
#: (written to a file that was deleted before it was seen in place again), shutdown (no end
#: before the sink was closed).
FILE_REASONS = ("queue_full", "memory", "write_failed", "vanished", "shutdown")


class _Flow:
    __slots__ = ("counted", "ended", "pending")

    def __init__(self) -> None:
        self.pending = 0  # records handed, not settled yet
        self.ended = False  # its end record is settled
        self.counted = False  # completed or dropped already


class FlowLedger:
    """The connections of one record sink (see the module doc); ``reasons``: the drop
    reasons it reports (each key exists from the start)."""

    def __init__(self, reasons: Iterable[str] = FILE_REASONS) -> None:
        self.reasons = tuple(reasons)
        self._lock = threading.Lock()
        self._flows: dict[int, _Flow] = {}
        self._connections = self._completed = 0
        self._dropped = dict.fromkeys(self.reasons, 0)

    def hand(self, flow: int) -> None:
        """A record of ``flow`` was handed to the sink (the flow's first: a connection)."""
        with self._lock:
            f = self._flows.get(flow)
            if f is None:
                f = self._flows[flow] = _Flow()
                self._connections += 1
            f.pending += 1

    def more(self, flow: int, n: int = 1) -> None:
        """A pending record of ``flow`` became ``n`` + 1 pieces, each settled on its own
        (NATS: a chunk over the server's max_payload)."""
        with self._lock:
            f = self._flows.get(flow)
            if f is not None:
                f.pending += n

    def done(self, flow: int, end: bool = False, lost: str | None = None) -> None:
        """A pending record of ``flow`` was settled: written, or ``lost`` for that reason
        (one of :attr:`reasons`); ``end``: it was the flow's end record (a flow end)."""
        with self._lock:
            self._settle(flow, end, lost)

    def done_many(self, records: Iterable[tuple[int, bool]], lost: str | None = None) -> None:
        """:meth:`done` for each (flow, end) of ``records``, under one lock."""
        with self._lock:
            for flow, end in records:
                self._settle(flow, end, lost)

    def done_counts(self, records: Iterable[tuple[int, int, bool]],
                    lost: str | None = None) -> None:
        """:meth:`done` for ``n`` records of each (flow, n, ended) of ``records`` (``ended``:
        the flow's end record is among them, its last), under one lock."""
        with self._lock:
            for flow, n, end in records:
                self._settle(flow, end, lost, n)

    def shutdown(self) -> int:
        """The sink closed: every flow still in flight is dropped as ``shutdown``; the
        ledger forgets every flow. Returns how many were dropped."""
        with self._lock:
            n = sum(1 for f in self._flows.values() if not f.counted)
            self._dropped["shutdown"] = self._dropped.get("shutdown", 0) + n
            self._flows.clear()
            return n

    def stats(self) -> dict[str, int]:
        """``connections``, ``connections_completed``, ``connections_dropped_<reason>`` for
        every reason, their sum ``connections_dropped`` and ``connections_in_flight``: one
        consistent snapshot."""
        with self._lock:
            dropped = dict(self._dropped)
            connections, completed = self._connections, self._completed
        out = {"connections": connections, "connections_completed": completed}
        out.update((f"connections_dropped_{r}", n) for r, n in dropped.items())
        out["connections_dropped"] = total = sum(dropped.values())
        out["connections_in_flight"] = connections - completed - total
        return out

    def _settle(self, flow: int, end: bool, lost: str | None, n: int = 1) -> None:
        f = self._flows.get(flow)
        if f is None:
            return  # forgotten by a shutdown: counted already
        f.pending -= n
        if lost is not None and not f.counted:
            f.counted = True
            self._dropped[lost] = self._dropped.get(lost, 0) + 1
        if end:
            f.ended = True
        if f.ended and f.pending <= 0:
            del self._flows[flow]
            if not f.counted:
                self._completed += 1



class Tally:
    """What became of the records of one recording: written (``records``, ``data_bytes``:
    chunk records and their data), or lost because the recording failed (``failed_*``) or
    because they went into a file that was deleted before it was seen in place again
    (``vanished_*``); each record is settled in ``ledger`` as its flow's, as it is counted.

    Records written to a file that is watched (:class:`~.files.FileWatch`) are *held* until
    :meth:`confirm` says whether that file was still in place. They are held as sums (per
    flow for the ledger), so holding a second of records costs little whatever the rate.
    Used by one thread (the writer's); the counters may be read from any."""

    def __init__(self, ledger: FlowLedger | None) -> None:
        self.ledger = ledger
        self.records = self.data_bytes = 0
        self.failed_records = self.failed_bytes = 0
        self.vanished_records = self.vanished_bytes = 0
        self._held_records = self._held_bytes = 0
        self._held: dict[int, list[int]] = {}  # flow → [records, its end among them]

    def written(self, ends: Sequence[tuple[int, int, int]], hold: bool = False) -> None:
        """Records written whole, as (end offset, data_len, flow) (``data_len`` < 0: the
        flow's end record): counted now, or, ``hold``, once :meth:`confirm` is told."""
        if hold:
            self._hold(ends)
            return
        lens = [n for _, n, _ in ends if n >= 0]
        self.records += len(lens)
        self.data_bytes += sum(lens)
        if self.ledger is not None and ends:
            self.ledger.done_many((flow, n < 0) for _, n, flow in ends)

    def failed(self, data_len: int, flow: int) -> None:
        """A record that did not reach the file: lost as ``write_failed``."""
        if data_len >= 0:
            self.failed_records += 1
            self.failed_bytes += data_len
        if self.ledger is not None:
            self.ledger.done(flow, data_len < 0, "write_failed")

    def confirm(self, in_place: bool = True) -> tuple[int, int]:
        """The file of the held records is in place (or was moved: they are in it), so they
        count as written; or, not ``in_place``, it was deleted: they are lost as
        ``vanished``. Returns (records, data bytes) of the chunk records among them."""
        out = (self._held_records, self._held_bytes)
        if in_place:
            self.records += out[0]
            self.data_bytes += out[1]
        else:
            self.vanished_records += out[0]
            self.vanished_bytes += out[1]
        if self.ledger is not None and self._held:
            self.ledger.done_counts(((flow, n, bool(end)) for flow, (n, end) in
                                     self._held.items()), None if in_place else "vanished")
        self._held_records = self._held_bytes = 0
        self._held = {}
        return out

    def _hold(self, ends: Sequence[tuple[int, int, int]]) -> None:
        held = self._held
        for _, n, flow in ends:
            f = held.get(flow)
            if f is None:
                f = held[flow] = [0, 0]
            f[0] += 1
            if n < 0:
                f[1] = 1
            else:
                self._held_records += 1
                self._held_bytes += n
