"""Request-mode forwarding (agent/sinks/request_forward.py) against real loopback shadows:
requests framed whole (pipelined, chunked, split anywhere), sent on a few pooled keep-alive
connections, every response read; and every request ends completed or dropped with one
reason, ``requests == completed + dropped + in_flight`` at every look and at the end."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.summary import degradation
from agent.metrics import FORWARD_REQUEST_DROP_REASONS, undeclared
from agent.mirror.config import ForwardConfig, MirrorConfig
from agent.sinks.request_forward import RequestForwardSink
from tests.unit.http_shadow import HttpShadow
from tests.unit.shadow import blackhole

FAST = ForwardConfig(mode="request", pool_size=4, response_timeout=0.5, close_timeout=3.0,
                     connect_timeout=0.5)
IDS = itertools.count(1)


def get(path: str, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: shadow", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, chunked: bool = False) -> bytes:
    if not chunked:
        return (f"POST {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    half = len(body) // 2
    pieces = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (body[:half], body[half:])
                      if p)
    return f"POST {path} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + pieces + (
        b"0\r\nX-Trailer: 1\r\n\r\n")


def books(stats: Counter[str]) -> tuple[int, int, dict[str, int], int]:
    """(requests, completed, dropped by reason, in flight), checking the equation."""
    dropped = {r: stats[f"requests_dropped_{r}"] for r in FORWARD_REQUEST_DROP_REASONS
               if stats[f"requests_dropped_{r}"]}
    assert stats["requests_dropped"] == sum(dropped.values())
    assert stats["requests"] == (stats["requests_completed"] + sum(dropped.values())
                                 + stats["requests_in_flight"]), dict(stats)
    return (stats["requests"], stats["requests_completed"], dropped,
            stats["requests_in_flight"])


def settle(sink: RequestForwardSink, requests: int, timeout: float = 10.0) -> None:
    """Wait until ``requests`` were handed over and none is in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = sink.stats
        if s["requests"] >= requests and not s["requests_in_flight"]:
            return
        time.sleep(0.01)
    raise AssertionError(f"not settled: {dict(sink.stats)}")


@pytest.fixture
def shadow() -> Iterator[HttpShadow]:
    s = HttpShadow()
    yield s
    s.close()


def sink_for(shadow: HttpShadow, **kw: object) -> RequestForwardSink:
    cfg = ForwardConfig(**{**{f: getattr(FAST, f) for f in (
        "mode", "pool_size", "response_timeout", "close_timeout", "connect_timeout")}, **kw})
    return RequestForwardSink(shadow.addr, config=cfg)


def feed(sink: RequestForwardSink, flow: int, stream: bytes, step: int = 0,
         end: bool = True) -> None:
    """Hand ``stream`` over in pieces of ``step`` bytes (0: whole), committing each."""
    step = step or len(stream)
    for i in range(0, len(stream), step):
        sink.send(flow, stream[i : i + step])
        sink.commit()
    if end:
        sink.end(flow)
        sink.commit()


def test_pipelined_requests_of_a_flow_reach_the_shadow_in_order(shadow: HttpShadow) -> None:
    sink = sink_for(shadow)
    stream = b"".join(get(f"/ok/{i}") for i in range(50))
    feed(sink, next(IDS), stream)
    settle(sink, 50)
    sink.close()
    requests, completed, dropped, _ = books(sink.stats)
    assert (requests, completed, dropped) == (50, 50, {})
    assert shadow.paths() == [f"/ok/{i}" for i in range(50)]
    assert sink.stats["bytes_forwarded"] == len(stream) and not sink.stats["bytes_dropped"]
    assert shadow.connections == 1 == sink.stats["pool_connections"]


@pytest.mark.parametrize("step", [1, 3, 7, 100])
def test_requests_split_anywhere_arrive_whole_and_exact(shadow: HttpShadow, step: int) -> None:
    """Chunked and sized bodies, a HEAD, odd pieces: the shadow gets each request's bytes."""
    reqs = [post("/ok/a", b"x" * 300), post("/chunked/b", b"y" * 257, chunked=True),
            get("/continue/c"), b"HEAD /ok/d HTTP/1.1\r\nHost: s\r\n\r\n",
            post("/nocontent/e", b""), get("/toclose/f"), get("/ok/g")]
    sink = sink_for(shadow)
    feed(sink, next(IDS), b"".join(reqs), step)
    settle(sink, len(reqs))
    sink.close()
    assert books(sink.stats)[:3] == (len(reqs), len(reqs), {})
    assert shadow.log == reqs  # no Connection header in them: byte for byte
    assert shadow.connections == 2  # the read-to-close response cost one reconnect


def test_connection_close_churn_costs_the_shadow_few_connections(shadow: HttpShadow) -> None:
    """400 captured connections of one ``Connection: close`` request each: at most the pool's
    4 shadow connections, each request there once, without the ``close``."""
    sink = sink_for(shadow)
    for i in range(400):
        feed(sink, next(IDS), get(f"/ok/{i}", "Connection: close"))
    settle(sink, 400)
    sink.close()
    assert books(sink.stats)[:3] == (400, 400, {})
    assert sorted(shadow.paths()) == sorted(f"/ok/{i}" for i in range(400))
    assert shadow.connections <= 4
    assert all(b"close" not in r.lower() for r in shadow.log)


def test_http10_close_and_a_shadow_that_closes_cost_a_reconnect_only(
        shadow: HttpShadow) -> None:
    sink = sink_for(shadow, pool_size=1)
    stream = (get("/ok/1", "Connection: close", version="1.0") + get("/close/2")
              + get("/ok/3", "Connection: keep-alive, close"))
    feed(sink, next(IDS), stream)
    settle(sink, 3)
    sink.close()
    assert books(sink.stats)[:3] == (3, 3, {})
    assert shadow.log[0] == get("/ok/1", "Connection: close", version="1.0")  # as it was
    assert b"Connection: keep-alive\r\n" in shadow.log[2] and b"close" not in shadow.log[2]
    assert shadow.connections == 3 == sink.stats["pool_connections"]


def test_shadow_faults_are_dropped_by_reason(shadow: HttpShadow) -> None:
    """Reset, never answering, answering garbage: one reason each; the flows' next requests
    go on, on new connections."""
    sink = sink_for(shadow)
    for kind in ("reset", "silent", "bad"):
        feed(sink, next(IDS), get(f"/{kind}/1") + get("/ok/after-" + kind))
    settle(sink, 6, timeout=5)
    sink.close()
    requests, completed, dropped, _ = books(sink.stats)
    assert (requests, completed) == (6, 3)
    assert dropped == {"reset": 1, "stalled": 1, "bad_response": 1}
    assert {p for p in shadow.paths() if "after" in p} == {
        "/ok/after-reset", "/ok/after-silent", "/ok/after-bad"}


def test_close_drops_what_is_still_queued_as_shutdown(shadow: HttpShadow) -> None:
    """One pooled connection held by a request never answered, five queued behind it."""
    sink = sink_for(shadow, pool_size=1, response_timeout=30.0, close_timeout=0.3)
    feed(sink, next(IDS), get("/silent/1"))
    for i in range(5):
        feed(sink, next(IDS), get(f"/ok/{i}"))
    time.sleep(0.2)
    assert books(sink.stats)[3] == 6
    sink.close()
    requests, completed, dropped, in_flight = books(sink.stats)
    assert (requests, completed, dropped, in_flight) == (6, 0, {"shutdown": 6}, 0)
    assert "forward sink dropped 6 request(s) (shutdown=6)" in degradation(
        {f'mirror_agent_forward_requests_dropped_total{{reason="{r}"}}': v
         for r, v in dropped.items()})


def test_stop_waiting_cuts_the_close_short(shadow: HttpShadow) -> None:
    sink = sink_for(shadow, response_timeout=30.0, close_timeout=30.0)
    feed(sink, next(IDS), get("/silent/1"))
    time.sleep(0.1)
    threading.Timer(0.2, sink.stop_waiting).start()
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 5
    assert books(sink.stats)[2] == {"shutdown": 1}


def test_a_gap_drops_the_request_it_hits_and_the_flow_resyncs(shadow: HttpShadow) -> None:
    sink = sink_for(shadow)
    flow = next(IDS)
    body = post("/ok/cut", b"z" * 100)
    sink.send(flow, get("/ok/1") + body[:60])
    sink.send(flow, body[70:], gap=10)  # inside the body: framing stays exact
    sink.send(flow, get("/ok/2")[:5])
    sink.send(flow, b"rest-of-something\r\n" + get("/ok/3"), gap=40)  # resync at a line
    sink.send(flow, get("/ok/4"))
    sink.end(flow)
    sink.commit()
    settle(sink, 5)
    sink.close()
    requests, completed, dropped, _ = books(sink.stats)
    assert (requests, completed, dropped) == (5, 3, {"gap": 2})
    assert shadow.paths() == ["/ok/1", "/ok/3", "/ok/4"]


def test_bytes_that_are_not_http_drop_the_flow_counted(shadow: HttpShadow) -> None:
    sink = sink_for(shadow)
    tls = bytes([0x16, 0x03, 0x01, 0x02, 0x00]) + bytes(range(256)) * 300
    feed(sink, next(IDS), tls, step=4096)
    feed(sink, next(IDS), get("/ws", "Upgrade: websocket", "Connection: Upgrade") + b"frames")
    feed(sink, next(IDS), get("/ok/1") + b"GET /ok/2 HTT", end=False)
    feed(sink, next(IDS), get("/ok/3"))
    time.sleep(0.3)
    sink.close()
    requests, completed, dropped, _ = books(sink.stats)
    assert (requests, completed) == (5, 2)
    assert dropped == {"not_http": 1, "upgrade": 1, "incomplete": 1}
    assert sorted(shadow.paths()) == ["/ok/1", "/ok/3"]
    s = sink.stats
    assert s["bytes_dropped"] + s["bytes_forwarded"] == (
        len(tls) + len(get("/ws", "Upgrade: websocket", "Connection: Upgrade")) + 6
        + len(get("/ok/1")) + 13 + len(get("/ok/3")))


def test_an_unreachable_shadow_drops_every_waiting_request() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens: refused
    sink = RequestForwardSink(addr, config=FAST)
    for i in range(20):
        feed(sink, next(IDS), get(f"/ok/{i}"))
    settle(sink, 20)
    sink.close()
    assert books(sink.stats)[:3] == (20, 0, {"connect_failed": 20})


def test_a_blackholed_shadow_is_connect_timeout() -> None:
    with blackhole() as addr:
        sink = RequestForwardSink(addr, config=FAST)
        for i in range(3):
            feed(sink, next(IDS), get(f"/ok/{i}"))
        settle(sink, 3, timeout=10)
        sink.close()
    assert books(sink.stats)[:3] == (3, 0, {"connect_timeout": 3})


def test_a_full_budget_drops_whole_requests_counted(shadow: HttpShadow) -> None:
    """The hand-off's budget refuses bytes: the requests in them are dropped
    (``total_buffer``), counted from their request lines; the flows go on."""
    cfg = ForwardConfig(mode="request", max_total_buffer=2000, max_flow_buffer=2000,
                        response_timeout=2.0)
    sink = RequestForwardSink(shadow.addr, config=cfg)
    flows = [next(IDS) for _ in range(4)]
    for round_ in range(10):  # no commit: everything waits in the hand-off
        for flow in flows:
            sink.send(flow, post(f"/ok/{flow}-{round_}", b"b" * 200))
    for flow in flows:
        sink.end(flow)
    sink.commit()
    settle(sink, 40)
    sink.close()
    requests, completed, dropped, _ = books(sink.stats)
    assert requests == 40 and completed == len(shadow.log) >= 1
    assert set(dropped) == {"total_buffer"} and completed + dropped["total_buffer"] == 40


def test_every_stat_is_a_declared_metric(shadow: HttpShadow) -> None:
    sink = sink_for(shadow)
    feed(sink, next(IDS), get("/ok/1") + b"\x00junk")
    settle(sink, 1)
    sink.close()
    assert not undeclared({"forward": sink.stats})
    assert sink.stats["pool_connections_open"] == 0


def test_the_mirror_picks_the_sink_by_mode(shadow: HttpShadow) -> None:
    from agent.mirror.driver import TrafficMirror

    mirror = TrafficMirror(MirrorConfig(observed_port=80, target_addr=shadow.addr,
                                        forward=FAST))
    mirror._open_forward()
    assert isinstance(mirror._forward, RequestForwardSink)
    mirror._close_forward()
    with pytest.raises(ValueError, match="forward mode 'bogus'"):
        ForwardConfig(mode="bogus")


def test_a_fault_of_the_sink_gives_that_flow_up_counted(shadow: HttpShadow,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.sinks.http_request import RequestFramer

    sink = sink_for(shadow)
    bad = next(IDS)
    feed(sink, bad, b"GET /ok/x HTTP/1.1\r\n", end=False)
    time.sleep(0.1)
    monkeypatch.setattr(RequestFramer, "feed", lambda self, data: 1 / 0)
    feed(sink, bad, b"Host: h\r\n\r\n" + get("/ok/y"))
    time.sleep(0.2)  # taken by the I/O thread meanwhile
    monkeypatch.undo()
    feed(sink, next(IDS), get("/ok/z"))
    settle(sink, 2)
    sink.close()
    assert books(sink.stats)[:3] == (2, 1, {"error": 1})
    assert sink.queued_bytes == 0 and shadow.paths() == ["/ok/z"]


def test_forward_mode_and_pool_from_flags_environment_and_file(tmp_path: Path) -> None:
    from agent.cli.configure import mirror_config
    from agent.cli.layers import parse_options
    from agent.cli.parser import UsageError

    base = ["offline", "x.pcap", "--port", "80", "--target", "127.0.0.1:9"]
    assert mirror_config(parse_options(base, {})).forward.mode == "connection"
    opts = parse_options([*base, "--forward-mode", "request", "--forward-pool", "5"], {})
    fwd = mirror_config(opts).forward
    assert (fwd.mode, fwd.pool_size) == ("request", 5)
    conf = tmp_path / "agent.toml"
    conf.write_text('forward-mode = "request"\nforward-pool = 3\n')
    opts = parse_options([*base, "--config", str(conf)], {"MIRROR_AGENT_FORWARD_POOL": "7"})
    assert (opts.pipe.forward_mode, opts.pipe.forward_pool) == ("request", 7)
    assert opts.origins["forward-mode"] == f"config {conf}"
    assert opts.origins["forward-pool"] == "env MIRROR_AGENT_FORWARD_POOL"
    for bad in (["--forward-mode", "stream"], ["--forward-pool", "0"]):
        with pytest.raises(UsageError):
            parse_options([*base, *bad], {})
