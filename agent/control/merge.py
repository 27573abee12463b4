"""Live sources made of others: a live capture merged with the pcap ingest, and a source
that beats a heartbeat each time its consumer comes back for more.

Both are :class:`~agent.sources.LiveSource` objects and pass on what the mirror asks of a
source: ``stats``, ``drain`` and, where the parts have them, ``handoffs`` and
``heartbeats`` (:class:`~agent.sources.HasHeartbeats`: the parts' own threads).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from agent.control.ingest import PcapIngest
from agent.mirror.handoff import HandoffStats, HasHandoffs
from agent.mirror.heartbeat import Heartbeat
from agent.model import Segment
from agent.sources import HasHeartbeats, LiveSource

__all__ = ["Beating", "MergedSource"]


class MergedSource:
    """The batches of ``live``, with those of ``ingest`` in between.

    The live source never waits behind a file: after each live batch (an empty one included,
    which a live source yields when idle) at most one ingest batch is taken, without waiting.
    Ends when ``live`` ends. ``stats`` are both sources' counters summed key by key (the
    ingest's ``pcap_jobs_*`` are its own); ``drain`` and ``close`` act on both.
    """

    def __init__(self, live: LiveSource, ingest: PcapIngest) -> None:
        self.live = live
        self.ingest = ingest

    def batches(self) -> Iterator[list[Segment]]:
        poll = self.ingest.poll
        for batch in self.live.batches():
            yield batch
            extra = poll()
            if extra:
                yield extra

    def drain(self) -> list[Segment]:
        return self.live.drain() + self.ingest.drain()

    def close(self) -> None:
        try:
            self.live.close()
        finally:
            self.ingest.close()

    def stats(self) -> dict[str, int]:
        out = Counter(self.live.stats())
        out.update(self.ingest.stats())  # (not "+", which drops zeros)
        return dict(out)

    def handoffs(self) -> list[HandoffStats]:
        mine = self.live.handoffs() if isinstance(self.live, HasHandoffs) else []
        return mine + self.ingest.handoffs()

    def heartbeats(self) -> list[Heartbeat]:
        """The live source's threads' heartbeats, then the pcap reader's."""
        mine = self.live.heartbeats() if isinstance(self.live, HasHeartbeats) else []
        return [*mine, self.ingest.heartbeat]


class Beating:
    """``source`` unchanged, with ``heartbeat`` started when reading begins, beaten at every
    batch the consumer asks for (it finished the one before: progress) and stopped when the
    source ends. The consumer's thread is the one watched: wrap the mirror's source with it."""

    def __init__(self, source: LiveSource, heartbeat: Heartbeat) -> None:
        self.source = source
        self.heartbeat = heartbeat

    def batches(self) -> Iterator[list[Segment]]:
        hb = self.heartbeat
        hb.start()
        for batch in self.source.batches():
            hb.beat()
            yield batch
        hb.stop()

    def drain(self) -> list[Segment]:
        return self.source.drain()

    def close(self) -> None:
        self.source.close()

    def stats(self) -> dict[str, int]:
        return self.source.stats()

    def handoffs(self) -> list[HandoffStats]:
        return self.source.handoffs() if isinstance(self.source, HasHandoffs) else []

    def heartbeats(self) -> list[Heartbeat]:
        """The wrapped source's threads' heartbeats (not :attr:`heartbeat`, the consumer's)."""
        return self.source.heartbeats() if isinstance(self.source, HasHeartbeats) else []
