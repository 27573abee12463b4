"""Forwarding faults and accounting, against real loopback shadows (127.0.0.1 / ::1 only).

Reserved source ports, the reason a dropped flow is counted under, a shadow that never reads,
failure logs once per outage, and counters written from two threads.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

import agent.sinks.forward as forward_mod
from agent.cli.commands import main
from agent.cli.configure import mirror_config
from agent.cli.layers import parse_options
from agent.cli.parser import UsageError
from agent.metrics import key, total
from agent.mirror.config import FORWARD_SOURCE_PORTS, ForwardConfig, MirrorConfig, parse_port_range
from agent.mirror.driver import TrafficMirror
from agent.sinks import shadow_conn, source_ports
from agent.sinks.forward import ForwardSink, bind_source_port
from agent.sinks.outage import OutageLog
from agent.sources.channel import ChannelSource
from tests.unit.segments import Conversation
from tests.unit.shadow import Shadow, blackhole, free_port, wait_until

# Metrics (agent/metrics.py) this file reads from stats.
FORWARD_CONNECTIONS_COMPLETED = "mirror_agent_forward_connections_completed_total"
FORWARD_DROPPED_BYTES = "mirror_agent_forward_dropped_bytes_total"
FORWARD_CONNECTIONS_DROPPED = "mirror_agent_forward_connections_dropped_total"
FORWARD_CONNECTIONS_DROPPED_CONNECT_TIMEOUT = key(FORWARD_CONNECTIONS_DROPPED,
                                                  reason="connect_timeout")


def in_range(port: int, ports: tuple[int, int] = FORWARD_SOURCE_PORTS) -> bool:
    return ports[0] <= port <= ports[1]


@pytest.fixture
def shadow() -> Iterator[Shadow]:
    s = Shadow()
    yield s
    s.close()


def mirror_flows(target: str, n: int, **cfg: Any) -> TrafficMirror:
    """Run ``n`` captured connections (request, then both FINs) through a mirror."""
    src = ChannelSource()
    for i in range(n):
        c = Conversation(client=(bytes([192, 0, 2, 1]), 43000 + i))
        for s in [*c.handshake(), c.seg(True, 0, b"req%d" % i), *c.fins(4, 0)]:
            src.put(s)
    src.end()
    m = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=target, **cfg))
    m.run(src)
    return m


def push(sink: ForwardSink, flow_id: int, *chunks: bytes, end: bool = True) -> None:
    for data in chunks:
        sink.send(flow_id, data)
        sink.commit()
    if end:
        sink.end(flow_id)
    sink.commit()


def free_port_pair() -> int:
    """``p`` such that ports p and p+1 of the reserved range are not bound by anyone now."""
    for _ in range(200):
        p = random.randrange(FORWARD_SOURCE_PORTS[0], FORWARD_SOURCE_PORTS[1])
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("", p))
                b.bind(("", p + 1))
        except OSError:
            continue
        return p
    raise AssertionError("no free port pair")


# ------------------------------------------------------------------ reserved source ports


def test_shadow_connections_come_from_reserved_ports(shadow: Shadow) -> None:
    m = mirror_flows(shadow.addr, 3)
    assert sorted(shadow.received) == [b"req0", b"req1", b"req2"]
    assert len(shadow.peers) == 3
    assert all(in_range(port) for _host, port in shadow.peers), shadow.peers
    assert m.stats()[FORWARD_CONNECTIONS_COMPLETED] == 3


def test_ipv6_target_from_reserved_port() -> None:
    s = Shadow("::1")
    try:
        mirror_flows(s.addr, 1)
    finally:
        s.close()
    assert s.received == [b"req0"]
    assert in_range(s.peers[0][1])


def test_exhausted_source_ports_drop_the_flow_as_no_source_port(shadow: Shadow) -> None:
    p = free_port_pair()
    sink = ForwardSink(shadow.addr, config=ForwardConfig(source_ports=(p, p + 1)))
    with capture_logs() as logs:
        for flow_id in (1, 2, 3):  # all three stay open: each needs a port of its own
            push(sink, flow_id, b"x%d" % flow_id, end=False)
        wait_until(lambda: sink.stats["connections_dropped_no_source_port"] == 1)
        wait_until(lambda: len(shadow.peers) == 2)
        sink.close()
    assert sorted(port for _h, port in shadow.peers) == [p, p + 1]
    st = sink.stats
    assert st["connections_dropped"] == 1 and st["connections_completed"] == 2
    assert st["bytes_dropped"] == 2 and st["bytes_forwarded"] == 4
    assert [e["reason"] for e in logs if e["event"] == "forwarding failed"] == ["no_source_port"]


def test_a_flow_waits_briefly_for_a_port_its_own_connections_free(shadow: Shadow) -> None:
    p = free_port_pair()
    sink = ForwardSink(shadow.addr, config=ForwardConfig(source_ports=(p, p + 1)))
    for flow_id in (1, 2):
        push(sink, flow_id, b"x%d" % flow_id, end=False)
    wait_until(lambda: len(shadow.peers) == 2)
    push(sink, 3, b"x3")  # no port free now: it waits ...
    time.sleep(0.2)
    push(sink, 1, end=True)  # ... until this one's connection ends and gives its port back
    wait_until(lambda: len(shadow.peers) == 3)
    sink.close()
    st = sink.stats
    assert st["connections_completed"] == 3 and not st["connections_dropped"], st


def test_custom_dial_binds_with_the_helper(shadow: Shadow) -> None:
    def dial(addr: str) -> socket.socket:
        host, port = addr.rsplit(":", 1)
        sock = socket.socket()
        bind_source_port(sock)
        sock.connect((host, int(port)))
        return sock

    with capture_logs() as logs:
        mirror_flows(shadow.addr, 1, dial=dial)
    assert shadow.received == [b"req0"] and in_range(shadow.peers[0][1])
    assert not [e for e in logs if e["event"].startswith("custom dial")]


def test_custom_dial_outside_the_range_is_warned_about(shadow: Shadow) -> None:
    def dial(addr: str) -> socket.socket:
        host, port = addr.rsplit(":", 1)
        return socket.create_connection((host, int(port)))  # an ephemeral port

    with capture_logs() as logs:
        mirror_flows(shadow.addr, 2, dial=dial)
    assert len(shadow.received) == 2
    assert len([e for e in logs if e["event"].startswith("custom dial")]) == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("61000-65535", (61000, 65535)), (" 62000 - 62001 ", (62000, 62001)), ("62000", (62000,) * 2),
])
def test_parse_port_range(text: str, expected: tuple[int, int]) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("65535-61000", "above the last"), ("0-10", "1-65535"), ("61000-70000", "1-65535"),
    ("a-b", "not LO-HI"), ("", "not LO-HI"), ("61000-", "not LO-HI"),
])
def test_parse_port_range_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_port_range(text)
    with pytest.raises(ValueError):
        ForwardConfig(source_ports=(65535, 61000))


@pytest.mark.parametrize("name", ["stall_timeout", "end_timeout", "end_grace"])
def test_negative_forward_timeouts_are_rejected(name: str) -> None:
    negative: dict[str, Any] = {name: -1.0}
    with pytest.raises(ValueError, match=name):
        ForwardConfig(**negative)


def test_cli_source_ports_reach_forward_config() -> None:
    parse = parse_options
    args = parse(["offline", "x.pcap", "--port", "8080"])
    assert args.pipe.forward_source_ports == FORWARD_SOURCE_PORTS
    args = parse(["offline", "x.pcap", "--port", "8080", "--forward-source-ports", "62000-62010"])
    assert mirror_config(args).forward.source_ports == (62000, 62010)


def test_cli_bad_source_ports_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["offline", "x.pcap", "--port", "80", "--forward-source-ports", "9-3"]) == 2
    assert "above the last" in capsys.readouterr().err
    args = parse_options(["run", "--iface", "lo", "--port", "62000"])
    with pytest.raises(UsageError, match="--port 62000 is inside --forward-source-ports"):
        mirror_config(args)  # capture would skip the service's own packets


# ------------------------------------------------------------------ which reason


def test_blackholed_target_is_connect_timeout_not_a_buffer_limit() -> None:
    cfg = ForwardConfig(connect_timeout=0.5, max_flow_buffer=8000, max_total_buffer=10_000)
    with blackhole() as target:
        sink = ForwardSink(target, config=cfg)
        push(sink, 1, b"a" * 6000, end=False)  # dialing, holding 6000
        push(sink, 2, b"b" * 6000)  # over the total before it has a connection
        push(sink, 3, b"c" * 3000, b"c" * 3000)  # over the total while dialing
        push(sink, 1, b"a" * 3000)
        sink.close()
    st = sink.stats
    assert st["connections_dropped_connect_timeout"] == 3 == st["connections_dropped"], st
    assert st["bytes_dropped"] == 21_000 and not st["bytes_forwarded"]


def test_blackholed_target_through_the_mirror() -> None:
    c = Conversation()
    big = [c.seg(True, i * 60000, b"x" * 60000) for i in range(50)]  # 3 MB, flow limit 1 MiB
    src = ChannelSource()
    for s in [*c.handshake(), *big, *c.fins(3_000_000, 0)]:
        src.put(s)
    src.end()
    with blackhole() as target:
        cfg = ForwardConfig(connect_timeout=0.5, max_flow_buffer=1 << 20)
        m = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=target, forward=cfg))
        m.run(src)
    st = m.stats()
    assert st[FORWARD_CONNECTIONS_DROPPED_CONNECT_TIMEOUT] == 1
    assert total(st, FORWARD_CONNECTIONS_DROPPED) == 1
    assert st[FORWARD_DROPPED_BYTES] == 3_000_000


def test_buffer_limit_while_dialing_counts_as_such_if_the_connect_succeeds(
        shadow: Shadow) -> None:
    def slow_dial(addr: str) -> socket.socket:
        time.sleep(0.3)
        host, port = addr.rsplit(":", 1)
        sock = socket.socket()
        bind_source_port(sock)
        sock.connect((host, int(port)))
        return sock

    sink = ForwardSink(shadow.addr, slow_dial, ForwardConfig(max_flow_buffer=1000))
    push(sink, 1, b"x" * 600, b"x" * 600)
    sink.close()
    st = sink.stats
    assert st["connections_dropped_flow_buffer"] == 1 == st["connections_dropped"]
    assert st["bytes_dropped"] == 1200 and not st["connections_completed"]


def test_never_reading_shadow_is_unconfirmed_not_completed() -> None:
    s = Shadow(read=False)
    sink = ForwardSink(s.addr, config=ForwardConfig(end_grace=0.3))
    push(sink, 1, b"GET / HTTP/1.1\r\n\r\n")
    sink.close()
    s.close()
    st = sink.stats
    assert not st["connections_completed"]
    assert st["connections_dropped_unconfirmed"] == 1
    assert st["bytes_forwarded"] == 18  # its kernel took them; nobody read them


def test_shadow_that_stops_reading_leaves_bytes_unacknowledged_counted_dropped() -> None:
    s = Shadow(read=False, rcvbuf=4096)

    def dial(addr: str) -> socket.socket:  # room for everything in our send buffer
        host, port = addr.rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        bind_source_port(sock)
        sock.connect((host, int(port)))
        return sock

    sink = ForwardSink(s.addr, dial, ForwardConfig(end_grace=0.3, stall_timeout=0.3))
    push(sink, 1, *[b"y" * 20_000] * 10)
    sink.close()
    s.close()
    st = sink.stats
    assert st["connections_dropped_stalled"] == 1 == st["connections_dropped"], st
    assert not st["connections_completed"]
    assert st["bytes_forwarded"] + st["bytes_dropped"] == 200_000
    assert st["bytes_dropped"] > 100_000


# ------------------------------------------------------------------ logs and counters


def test_each_outage_is_logged_once_with_its_recovery() -> None:
    port = free_port()
    sink = ForwardSink(f"127.0.0.1:{port}", config=ForwardConfig(log_interval=0))
    with capture_logs() as logs:
        push(sink, 1, b"a")
        wait_until(lambda: sink.stats["connections_dropped_connect_failed"] == 1)
        push(sink, 2, b"b")
        wait_until(lambda: sink.stats["connections_dropped_connect_failed"] == 2)
        s = Shadow(port=port)
        push(sink, 3, b"c")
        wait_until(lambda: sink.stats["connections_completed"] == 1)
        s.close()
        push(sink, 4, b"d")  # a second outage
        wait_until(lambda: sink.stats["connections_dropped_connect_failed"] == 3)
        sink.close()
    events = [(e["event"], e.get("reason"), e.get("failures")) for e in logs]
    assert events == [
        ("forwarding failed", "connect_failed", None),
        ("target reachable again", None, {"connect_failed": 2}),
        ("forwarding failed", "connect_failed", None),
    ]


def test_a_second_stall_outage_is_logged_again() -> None:
    s = Shadow(read=False, rcvbuf=4096)  # reads a connection only while s.read is set
    sink = ForwardSink(s.addr, config=ForwardConfig(max_flow_buffer=200_000, log_interval=0))
    with capture_logs() as logs:
        push(sink, 1, *[b"z" * 100_000] * 100)  # 10 MB into a shadow that never reads
        wait_until(lambda: sink.stats["connections_dropped_flow_buffer"] == 1)
        s.read = True
        push(sink, 2, b"fine")
        wait_until(lambda: sink.stats["connections_completed"] == 1)
        s.read = False
        push(sink, 3, *[b"z" * 100_000] * 100)
        wait_until(lambda: sink.stats["connections_dropped_flow_buffer"] == 2)
        sink.close()
    s.close()
    events = [(e["event"], e.get("reason"), e.get("failures")) for e in logs]
    assert events == [
        ("forwarding failed", "flow_buffer", None),
        ("target reachable again", None, {"flow_buffer": 1}),
        ("forwarding failed", "flow_buffer", None),
    ]


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, object]]] = []

    def warning(self, event: str, **kw: object) -> None:
        self.lines.append(("warning", event, kw))

    def info(self, event: str, **kw: object) -> None:
        self.lines.append(("info", event, kw))


def test_outage_log_is_rate_limited_per_reason() -> None:
    now = [0.0]
    rec = _Recorder()
    ol = OutageLog(rec, "failed", "back", interval=10, clock=lambda: now[0], target="t")
    ol.failed("a")
    ol.failed("a")
    now[0] = 1
    ol.recovered()
    assert rec.lines == [("warning", "failed", {"reason": "a", "target": "t"}),
                         ("info", "back", {"target": "t", "failures": {"a": 2},
                                           "outage_seconds": 1})]
    now[0] = 2
    ol.failed("a")  # a new outage, 2 s after the last warning: counted, not logged
    now[0] = 3
    ol.recovered()  # its start was not logged, so neither is its end
    assert len(rec.lines) == 2
    now[0] = 11
    ol.failed("a", 2)
    ol.failed("b")
    assert rec.lines[2:] == [
        ("warning", "failed", {"reason": "a", "target": "t", "unlogged_earlier": 1}),
        ("warning", "failed", {"reason": "b", "target": "t"})]
    now[0] = 12
    ol.recovered({"b"})
    assert rec.lines[4] == ("info", "back", {"target": "t", "failures": {"b": 1},
                                             "outage_seconds": 1})
    assert ol.failing == {"a"}


class _SlowCounter(Counter[str]):
    """Yields the GIL between reading and writing a count, as a thread switch may."""

    def __getitem__(self, key: str) -> int:
        value = super().__getitem__(key)
        time.sleep(0)
        return value


def test_counters_updated_from_both_threads_lose_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward_mod, "Counter", _SlowCounter)
    sink = ForwardSink("127.0.0.1:9", config=ForwardConfig(max_total_buffer=1))
    sink.send(1, b"xx")  # over the total: the flow is dropped, later bytes only counted
    n = 2000
    done = threading.Event()

    def io_thread_discards() -> None:
        for _ in range(n):
            sink._discard_bytes(1)
        done.set()

    sink._loop.call_soon_threadsafe(io_thread_discards)
    for _ in range(n):
        sink.send(1, b"x")
    done.wait(10)
    sink.close()
    assert sink.stats["bytes_dropped"] == 2 + 2 * n


# ------------------------------------------------------------------ stalls and the budget


def live_tasks(sink: ForwardSink) -> int:
    return len(sink._live)


def test_shadow_that_stops_reading_after_the_end_is_dropped_as_stalled() -> None:
    """The flow's bytes stay in the budget while the transport holds them, and a drain that
    makes no progress for ``stall_timeout`` ends the connection: counted, logged, freed."""
    s = Shadow(read=False, rcvbuf=4096)
    sink = ForwardSink(s.addr, config=ForwardConfig(stall_timeout=0.5, end_grace=0.1))
    total = 120 * 65536  # more than the kernel's send buffer can take (4 MiB at most)
    with capture_logs() as logs:
        push(sink, 1, *[b"z" * 65536] * 120)
        wait_until(lambda: sink.queued_bytes > total // 3)  # held by us, so in the budget
        wait_until(lambda: sink.stats["connections_dropped_stalled"] == 1, timeout=10)
        wait_until(lambda: live_tasks(sink) == 0)
        assert sink.queued_bytes == 0
        st = sink.stats
        sink.close()
    s.close()
    assert st["connections_dropped"] == 1 and st["bytes_forwarded"] + st["bytes_dropped"] == total
    assert st["bytes_dropped"] > total // 3
    assert [e["reason"] for e in logs if e["event"] == "forwarding failed"] == ["stalled"]
    assert [e["flow_id"] for e in logs if e["event"] == "forwarding failed"] == [1]


def test_bytes_counted_dropped_never_reach_the_shadow_later() -> None:
    """A connection given up on is reset, not closed: its unsent bytes are not delivered."""
    s = Shadow(read=False, rcvbuf=4096)
    sink = ForwardSink(s.addr, config=ForwardConfig(stall_timeout=0.3, end_grace=0.1))
    push(sink, 1, *[b"z" * 65536] * 20)
    wait_until(lambda: sink.stats["connections_dropped_stalled"] == 1)
    wait_until(lambda: live_tasks(sink) == 0)
    got = s.read_late()  # the shadow wakes up and reads
    sink.close()
    s.close()
    st = sink.stats
    assert got == st["bytes_forwarded"] and st["bytes_dropped"] == 20 * 65536 - got


def test_shadow_that_stops_reading_while_the_flow_is_open_is_dropped_as_stalled() -> None:
    s = Shadow(read=False, rcvbuf=4096)
    sink = ForwardSink(s.addr, config=ForwardConfig(stall_timeout=0.3))
    push(sink, 1, *[b"z" * 65536] * 20, end=False)
    wait_until(lambda: sink.stats["connections_dropped_stalled"] == 1)
    wait_until(lambda: live_tasks(sink) == 0 and sink.queued_bytes == 0)
    push(sink, 1, b"more")  # the flow is given up: later bytes only counted
    sink.close()
    s.close()
    st = sink.stats
    assert st["connections_dropped"] == 1 and st["connections"] == 1
    assert st["bytes_forwarded"] + st["bytes_dropped"] == 20 * 65536 + 4


def small_sndbuf_dial(addr: str) -> socket.socket:
    """A dial whose socket's kernel send buffer is small: the rest waits in the transport."""
    host, port = addr.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    bind_source_port(sock)
    sock.connect((host, int(port)))
    return sock


def test_bytes_in_the_transport_count_against_the_flow_buffer() -> None:
    s = Shadow(read=False, rcvbuf=4096)
    sink = ForwardSink(s.addr, small_sndbuf_dial, ForwardConfig(max_flow_buffer=1 << 20))
    push(sink, 1, b"a" * 600_000, end=False)

    def written() -> bool:
        conn = sink._current.get(1)
        return conn is not None and conn.pushed == 600_000  # handed to the transport

    wait_until(written)
    push(sink, 1, b"b" * 600_000)  # the first 600 kB are still ours: over 1 MiB
    wait_until(lambda: sink.stats["connections_dropped_flow_buffer"] == 1)
    wait_until(lambda: live_tasks(sink) == 0 and sink.queued_bytes == 0)
    sink.close()
    s.close()
    st = sink.stats
    assert st["connections_dropped"] == 1
    assert st["bytes_forwarded"] + st["bytes_dropped"] == 1_200_000


def test_shadow_that_trickles_after_the_end_is_cut_at_end_timeout() -> None:
    s = Shadow(rcvbuf=4096, pace=0.05, chunk=1024)  # about 20 kB/s: never stalls
    cfg = ForwardConfig(end_timeout=0.5, stall_timeout=5, end_grace=30)
    sink = ForwardSink(s.addr, config=cfg)
    push(sink, 1, *[b"t" * 65536] * 16)
    wait_until(lambda: sink.stats["connections_dropped_stalled"] == 1)
    wait_until(lambda: live_tasks(sink) == 0 and sink.queued_bytes == 0)
    st = sink.stats
    sink.close()
    s.close()
    assert st["connections_dropped"] == 1 and st["bytes_forwarded"] > 0
    assert st["bytes_forwarded"] + st["bytes_dropped"] == 16 * 65536


def test_slow_but_healthy_shadow_is_completed_not_stalled() -> None:
    """Acknowledgements still coming after ``end_grace`` are waited for, not counted lost."""
    s = Shadow(rcvbuf=4096, pace=0.01, chunk=16384)
    sink = ForwardSink(s.addr, config=ForwardConfig(end_grace=0.05, stall_timeout=2))
    push(sink, 1, *[b"h" * 65536] * 8)
    wait_until(lambda: sink.stats["connections_completed"] == 1, timeout=20)
    sink.close()
    s.close()
    st = sink.stats
    assert not st["connections_dropped"] and not st["bytes_dropped"], st
    assert st["bytes_forwarded"] == 8 * 65536 and s.received == [b"h" * 8 * 65536]


# ------------------------------------------------------------------ dial faults


def test_a_dial_raising_any_exception_is_connect_failed() -> None:
    def dial(addr: str) -> socket.socket:
        raise ValueError("no such shadow")

    sink = ForwardSink("127.0.0.1:9", dial, ForwardConfig(max_total_buffer=100))
    with capture_logs() as logs:
        push(sink, 1, b"x" * 60)
        wait_until(lambda: sink.stats["connections_dropped_connect_failed"] == 1)
        wait_until(lambda: live_tasks(sink) == 0)
        assert sink.queued_bytes == 0 and sink._dialing == 0
        push(sink, 2, b"y" * 60)  # the budget is free again: dialed, not over the total
        wait_until(lambda: sink.stats["connections_dropped_connect_failed"] == 2)
        sink.close()
    st = sink.stats
    assert st["connections_dropped"] == 2 and st["bytes_dropped"] == 120
    failed = [e for e in logs if e["event"] == "forwarding failed"]
    assert len(failed) == 1 and "ValueError" in failed[0]["error"]


def test_an_unexpected_error_drops_the_flow_and_frees_its_budget(
        shadow: Shadow, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("bug")

    sink = ForwardSink(shadow.addr)
    monkeypatch.setattr(shadow_conn.Conn, "flush_queue", broken)
    with capture_logs() as logs:
        push(sink, 1, b"x" * 50)
        wait_until(lambda: sink.stats["connections_dropped_error"] == 1)
        wait_until(lambda: live_tasks(sink) == 0)
        sink.close()
    assert sink.queued_bytes == 0 and sink.stats["bytes_dropped"] == 50
    assert [e["reason"] for e in logs if e["event"] == "forwarding failed"] == ["error"]


def test_shutdown_abort_names_the_flow() -> None:
    with blackhole() as target:
        sink = ForwardSink(target, config=ForwardConfig(connect_timeout=30, close_timeout=0.2))
        with capture_logs() as logs:
            push(sink, 7, b"x", end=False)
            sink.close()
    failed = [e for e in logs if e["event"] == "forwarding failed"]
    assert [(e["reason"], e["flow_id"]) for e in failed] == [("shutdown", 7)]


# ------------------------------------------------------------------ each flow counted once


def test_each_shadow_connection_of_a_flow_restarted_by_a_gap_is_counted_once() -> None:
    sink = ForwardSink(f"127.0.0.1:{free_port()}")
    sink.send(1, b"before")
    sink.send(1, b"after", gap=10)  # a second shadow connection; both are refused
    push(sink, 1)
    wait_until(lambda: live_tasks(sink) == 0 and sink.stats["connections"] == 2)
    sink.close()
    st = sink.stats
    assert st["connections_dropped"] == 2 == st["connections_dropped_connect_failed"], st
    assert st["bytes_dropped"] == 11 and st["connections_in_flight"] == 0


def test_a_dropped_flow_is_not_revived_by_a_queued_gap(shadow: Shadow) -> None:
    sink = ForwardSink(shadow.addr, config=ForwardConfig(max_flow_buffer=1000))
    sink.send(1, b"x" * 600)
    sink.send(1, b"x" * 600)  # over the flow limit: given up on in the I/O thread ...
    sink.send(1, b"y" * 100, gap=5)  # ... after these were queued
    push(sink, 1)
    sink.close()
    st = sink.stats
    assert st["connections_dropped"] == 1 == st["connections_dropped_flow_buffer"], st
    assert st["bytes_dropped"] == 1300 and st["connections"] == 1
    assert shadow.received in ([], [b""])


# ------------------------------------------------------------------ source ports


def test_concurrent_walks_each_see_the_whole_range() -> None:
    ports = (62100, 62107)
    walks = [iter(source_ports._Walk(ports)) for _ in range(3)]
    seen: list[list[int]] = [[], [], []]
    for _ in range(8):
        for w, s in zip(walks, seen, strict=True):
            s.append(next(w))
    assert all(sorted(s) == list(range(62100, 62108)) for s in seen), seen


def test_bind_from_many_threads_finds_the_one_free_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    p = free_port_pair()
    with socket.socket() as taken:
        taken.bind(("", p))  # no SO_REUSEADDR: bind on p fails with EADDRINUSE
        real_bind = source_ports._bind

        def slow_bind(sock: socket.socket, port: int) -> None:
            time.sleep(0.001)  # let the threads interleave
            real_bind(sock, port)

        monkeypatch.setattr(source_ports, "_bind", slow_bind)
        results: list[object] = []

        def worker() -> None:
            with socket.socket() as sock:
                try:
                    results.append(bind_source_port(sock, (p, p + 1)))
                except OSError as e:
                    results.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [p + 1] * 8


def _count_binds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    binds: list[int] = []
    real_bind = source_ports._bind

    def counting(sock: socket.socket, port: int, address: str = "") -> None:
        binds.append(port)
        real_bind(sock, port, address)

    monkeypatch.setattr(source_ports, "_bind", counting)
    return binds


def test_an_exhausted_range_fails_fast_until_the_back_off_ends(
        shadow: Shadow, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    p = free_port_pair()
    ports = (p, p + 1)
    host, port = shadow.addr.rsplit(":", 1)
    now = [1000.0]
    monkeypatch.setattr(source_ports, "_clock", lambda: now[0])
    binds = _count_binds(monkeypatch)

    def held_elsewhere(source_port: int) -> socket.socket:  # not through the pool
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", source_port))
        sock.connect((host, int(port)))
        return sock

    async def scenario() -> None:
        held = [held_elsewhere(p) for p in ports]
        for expected_binds in (2, 0, 0):  # a scan, then the back-off
            binds.clear()
            with pytest.raises(source_ports.NoSourcePort):
                await source_ports.connect_from_ports(host, int(port), ports)
            assert len(binds) == expected_binds
            now[0] += source_ports.EXHAUSTED_BACKOFF / 3
        now[0] += source_ports.EXHAUSTED_BACKOFF
        binds.clear()
        with pytest.raises(source_ports.NoSourcePort):
            await source_ports.connect_from_ports(host, int(port), ports)
        assert len(binds) == 2  # scanned again
        other = Shadow()
        try:  # another target is not in back-off: its 4-tuples are free
            ohost, oport = other.addr.rsplit(":", 1)
            held.append((await source_ports.connect_from_ports(ohost, int(oport), ports))[0])
        finally:
            other.close()
        for sock in held:
            sock.close()

    asyncio.run(scenario())


_UNUSABLE_V6 = r"""
import asyncio, errno, socket, sys
for path in ("all", "lo"):
    with open(f"/proc/sys/net/ipv6/conf/{path}/disable_ipv6", "w") as f:
        f.write("1")
from agent.sinks import shadow_conn, source_ports
from tests.unit.shadow import Shadow

shadow = Shadow()
port = int(shadow.addr.rsplit(":", 1)[1])
binds = []
real_bind = source_ports._bind
source_ports._bind = lambda sock, p, a="": (binds.append(sock.family), real_bind(sock, p, a))[1]
V6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))
V4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))

async def main(infos):
    async def resolve(*_a, **_k):
        return infos
    asyncio.get_running_loop().getaddrinfo = resolve
    return (await source_ports.connect_from_ports("localhost", port))[0]

sock = asyncio.run(main([V6, V4]))
assert sock.getpeername() == ("127.0.0.1", port), sock
assert binds.count(socket.AF_INET6) <= 2, binds
try:
    asyncio.run(main([V6]))
except source_ports.NoSourcePort as e:
    sys.exit(f"an unusable address is not an exhausted range: {e}")
except OSError as e:
    assert e.errno == errno.EADDRNOTAVAIL, e
print("ok")
"""


def test_an_unusable_address_is_skipped_for_the_next_one() -> None:
    """A target resolving to ::1 first while IPv6 is off: EADDRNOTAVAIL whatever the port."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode:
        pytest.skip("unshare -rn (a private network namespace) is not available")
    script = "import subprocess; subprocess.run(['ip', 'link', 'set', 'lo', 'up'])\n"
    r = subprocess.run(["unshare", "-rn", sys.executable, "-c", script + _UNUSABLE_V6],
                       capture_output=True, text=True, cwd=root, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
