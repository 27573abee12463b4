"""The live source's user-space stages without a kernel: the reorderer (per-CPU rings merged
by timestamp, the newest held back), the drain thread's bounded hand-off (pause, not drop),
and the ring sizes worked out from --buffer-mib."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.model import Segment
from agent.sources.ebpf.source import FILL_FRACTION, RingGeometry
from agent.sources.ring.drain import RingDrain
from agent.sources.ring.reorder import Reorderer

ADDR = bytes([192, 0, 2, 1])


def seg(ts: float, size: int = 10, tag: int = 0) -> Segment:
    return Segment(ADDR, 40000, ADDR, 8080, tag, 0, 0x18, b"x" * size, ts)


@given(st.lists(st.floats(0, 10, allow_nan=False), max_size=60),
       st.lists(st.floats(0, 10, allow_nan=False), max_size=6))
def test_reorderer_releases_in_order_and_holds_the_rest(stamps: list[float],
                                                        cutoffs: list[float]) -> None:
    """However the drains split and interleave (CPU rings), every segment comes out once,
    each release is in timestamp order, and nothing newer than a cutoff leaves early."""
    order = Reorderer()
    segs = [seg(ts, tag=i) for i, ts in enumerate(stamps)]
    rng = random.Random(len(segs))
    out: list[Segment] = []
    pos = 0
    for cutoff in sorted(cutoffs):
        take = rng.randint(0, len(segs) - pos)
        batch = segs[pos:pos + take]
        rng.shuffle(batch)
        order.add(batch)
        pos += take
        released = order.release(cutoff)
        assert all(s.ts <= cutoff for s in released)
        assert [s.ts for s in released] == sorted(s.ts for s in released)
        out += released
    order.add(segs[pos:])
    out += order.release_all()
    assert sorted(s.seq for s in out) == list(range(len(segs)))
    assert len(order) == 0


def test_reorderer_keeps_arrival_order_for_equal_stamps() -> None:
    order = Reorderer()
    order.add([seg(1.0, tag=1), seg(1.0, tag=2), seg(0.5, tag=0)])
    assert [s.seq for s in order.release(1.0)] == [0, 1, 2]


class FakeRing:
    """A ring whose every consume() makes ``per_drain`` bytes of segments."""

    def __init__(self, per_drain: int) -> None:
        self.per_drain = per_drain
        self.pending: list[Segment] = []
        self.consumed = 0
        self.fail: BaseException | None = None

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.001))

    def consume(self) -> int:
        if self.fail is not None:
            raise self.fail
        self.consumed += 1
        self.pending.append(seg(time.monotonic(), self.per_drain))
        return self.per_drain

    def take(self) -> list[Segment]:
        out, self.pending = self.pending, []
        return out


def test_drain_pauses_over_budget_and_resumes_when_taken() -> None:
    ring = FakeRing(per_drain=1000)
    drain = RingDrain(ring, ring.take, interval=0.001, budget=5000)
    drain.start()
    time.sleep(0.2)
    stalled = ring.consumed
    time.sleep(0.1)
    assert stalled == ring.consumed <= 7  # paused: over budget after 6 drains at most
    assert drain.pauses >= 1
    segs, drained_at = drain.take(0.1)
    assert sum(len(s.payload) for s in segs) == 1000 * stalled and drained_at > 0
    time.sleep(0.05)
    assert ring.consumed > stalled  # taken: the drain goes on
    rest = drain.stop()
    assert sum(len(s.payload) for s in rest) == 1000 * (ring.consumed - stalled)


def test_drain_error_reaches_the_taker_and_stop_joins() -> None:
    ring = FakeRing(per_drain=10)
    ring.fail = OSError(5, "ring gone")
    drain = RingDrain(ring, ring.take, interval=0.001, budget=1 << 20)
    drain.start()
    with pytest.raises(OSError, match="ring gone"):
        for _ in range(100):
            drain.take(0.05)
    drain.stop()
    assert not [t for t in threading.enumerate() if t.name == "ring-drain"]


@pytest.mark.parametrize(("mib", "transport", "cpus"), [(16, "perf", 2), (16, "ringbuf", 2),
                                                         (3, "perf", 1), (4, "ringbuf", 6)])
def test_ring_geometry(mib: int, transport: str, cpus: int) -> None:
    g = RingGeometry.of(mib, transport, cpus)
    page = 4096
    assert g.perf_pages & (g.perf_pages - 1) == 0 and g.perf_pages * page >= mib << 20
    assert g.ringbuf_pages & (g.ringbuf_pages - 1) == 0
    assert g.ringbuf_pages * page >= (mib << 20) * cpus
    assert g.capacity == (g.ringbuf_pages if transport == "ringbuf" else g.perf_pages) * page
    # Every CPU writing its wakeup share fills at most FILL_FRACTION of the ring.
    share = cpus if transport == "ringbuf" else 1
    assert g.wakeup * share <= g.capacity * FILL_FRACTION


def test_drain_hand_off_counts_every_drain_and_drops_nothing() -> None:
    ring = FakeRing(per_drain=1000)
    drain = RingDrain(ring, ring.take, interval=0.001, budget=5000)
    drain.start()
    time.sleep(0.1)
    taken = sum(len(s.payload) for s in drain.take(0.1)[0])
    time.sleep(0.05)
    rest = sum(len(s.payload) for s in drain.stop())
    st = drain.handoff_stats()
    assert (st.name, st.policy, st.budget_bytes) == ("ring_drain", "pause", 5000)
    assert st.bytes == st.taken_bytes == taken + rest == 1000 * ring.consumed
    assert st.items == st.taken_items == ring.consumed and not st.dropped_items
    assert st.pauses == drain.pauses >= 1 and st.queued_bytes == 0
