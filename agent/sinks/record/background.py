"""A record writer on its own thread, so the capture loop never waits for the disk."""

from __future__ import annotations

import threading
from dataclasses import replace

import structlog

from agent.mirror.handoff import Handoff, HandoffStats, Policy
from agent.model import FlowEnd, TrafficChunk
from agent.sinks.record.ledger import FlowLedger
from agent.sinks.record.writers import RecordWriter

__all__ = ["BackgroundWriter"]

log = structlog.get_logger("agent.record")

_CHUNK, _END, _FLUSH = range(3)  # kinds of queued items


class BackgroundWriter:
    """Runs a record writer on its own thread, so the capture loop never waits for the disk.

    Records keep their order. At most ``max_bytes`` of data wait at once; past that, records
    are dropped and counted (``dropped_records``/``dropped_bytes``), never the reader
    blocked, and the recording stays honest: the flow's next record carries the dropped bytes
    in its ``gap_bytes`` (or its end record in its trailing gap).
    :meth:`flush` waits until everything queued is written and flushed. Whenever its queue
    runs empty the writer thread calls the inner writer's ``tick()`` (or, without one, its
    ``flush()``), and again after the seconds it returns if nothing comes before: that is
    how a compressed recording is written at least once a second, a file closed when its
    time slot ends, and a file that vanished from its path noticed within a second, even
    while no record comes (:meth:`agent.sinks.record.output.Output.tick`). An error the inner
    writer raises (not a contained file error; a broken stdout, say) is raised by the next
    call on the capture thread.

    The thread starts with the first record. :meth:`close` writes and flushes everything
    queued, stops the thread and waits for it, so the file can be closed after it; a later
    record starts the thread again. All calls come from one thread (the capture thread).

    The queue is an :class:`agent.mirror.handoff.Handoff` with the *drop* policy (reason ``full``):
    the capture thread is its producer and owns :attr:`dropped_records`/:attr:`dropped_bytes`,
    the ``record-writer`` thread its consumer, which gives a record's bytes back to the budget
    once it has written them.

    Connections: with an inner writer that keeps them (a
    :class:`~agent.sinks.record.writers.FileWriter`, :meth:`~.FileWriter.fronted`), every
    record is handed to its :attr:`ledger` here, on the capture thread, as it is queued; a
    record dropped here settles its flow as dropped (``queue_full``, ``memory``); the inner
    writer settles the rest as they reach the file. :meth:`close` drops what is still in
    flight as ``shutdown`` (see :mod:`agent.sinks.record.ledger`).
    """

    def __init__(self, inner: RecordWriter, max_bytes: int = 256 << 20) -> None:
        # 256 MiB default (256 << 20 = 268,435,456 bytes of record data, the chunks' own bytes,
        # not copied) may wait for the disk: ~0.5 s of 4 Gbit/s, or ~2.7 s of a 100 MB/s disk
        # falling behind completely. Records and ends cost ~200 B of objects each beyond
        # that, not counted. The mirror passes the memory budget's ``record_queue``
        # (agent/mirror/budget.py); the 256 MiB default is for this class alone.
        self._inner = inner
        fronted = getattr(inner, "fronted", None)
        #: The inner writer's connections (None if it keeps none).
        self.ledger: FlowLedger | None = fronted() if fronted is not None else None
        self._lost = ""  # why _put refused its latest record
        self._handoff: Handoff[tuple[int, object, bytes]] = Handoff(
            "record_writer", max_bytes, Policy.DROP, release_on_take=False)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.dropped_records = 0
        self.dropped_bytes = 0
        #: Set by the memory guard (from its thread) while the process is near its memory
        #: limit: records are refused like a full queue's, counted as ``shed_*``.
        self.shed = False
        self.shed_records = 0
        self.shed_bytes = 0
        self._missed: dict[tuple[int, str], int] = {}  # (flow, from) → bytes dropped since

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        self._raise()  # before the owed gap is taken: a raise must not lose it
        key = (chunk.flow_id, chunk.from_addr)
        missed = self._missed.pop(key, 0)
        queued = replace(chunk, gap_bytes=chunk.gap_bytes + missed) if missed else chunk
        ledger = self.ledger
        if ledger is not None:
            ledger.hand(chunk.flow_id)
        if not self._put(_CHUNK, queued, data):
            # Dropped: its bytes, and the gap before them, are owed to the next record.
            self._missed[key] = queued.gap_bytes + len(data)
            if ledger is not None:
                ledger.done(chunk.flow_id, lost=self._lost)

    def flow_end(self, end: FlowEnd) -> None:
        missed = sum(v for (fid, _), v in self._missed.items() if fid == end.flow_id)
        if missed:
            self._missed = {k: v for k, v in self._missed.items() if k[0] != end.flow_id}
            end = replace(end, trailing_gap=end.trailing_gap + missed)
        if self.ledger is not None:
            self.ledger.hand(end.flow_id)
        if not self._put(_END, end, b"") and self.ledger is not None:
            self.ledger.done(end.flow_id, end=True, lost=self._lost)

    def flush(self) -> None:
        done = threading.Event()
        self._put(_FLUSH, done, b"")
        thread = self._thread
        while not done.wait(0.5):
            if thread is None or not thread.is_alive():
                break
        self._raise()

    def close(self) -> None:
        """Write and flush everything queued, then stop the thread and wait for it. Raises
        like :meth:`flush`; calling it again does nothing more."""
        thread = self._thread
        if thread is not None:
            self._handoff.close()  # the thread writes what is queued, flushes and ends
            thread.join()
            self._thread = None
        if self.ledger is not None:
            self.ledger.shutdown()
        self._raise()

    def stats(self) -> dict[str, int]:
        """The inner writer's counts, plus ``record_dropped_*`` if records were dropped."""
        out = self._inner.stats()
        if self.dropped_records:
            out.update(record_dropped_records=self.dropped_records,
                       record_dropped_bytes=self.dropped_bytes)
        if self.shed_records:
            out.update(record_shed_records=self.shed_records,
                       record_shed_bytes=self.shed_bytes)
        return out

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.mirror.handoff.HasHandoffs`: this stage's hand-off."""
        return [self.handoff_stats()]

    def handoff_stats(self) -> HandoffStats:
        """The queue's counters (see :mod:`agent.mirror.handoff`)."""
        return self._handoff.stats()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _put(self, kind: int, item: object, data: bytes) -> bool:
        """Queue one item; False if a chunk was dropped because the queue is full (items
        other than chunks are empty, so they always fit)."""
        self._raise()
        if self._thread is None and self._handoff.closed:
            self._handoff.reopen()  # closed earlier: a new run, a new thread
        n = len(data)
        if n and self.shed:
            self._lost = "memory"
            self.shed_records += 1
            self.shed_bytes += n
            return False
        if not self._handoff.put((kind, item, data), n):
            self._lost = "queue_full"
            if not self.dropped_records:
                log.warning("recording cannot keep up; dropping records (counted, and "
                            "marked as gaps in the recording)")
            self.dropped_records += 1
            self.dropped_bytes += n
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
            self._thread.start()
        return True

    def _run(self) -> None:
        handoff = self._handoff
        wait: float | None = None
        while True:
            batch = handoff.take_all(wait)
            if not batch and handoff.closed:  # closed and drained
                break
            for kind, item, data in batch:
                self._apply(kind, item, data)
                handoff.release(len(data))  # written: no longer held
            if not len(handoff):  # the queue ran empty (or a tick came due)
                wait = self._tick()
        self._apply(_FLUSH, None, b"")

    def _tick(self) -> float | None:
        """The queue ran empty: the inner writer's :meth:`tick` if it has one (it writes what
        is due and says when to call again), else its flush. Seconds to wait at most."""
        tick = getattr(self._inner, "tick", None)
        if tick is None:
            self._apply(_FLUSH, None, b"")
            return None
        try:
            wait: float | None = tick()
        except BaseException as e:  # handed to the capture thread
            self._error = e
            return None
        return None if wait is None else max(wait, 0.01)

    def _apply(self, kind: int, item: object, data: bytes) -> None:
        """One queued item (a chunk, a flow end or a flush; then set ``item`` if an event)."""
        try:
            if kind == _CHUNK:
                self._inner.write(item, data)  # type: ignore[arg-type]
            elif kind == _END:
                self._inner.flow_end(item)  # type: ignore[arg-type]
            else:
                self._inner.flush()
        except BaseException as e:  # handed to the capture thread
            self._error = e
        if isinstance(item, threading.Event):
            item.set()
