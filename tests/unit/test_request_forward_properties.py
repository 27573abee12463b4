"""Request-mode forwarding under random fault schedules (issue 18): flows of pipelined
requests that a real loopback shadow answers, resets, stalls on, garbles or closes after;
pieces split anywhere, capture gaps, unended flows, a close with work still queued. Another
thread reads the stats all along: ``requests == completed + dropped + in_flight`` at every
look; at the end nothing is in flight, every byte handed over is forwarded or dropped, and
the hand-off holds nothing."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.metrics import FORWARD_REQUEST_DROP_REASONS
from agent.mirror.config import ForwardConfig
from agent.sinks.request_forward import RequestForwardSink
from tests.unit.http_shadow import HttpShadow

KINDS = ("ok", "chunked", "continue", "nocontent", "close", "toclose", "slow", "reset",
         "silent", "bad")
BENIGN = frozenset({"ok", "chunked", "continue", "nocontent", "close", "toclose", "slow"})
IDS = itertools.count(1_000_000)


@dataclass
class FlowPlan:
    kinds: list[str]
    step: int  # piece size (0: whole)
    gap: tuple[int, int] | None  # (at, length): bytes cut out, sent with gap=
    ended: bool

    def stream(self, flow: int) -> bytes:
        out = []
        for i, kind in enumerate(self.kinds):
            path = f"/{kind}/{flow}-{i}"
            if i % 3 == 1:
                body = b"b" * (17 * i + 3)
                out.append(f"POST {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n"
                           .encode() + body)
            else:
                out.append(f"GET {path} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
                           .encode())
        return b"".join(out)


flows_st = st.lists(st.builds(
    FlowPlan, st.lists(st.sampled_from(KINDS), min_size=1, max_size=5),
    st.sampled_from([0, 1, 7, 40]),
    st.none() | st.tuples(st.integers(0, 400), st.integers(1, 80)), st.booleans()),
    min_size=1, max_size=6)


class Watcher:
    """Reads the sink's stats in a loop from its own thread; keeps the first imbalance."""

    def __init__(self, sink: RequestForwardSink) -> None:
        self.sink = sink
        self.looks = 0
        self.broken: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.sink.stats
            dropped = sum(s[f"requests_dropped_{r}"] for r in FORWARD_REQUEST_DROP_REASONS)
            if (s["requests"] != s["requests_completed"] + dropped + s["requests_in_flight"]
                    or s["requests_in_flight"] < 0) and self.broken is None:
                self.broken = dict(s)
            self.looks += 1
            time.sleep(0.0005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def hand_over(sink: RequestForwardSink, plans: list[FlowPlan], data: st.DataObject) -> int:
    """Send every flow's pieces, interleaved at random; the bytes handed over."""
    queues: list[tuple[int, list[tuple[bytes, int]], bool]] = []
    total = 0
    for plan in plans:
        flow = next(IDS)
        stream = plan.stream(flow)
        gap = 0
        pieces: list[tuple[bytes, int]] = []
        if plan.gap is not None:
            at, n = plan.gap[0] % len(stream), plan.gap[1]
            head, tail = stream[:at], stream[at + n :]
            gap = len(stream[at : at + n])
            stream = head + tail
            cut = len(head)
        else:
            cut = -1
        step = plan.step or len(stream) or 1
        for i in range(0, len(stream), step):
            piece = stream[i : i + step]
            if cut >= 0 and i <= cut < i + step:  # the gap falls in this piece: split it
                pieces += [(piece[: cut - i], 0), (piece[cut - i :], gap)]
            else:
                pieces.append((piece, 0))
        kept: list[tuple[bytes, int]] = []
        owed = 0
        for piece, g in pieces:  # an empty piece's gap goes with the next one
            owed += g
            if piece:
                kept.append((piece, owed))
                owed = 0
        total += sum(len(p) for p, _ in kept)
        if kept:
            queues.append((flow, kept, plan.ended))
    while queues:
        idx = data.draw(st.integers(0, len(queues) - 1))
        flow, pieces, ended = queues[idx]
        piece, gap = pieces.pop(0)
        sink.send(flow, piece, gap)
        if data.draw(st.booleans()):
            sink.commit()
        if not pieces:
            queues.pop(idx)
            if ended:
                sink.end(flow)
    sink.commit()
    return total


@pytest.fixture(scope="module")
def shadow() -> Iterator[HttpShadow]:
    s = HttpShadow()
    yield s
    s.close()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plans=flows_st, pool=st.integers(1, 4), close_timeout=st.sampled_from([0.05, 3.0]),
       wait=st.sampled_from([0.0, 0.05, 0.4]), data=st.data())
def test_every_request_is_accounted_for_at_every_look(
        shadow: HttpShadow, plans: list[FlowPlan], pool: int, close_timeout: float,
        wait: float, data: st.DataObject) -> None:
    benign = all(k in BENIGN for p in plans for k in p.kinds)
    cfg = ForwardConfig(mode="request", pool_size=pool, close_timeout=close_timeout,
                        response_timeout=5.0 if benign else 0.3, connect_timeout=1.0)
    sink = RequestForwardSink(shadow.addr, config=cfg)
    watcher = Watcher(sink)
    handed = hand_over(sink, plans, data)
    time.sleep(wait)
    sink.close()
    watcher.stop()
    assert watcher.broken is None, watcher.broken
    s = sink.stats
    dropped = {r: s[f"requests_dropped_{r}"] for r in FORWARD_REQUEST_DROP_REASONS
               if s[f"requests_dropped_{r}"]}
    assert s["requests_in_flight"] == 0, dict(s)
    assert s["requests"] == s["requests_completed"] + sum(dropped.values()), dict(s)
    assert s["bytes_forwarded"] + s["bytes_dropped"] == handed, dict(s)
    assert sink.queued_bytes == 0 and s["pool_connections_open"] == 0
    expected = sum(len(p.kinds) for p in plans)
    if all(p.gap is None for p in plans):
        assert s["requests"] == expected, dict(s)
    if close_timeout == 3.0 and benign and all(p.gap is None and p.ended for p in plans):
        assert s["requests_completed"] == expected, (dropped, dict(s))
