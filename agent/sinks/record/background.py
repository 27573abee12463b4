"""A record writer on its own thread, so the capture loop never waits for the disk."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import replace

import structlog

from agent.model import FlowEnd, TrafficChunk
from agent.sinks.record.writers import RecordWriter

__all__ = ["BackgroundWriter"]

log = structlog.get_logger("agent.record")

_CHUNK, _END, _FLUSH, _STOP = range(4)  # kinds of queued items


class BackgroundWriter:
    """Runs a record writer on its own thread, so the capture loop never waits for the disk.

    Records keep their order. At most ``max_bytes`` of data wait at once; past that, records
    are dropped and counted (``dropped_records``/``dropped_bytes``), never the reader
    blocked, and the recording stays honest: the flow's next record carries the dropped bytes
    in its ``gap_bytes`` (or its end record in its trailing gap).
    :meth:`flush` waits until everything queued is written and flushed; the writer also
    flushes whenever its queue runs empty. An error the inner writer raises (not a contained
    file error; a broken stdout, say) is raised by the next call on the capture thread.

    The thread starts with the first record. :meth:`close` writes and flushes everything
    queued, stops the thread and waits for it, so the file can be closed after it; a later
    record starts the thread again. All calls come from one thread (the capture thread).
    """

    def __init__(self, inner: RecordWriter, max_bytes: int = 256 << 20) -> None:
        self._inner = inner
        self._max = max_bytes
        self._queue: deque[tuple[int, object, bytes]] = deque()
        self._queued_bytes = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.dropped_records = 0
        self.dropped_bytes = 0
        self._missed: dict[tuple[int, str], int] = {}  # (flow, from) → bytes dropped since

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        key = (chunk.flow_id, chunk.from_addr)
        missed = self._missed.pop(key, 0)
        queued = replace(chunk, gap_bytes=chunk.gap_bytes + missed) if missed else chunk
        if not self._put(_CHUNK, queued, data):
            # Dropped: its bytes, and the gap before them, are owed to the next record.
            self._missed[key] = queued.gap_bytes + len(data)

    def flow_end(self, end: FlowEnd) -> None:
        missed = sum(v for (fid, _), v in self._missed.items() if fid == end.flow_id)
        if missed:
            self._missed = {k: v for k, v in self._missed.items() if k[0] != end.flow_id}
            end = replace(end, trailing_gap=end.trailing_gap + missed)
        self._put(_END, end, b"")

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
            with self._cv:
                self._queue.append((_STOP, None, b""))
                self._cv.notify()
            thread.join()
            self._thread = None
        self._raise()

    def stats(self) -> dict[str, int]:
        """The inner writer's counts, plus ``record_dropped_*`` if records were dropped."""
        out = self._inner.stats()
        if self.dropped_records:
            out.update(record_dropped_records=self.dropped_records,
                       record_dropped_bytes=self.dropped_bytes)
        return out

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _put(self, kind: int, item: object, data: bytes) -> bool:
        """Queue one item; False if a chunk was dropped because the queue is full."""
        self._raise()
        n = len(data)
        with self._cv:
            if kind == _CHUNK and self._queued_bytes + n > self._max:
                if not self.dropped_records:
                    log.warning("recording cannot keep up; dropping records (counted, and "
                                "marked as gaps in the recording)")
                self.dropped_records += 1
                self.dropped_bytes += n
                return False
            self._queue.append((kind, item, data))
            self._queued_bytes += n
            self._cv.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
            self._thread.start()
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                batch = list(self._queue)
                self._queue.clear()
            for kind, item, data in batch:
                if kind == _STOP:  # always the last item: its caller waits for this thread
                    self._apply(_FLUSH, None, b"")
                    return
                self._apply(kind, item, data)
                with self._cv:
                    self._queued_bytes -= len(data)
            with self._cv:
                idle = not self._queue
            if idle:
                self._apply(_FLUSH, None, b"")

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
