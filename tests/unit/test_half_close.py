"""A direction that reached its FIN ends on its own (DirectionEnd), and ends the shadow
connection: XDP sees only ingress, so the service's FIN may never come."""

from __future__ import annotations

import random
import threading
import time

import pytest

from agent.hooks import KeepAll, OnlyToObserved
from agent.hooks.http import InjectHeader
from agent.metrics import key
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.model import ACK, FIN, Direction, DirectionEnd, FlowEnd, Segment, TrafficChunk
from agent.reassembly import Output, Reassembler, ReassemblyConfig
from agent.sources.channel import ChannelSource
from tests.unit.segments import Conversation, split
from tests.unit.shadow import Shadow, wait_until

# Metrics (agent/metrics.py) this file reads from stats.
FORWARD_CONNECTIONS = "mirror_agent_forward_connections_total"
FORWARD_CONNECTIONS_COMPLETED = "mirror_agent_forward_connections_completed_total"
MIRROR_FORWARD_LATE_BYTES = "mirror_agent_mirror_forward_late_bytes_total"
REASSEMBLY_FLOWS_CLOSED_FLUSH = key("mirror_agent_reassembly_flows_closed_total", reason="flush")


def classify(src_port: int, dst_port: int) -> Direction:
    return Direction.TO_OBSERVED if dst_port == 8080 else Direction.FROM_OBSERVED


def reassemble(segs: list[Segment], cfg: ReassemblyConfig | None = None) -> Output:
    return Reassembler(cfg, classify).process(segs)


def kinds(out: Output) -> list[str]:
    """Each item as text: ``chunk <direction> <data>``, ``end <direction>``, ``flow <reason>``."""
    def text(o: TrafficChunk | DirectionEnd | FlowEnd) -> str:
        if isinstance(o, TrafficChunk):
            return f"chunk {o.direction} {o.data.decode()}"
        if isinstance(o, DirectionEnd):
            return f"end {o.direction}"
        return f"flow {o.reason}"
    return [text(o) for o in out]


def test_client_fin_alone_ends_its_direction_not_the_flow() -> None:
    c = Conversation()
    out = reassemble([*c.handshake(), c.seg(True, 0, b"req"), c.seg(False, 0, b"resp"),
                      c.seg(True, 3, flags=FIN | ACK)])
    assert kinds(out) == ["chunk to_observed req", "chunk from_observed resp", "end to_observed"]
    end = out[-1]
    assert isinstance(end, DirectionEnd)
    assert end.from_addr == "192.0.2.1:40000" and end.flow_id == out[0].flow_id


def test_fin_before_missing_bytes_waits_for_them() -> None:
    c = Conversation()
    out = reassemble([*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 4, b"ef"),
                      c.seg(True, 6, flags=FIN | ACK), c.seg(True, 2, b"cd")])
    assert kinds(out) == ["chunk to_observed ab", "chunk to_observed cdef", "end to_observed"]


def test_a_skipped_hole_completes_the_direction() -> None:
    c = Conversation()
    t = c.ts
    r = Reassembler(ReassemblyConfig(hole_timeout=1.0), classify)
    out = r.process([*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 4, b"ef", ts=t + 0.1),
                     c.seg(True, 6, flags=FIN | ACK, ts=t + 0.2)])
    assert kinds(out)[-1] == "chunk to_observed ab"
    r.advance(t + 2, out)
    assert kinds(out)[-2:] == ["chunk to_observed ef", "end to_observed"]
    assert r.flow_count == 1


def test_both_fins_end_each_direction_once_then_the_flow() -> None:
    c = Conversation()
    out = reassemble([*c.handshake(), c.seg(True, 0, b"q"), c.seg(False, 0, b"r"),
                      *c.fins(1, 1), c.seg(True, 1, flags=FIN | ACK)])  # FIN retransmitted
    assert kinds(out) == ["chunk to_observed q", "chunk from_observed r", "end to_observed",
                          "end from_observed", "flow fin"]


def test_a_skipped_hole_that_completes_the_last_direction_ends_the_flow() -> None:
    c = Conversation()
    t = c.ts
    r = Reassembler(ReassemblyConfig(hole_timeout=1.0), classify)
    out = r.process([*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 4, b"ef", ts=t + 0.1),
                     c.seg(True, 6, flags=FIN | ACK, ts=t + 0.2),
                     c.seg(False, 0, flags=FIN | ACK, ts=t + 0.3)])
    assert kinds(out)[-2:] == ["chunk to_observed ab", "end from_observed"]
    r.advance(t + 2, out)
    assert kinds(out)[-3:] == ["chunk to_observed ef", "end to_observed", "flow fin"]
    assert r.flow_count == 0 and r.buffered_bytes == 0
    assert r.stats.gap_bytes == 2 and r.stats.flows_closed == {"fin": 1}


def test_a_limit_that_completes_another_flows_last_direction_ends_that_flow() -> None:
    r = Reassembler(ReassemblyConfig(max_total_buffer=5), classify)
    a = Conversation()
    out = r.process([*a.handshake(), a.seg(False, 0, flags=FIN | ACK), a.seg(True, 0, b"ab"),
                     a.seg(True, 4, b"efgh"), a.seg(True, 8, flags=FIN | ACK)])
    assert kinds(out)[-2:] == ["end from_observed", "chunk to_observed ab"]
    b = Conversation(client=(bytes([192, 0, 2, 9]), 40001))
    out = r.process([*b.handshake(), b.seg(True, 10, b"xyz")])  # 7 bytes held: over the limit
    assert kinds(out) == ["chunk to_observed efgh", "end to_observed", "flow fin"]
    assert r.stats.limit_skips == 1 and r.flow_count == 1


def test_a_bare_fin_after_lost_data_ends_the_direction_at_the_hole_timeout() -> None:
    c = Conversation()
    t = c.ts
    r = Reassembler(ReassemblyConfig(hole_timeout=1.0), classify)
    # "cd" is lost; the FIN right after it is the last the client sends.
    out = r.process([*c.handshake(), c.seg(True, 0, b"ab"),
                     c.seg(True, 4, flags=FIN | ACK, ts=t + 0.1)])
    assert kinds(out) == ["chunk to_observed ab"]
    r.advance(t + 0.9, out)
    assert kinds(out) == ["chunk to_observed ab"]  # TCP may still retransmit "cd"
    r.advance(t + 1.2, out)
    assert kinds(out) == ["chunk to_observed ab", "end to_observed"]
    assert r.stats.hole_timeouts == 1 and r.flow_count == 1
    out = r.process([c.seg(True, 2, b"cd", ts=t + 1.3)])  # too late: the direction is over
    assert out == [] and r.stats.retransmitted_bytes == 2
    out = r.process([c.seg(False, 0, flags=FIN | ACK, ts=t + 1.4)])
    assert kinds(out) == ["end from_observed", "flow fin"]
    end = out[-1]
    assert isinstance(end, FlowEnd) and end.trailing_gap == 2
    assert r.stats.gap_bytes == 2 and r.buffered_bytes == 0


def test_a_fin_hole_filled_in_time_is_not_a_gap() -> None:
    c = Conversation()
    t = c.ts
    r = Reassembler(ReassemblyConfig(hole_timeout=1.0), classify)
    out = r.process([*c.handshake(), c.seg(True, 0, b"ab"),
                     c.seg(True, 6, flags=FIN | ACK, ts=t + 0.1),
                     c.seg(True, 2, b"cd", ts=t + 0.8),  # progress: the hole starts again
                     c.seg(False, 0, b"reply", ts=t + 1.5)])
    assert kinds(out) == ["chunk to_observed ab", "chunk to_observed cd",
                          "chunk from_observed reply"]  # t + 1.5: no hole waited 1 s
    r.advance(t + 1.9, out)
    assert kinds(out)[-1] == "end to_observed"  # "ef" waited 1 s from the progress at t + 0.8
    assert r.stats.hole_timeouts == 1 and r.stats.gap_bytes == 0
    r.flush(out)
    end = out[-1]
    assert isinstance(end, FlowEnd) and end.trailing_gap == 2 and r.stats.gap_bytes == 2


def test_a_bare_fin_hole_without_timeout_waits_for_the_flow_end() -> None:
    c = Conversation()
    r = Reassembler(ReassemblyConfig(hole_timeout=0), classify)
    out = r.process([*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 4, flags=FIN | ACK)])
    r.advance(c.ts + 100, out)
    assert kinds(out) == ["chunk to_observed ab"]
    r.flush(out)
    assert kinds(out)[1:] == ["flow flush"]
    end = out[-1]
    assert isinstance(end, FlowEnd) and end.trailing_gap == 2


def test_no_bytes_of_a_direction_after_its_end() -> None:
    """Bytes past a FIN are not the stream's: dropped and counted as late, never delivered."""
    c = Conversation()
    r = Reassembler(ReassemblyConfig(), classify)
    out = r.process([*c.handshake(), c.seg(True, 0, b"abc"), c.seg(True, 3, flags=FIN | ACK),
                     c.seg(True, 3, b"xyz"), c.seg(True, 1, b"bcde")])
    assert kinds(out) == ["chunk to_observed abc", "end to_observed"]
    assert r.stats.late_bytes == 5 and r.stats.late_segments == 2
    assert r.stats.retransmitted_bytes == 2
    r.flush(out)
    assert kinds(out)[2:] == ["flow flush"] and r.stats.gap_bytes == 0


def test_held_bytes_past_a_later_fin_are_dropped() -> None:
    c = Conversation()
    r = Reassembler(ReassemblyConfig(), classify)
    out = r.process([*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 4, b"efgh"),
                     c.seg(True, 6, flags=FIN | ACK),  # "gh" past it: not this stream's
                     c.seg(True, 2, b"cd")])
    assert kinds(out) == ["chunk to_observed ab", "chunk to_observed cdef", "end to_observed"]
    assert r.stats.late_bytes == 2 and r.buffered_bytes == 0


def test_a_keepalive_after_the_fin_is_not_data() -> None:
    """A keep-alive of a half-closed side sits at the FIN's number (snd_una - 1)."""
    c = Conversation()
    r = Reassembler(ReassemblyConfig(), classify)
    out = r.process([*c.handshake(), c.seg(True, 0, b"abc"), c.seg(True, 3, flags=FIN | ACK),
                     c.seg(True, 3, b"\x00")])
    assert kinds(out) == ["chunk to_observed abc", "end to_observed"]
    assert r.stats.keepalives == 1 and r.stats.late_bytes == 0


@pytest.mark.parametrize("seed", range(40))
def test_direction_end_follows_all_its_bytes_whatever_the_order(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randint(1, 3000))
    c = Conversation()
    body = [c.seg(True, off, piece) for off, piece in split(data, rng, 200)]
    body += [rng.choice(body) for _ in range(len(body) // 3)]  # duplicates
    body.append(c.seg(True, len(data), flags=FIN | ACK))
    rng.shuffle(body)
    for i, s in enumerate(body):
        s.ts = c.ts + i * 0.001
    out = reassemble([*c.handshake(), *body])
    ends = [i for i, o in enumerate(out) if isinstance(o, DirectionEnd)]
    assert ends == [len(out) - 1]
    assert b"".join(o.data for o in out if isinstance(o, TrafficChunk)) == data


# ------------------------------------------------------------------ through the mirror


def request_then_client_fin(c: Conversation, request: bytes) -> list[Segment]:
    return [*c.handshake(), c.seg(True, 0, request), c.seg(False, 0, b"HTTP/1.1 200 OK\r\n\r\n"),
            c.seg(True, len(request), flags=FIN | ACK)]


def test_shadow_sees_eof_once_the_client_finished_without_the_service_fin() -> None:
    shadow = Shadow()
    src = ChannelSource(idle_tick=0.01)
    m = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=shadow.addr))
    run = threading.Thread(target=m.run, args=(src,))
    run.start()
    try:
        started = time.monotonic()
        for s in request_then_client_fin(Conversation(), b"GET / HTTP/1.1\r\n\r\n"):
            src.put(s)
        wait_until(lambda: shadow.eof_at, timeout=3)
        assert shadow.eof_at[0] - started < 1.5  # not the idle timeout (600 s)
        assert shadow.received == [b"GET / HTTP/1.1\r\n\r\n"]
        assert run.is_alive() and m.reassembler.flow_count == 1  # the flow itself is open
    finally:
        src.end()
        run.join(10)
        shadow.close()
    st = m.stats()
    assert st[FORWARD_CONNECTIONS] == 1 == st[FORWARD_CONNECTIONS_COMPLETED]
    assert st[REASSEMBLY_FLOWS_CLOSED_FLUSH] == 1


def test_held_forward_bytes_go_out_at_the_client_fin_on_the_same_connection() -> None:
    shadow = Shadow()
    recorded: list[bytes] = []
    c = Conversation()
    partial = b"GET / HTTP/1.1\r\nHost: x\r\n"  # a header block InjectHeader still holds
    src = ChannelSource()
    for s in [*request_then_client_fin(c, partial), c.seg(False, 19, flags=FIN | ACK)]:
        src.put(s)
    src.end()
    m = TrafficMirror(MirrorConfig(
        observed_port=8080, target_addr=shadow.addr,
        forward_hook=[OnlyToObserved(), InjectHeader("X-Mirror", "1")],
        record_hook=KeepAll(), write_func=lambda ch, d: recorded.append(d)))
    m.run(src)
    shadow.close()
    assert shadow.received == [partial]  # released at the client's FIN, one connection
    assert recorded == [partial, b"HTTP/1.1 200 OK\r\n\r\n"]
    st = m.stats()
    assert st[FORWARD_CONNECTIONS] == 1 and not st.get(MIRROR_FORWARD_LATE_BYTES)
