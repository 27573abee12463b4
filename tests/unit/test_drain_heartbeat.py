"""The ring-drain thread's heartbeat (``/healthz``): it runs with the thread, beats every
turn (paused or not), is stopped on purpose by ``stop``, and reports a thread that died of
an error; sources pass their threads' heartbeats on to the control API."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.cli.control import Control
from agent.cli.layers import parse_options
from agent.control import Beating, MergedSource, PcapIngest
from agent.mirror.heartbeat import Heartbeat, problems
from agent.model import Segment
from agent.sources import HasHeartbeats
from agent.sources.ring.drain import RingDrain

ADDR = bytes([192, 0, 2, 1])


class Ring:
    """Each consume() makes one 100-byte segment; raises ``fail`` from consume ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.pending: list[Segment] = []
        self.consumed = 0
        self.fail_at = fail_at

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.001))

    def consume(self) -> int:
        if self.fail_at is not None and self.consumed >= self.fail_at:
            raise OSError(5, "ring gone")
        self.consumed += 1
        self.pending.append(Segment(ADDR, 40000, ADDR, 8080, 0, 0, 0x18, b"x" * 100, 0.0))
        return 100

    def take(self) -> list[Segment]:
        out, self.pending = self.pending, []
        return out


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_drain_heartbeat_runs_with_the_thread_and_beats_while_paused() -> None:
    ring = Ring()
    drain = RingDrain(ring, ring.take, interval=0.001, budget=500)
    hb = drain.heartbeat
    assert hb.name == "ring-drain" and not hb.running and hb.problem() is None
    drain.start()
    assert hb.running
    _until(lambda: drain.pauses >= 1)  # over budget: the drain waits for the mirror
    time.sleep(0.05)
    assert hb.silence() < 0.04 and hb.problem() is None  # still turning
    drain.stop()
    assert not hb.running and hb.problem() is None  # stopped on purpose


def test_drain_whose_thread_dies_reports_it_dead() -> None:
    ring = Ring(fail_at=3)
    drain = RingDrain(ring, ring.take, interval=0.001, budget=1 << 20)
    drain.start()
    _until(lambda: not [t for t in threading.enumerate() if t.name == "ring-drain"])
    assert problems([drain.heartbeat]) == ["ring-drain: thread is dead"]
    with pytest.raises(OSError, match="ring gone"):  # after what was drained before it
        for _ in range(10):
            drain.take(0.01)
    drain.stop()
    assert drain.heartbeat.problem() is None


class Live:
    """A live source with a thread of its own (its heartbeat ``own``)."""

    def __init__(self) -> None:
        self.own = Heartbeat("ring-drain")

    def batches(self) -> Iterator[list[Segment]]:
        yield []

    def drain(self) -> list[Segment]:
        return []

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}

    def heartbeats(self) -> list[Heartbeat]:
        return [self.own]


def test_sources_pass_their_threads_heartbeats_on() -> None:
    live, ingest = Live(), PcapIngest()
    try:
        merged = MergedSource(live, ingest)
        assert isinstance(merged, HasHeartbeats)
        assert merged.heartbeats() == [live.own, ingest.heartbeat]
        mine = Heartbeat("mirror")
        assert Beating(merged, mine).heartbeats() == [live.own, ingest.heartbeat]
        assert Beating(live, mine).heartbeats() == [live.own]
    finally:
        ingest.close()


def test_control_watches_the_mirror_and_the_sources_threads() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = parse_options(["run", "--iface", "lo", "--port", "8080",
                          "--listen", f"127.0.0.1:{port}"])
    control = Control(opts)
    try:
        live = Live()
        control.source(live)
        assert [b.name for b in control.agent.heartbeats()] == ["mirror", "ring-drain"]
        assert control.agent.heartbeats()[1] is live.own
        assert control.agent.state == "ready"
    finally:
        control.close()
