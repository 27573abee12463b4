"""The MirrorConfig / TrafficMirror contracts, one test each (real sockets for forwarding)."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator

import pytest

from agent.hooks import Hook, HookFunc, HookPipeline, HookResult, KeepAll, OnlyToObserved
from agent.metrics import key
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import Cancelled, TrafficMirror, coalesce
from agent.model import Direction, FlowEnd, Segment, TrafficChunk
from agent.reassembly import Output
from agent.sinks.record import NativeReader
from agent.sources.channel import ChannelSource
from tests.unit.segments import Conversation

# Metrics (agent/metrics.py) this file reads from stats.
FORWARD_CONNECTIONS_COMPLETED = "mirror_agent_forward_connections_completed_total"
FORWARD_DROPPED_BYTES = "mirror_agent_forward_dropped_bytes_total"
FORWARD_CONNECTIONS_DROPPED_CONNECT_FAILED = key(
    "mirror_agent_forward_connections_dropped_total", reason="connect_failed")
FORWARD_CONNECTIONS_DROPPED_FLOW_BUFFER = key(
    "mirror_agent_forward_connections_dropped_total", reason="flow_buffer")
FORWARD_FORWARDED_BYTES = "mirror_agent_forward_forwarded_bytes_total"
REASSEMBLY_SEGMENTS = "mirror_agent_reassembly_segments_total"


def conversation() -> list[Segment]:
    c = Conversation()
    return [*c.handshake(), c.seg(True, 0, b"GET / HTTP/1.1\r\n\r\n"),
            c.seg(False, 0, b"HTTP/1.1 200 OK\r\n\r\n"), *c.fins(18, 19)]


def source_of(segs: list[Segment]) -> ChannelSource:
    src = ChannelSource()
    for s in segs:
        src.put(s)
    src.end()
    return src


class Sink:
    """A real TCP server collecting what each accepted connection sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            self.received.append(data)
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def test_none_source_raises() -> None:
    with pytest.raises(ValueError, match="packet source is None"):
        TrafficMirror(MirrorConfig(observed_port=8080)).run(None)


def test_source_is_always_closed() -> None:
    src = source_of(conversation())

    def boom(chunk: TrafficChunk) -> tuple[bytes, bool]:
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        TrafficMirror(MirrorConfig(observed_port=8080, record_hook=HookFunc(boom))).run(src)
    assert src._closed


def test_hook_error_aborts_run_with_that_error() -> None:
    calls = []

    def boom(chunk: TrafficChunk) -> tuple[bytes, bool]:
        calls.append(chunk)
        raise KeyError("first")

    with pytest.raises(KeyError):
        TrafficMirror(MirrorConfig(observed_port=8080, record_hook=HookFunc(boom))).run(
            source_of(conversation()))
    assert len(calls) == 1


def test_close_error_is_raised() -> None:
    class Bad(ChannelSource):
        def close(self) -> None:
            raise OSError("close failed")

    src = Bad()
    src.end()
    with pytest.raises(OSError, match="close failed"):
        TrafficMirror(MirrorConfig(observed_port=8080)).run(src)


def test_cancel_flushes_then_propagates() -> None:
    c = Conversation()
    src = ChannelSource()
    # Out-of-order data that only a flush releases.
    for s in [*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 5, b"held")]:
        src.put(s)
    got: list[TrafficChunk] = []
    cancel = threading.Event()
    mirror = TrafficMirror(MirrorConfig(
        observed_port=8080, write_func=lambda ch, d: got.append(ch)))
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(Cancelled):
        mirror.run(src, cancel)
    assert [g.data for g in got] == [b"ab", b"held"]
    assert got[1].gap_bytes == 3


def test_default_hooks_record_only_to_observed() -> None:
    got: list[TrafficChunk] = []
    TrafficMirror(MirrorConfig(observed_port=8080, write_func=lambda ch, d: got.append(ch))).run(
        source_of(conversation()))
    assert [g.direction for g in got] == [Direction.TO_OBSERVED]


def test_observed_port_zero_drops_everything(caplog: pytest.LogCaptureFixture) -> None:
    got: list[TrafficChunk] = []
    m = TrafficMirror(MirrorConfig(observed_port=0, write_func=lambda ch, d: got.append(ch)))
    m.run(source_of(conversation()))
    assert got == []
    assert m.counters["record_hook_dropped_bytes"] == 37


def test_no_writer_record_hook_still_runs() -> None:
    seen: list[TrafficChunk] = []

    def spy(chunk: TrafficChunk) -> tuple[bytes, bool]:
        seen.append(chunk)
        return chunk.data, True

    m = TrafficMirror(MirrorConfig(observed_port=8080, record_hook=HookFunc(spy)))
    m.run(source_of(conversation()))
    assert len(seen) == 2
    assert m.counters["records"] == 0


def test_no_target_forward_hook_not_called() -> None:
    called: list[TrafficChunk] = []

    def spy(ch: TrafficChunk) -> HookResult:
        called.append(ch)
        return ch.data, True

    m = TrafficMirror(MirrorConfig(observed_port=8080, forward_hook=HookFunc(spy)))
    m.run(source_of(conversation()))
    assert called == []


def test_write_func_wins_over_writer() -> None:
    buf = io.BytesIO()
    got: list[bytes] = []
    TrafficMirror(MirrorConfig(observed_port=8080, writer=buf,
                               write_func=lambda ch, d: got.append(d))).run(
        source_of(conversation()))
    assert got == [b"GET / HTTP/1.1\r\n\r\n"]
    assert buf.getvalue() == b""


def test_writer_gets_native_records() -> None:
    buf = io.BytesIO()
    TrafficMirror(MirrorConfig(observed_port=8080, writer=buf, record_hook=KeepAll())).run(
        source_of(conversation()))
    buf.seek(0)
    recs = list(NativeReader(buf))
    assert [r.kind for r in recs] == ["chunk", "chunk", "end"]
    assert recs[0].data == b"GET / HTTP/1.1\r\n\r\n" and recs[2].data == b"fin"


def test_keep_false_drops_and_empty_data_skips() -> None:
    got: list[bytes] = []

    def hook(chunk: TrafficChunk) -> tuple[bytes, bool]:
        if chunk.direction is Direction.FROM_OBSERVED:
            return chunk.data, False
        return b"", True

    m = TrafficMirror(MirrorConfig(observed_port=8080, record_hook=HookFunc(hook),
                                   write_func=lambda ch, d: got.append(d)))
    m.run(source_of(conversation()))
    assert got == []
    assert m.counters["record_hook_dropped_bytes"] == 19


def test_forward_changes_never_reach_record(sink: Sink) -> None:
    recorded: list[bytes] = []

    def mangle(chunk: TrafficChunk) -> tuple[bytes, bool]:
        keep = chunk.direction is Direction.TO_OBSERVED
        chunk.data = b"MANGLED"  # even in place
        return b"FORWARDED", keep

    TrafficMirror(MirrorConfig(observed_port=8080, target_addr=sink.addr,
                               forward_hook=HookFunc(mangle),
                               write_func=lambda ch, d: recorded.append(d))).run(
        source_of(conversation()))
    assert recorded == [b"GET / HTTP/1.1\r\n\r\n"]
    assert sink.received == [b"FORWARDED"]


def test_forward_one_connection_per_captured_connection(sink: Sink) -> None:
    segs = []
    for i in range(3):
        c = Conversation(client=(bytes([192, 0, 2, 1]), 43000 + i))
        segs += [*c.handshake(), c.seg(True, 0, f"req{i}-a|".encode()),
                 c.seg(True, 7, f"req{i}-b".encode()), *c.fins(13, 0)]
    m = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=sink.addr))
    m.run(source_of(segs))
    assert sorted(sink.received) == [b"req0-a|req0-b", b"req1-a|req1-b", b"req2-a|req2-b"]
    assert m.stats()[FORWARD_CONNECTIONS_COMPLETED] == 3


def test_custom_dial_is_used(sink: Sink) -> None:
    dialed: list[str] = []

    def dial(addr: str) -> socket.socket:
        dialed.append(addr)
        host, port = addr.rsplit(":", 1)
        return socket.create_connection((host, int(port)), timeout=5)

    TrafficMirror(MirrorConfig(observed_port=8080, target_addr=sink.addr, dial=dial)).run(
        source_of(conversation()))
    assert dialed == [sink.addr]
    assert sink.received == [b"GET / HTTP/1.1\r\n\r\n"]


def test_refusing_target_costs_only_forwarding() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    got: list[bytes] = []
    m = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=f"127.0.0.1:{port}",
                                   write_func=lambda ch, d: got.append(d)))
    m.run(source_of(conversation()))
    assert got == [b"GET / HTTP/1.1\r\n\r\n"]
    st = m.stats()
    assert st[FORWARD_CONNECTIONS_DROPPED_CONNECT_FAILED] == 1
    assert st[FORWARD_DROPPED_BYTES] == 18


def test_stalled_target_drops_the_flow_not_the_mirror() -> None:
    server = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never reads
    server.listen(1)
    addr = f"127.0.0.1:{server.getsockname()[1]}"
    c = Conversation()
    big = [c.seg(True, i * 60000, b"x" * 60000) for i in range(100)]  # 6 MB
    from agent.mirror.config import ForwardConfig
    m = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=addr,
                                   forward=ForwardConfig(max_flow_buffer=1 << 20,
                                                         close_timeout=1)))
    m.run(source_of([*c.handshake(), *big]))
    server.close()
    st = m.stats()
    assert st[FORWARD_CONNECTIONS_DROPPED_FLOW_BUFFER] == 1
    assert st[FORWARD_DROPPED_BYTES] + st.get(FORWARD_FORWARDED_BYTES, 0) == 6_000_000


def test_built_in_direction_filters_decide_as_their_calls_would() -> None:
    """KeepAll and OnlyToObserved at the head of a pipeline are not called; the result is
    what calling every hook gives. A subclass (which may handle() otherwise) is called."""
    calls: list[Direction] = []

    class Counting(KeepAll):
        def handle(self, chunk: TrafficChunk) -> tuple[bytes, bool]:
            calls.append(chunk.direction)
            return chunk.data + b"!", True

    pipelines: list[list[Hook]] = [
        [], [KeepAll()], [OnlyToObserved()], [KeepAll(), OnlyToObserved()],
        [Counting()], [OnlyToObserved(), Counting()], [Counting(), OnlyToObserved()],
        [OnlyToObserved(), Counting(), KeepAll()]]
    for hooks in pipelines:
        for d in Direction:
            chunk = TrafficChunk(b"x", "a", "b", d, 0.0, 1)
            want: tuple[bytes, bool] = (b"x", True)
            for h in hooks:
                want = h.handle(chunk.with_data(want[0]))
                if not want[1]:
                    want = (b"", False)
                    break
            calls.clear()
            assert HookPipeline(hooks).handle(chunk) == want, (hooks, d)
            called = [h for h in hooks if isinstance(h, Counting)]
            filtered = isinstance(hooks[0], OnlyToObserved) if hooks else False
            assert len(calls) == (0 if filtered and d is not Direction.TO_OBSERVED
                                  else len(called)), (hooks, d)


def test_coalesce_keeps_direction_interleaving() -> None:
    def ch(fid: int, frm: str, data: bytes, gap: int = 0) -> TrafficChunk:
        return TrafficChunk(data, frm, "s", Direction.UNKNOWN, 0.0, fid, gap)

    items: Output = [
        ch(1, "a", b"1"), ch(2, "x", b"X"), ch(1, "a", b"2"), ch(1, "b", b"R"), ch(1, "a", b"3"),
        ch(1, "a", b"4", gap=5), FlowEnd(1, "fin"), ch(2, "x", b"Y"),
    ]
    out = coalesce(items)
    got = [(o.flow_id, o.data, o.gap_bytes) if isinstance(o, TrafficChunk) else "end"
           for o in out]
    assert got == [(1, b"12", 0), (2, b"XY", 0), (1, b"R", 0), (1, b"3", 0), (1, b"4", 5), "end"]


def test_stats_are_logged_periodically_while_running() -> None:
    from structlog.testing import capture_logs

    src = ChannelSource(idle_tick=0.01)
    mirror = TrafficMirror(MirrorConfig(observed_port=80, write_func=lambda c, d: None))

    def feed() -> None:
        for s in conversation():
            src.put(s)

    feeder = threading.Timer(0.3, feed)
    feeder.start()
    threading.Timer(0.6, src.end).start()
    with capture_logs() as logs:
        mirror.run(src, stats_interval=0.05)
    feeder.join()
    reports = [e for e in logs if e["event"] == "stats"]
    assert len(reports) >= 5  # ~12 intervals pass
    assert reports[0][REASSEMBLY_SEGMENTS] == 0
    assert reports[-1][REASSEMBLY_SEGMENTS] == len(conversation())
