"""The forward sink's accounting under random fault schedules, against a real loopback shadow.

Every shadow connection ends exactly once, completed or dropped with one reason, and
``connections == completed + dropped + in_flight`` at every look and at the end (in flight 0);
every byte handed over is forwarded or dropped; and the counters agree with what the shadow
itself logged: a completed connection's bytes all reached it.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.mirror.config import ForwardConfig
from agent.sinks import forward
from agent.sinks.forward import DROP_REASONS, ForwardSink
from agent.sinks.source_ports import bind_source_port

#: What the shadow does with a connection, by the first byte the flow sends.
#: A: read to EOF, answer, close.  C: answer and close its side at once, read to EOF.
#: R: read 100 bytes (or to EOF), then reset.  S: read to EOF, never answer nor close.
#: K: read to EOF, answer, keep the connection open.
EXPECTED = {b"A": "completed", b"C": "completed", b"R": "reset", b"S": "unconfirmed",
            b"K": "completed"}

FLOW_IDS = itertools.count(1)  # 4 digits on the wire: unique over every example
CONFIG = ForwardConfig(stall_timeout=1.0, end_grace=0.2, end_timeout=2.0, close_timeout=3.0)


@dataclass
class Log:
    """What the shadow saw: per flow id, the bytes received."""

    received: dict[int, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModeShadow:
    """A loopback shadow serving each connection by the mode its first byte names."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.log = Log()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with contextlib.suppress(OSError):
            while len(data) < 5:  # mode byte and a 4-digit flow id
                chunk = conn.recv(5 - len(data))
                if not chunk:
                    return
                data += chunk
            mode, flow_id = data[:1], int(data[1:5])
            if mode == b"C":
                conn.sendall(b"answer")
                conn.shutdown(socket.SHUT_WR)
            while chunk := conn.recv(100 if mode == b"R" else 65536):
                data += chunk
                if mode == b"R" and len(data) >= 100:
                    break
            with self.log.lock:
                self.log.received[flow_id] = data
            if mode == b"R":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            elif mode in (b"A", b"K"):
                conn.sendall(b"answer")
                if mode == b"A":
                    conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture(scope="module")
def shadow() -> Iterator[ModeShadow]:
    s = ModeShadow()
    yield s
    s.close()


def check_equation(stats: Counter[str]) -> None:
    dropped = sum(stats[f"connections_dropped_{r}"] for r in DROP_REASONS)
    assert dropped == stats["connections_dropped"]
    assert stats["connections"] == (stats["connections_completed"] + dropped
                                    + stats["connections_in_flight"]), stats
    assert stats["connections_in_flight"] >= 0, stats


flows_strategy = st.lists(
    st.tuples(st.sampled_from(sorted(EXPECTED)),  # mode
              st.lists(st.integers(1, 30_000), min_size=1, max_size=4),  # chunk sizes
              st.booleans()),  # the service closed first
    min_size=1, max_size=12)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flows=flows_strategy)
def test_every_connection_ends_once_and_the_counts_match_the_shadow(
        shadow: ModeShadow, flows: list[tuple[bytes, list[int], bool]]) -> None:
    sink = ForwardSink(shadow.addr, config=CONFIG)
    stop = threading.Event()
    looks = 0

    def watch() -> None:  # reads the counters while the I/O thread works
        nonlocal looks
        while not stop.is_set():
            check_equation(sink.stats)
            looks += 1
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent: dict[int, bytes] = {}
    try:
        for mode, sizes, after_service in flows:
            flow_id = next(FLOW_IDS)
            data = mode + b"%04d" % flow_id + b"".join(
                bytes([65 + (flow_id + k) % 26]) * n for k, n in enumerate(sizes))
            sent[flow_id] = data
            cut = 0
            for n in (5 + sizes[0], *sizes[1:]):  # the header goes with the first piece
                sink.send(flow_id, data[cut:cut + n])
                sink.commit()
                cut += n
            sink.end(flow_id, after_service)
            sink.commit()
        deadline = time.monotonic() + 10
        while sink.stats["connections_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sink.close()
        stop.set()
        watcher.join()
    stats = sink.stats
    check_equation(stats)
    assert looks > 0
    assert stats["connections_in_flight"] == 0 and not stats["connections_dropped_shutdown"]
    assert stats["connections"] == len(flows)
    want = Counter(EXPECTED[mode] for mode, _sizes, _after in flows)
    got = Counter({"completed": stats["connections_completed"]})
    got.update({r: stats[f"connections_dropped_{r}"] for r in DROP_REASONS
                if stats[f"connections_dropped_{r}"]})
    assert got == want, stats
    handed = sum(len(d) for d in sent.values())
    assert stats["bytes_forwarded"] + stats["bytes_dropped"] == handed, stats
    with shadow.log.lock:
        received = dict(shadow.log.received)
    for flow_id, data in sent.items():
        if EXPECTED[data[:1]] == "completed":  # the shadow's own log has every byte
            assert received.get(flow_id) == data, flow_id
    assert sink.queued_bytes == 0


def test_a_burst_beyond_the_dial_slots_waits_for_them_and_completes(
        shadow: ModeShadow, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backlog of a paused agent (SIGSTOP, a CPU quota) arrives as one batch: flows
    beyond the dial slots wait for one instead of being shed, and every one completes."""
    monkeypatch.setattr(forward, "MAX_DIALING", 4)
    sink = ForwardSink(shadow.addr, config=CONFIG)
    flows = [next(FLOW_IDS) for _ in range(40)]
    for flow_id in flows:
        sink.send(flow_id, b"A%04d burst" % flow_id)
        sink.end(flow_id)
    sink.commit()  # one batch: 40 new flows, 4 slots
    sink.close()
    stats = sink.stats
    check_equation(stats)
    assert stats["connections"] == 40 and stats["connections_completed"] == 40, stats
    with shadow.log.lock:
        assert all(shadow.log.received.get(f) == b"A%04d burst" % f for f in flows)


def test_flows_that_wait_longer_than_overload_lag_are_shed(
        shadow: ModeShadow, monkeypatch: pytest.MonkeyPatch) -> None:
    """While every slot's dial hangs, the flows waiting behind it are shed as ``overload``
    once they waited ``overload_lag``: the loop cannot keep up, and the wait is bounded."""
    monkeypatch.setattr(forward, "MAX_DIALING", 1)

    def slow_dial(addr: str) -> socket.socket:
        time.sleep(0.6)
        host, port = addr.rsplit(":", 1)
        sock = socket.socket()
        bind_source_port(sock)
        sock.connect((host, int(port)))
        return sock

    config = ForwardConfig(stall_timeout=1.0, end_grace=0.2, end_timeout=2.0,
                           close_timeout=3.0, overload_lag=0.2)
    sink = ForwardSink(shadow.addr, dial=slow_dial, config=config)
    flows = [next(FLOW_IDS) for _ in range(4)]
    for flow_id in flows:
        sink.send(flow_id, b"A%04d hello" % flow_id)
        sink.end(flow_id)
    sink.commit()
    sink.close()
    stats = sink.stats
    check_equation(stats)
    assert stats["connections"] == 4 and stats["connections_dropped_overload"] == 3, stats
    assert stats["connections_completed"] == 1
    assert stats["bytes_dropped"] == 3 * 11 and sink.queued_bytes == 0


def test_bytes_for_a_connection_the_shadow_already_reset_are_counted_dropped(
        shadow: ModeShadow) -> None:
    """The shadow resets while the flow still sends (under load the reset can come between
    two chunks): the later chunks are dropped and counted, so forwarded + dropped is every
    byte handed over (seen in CI: 9,310 bytes in neither)."""
    sink = ForwardSink(shadow.addr, config=CONFIG)
    flow_id = next(FLOW_IDS)
    first = b"R%04d" % flow_id + b"r" * 200  # the shadow reads 100 bytes, then resets
    sink.send(flow_id, first)
    sink.commit()
    deadline = time.monotonic() + 5
    while not sink.stats["connections_dropped_reset"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.stats["connections_dropped_reset"] == 1
    later = b"s" * 5000
    sink.send(flow_id, later)  # for a connection already counted as reset
    sink.end(flow_id)
    sink.commit()
    sink.close()
    stats = sink.stats
    check_equation(stats)
    assert stats["bytes_forwarded"] + stats["bytes_dropped"] == len(first) + len(later), stats
    assert sink.queued_bytes == 0
