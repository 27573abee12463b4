"""The memory guard (agent/mirror/memory_guard.py): its policy fed RSS samples (sans-I/O), the
thread that applies it, and the stages' sides of shedding: the reassembler refuses new connections
whole, the record writer refuses records, the forward sink drops its largest connections, the
native drain pauses. Every drop counted by reason (``memory``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from agent import metrics
from agent.mirror.memory_guard import (
    DROP_EVERY,
    STUCK_AFTER,
    TRIM_EVERY,
    TRIM_EVERY_HIGH,
    GuardThread,
    Level,
    MemoryGuard,
    PipelineActions,
    Thresholds,
    read_rss,
    trim_heap,
)
from agent.model import ACK, FIN, PSH, SYN, Direction, FlowEnd, TrafficChunk
from agent.reassembly import Reassembler
from agent.sinks.forward import ForwardSink
from agent.sinks.record import BackgroundWriter
from agent.sources.ring.native import NativeDecoder
from agent.sources.ring.pump import PERF, NativeDrain, hold_all
from tests.unit.rings import PerfRing, event
from tests.unit.segments import Conversation
from tests.unit.shadow import Shadow, wait_until

MIB = 1 << 20
#: Limit 1000 bytes: trim 800, low 800, high 880, critical 950.
T = Thresholds.of(1000)


def ladder() -> MemoryGuard:
    return MemoryGuard(T)


# ---------------------------------------------------------------- the policy (sans-I/O)


def test_thresholds_are_fractions_of_the_limit_in_order() -> None:
    assert (T.trim, T.low, T.high, T.critical) == (800, 800, 880, 950)
    with pytest.raises(ValueError, match="low <= high <= critical"):
        Thresholds.of(1000, low=0.9, high=0.8)


def test_high_sheds_and_holds_until_low_then_resumes() -> None:
    g = ladder()
    assert g.observe(500, 0.0) == g.observe(870, 0.01)  # under high: nothing
    v = g.observe(880, 0.02)
    assert v.level is Level.HIGH and v.changed and not v.drop_bytes
    assert g.observe(820, 0.03).level is Level.HIGH and not g.observe(820, 0.04).changed
    v = g.observe(800, 0.05)  # at low: resume
    assert v.level is Level.OK and v.changed
    assert g.episodes == {Level.HIGH: 1, Level.CRITICAL: 0}
    assert g.stats()["shed_ms"] == 30 and g.peak == 880 and g.samples == 6


def test_critical_drops_queued_data_paced_and_steps_down() -> None:
    g = ladder()
    v = g.observe(960, 0.0)
    assert v.level is Level.CRITICAL and v.drop_bytes == 960 - T.low
    assert not g.observe(955, DROP_EVERY / 2).drop_bytes  # paced: the frees must show first
    assert g.observe(955, DROP_EVERY).drop_bytes == 955 - T.low
    assert g.observe(900, 0.3).level is Level.CRITICAL  # still at or above high
    assert g.observe(850, 0.4).level is Level.HIGH
    assert g.observe(790, 0.5).level is Level.OK
    assert g.drops == 3 and g.episodes == {Level.HIGH: 0, Level.CRITICAL: 1}


def test_high_that_does_not_come_down_escalates_to_critical() -> None:
    g = ladder()
    g.observe(890, 0.0)
    assert g.observe(870, STUCK_AFTER / 2).level is Level.HIGH
    v = g.observe(870, STUCK_AFTER)
    assert v.level is Level.CRITICAL and v.changed and v.drop_bytes == 70
    assert g.episodes == {Level.HIGH: 1, Level.CRITICAL: 1}


def test_trims_are_paced_faster_near_the_limit_and_back_off_when_useless() -> None:
    g = ladder()
    assert not g.should_trim(799, 0.0)
    assert g.should_trim(800, 0.0)
    g.trimmed(850, 700, 0.0)  # gave back 150 bytes: useful
    assert not g.should_trim(850, TRIM_EVERY / 2) and g.should_trim(850, TRIM_EVERY)
    assert g.should_trim(890, TRIM_EVERY_HIGH)  # at high: sooner
    g.trimmed(850, 850, 1.0)  # gave nothing back: the next one waits twice as long
    assert not g.should_trim(850, 1.0 + TRIM_EVERY) and g.should_trim(850, 1.0 + 2 * TRIM_EVERY)
    g.observe(960, 2.0)  # a drop: trim as soon as the pace allows
    assert g.should_trim(810, 2.0 + TRIM_EVERY_HIGH)
    assert g.trims == 2 and g.trimmed_bytes == 150


def test_every_stat_is_a_declared_metric() -> None:
    g = ladder()
    g.observe(900, 0.0)
    stats = g.stats()
    assert metrics.undeclared({"memory": stats}) == []
    snap = metrics.snapshot(metrics.new_registry(lambda: {"memory": stats}))
    assert snap["mirror_agent_memory_rss_ratio"] == pytest.approx(0.9)
    assert snap['mirror_agent_memory_pressure_episodes_total{level="high"}'] == 1
    assert snap['mirror_agent_memory_threshold_bytes{level="critical"}'] == 950


# ---------------------------------------------------------------- the thread


@dataclass
class Recorder:
    levels: list[Level] = field(default_factory=list)
    drops: list[int] = field(default_factory=list)

    def set_level(self, level: Level) -> None:
        self.levels.append(level)

    def drop(self, nbytes: int) -> None:
        self.drops.append(nbytes)


def test_tick_trims_first_then_judges_the_rss_after_it() -> None:
    samples = iter([900, 700, 960, 960, 990, 600])
    trims: list[int] = []
    now = [0.0]
    actions = Recorder()
    th = GuardThread(ladder(), actions, read=lambda: next(samples),
                     trim=lambda: trims.append(1), clock=lambda: now[0])
    assert th.tick().level is Level.OK  # 900, trimmed to 700: no shedding at all
    now[0] = 0.01
    assert th.tick().level is Level.CRITICAL  # 960: too soon to trim again
    now[0] = 1.0
    th.tick()  # 960 trimmed, 990 after it: still critical, another drop
    assert actions.levels == [Level.CRITICAL] and actions.drops == [160, 190]
    assert len(trims) == 2 and th.stats()["trims"] == 2
    th.stop()  # back to level 0: everything resumes
    assert actions.levels == [Level.CRITICAL, Level.OK]


def test_thread_reads_this_process_and_stops() -> None:
    actions = Recorder()
    th = GuardThread(MemoryGuard(Thresholds.of(1 << 40)), actions, interval=0.001)
    th.start()
    wait_until(lambda: th.guard.samples >= 3)
    th.stop()
    assert 0 < th.guard.peak < 1 << 40 and actions.levels == []
    assert abs(read_rss() - th.guard.rss) < 64 * MIB


def test_trim_gives_freed_heap_back() -> None:
    """Freed blocks pinned between live ones stay resident until trimmed (why the guard
    trims: glibc never gives them back by itself)."""
    if trim_heap is None:
        pytest.skip("no malloc_trim in this C library")
    blocks = [b"x" * 100_000 for _ in range(800)]  # 80 MB of heap (under mmap's threshold)
    pin = blocks[-1]  # the last one keeps the heap's top where it is
    del blocks
    before = read_rss()
    trim_heap()
    assert before - read_rss() > 40 * MIB
    assert len(pin) == 100_000


# ---------------------------------------------------------------- the stages' side


@dataclass
class FakeRefusals:
    reason: str | None = None


class FakeWriter:
    shed = False


class FakeForward:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def shed(self, nbytes: int) -> None:
        self.asked.append(nbytes)


def test_pipeline_actions_shed_hold_refuse_and_drop() -> None:
    refusals, writer, fwd = FakeRefusals(), FakeWriter(), FakeForward()
    held: list[bool] = []
    acts = PipelineActions(refusals, writer, lambda: fwd, held.append)
    acts.set_level(Level.HIGH)
    assert refusals.reason == "memory" and held == [True] and not writer.shed
    acts.set_level(Level.CRITICAL)
    assert writer.shed and held == [True, True]
    acts.drop(123)
    assert fwd.asked == [123]
    acts.set_level(Level.OK)
    assert refusals.reason is None and held[-1] is False and not writer.shed
    PipelineActions(refusals, None, lambda: None, held.append).drop(5)  # no sinks: no-op


def test_reassembler_refuses_new_connections_whole_while_shedding() -> None:
    r = Reassembler()
    old, new = Conversation(), Conversation(client=(bytes([192, 0, 2, 9]), 40001))
    out = r.process([*old.handshake(), old.seg(True, 0, b"GET /")])
    r.refusals.reason = "memory"
    out += r.process([*new.handshake(), new.seg(True, 0, b"POST /x"),
                      old.seg(True, 5, b" HTTP/1.1")])  # a tracked flow goes on
    r.refusals.reason = None
    out += r.process([new.seg(True, 7, b"body"), new.seg(True, 11, flags=FIN | ACK)])
    data = [c.data for c in out if isinstance(c, TrafficChunk)]
    assert data == [b"GET /", b" HTTP/1.1"]  # the refused one: not picked up mid-stream
    s = r.stats
    assert s.flows_opened == 1 and s.flows_refused == {"memory": 1}
    assert s.refused_bytes == {"memory": len(b"POST /x") + len(b"body")}
    assert r.stats.as_dict()["flows_refused_memory"] == 1
    again = Conversation(client=new.client, client_isn=9000)  # a new connection, same addresses
    out = r.process([*again.handshake(), again.seg(True, 0, b"hi")])
    assert [c.data for c in out if isinstance(c, TrafficChunk)] == [b"hi"]
    assert len(r.refusals) == 0 and r.stats.flows_opened == 2


def test_refused_connections_are_bounded_and_expire() -> None:
    r = Reassembler()
    r.refusals.reason = "memory"
    cap = max(1024, r.config.max_flows // 4)
    for i in range(cap + 10):
        c = Conversation(client=(bytes([198, 51, 100, i % 250]), 1000 + i))
        r.process([c.seg(True, 0, b"x", flags=SYN | ACK | PSH)])
    assert len(r.refusals) == cap and r.stats.flows_refused["memory"] == cap + 10
    r.refusals.expire(time.time() + 10 * r.config.tombstone_ttl)
    assert len(r.refusals) == 0


class Inner:
    """A record writer that keeps what it is given."""

    def __init__(self) -> None:
        self.chunks: list[TrafficChunk] = []

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        self.chunks.append(chunk)

    def flow_end(self, end: FlowEnd) -> None:
        pass

    def flush(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"records": len(self.chunks)}


def test_record_writer_refuses_records_while_shed_and_marks_the_gap() -> None:
    inner = Inner()
    w = BackgroundWriter(inner)

    def mk(d: bytes) -> TrafficChunk:
        return TrafficChunk(d, "a:1", "b:2", Direction.TO_OBSERVED, 1.0, 7)

    w.write(mk(b"one"), b"one")
    w.shed = True
    w.write(mk(b"lost!"), b"lost!")
    w.shed = False
    w.write(mk(b"two"), b"two")
    w.close()
    assert [c.gap_bytes for c in inner.chunks] == [0, 5]
    assert w.stats() == {"records": 2, "record_shed_records": 1, "record_shed_bytes": 5}
    snap = metrics.snapshot(metrics.new_registry(lambda: {"record": w.stats()}))
    assert snap['mirror_agent_record_records_lost_total{reason="memory"}'] == 1


@pytest.fixture
def slow_shadow() -> Iterator[Shadow]:
    shadow = Shadow(read=False, rcvbuf=4096)
    yield shadow
    shadow.close()


def test_forward_sink_sheds_the_connections_holding_the_most(slow_shadow: Shadow) -> None:
    sink = ForwardSink(slow_shadow.addr)
    try:
        sink.send(1, b"a" * (8 * MIB - 1))
        sink.send(2, b"b" * MIB)
        sink.commit()
        wait_until(lambda: len(slow_shadow.peers) == 2)
        time.sleep(0.2)  # the kernel takes what it can; the transports hold the rest
        assert sink.queued_bytes > 2 * MIB  # flow 1's at least
        sink.shed(1)
        wait_until(lambda: sink.stats["connections_dropped_memory"] == 1)
        assert sink.queued_bytes <= MIB  # flow 1 went, whole; what is left is flow 2's
        sink.send(1, b"more")  # a dropped flow stays dropped
        sink.commit()
    finally:
        sink.stop_waiting()
        sink.close()
    stats = sink.stats
    assert stats["connections_dropped_memory"] == 1 and stats["connections"] == 2
    assert stats["connections"] == (stats["connections_completed"]
                                    + stats["connections_dropped"]
                                    + stats["connections_in_flight"])


def test_hold_pauses_every_native_drain_until_released() -> None:
    c, s = ("10.0.1.1", 41000), ("10.0.0.1", 8080)
    ring = PerfRing([event(c, s, 1, b"held")])
    drain = NativeDrain(NativeDecoder(0.0), [(PERF, *ring.args()[:2], 0, ring.size)], -1,
                        0.001, 1 << 30)
    assert hold_all(True)
    try:
        drain.start()
        wait_until(lambda: drain.pauses >= 1)
        assert drain.take(0.05)[0] == [] and drain._read().turns == 0
    finally:
        hold_all(False)
    deadline = time.monotonic() + 5
    segs: list[object] = []
    while not segs and time.monotonic() < deadline:
        segs = drain.take(0.05)[0]  # type: ignore[assignment]
    assert [x.payload for x in segs] == [b"held"]  # type: ignore[attr-defined]
    drain.stop()
