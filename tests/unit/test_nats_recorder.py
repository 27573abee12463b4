"""The NATS recorder against real brokers on loopback: records round-trip through a JetStream
stream (big chunks split under max_payload), a broker that is down or dies costs only the
recording (drops counted, owed as gaps, never a stalled writer) and publishing resumes when it
is back; one that accepts connections but never speaks fills the bounded queue."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.nats import NatsRecorder, NatsTarget
from agent.sinks.nats.consumer import NatsUnavailable, read_stream
from agent.sinks.nats.publisher import Settings
from tests.unit.nats_server import NatsServer, free_port, needs_server

FAST = Settings(connect_timeout=1.0, drain_timeout=2.0, ack_timeout=2.0, backoff_max=0.3)


def _chunk(flow: int, data: bytes, gap: int = 0) -> TrafficChunk:
    return TrafficChunk(data, f"192.0.2.1:{40000 + flow}", "198.51.100.1:8080",
                        Direction.TO_OBSERVED, time.time(), flow, gap)


def _wait(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "store").start()
    try:
        yield srv
    finally:
        srv.stop()


@needs_server
def test_round_trip_in_order_with_big_chunks_split(server: NatsServer) -> None:
    target = NatsTarget("127.0.0.1", server.port, "mirror.unit")
    rec = NatsRecorder(target, live=True, settings=FAST)
    big = bytes(range(256)) * 10_000  # 2.5 MiB: over the 1 MiB max_payload
    sent = [(1, b"GET /a HTTP/1.1\r\n\r\n"), (2, big), (1, b"GET /b HTTP/1.1\r\n\r\n")]
    for flow, data in sent:
        rec.write(_chunk(flow, data), data)
    rec.flow_end(FlowEnd(1, "fin"))
    rec.close()
    stats = rec.stats()
    assert stats["records"] == 1 + 3 + 1 + 1 and stats["recorded_bytes"] == len(big) + 38
    got = read_stream(target)
    assert got.stream == "mirror_unit" and got.problems == []
    assert b"".join(r.data for r in got.records if r.flow_id == 2) == big
    assert [r.data for r in got.records if r.flow_id == 1] == [sent[0][1], sent[2][1], b"fin"]
    assert all(r.gap_bytes == 0 for r in got.records)


def test_broker_down_at_start_drops_and_counts_and_never_blocks() -> None:
    for live in (True, False):  # offline waits for room, but the publisher drops: no hang
        rec = NatsRecorder(NatsTarget("127.0.0.1", free_port(), "s"), budget=4096, live=live,
                           settings=FAST)
        for i in range(2000):
            rec.write(_chunk(i % 5, b"x" * 100), b"x" * 100)
        rec.close()
        s = rec.stats()
        dropped = s["nats_dropped_records_broker_down"] + s["nats_dropped_records_queue_full"]
        assert dropped == 2000 and s["records"] == 0 and s["nats_connect_failures"] >= 1
        assert s["nats_dropped_bytes_broker_down"] + s["nats_dropped_bytes_queue_full"] == 200_000
        assert rec.handoffs()[0].queued_bytes == 0


def test_a_silent_broker_fills_the_queue_and_drops_count_as_queue_full() -> None:
    with socket.socket() as silent:  # accepts, never says INFO: the connect times out
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        rec = NatsRecorder(NatsTarget("127.0.0.1", silent.getsockname()[1], "s"),
                           budget=1000, live=True, settings=FAST)
        # The constructor waited for the first attempt to time out; the second one starts
        # after a backoff of about 0.1 s and waits 1 s: the records come during it.
        time.sleep(0.3)
        for _ in range(20):
            rec.write(_chunk(1, b"y" * 100), b"y" * 100)
        s = rec.stats()
        assert s["nats_dropped_records_queue_full"] == 10  # 10 x 100 bytes fit
        rec.close()
    s = rec.stats()
    assert s["nats_dropped_records_broker_down"] == 10 and s["nats_connect_failures"] >= 1


def test_replay_from_an_unreachable_broker_says_so() -> None:
    with pytest.raises(NatsUnavailable, match="cannot reach"):
        read_stream(NatsTarget("127.0.0.1", free_port(), "s"))


@needs_server
def test_broker_killed_and_restarted_mid_run(server: NatsServer) -> None:
    target = NatsTarget("127.0.0.1", server.port, "mirror.restart")
    rec = NatsRecorder(target, live=True, settings=FAST)
    rec.write(_chunk(1, b"before"), b"before")
    _wait(lambda: rec.stats()["records"] == 1)
    server.kill()
    _wait(lambda: rec.stats()["nats_connected"] == 0)
    for _ in range(50):  # the broker is gone: dropped at once, never waited for
        rec.write(_chunk(1, b"lost"), b"lost")
    _wait(lambda: rec.stats()["nats_dropped_records_broker_down"] == 50)
    server.start()
    _wait(lambda: rec.stats()["nats_connects"] == 2)
    rec.write(_chunk(1, b"after"), b"after")
    rec.close()
    s = rec.stats()
    assert s["records"] == 2 and s["nats_disconnects"] == 1
    assert s["nats_dropped_bytes_broker_down"] == 200
    got = read_stream(target)
    assert [(r.data, r.gap_bytes) for r in got.records] == [(b"before", 0), (b"after", 200)]


def test_reconnecting_leaves_the_global_random_state_alone() -> None:
    """The publisher thread's back-off jitter (and nats-py's server shuffle) draw from
    generators of their own: a program's seeded ``random`` (or Hypothesis, which checks it)
    sees no draw from the agent's threads."""
    import random

    state = random.getstate()
    rec = NatsRecorder(NatsTarget("127.0.0.1", free_port(), "s"), live=True, settings=FAST)
    time.sleep(1.0)  # a down broker: several attempts, each backed off with jitter
    rec.close()
    assert rec.stats()["records"] == 0
    assert random.getstate() == state
