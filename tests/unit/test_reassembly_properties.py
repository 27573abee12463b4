"""Property tests: any segmentation, reordering, duplication and overlap reassembles exactly;
with segments removed, exactly the removed bytes are reported as gaps."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import FlowEnd, TrafficChunk
from agent.reassembly import Reassembler
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
    # Reorder by local shuffles so timestamps stay monotonic but arrival order changes.
    for i in range(len(body)):
        if rng.random() < reorder:
            j = min(len(body) - 1, i + rng.randint(1, 8))
            body[i], body[j] = body[j], body[i]
    segs += body + conv.fins(len(client_data), len(server_data))
    for i, s in enumerate(segs):
        s.ts = 1_700_000_000.0 + i * 0.001

    r = Reassembler()
    out = r.process(segs)
    if r.flow_count:
        r.flush(out)
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
