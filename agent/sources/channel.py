"""An in-memory source for tests and embedding: put segments (or raw frames) in, call end().

Like the original's channel source, the producer owns the lifecycle: :meth:`close` only stops
reading; the mirror's run returns once :meth:`end` was called and everything was read.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

from agent.decode import LINKTYPE_ETHERNET, Decoder
from agent.model import Segment

__all__ = ["ChannelSource"]

_END = object()


class ChannelSource:
    """A thread-safe queue of :class:`Segment` or raw frame ``bytes`` (decoded as ``linktype``).

    ``batches`` yields an empty batch every ``idle_tick`` seconds while the queue is empty, so
    the consumer can let time pass and notice cancellation.
    """

    def __init__(self, linktype: int = LINKTYPE_ETHERNET, idle_tick: float = 0.05) -> None:
        self._q: queue.Queue[object] = queue.Queue()
        self._decoder = Decoder(linktype)
        self._idle_tick = idle_tick
        self._closed = False
        self._items = 0

    def put(self, item: Segment | bytes, ts: float = 0.0) -> None:
        """Queue a segment, or a raw frame captured at ``ts``."""
        self._q.put(item if isinstance(item, Segment) else (item, ts))

    def end(self) -> None:
        """No more input: the consumer finishes once it has read what is queued."""
        self._q.put(_END)

    def batches(self) -> Iterator[list[Segment]]:
        q = self._q
        while not self._closed:
            try:
                item = q.get(timeout=self._idle_tick)
            except queue.Empty:
                yield []
                continue
            batch: list[Segment] = []
            while True:
                if item is _END:
                    if batch:
                        yield batch
                    return
                self._items += 1
                if isinstance(item, Segment):
                    batch.append(item)
                else:
                    assert isinstance(item, tuple)
                    frame, ts = item
                    seg = self._decoder.decode(frame, ts)
                    if seg is not None:
                        batch.append(seg)
                    if self._decoder.ready:  # IP datagrams given up (timeout, memory)
                        batch += self._decoder.take_ready()
                if len(batch) >= 256:
                    break
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            yield batch

    def close(self) -> None:
        self._closed = True

    def stats(self) -> dict[str, int]:
        return {"frames": self._items, **self._decoder.stats.as_dict()}
