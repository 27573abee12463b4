"""Property tests: any segmentation, reordering, duplication and overlap reassembles exactly;
with segments removed, exactly the removed bytes are reported as gaps."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.mirror.driver import coalesce
from agent.model import ACK, FIN, RST, SYN, DirectionEnd, FlowEnd, Segment, TrafficChunk
from agent.reassembly import Output, Reassembler, ReassemblyConfig
from tests.unit.segments import Conversation, split


def _check_stream(
    chunks: list[TrafficChunk], original: bytes, trailing: int, covered: set[int]
) -> None:
    """Walk the chunks of one direction: gaps and data must match the original exactly."""
    pos = 0
    for c in chunks:
        assert all(i not in covered for i in range(pos, pos + c.gap_bytes)), "gap over known bytes"
        pos += c.gap_bytes
        assert c.data == original[pos : pos + len(c.data)]
        assert all(i in covered for i in range(pos, pos + len(c.data)))
        pos += len(c.data)
    assert pos + trailing == len(original)


def _check_notices(out: Output, fed: int) -> None:
    """The order of chunks and ends, per flow. ``out[:fed]`` came from segments (and time),
    the rest from a flush.

    At most one DirectionEnd per direction, before the flow's FlowEnd; no chunk of a direction
    after its DirectionEnd, nothing of a flow after its FlowEnd; a flow whose two directions
    ended while segments came in ended then, with reason ``fin``.
    """
    dir_ends: dict[int, dict[str, int]] = {}
    flow_ends: dict[int, int] = {}
    for i, o in enumerate(out):
        assert o.flow_id not in flow_ends, f"{o} after the flow's end"
        if isinstance(o, TrafficChunk):
            assert o.from_addr not in dir_ends.get(o.flow_id, {}), f"{o} after its direction end"
        elif isinstance(o, DirectionEnd):
            ends = dir_ends.setdefault(o.flow_id, {})
            assert o.from_addr not in ends, f"second {o}"
            ends[o.from_addr] = i
        else:
            flow_ends[o.flow_id] = i
    assert set(dir_ends) <= set(flow_ends), "a direction end with no flow end"
    for flow_id, ends in dir_ends.items():
        end = out[flow_ends[flow_id]]
        assert isinstance(end, FlowEnd)
        if len(ends) == 2 and max(ends.values()) < fed:
            assert end.reason == "fin" and flow_ends[flow_id] < fed, f"{end} after both ends"


def _conversation(
    client_data: bytes, server_data: bytes, rng: random.Random, isn_c: int, isn_s: int,
    reorder: float, dup: float, loss: float, fins_in_body: bool = False,
) -> tuple[list[Segment], dict[bool, set[int]]]:
    """Both streams cut at random, with losses, retransmissions and local reordering; the
    bytes each direction's segments carry (``covered``)."""
    conv = Conversation(client_isn=isn_c, server_isn=isn_s)
    segs = conv.handshake()
    body = []
    covered: dict[bool, set[int]] = {True: set(), False: set()}
    for from_client, data in ((True, client_data), (False, server_data)):
        for off, piece in split(data, rng, max_size=rng.choice([20, 200, 1500])):
            if rng.random() < loss:
                continue  # lost
            body.append(conv.seg(from_client, off, piece))
            covered[from_client].update(range(off, off + len(piece)))
            if rng.random() < dup:
                # A retransmission, possibly re-cut to overlap neighbours.
                a = max(0, off - rng.randint(0, 50))
                b = min(len(data), off + len(piece) + rng.randint(0, 50))
                body.append(conv.seg(from_client, a, data[a:b]))
                covered[from_client].update(range(a, b))
    fins = conv.fins(len(client_data), len(server_data))
    if fins_in_body:
        body += fins
    # Reorder by local shuffles so timestamps stay monotonic but arrival order changes.
    for i in range(len(body)):
        if rng.random() < reorder:
            j = min(len(body) - 1, i + rng.randint(1, 8))
            body[i], body[j] = body[j], body[i]
    segs += body if fins_in_body else body + fins
    for i, s in enumerate(segs):
        s.ts = 1_700_000_000.0 + i * 0.001
    return segs, covered


@settings(max_examples=300, deadline=None)
@given(
    client_len=st.integers(0, 6000),
    server_len=st.integers(0, 6000),
    seed=st.integers(0, 2**32 - 1),
    isn_c=st.sampled_from([0, 1000, 2**32 - 1, 2**32 - 700, 2**31]),
    isn_s=st.integers(0, 2**32 - 1),
    reorder=st.floats(0, 1),
    dup=st.floats(0, 0.5),
    loss=st.floats(0, 0.4),
)
def test_random_stream_reassembles_exactly(
    client_len: int, server_len: int, seed: int, isn_c: int, isn_s: int,
    reorder: float, dup: float, loss: float,
) -> None:
    rng = random.Random(seed)
    client_data = rng.randbytes(client_len)
    server_data = rng.randbytes(server_len)
    segs, covered = _conversation(client_data, server_data, rng, isn_c, isn_s, reorder, dup, loss)

    r = Reassembler()
    out = r.process(segs)
    fed = len(out)
    if r.flow_count:
        r.flush(out)
    _check_notices(out, fed)
    chunks = [o for o in out if isinstance(o, TrafficChunk)]
    ends = [o for o in out if isinstance(o, FlowEnd)]
    assert len(ends) == 1
    c2s = [c for c in chunks if c.from_addr == "192.0.2.1:40000"]
    s2c = [c for c in chunks if c.from_addr == "192.0.2.2:8080"]
    missing_c = len(client_data) - len(covered[True] & set(range(len(client_data))))
    missing_s = len(server_data) - len(covered[False] & set(range(len(server_data))))
    trailing_total = ends[0].trailing_gap
    # Trailing gap is reported on the end notice; split it per direction by what is left.
    got_c = sum(len(c.data) + c.gap_bytes for c in c2s)
    got_s = sum(len(c.data) + c.gap_bytes for c in s2c)
    trail_c = len(client_data) - got_c
    trail_s = len(server_data) - got_s
    assert trail_c + trail_s == trailing_total
    _check_stream(c2s, client_data, trail_c, covered[True])
    _check_stream(s2c, server_data, trail_s, covered[False])
    assert sum(c.gap_bytes for c in chunks) + trailing_total == missing_c + missing_s
    assert r.stats.gap_bytes == missing_c + missing_s
    if missing_c == 0 and missing_s == 0:
        assert ends[0].reason == "fin"
    assert r.flow_count == 0
    assert r.buffered_bytes == 0


@settings(max_examples=300, deadline=None)
@given(
    client_len=st.integers(0, 4000),
    server_len=st.integers(0, 4000),
    seed=st.integers(0, 2**32 - 1),
    isn_c=st.sampled_from([0, 1000, 2**32 - 1, 2**32 - 700, 2**31]),
    isn_s=st.integers(0, 2**32 - 1),
    reorder=st.floats(0, 1),
    dup=st.floats(0, 0.5),
    loss=st.floats(0, 0.4),
    hole_timeout=st.sampled_from([0.0005, 0.002, 0.005, 0.05]),
)
def test_with_a_hole_timeout_every_connection_ends_by_its_fins(
    client_len: int, server_len: int, seed: int, isn_c: int, isn_s: int,
    reorder: float, dup: float, loss: float, hole_timeout: float,
) -> None:
    """Holes (a FIN's too) are skipped once they waited ``hole_timeout``: both directions end
    and then the flow, by ``fin``, without a flush; every byte is delivered or a gap."""
    rng = random.Random(seed)
    data = {True: rng.randbytes(client_len), False: rng.randbytes(server_len)}
    segs, _covered = _conversation(data[True], data[False], rng, isn_c, isn_s, reorder, dup,
                                   loss, fins_in_body=True)
    r = Reassembler(ReassemblyConfig(hole_timeout=hole_timeout))
    out = r.process(segs)
    now = segs[-1].ts
    for _ in range(len(segs)):  # each call skips at most one hole per direction
        if not r.flow_count:
            break
        now += hole_timeout
        r.advance(now, out)
    fed = len(out)
    r.flush(out)
    _check_notices(out, fed)
    assert r.flow_count == 0 and r.buffered_bytes == 0
    ends = [o for o in out if isinstance(o, FlowEnd)]
    assert [e.reason for e in ends] == ["fin"]
    assert len([o for o in out if isinstance(o, DirectionEnd)]) == 2
    chunks = [o for o in out if isinstance(o, TrafficChunk)]
    got = 0
    for from_client, addr in ((True, "192.0.2.1:40000"), (False, "192.0.2.2:8080")):
        pos = 0
        for c in chunks:
            if c.from_addr == addr:
                pos += c.gap_bytes
                assert c.data == data[from_client][pos : pos + len(c.data)]
                pos += len(c.data)
        got += pos
    assert got + ends[0].trailing_gap == client_len + server_len
    assert r.stats.gap_bytes == sum(c.gap_bytes for c in chunks) + ends[0].trailing_gap


_CLIENT_IP, _SERVER_IP = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
JunkSegment = tuple[int, bool, int, int, int, int, float, bool, bool]
_junk_segment = st.tuples(
    st.integers(0, 2),  # which of three connections
    st.booleans(),  # from the client
    st.sampled_from([ACK, ACK, ACK, SYN, SYN | ACK, FIN | ACK, RST | ACK]),
    st.integers(-5, 60),  # offset into the direction's stream
    st.sampled_from([0, 1, 3, 10, 30]),  # payload length
    st.sampled_from([0, 0, 0, 2, 10]),  # bytes lost by the source
    st.sampled_from([0.0001, 0.001, 0.005, 0.02]),  # time since the previous segment
    st.booleans(),  # zero window
    st.booleans(),  # let time pass after it
)


def _junk(segments: list[JunkSegment], rng: random.Random) -> list[tuple[Segment, bool]]:
    """The segments the strategy describes (three connections), each with "let time pass
    after it"."""
    isn = [rng.randrange(2**32) for _ in range(3)]
    ts = 1_700_000_000.0
    out = []
    for conn, from_client, flags, off, size, lost, dt, zero, wait in segments:
        port = 40000 + conn
        src, dst = ((_CLIENT_IP, port), (_SERVER_IP, 8080))
        if not from_client:
            src, dst = dst, src
        seq = (isn[conn] + (0 if from_client else 7777) + off) & 0xFFFFFFFF
        ts += dt
        out.append((Segment(src[0], src[1], dst[0], dst[1], seq, 0, flags, rng.randbytes(size),
                            ts, 0 if zero else 65535, lost), wait))
    return out


_limits = {
    "hole_timeout": st.sampled_from([0.0, 0.001, 0.01]),
    "max_flow_buffer": st.sampled_from([50, 4 << 20]),
    "max_total_buffer": st.sampled_from([80, 256 << 20]),
    "max_flows": st.sampled_from([1, 100]),
    "idle_timeout": st.sampled_from([0.05, 600.0]),
}


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(_junk_segment, max_size=120), seed=st.integers(0, 2**32 - 1),
       **_limits)
def test_any_segments_keep_the_order_of_chunks_and_ends(
    segments: list[JunkSegment], seed: int, hole_timeout: float, max_flow_buffer: int,
    max_total_buffer: int, max_flows: int, idle_timeout: float,
) -> None:
    """Whatever arrives (junk flags, numbers, limits, time): the notice order holds, a call
    that completes a flow's second direction also ends the flow, and every byte given up on
    is reported once."""
    rng = random.Random(seed)
    r = Reassembler(ReassemblyConfig(
        hole_timeout=hole_timeout, max_flow_buffer=max_flow_buffer, max_flows=max_flows,
        max_total_buffer=max_total_buffer, idle_timeout=idle_timeout))
    out: Output = []
    ended: dict[int, int] = {}  # flow id -> directions ended

    def call(step: Output) -> None:
        closing = set()
        for o in step:
            if isinstance(o, DirectionEnd):
                ended[o.flow_id] = ended.get(o.flow_id, 0) + 1
                if ended[o.flow_id] == 2:
                    closing.add(o.flow_id)
        assert closing <= {o.flow_id for o in step if isinstance(o, FlowEnd)}, step
        out.extend(step)

    for seg, wait in _junk(segments, rng):
        step: Output = []
        r.feed(seg, step)
        call(step)
        if wait:
            step = []
            r.advance(seg.ts + 0.01, step)
            call(step)
    step = []
    r.flush(step)
    call(step)
    _check_notices(out, 0)
    assert r.flow_count == 0 and r.buffered_bytes == 0
    chunks = [o for o in out if isinstance(o, TrafficChunk)]
    trailing = sum(o.trailing_gap for o in out if isinstance(o, FlowEnd))
    assert r.stats.gap_bytes == sum(c.gap_bytes for c in chunks) + trailing
    assert r.stats.bytes_delivered == sum(len(c.data) for c in chunks)


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(_junk_segment, max_size=120), seed=st.integers(0, 2**32 - 1),
       batch=st.sampled_from([1, 3, 16, 200]), **_limits)
def test_a_batch_merges_its_chunks_as_coalesce_does(
    segments: list[JunkSegment], seed: int, batch: int, hole_timeout: float,
    max_flow_buffer: int, max_total_buffer: int, max_flows: int, idle_timeout: float,
) -> None:
    """feed_batch() is feed() for each segment, then coalesce(): the same chunks (merged
    the same way), ends and counters, whatever arrives."""
    cfg = ReassemblyConfig(hole_timeout=hole_timeout, max_flow_buffer=max_flow_buffer,
                           max_flows=max_flows, max_total_buffer=max_total_buffer,
                           idle_timeout=idle_timeout)
    merged, single = Reassembler(cfg), Reassembler(cfg)
    got: Output = []
    want: Output = []
    fed = _junk(segments, random.Random(seed))
    for i in range(0, len(fed), batch):
        part = fed[i : i + batch]
        merged.feed_batch([seg for seg, _ in part], got)
        step: Output = []
        for seg, _ in part:
            single.feed(seg, step)
        want += coalesce(step)
        if part[-1][1]:
            for r, out in ((merged, got), (single, want)):
                r.advance(part[-1][0].ts + 0.01, out)
    merged.flush(got)
    single.flush(want)
    assert [_fields(o) for o in got] == [_fields(o) for o in want]
    assert merged.stats.chunks == sum(isinstance(o, TrafficChunk) for o in got)
    merged.stats.chunks = single.stats.chunks
    assert merged.stats == single.stats


def _fields(o: TrafficChunk | DirectionEnd | FlowEnd) -> tuple[object, ...]:
    if isinstance(o, TrafficChunk):
        return ("chunk", o.flow_id, o.from_addr, o.to_addr, o.direction, o.seen_at,
                o.gap_bytes, o.data)
    return (type(o).__name__, *vars(o).values()) if hasattr(o, "__dict__") else (repr(o),)
