"""Every TCP case the reassembler must handle, one test each."""

from __future__ import annotations

from agent.model import ACK, FIN, RST, SYN, FlowEnd, Segment, TrafficChunk
from agent.reassembly import Output, Reassembler, ReassemblyConfig
from tests.unit.segments import Conversation


def run(segs: list[Segment], cfg: ReassemblyConfig | None = None,
        flush: bool = True) -> tuple[Reassembler, list[TrafficChunk], list[FlowEnd]]:
    r = Reassembler(cfg)
    out = r.process(segs)
    if flush:
        r.flush(out)
    return (r, [o for o in out if isinstance(o, TrafficChunk)],
            [o for o in out if isinstance(o, FlowEnd)])


def client_bytes(chunks: list[TrafficChunk]) -> bytes:
    return b"".join(c.data for c in chunks if c.from_addr.endswith(":40000"))


def test_out_of_order_is_held_then_delivered_in_order() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 5, b"world"), c.seg(True, 0, b"hello")]
    r, chunks, _ = run(segs, flush=False)
    assert [x.data for x in chunks] == [b"helloworld"]
    assert r.buffered_bytes == 0


def test_in_order_data_is_delivered_immediately() -> None:
    c = Conversation()
    r = Reassembler()
    out = r.process([*c.handshake(), c.seg(True, 0, b"GET /")])
    assert [o.data for o in out if isinstance(o, TrafficChunk)] == [b"GET /"]


def test_duplicates_and_retransmissions_are_trimmed() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"abcdef"), c.seg(True, 0, b"abcdef"),
            c.seg(True, 3, b"defghi")]
    r, chunks, _ = run(segs)
    assert client_bytes(chunks) == b"abcdefghi"
    assert r.stats.retransmitted_bytes == 9
    assert r.stats.conflict_bytes == 0


def test_conflicting_overlap_first_copy_wins_and_is_counted() -> None:
    c = Conversation()
    # Two out-of-order copies of the same range with different bytes, then the hole fills.
    segs = [*c.handshake(), c.seg(True, 4, b"XXXX"), c.seg(True, 4, b"YYZZ"),
            c.seg(True, 0, b"0123")]
    r, chunks, _ = run(segs)
    assert client_bytes(chunks) == b"0123XXXX"
    assert r.stats.conflict_bytes == 4
    # A retransmission of delivered bytes that disagrees is counted too; delivered bytes stay.
    c2 = Conversation()
    r2, chunks2, _ = run([*c2.handshake(), c2.seg(True, 0, b"abcd"), c2.seg(True, 2, b"ZZ")])
    assert client_bytes(chunks2) == b"abcd"
    assert r2.stats.conflict_bytes == 2


def test_sequence_wraparound() -> None:
    c = Conversation(client_isn=2**32 - 3)
    segs = [*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 2, b"cdef"), c.seg(True, 6, b"g")]
    _, chunks, _ = run(segs)
    assert client_bytes(chunks) == b"abcdefg"


def test_missing_syn_starts_at_first_data_without_stalling() -> None:
    c = Conversation()
    segs = [c.seg(True, 100, b"mid-stream"), c.seg(True, 110, b" more")]
    _r, chunks, _ = run(segs, flush=False)
    assert client_bytes(chunks) == b"mid-stream more"


def test_data_on_syn_is_delivered() -> None:
    c = Conversation()
    syn = c.seg(True, 0, b"fastopen", flags=SYN)
    segs = [syn, c.seg(False, 0, flags=SYN | ACK), c.seg(True, 8, b"!")]
    _, chunks, _ = run(segs)
    assert client_bytes(chunks) == b"fastopen!"


def test_keepalive_probe_is_never_data() -> None:
    c = Conversation()
    # Linux keep-alive: seq = next - 1, zero or one garbage byte.
    segs = [*c.handshake(), c.seg(True, 0, b"req"), c.seg(True, 2, b"\x00"), c.seg(True, 2, b"")]
    r, chunks, _ = run(segs)
    assert client_bytes(chunks) == b"req"
    assert r.stats.keepalives == 1  # the empty one carries no payload and is not data at all


def test_zero_window_probe_is_not_delivered_unless_taken() -> None:
    c = Conversation()
    server_zero = c.seg(False, 0, flags=ACK, window=0)
    # The probe byte is re-sent as part of the next segment: delivered once, from there.
    segs = [*c.handshake(), c.seg(True, 0, b"abc"), server_zero, c.seg(True, 3, b"P"),
            c.seg(False, 0, flags=ACK, window=1000), c.seg(True, 3, b"def")]
    r, chunks, _ = run(segs)
    assert client_bytes(chunks) == b"abcdef"
    assert r.stats.zero_window_probes == 1
    # A garbage probe byte that the real data replaces never shows up.
    c2 = Conversation()
    segs2 = [*c2.handshake(), c2.seg(True, 0, b"abc"), c2.seg(False, 0, flags=ACK, window=0),
             c2.seg(True, 3, b"?"), c2.seg(False, 0, flags=ACK, window=500),
             c2.seg(True, 3, b"xyz")]
    _, chunks2, _ = run(segs2)
    assert client_bytes(chunks2) == b"abcxyz"


def test_rst_closes_and_late_segments_are_dropped_and_counted() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"abc"), c.seg(False, 0, flags=RST | ACK),
            c.seg(True, 3, b"late")]
    r, chunks, ends = run(segs, flush=False)
    assert client_bytes(chunks) == b"abc"
    assert [e.reason for e in ends] == ["rst"]
    assert r.flow_count == 0
    assert r.stats.late_segments == 1 and r.stats.late_bytes == 4


def test_second_fin_closes() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"q"), c.seg(True, 1, flags=FIN | ACK)]
    r, _, ends = run(segs, flush=False)
    assert not ends and r.flow_count == 1  # one FIN: half closed only
    out = r.process([c.seg(False, 0, flags=FIN | ACK)])
    assert [o.reason for o in out if isinstance(o, FlowEnd)] == ["fin"]
    assert r.flow_count == 0


def test_fin_before_missing_data_waits_for_it() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 4, flags=FIN | ACK),
            c.seg(False, 0, flags=FIN | ACK), c.seg(True, 2, b"cd")]
    _r, chunks, ends = run(segs, flush=False)
    assert client_bytes(chunks) == b"abcd"
    assert [e.reason for e in ends] == ["fin"]


def test_new_syn_on_closed_tuple_starts_new_connection() -> None:
    c = Conversation()
    first = [*c.handshake(), c.seg(True, 0, b"one"), *c.fins(3, 0)]
    c2 = Conversation(client_isn=777_777, server_isn=888_888)
    second = [*c2.handshake(), c2.seg(True, 0, b"two")]
    r, chunks, _ends = run(first + second)
    ids = {ch.flow_id for ch in chunks}
    assert len(ids) == 2
    assert [ch.data for ch in chunks] == [b"one", b"two"]
    assert r.stats.flows_opened == 2


def test_idle_flush_by_periodic_sweep() -> None:
    c = Conversation()
    cfg = ReassemblyConfig(idle_timeout=10)
    r = Reassembler(cfg)
    out = r.process([*c.handshake(), c.seg(True, 0, b"x"), c.seg(True, 5, b"y")])
    assert r.flow_count == 1
    r.advance(c.ts + 6, out)  # idle 6 s: stays
    assert r.flow_count == 1
    r.advance(c.ts + 12, out)
    ends = [o for o in out if isinstance(o, FlowEnd)]
    assert [e.reason for e in ends] == ["idle"]
    # The held "y" was delivered after its 4-byte hole, reported as a gap.
    gapped = [o for o in out if isinstance(o, TrafficChunk) and o.gap_bytes]
    assert [(g.data, g.gap_bytes) for g in gapped] == [(b"y", 4)]


def test_time_comes_from_segments() -> None:
    c = Conversation()
    r = Reassembler(ReassemblyConfig(idle_timeout=10))
    out = r.process([*c.handshake(), c.seg(True, 0, b"x")])
    other = Conversation(client=(bytes([192, 0, 2, 9]), 5555))
    other.ts = c.ts + 30
    r.process([other.seg(True, 0, b"later")])  # its timestamp triggers the sweep
    assert r.flow_count == 1
    assert r.stats.flows_closed == {"idle": 1}
    assert out


def test_flow_buffer_limit_skips_hole_and_reports_gap() -> None:
    c = Conversation()
    cfg = ReassemblyConfig(max_flow_buffer=1000)
    segs = [*c.handshake()] + [c.seg(True, 100 + i * 100, b"z" * 100) for i in range(11)]
    r, chunks, _ = run(segs, cfg, flush=False)
    assert r.stats.limit_skips == 1
    assert chunks[0].gap_bytes == 100
    assert len(chunks[0].data) == 1100
    assert r.buffered_bytes == 0


def test_hole_timeout_skips_a_hole_nothing_fills() -> None:
    """A hole left by a source overflow is skipped once later data waited hole_timeout."""
    c = Conversation()
    cfg = ReassemblyConfig(hole_timeout=1.0)
    t = c.ts
    segs = [*c.handshake(), c.seg(True, 100, b"later", ts=t + 0.1),
            c.seg(True, 105, b"more", ts=t + 0.5),  # held: before the timeout
            c.seg(False, 0, b"reply", ts=t + 1.2)]  # time passes on any flow
    r, chunks, _ = run(segs, cfg, flush=False)
    assert [(x.data, x.gap_bytes) for x in chunks if x.data != b"reply"] == [
        (b"latermore", 100)]
    assert r.stats.hole_timeouts == 1 and r.stats.gap_bytes == 100
    assert r.buffered_bytes == 0


def test_hole_filled_in_time_is_not_skipped_and_advance_expires_holes() -> None:
    c = Conversation()
    t = c.ts
    r = Reassembler(ReassemblyConfig(hole_timeout=1.0))
    out = r.process([*c.handshake(), c.seg(True, 3, b"def", ts=t + 0.1),
                     c.seg(True, 0, b"abc", ts=t + 0.9)])
    r.feed(c.seg(True, 10, b"k", ts=t + 1.0), out)
    assert [x.data for x in out if isinstance(x, TrafficChunk)] == [b"abcdef"]
    r.advance(t + 1.5, out)  # not yet: the second hole started at t + 1.0
    r.advance(t + 2.1, out)
    chunks = [x for x in out if isinstance(x, TrafficChunk)]
    assert [(x.data, x.gap_bytes) for x in chunks] == [(b"abcdef", 0), (b"k", 4)]
    assert r.stats.hole_timeouts == 1


def test_total_buffer_limit_holds() -> None:
    cfg = ReassemblyConfig(max_total_buffer=5000)
    r = Reassembler(cfg)
    out: Output = []
    for i in range(20):
        c = Conversation(client=(bytes([192, 0, 2, 1]), 41000 + i))
        for s in [*c.handshake(), c.seg(True, 10, b"q" * 1000)]:
            r.feed(s, out)
        assert r.buffered_bytes <= 5000
    assert r.stats.limit_skips >= 15


def test_max_flows_evicts_and_counts() -> None:
    r = Reassembler(ReassemblyConfig(max_flows=3))
    out: Output = []
    for i in range(5):
        c = Conversation(client=(bytes([192, 0, 2, 1]), 42000 + i))
        for s in c.handshake():
            r.feed(s, out)
    assert r.flow_count == 3
    assert r.stats.flows_closed == {"evicted": 2}


def test_max_lifetime_ends_flow() -> None:
    c = Conversation()
    r = Reassembler(ReassemblyConfig(max_lifetime=5, idle_timeout=100))
    out = r.process([*c.handshake(), c.seg(True, 0, b"a")])
    r.advance(c.ts + 60, out)
    assert r.stats.flows_closed == {"lifetime": 1}


def test_lost_bytes_from_source_are_a_gap_at_once() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"head", lost=6), c.seg(True, 10, b"tail")]
    r, chunks, _ = run(segs, flush=False)
    assert [(x.data, x.gap_bytes) for x in chunks] == [(b"head", 0), (b"tail", 6)]
    assert r.stats.gap_bytes == 6


def test_trailing_gap_reported_on_flow_end() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 5, flags=FIN | ACK),
            c.seg(False, 0, flags=FIN | ACK)]
    r, _, ends = run(segs)
    assert ends[0].trailing_gap == 3
    assert r.stats.gap_bytes == 3


def test_untracked_direction_follows_flags_only() -> None:
    """Responses nobody consumes: payload ignored (even if absent), FIN still closes."""
    from agent.model import Direction

    c = Conversation()

    def classify(sport: int, dport: int) -> Direction:
        return Direction.TO_OBSERVED if dport == 8080 else Direction.FROM_OBSERVED

    r = Reassembler(ReassemblyConfig(), classify, untracked=frozenset({Direction.FROM_OBSERVED}))
    segs = [*c.handshake(), c.seg(True, 0, b"GET / HTTP/1.1\r\n\r\n"),
            c.seg(False, 0, b"HTTP/1.1 200 OK\r\n\r\n"),
            c.seg(False, 19, b""),  # an elided response: its payload never came
            c.seg(True, 18, b"GET /2 HTTP/1.1\r\n\r\n"), *c.fins(37, 500)]
    out = r.process(segs)
    chunks = [o for o in out if isinstance(o, TrafficChunk)]
    ends = [o for o in out if isinstance(o, FlowEnd)]
    assert [x.data for x in chunks] == [b"GET / HTTP/1.1\r\n\r\n", b"GET /2 HTTP/1.1\r\n\r\n"]
    assert [e.reason for e in ends] == ["fin"]
    assert r.stats.untracked_segments == 4 and r.stats.gap_bytes == 0  # SYN-ACK, 2 data, FIN


def test_lost_bytes_after_a_retransmitted_payload_are_a_gap_from_the_next_byte() -> None:
    """A copy of delivered bytes whose source lost what followed: the gap starts at nxt."""
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"abcde"), c.seg(True, 0, b"ab", lost=10),
            c.seg(True, 12, b"X")]
    r, chunks, _ = run(segs, flush=False)
    assert [(x.data, x.gap_bytes) for x in chunks] == [(b"abcde", 0), (b"X", 7)]
    assert r.buffered_bytes == 0 and r.stats.gap_bytes == 7


def test_open_flows_are_counted_per_tunnel_for_status() -> None:
    """The same 4-tuple in two tenants' tunnels is two flows, each counted under its tunnel;
    a plain flow is left out (``/status`` shows ``tunnels``)."""
    r = Reassembler(ReassemblyConfig())
    c = Conversation()
    for tunnel in ("vxlan:1", "vxlan:2", ""):
        for seg in c.handshake():
            seg.tunnel = tunnel
            r.process([seg])
    assert r.flow_count == 3
    assert r.flows_by_tunnel() == {"vxlan:1": 1, "vxlan:2": 1}


def test_tunnel_counts_follow_flow_ends_and_are_a_snapshot() -> None:
    """Ends by RST, idle sweep and flush take their flows out of the counts; a reader gets a
    copy of the snapshot the feeding thread publishes, never the live table (no retry loop
    for a table changing size under another thread)."""
    r = Reassembler(ReassemblyConfig(idle_timeout=10))
    convs = [Conversation(client=(bytes([192, 0, 2, 1]), 41000 + i)) for i in range(3)]
    for c, tunnel in zip(convs, ("vxlan:1", "vxlan:1", "vxlan:2"), strict=True):
        for seg in c.handshake():
            seg.tunnel = tunnel
            r.process([seg])
    seen = r.flows_by_tunnel()
    assert seen == {"vxlan:1": 2, "vxlan:2": 1}
    rst = convs[0].seg(True, 0, flags=RST)
    rst.tunnel = "vxlan:1"
    r.process([rst])
    assert r.flows_by_tunnel() == {"vxlan:1": 1, "vxlan:2": 1}
    assert seen == {"vxlan:1": 2, "vxlan:2": 1}  # a copy: the reader's dict never changes
    r.advance(convs[2].ts + 100, [])  # idle: both remaining flows end
    assert r.flows_by_tunnel() == {} and r.flow_count == 0
