"""The sans-I/O mirror step: given segments, the exact commands (no sockets, files, threads)."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from agent.hooks import HookFunc, KeepAll, OnlyToObserved, SampleFlows
from agent.hooks.http import InjectHeader
from agent.mirror.config import MirrorConfig
from agent.mirror.step import (
    Command,
    EndForward,
    FlowCut,
    Forward,
    MirrorStep,
    Record,
    RecordFlowEnd,
)
from agent.model import FIN, Direction, Segment, TrafficChunk
from agent.reassembly import ReassemblyConfig
from tests.unit.segments import Conversation

REQ = b"GET / HTTP/1.1\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\n\r\n"
#: Never dialled: the step makes commands only.
SHADOW = "192.0.2.99:80"


def step(target: bool = True, record: bool = True, **cfg: Any) -> MirrorStep:
    def never(chunk: TrafficChunk, data: bytes) -> None:
        raise AssertionError("the step never writes")

    return MirrorStep(MirrorConfig(observed_port=8080, target_addr=SHADOW if target else "",
                                   write_func=never if record else None, **cfg))


def show(cmds: list[Command]) -> list[tuple[object, ...]]:
    """Each command as a tuple: kind, flow, and what matters of it."""
    out: list[tuple[object, ...]] = []
    for c in cmds:
        if isinstance(c, Forward):
            out.append(("forward", c.flow_id, c.data, c.gap))
        elif isinstance(c, EndForward):
            out.append(("end_forward", c.flow_id))
        elif isinstance(c, Record):
            out.append(("record", c.chunk.flow_id, str(c.chunk.direction), c.data))
        elif isinstance(c, RecordFlowEnd):
            out.append(("record_end", c.end.flow_id, c.end.reason))
        else:
            assert isinstance(c, FlowCut)
            out.append(("cut", c.end.flow_id, c.end.reason))
    return out


def exchange(c: Conversation, client_fin_first: bool = False) -> list[Segment]:
    """Handshake, a request, a response, both FINs (the client's before the response if
    ``client_fin_first``)."""
    req, resp = c.seg(True, 0, REQ), c.seg(False, 0, RESP)
    cfin, sfin = c.fins(len(REQ), len(RESP))
    body = [req, cfin, resp] if client_fin_first else [req, resp, cfin]
    return [*c.handshake(), *body, sfin]


def test_forwards_only_client_to_service_and_records_per_hooks() -> None:
    s = step()
    assert show(s.feed(exchange(Conversation()))) == [
        ("forward", 1, REQ, 0), ("record", 1, "to_observed", REQ),
        ("end_forward", 1),  # at the client's FIN
        ("record_end", 1, "fin"),
    ]
    assert s.counters == {"chunks": 2, "forward_hook_dropped_bytes": len(RESP),
                          "record_hook_dropped_bytes": len(RESP)}


def test_record_hooks_decide_what_is_recorded_and_forward_changes_never_reach_them() -> None:
    def mangle(chunk: TrafficChunk) -> tuple[bytes, bool]:
        chunk.data = b"MANGLED"  # in place, on its own copy
        return b"FWD", True

    s = step(forward_hook=[OnlyToObserved(), HookFunc(mangle)],
             record_hook=[KeepAll(), HookFunc(lambda ch: (ch.data.upper(), True))])
    assert show(s.feed(exchange(Conversation()))) == [
        ("forward", 1, b"FWD", 0), ("record", 1, "to_observed", REQ.upper()),
        ("record", 1, "from_observed", RESP.upper()), ("end_forward", 1),
        ("record_end", 1, "fin"),
    ]


def test_without_target_or_writer_no_commands_but_record_hooks_run() -> None:
    seen: list[Direction] = []

    def spy(chunk: TrafficChunk) -> tuple[bytes, bool]:
        seen.append(chunk.direction)
        return chunk.data, True

    s = step(target=False, record=False,
             forward_hook=HookFunc(lambda ch: pytest.fail("forward hook called")),
             record_hook=HookFunc(spy))
    assert s.feed(exchange(Conversation())) == []
    assert seen == [Direction.TO_OBSERVED, Direction.FROM_OBSERVED]


def test_client_end_ends_the_shadow_connection_and_later_bytes_are_counted_late() -> None:
    s = step(forward_hook=KeepAll())  # would forward the response too
    assert show(s.feed(exchange(Conversation(), client_fin_first=True))) == [
        ("forward", 1, REQ, 0), ("record", 1, "to_observed", REQ), ("end_forward", 1),
        ("record_end", 1, "fin"),
    ]
    assert s.counters["mirror_forward_late_bytes"] == len(RESP)


def test_flow_end_gives_back_what_hooks_hold() -> None:
    class Holding:
        """Holds every byte until the flow ends."""

        def __init__(self) -> None:
            self.held: dict[tuple[int, str], bytes] = {}

        def handle(self, chunk: TrafficChunk) -> tuple[bytes, bool]:
            key = (chunk.flow_id, chunk.from_addr)
            self.held[key] = self.held.get(key, b"") + chunk.data
            return b"", True

        def flow_end(self, chunk: TrafficChunk) -> bytes:
            return self.held.pop((chunk.flow_id, chunk.from_addr), b"")

    c = Conversation()
    partial = b"GET / HTTP/1.1\r\nHost: x\r\n"  # a header block InjectHeader still holds
    s = step(forward_hook=[OnlyToObserved(), InjectHeader("X-Mirror", "1")],
             record_hook=[OnlyToObserved(), Holding()])
    cmds = s.feed([*c.handshake(), c.seg(True, 0, partial[:10]), c.seg(False, 0, RESP),
                   c.seg(True, 10, partial[10:])])
    assert cmds == []  # everything held
    assert show(s.feed([c.seg(True, len(partial), flags=FIN)])) == [
        ("forward", 1, partial, 0), ("end_forward", 1)]  # the client's end releases it
    assert show(s.flush()) == [("record", 1, "to_observed", partial), ("record_end", 1, "flush")]


def test_end_records_only_for_recorded_flows_and_sampling_is_per_flow() -> None:
    s = step(target=False, record_hook=SampleFlows(0.5))
    segs: list[Segment] = []
    for i in range(40):
        segs += exchange(Conversation(client=(bytes([192, 0, 2, 1]), 41000 + i)))
    kept = {f for f in range(1, 41) if zlib.crc32(f.to_bytes(8, "little")) <= 0x7FFFFFFF}
    assert 5 < len(kept) < 35
    want = [x for f in sorted(kept) for x in (("record", f, "to_observed", REQ),
                                              ("record", f, "from_observed", RESP),
                                              ("record_end", f, "fin"))]
    assert show(s.feed(segs)) == want


def test_unobserved_connections_make_no_command_whatever_the_hooks() -> None:
    c = Conversation(server=(bytes([192, 0, 2, 2]), 9999))
    s = step(forward_hook=KeepAll(), record_hook=KeepAll())
    assert s.feed(exchange(c)) == []
    assert s.counters["forward_unobserved_bytes"] == len(REQ) + len(RESP)
    assert s.counters["record_unobserved_bytes"] == len(REQ) + len(RESP)
    s.set_ports(frozenset({9999}))  # a new connection on it is observed
    again = Conversation(client=(bytes([192, 0, 2, 1]), 40001), server=c.server)
    assert show(s.feed(exchange(again))) == [
        ("forward", 2, REQ, 0), ("record", 2, "to_observed", REQ),
        ("forward", 2, RESP, 0), ("record", 2, "from_observed", RESP),
        ("end_forward", 2), ("record_end", 2, "fin")]


def test_limits_and_time_end_flows() -> None:
    s = step(target=False, record_hook=KeepAll(),
             reassembly=ReassemblyConfig(max_flows=1, idle_timeout=10))
    a, b = Conversation(), Conversation(client=(bytes([192, 0, 2, 1]), 40001))
    assert show(s.feed([*a.handshake(), a.seg(True, 0, REQ), *b.handshake()])) == [
        ("record", 1, "to_observed", REQ), ("record_end", 1, "evicted"), ("cut", 1, "evicted")]
    assert show(s.feed([b.seg(True, 0, REQ)])) == [("record", 2, "to_observed", REQ)]
    assert s.advance(b.ts + 1) == []
    assert show(s.advance(b.ts + 60)) == [("record_end", 2, "idle")]


def test_commands_made_before_a_hook_raised_are_kept() -> None:
    def second_fails(chunk: TrafficChunk) -> tuple[bytes, bool]:
        if chunk.direction is Direction.FROM_OBSERVED:
            raise RuntimeError("hook failed")
        return chunk.data, True

    s = step(record_hook=HookFunc(second_fails))
    out: list[Command] = []
    with pytest.raises(RuntimeError, match="hook failed"):
        s.feed(exchange(Conversation()), out)
    assert show(out) == [("forward", 1, REQ, 0), ("record", 1, "to_observed", REQ)]
    assert s.counters["chunks"] == 2


def test_a_gap_in_bytes_the_forward_hooks_dropped_goes_with_the_next_forward() -> None:
    """A gap lands in a request the selection drops: the next kept bytes still restart the
    shadow connection, so the shadow never sees the halves of two requests joined."""
    def drop_b(chunk: TrafficChunk) -> tuple[bytes, bool]:
        return chunk.data, not chunk.data.startswith(b"B")

    s = step(record=False, forward_hook=[OnlyToObserved(), HookFunc(drop_b)])
    c = Conversation()
    cmds = s.feed([*c.handshake(), c.seg(True, 0, b"A" * 10), c.seg(True, 15, b"B" * 5)])
    cmds += s.advance(c.ts + 100)  # the hole before B times out: B comes with gap 5
    cmds += s.feed([c.seg(True, 20, b"C" * 5)])
    forwards = [(x.data, x.gap) for x in cmds if isinstance(x, Forward)]
    assert forwards == [(b"A" * 10, 0), (b"C" * 5, 5)]
