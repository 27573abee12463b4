"""Resets and data on a SYN follow what the receiving stack delivers (agent/reassembly.py's
docstring): RFC 5961 §3.2 for RSTs, RST data never delivered, TCP Fast Open data delivered
only as far as the SYN-ACK acknowledges it, and once."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import ACK, FIN, PSH, RST, SYN, DirectionEnd, FlowEnd, Segment, TrafficChunk
from agent.reassembly import Output, Reassembler, ReassemblyConfig
from agent.reassembly.stream import MAX_WINDOW
from tests.unit.segments import Conversation, split

CLIENT_ISN = 1000
SERVER_ISN = 5000


def run(segs: list[Segment], flush: bool = False) -> tuple[Reassembler, Output]:
    r = Reassembler(ReassemblyConfig())
    out = r.process(segs)
    if flush:
        r.flush(out)
    return r, out


def data(out: Output, from_client: bool = True) -> bytes:
    port = ":40000" if from_client else ":8080"
    return b"".join(o.data for o in out if isinstance(o, TrafficChunk)
                    and o.from_addr.endswith(port))


def ends(out: Output) -> list[str]:
    return [o.reason for o in out if isinstance(o, FlowEnd)]


# ---------------------------------------------------------------- RST acceptance


def test_blind_in_window_rst_is_ignored_and_every_later_byte_delivered() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"GET /a"), c.seg(False, 0, b"200 a"),
            c.seg(True, 6 + 1000, flags=RST),  # spoofed toward the server: 1000 bytes ahead
            c.seg(False, 5 + 77, flags=RST | ACK),  # and toward the client
            c.seg(True, 6, b"GET /b"), c.seg(False, 5, b"200 b"), *c.fins(12, 10)]
    r, out = run(segs)
    assert data(out) == b"GET /aGET /b" and data(out, False) == b"200 a200 b"
    assert ends(out) == ["fin"]
    assert r.stats.rst_ignored_in_window == 2 and r.stats.flows_closed == {"fin": 1}


def test_out_of_window_rst_is_ignored() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"abcdef"),
            c.seg(True, 2, flags=RST),  # behind the next expected byte
            c.seg(True, 6 + MAX_WINDOW + 5, flags=RST),  # beyond any window
            c.seg(True, 6, b"gh")]
    r, out = run(segs)
    assert data(out) == b"abcdefgh" and not ends(out)
    assert r.stats.rst_ignored_out_of_window == 2 and r.stats.rst_ignored_in_window == 0


def test_exact_rst_ends_the_flow_and_later_data_is_late() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"abc"), c.seg(True, 3, flags=RST | ACK),
            c.seg(True, 3, b"more")]
    r, out = run(segs)
    assert data(out) == b"abc" and ends(out) == ["rst"]
    assert r.stats.late_bytes == 4 and r.stats.rst_unchecked == 0


@pytest.mark.parametrize("offset", [3, 4], ids=["fin_seq", "after_fin"])
def test_rst_after_a_fin_at_the_fin_or_just_past_it_is_taken(offset: int) -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"abc"), c.seg(True, 3, flags=FIN | ACK),
            c.seg(True, offset, flags=RST | ACK)]
    _, out = run(segs)
    assert ends(out) == ["rst"]


def test_rst_at_the_end_of_bytes_the_capture_missed_is_taken() -> None:
    """The receiver may have the bytes the mirror holds a hole before: RCV.NXT may be past
    held data, so a RST there is real."""
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"ab"), c.seg(True, 4, b"ef"),  # "cd" not captured
            c.seg(True, 6, flags=RST | ACK)]
    r, out = run(segs)
    assert ends(out) == ["rst"]
    assert [(o.data, o.gap_bytes) for o in out if isinstance(o, TrafficChunk)] == [
        (b"ab", 0), (b"ef", 2)]
    assert r.stats.gap_bytes == 2


def test_rst_of_a_side_never_seen_is_taken_unchecked() -> None:
    """Connection refused, and a pickup mid-stream where only the client was captured."""
    c = Conversation()
    r, out = run([c.seg(True, 0, flags=SYN), c.seg(False, 0, flags=RST | ACK)])
    assert ends(out) == ["rst"] and r.stats.rst_unchecked == 1
    c2 = Conversation()
    r2, out2 = run([c2.seg(True, 50, b"mid"), c2.seg(False, 9999, flags=RST | ACK)])
    assert data(out2) == b"mid" and ends(out2) == ["rst"] and r2.stats.rst_unchecked == 1


def test_an_ignored_rsts_zero_window_does_not_hold_the_peers_next_byte() -> None:
    """RSTs carry window 0; an ignored one must not make the next byte look like a probe."""
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"ab"),
            c.seg(False, 300, flags=RST, window=0), c.seg(True, 2, b"c")]
    r, out = run(segs)
    assert data(out) == b"abc" and r.stats.zero_window_probes == 0


def test_syn_with_rst_opens_and_ends_nothing() -> None:
    c = Conversation()
    r, out = run([*c.handshake(), c.seg(True, 0, b"a"), c.seg(True, 5, b"x", flags=SYN | RST)])
    assert not ends(out) and r.flow_count == 1 and r.stats.flows_opened == 1
    r2, out2 = run([Conversation().seg(True, 0, flags=SYN | RST)])
    assert r2.flow_count == 0 and r2.stats.flows_opened == 0 and not out2


# ---------------------------------------------------------------- data on a RST


def test_data_on_an_accepted_rst_is_not_delivered_but_counted() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"abc"), c.seg(True, 3, b"BYE", flags=RST | ACK)]
    r, out = run(segs)
    assert data(out) == b"abc" and ends(out) == ["rst"]
    assert r.stats.rst_payload_bytes == 3 and r.stats.late_bytes == 0


def test_data_on_an_ignored_rst_is_not_delivered_and_the_real_bytes_are() -> None:
    c = Conversation()
    segs = [*c.handshake(), c.seg(True, 0, b"abc"), c.seg(True, 5, b"EVIL", flags=RST),
            c.seg(True, 3, b"defghijk")]
    r, out = run(segs)
    assert data(out) == b"abcdefghijk"
    assert r.stats.rst_payload_bytes == 4 and r.stats.conflict_bytes == 0


def test_data_on_a_rst_of_no_flow_is_counted() -> None:
    r, out = run([Conversation().seg(True, 0, b"lost", flags=RST | ACK)])
    assert not out and r.stats.rst_payload_bytes == 4


# ---------------------------------------------------------------- data on a SYN (Fast Open)


def syn_ack(c: Conversation, acked: int) -> Segment:
    """The server's SYN-ACK acknowledging ``acked`` bytes of the client's SYN data."""
    return c.seg(False, 0, flags=SYN | ACK, ack=CLIENT_ISN + 1 + acked)


def test_fast_open_accepted_data_is_delivered_once() -> None:
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    segs = [c.seg(True, 0, b"GET /", flags=SYN), syn_ack(c, 5),
            c.seg(True, 0, b"GET /", flags=ACK | PSH),  # a needless retransmission
            c.seg(True, 5, b"x HTTP/1.1")]
    r, out = run(segs)
    assert data(out) == b"GET /x HTTP/1.1"
    assert r.stats.syn_data_bytes == 5 and r.stats.syn_data_refused_bytes == 0
    assert r.stats.retransmitted_bytes == 5


def test_fast_open_data_waits_for_the_answer() -> None:
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    r = Reassembler()
    out = r.process([c.seg(True, 0, b"GET /", flags=SYN)])
    assert not out and r.buffered_bytes == 5  # held, and counted as held
    r.feed(syn_ack(c, 5), out)
    assert data(out) == b"GET /" and r.buffered_bytes == 0


def test_fast_open_refused_and_sent_again_is_delivered_once() -> None:
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    segs = [c.seg(True, 0, b"GET /", flags=SYN), syn_ack(c, 0),
            c.seg(True, 0, b"GET /x"), c.seg(True, 6, b" HTTP/1.1")]
    r, out = run(segs)
    assert data(out) == b"GET /x HTTP/1.1"
    assert r.stats.syn_data_bytes == 0 and r.stats.syn_data_refused_bytes == 5
    assert r.stats.retransmitted_bytes == 0


def test_fast_open_refused_then_reset_delivers_nothing() -> None:
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    _, out = run([c.seg(True, 0, b"GET /", flags=SYN), c.seg(False, 0, flags=RST | ACK)])
    assert data(out) == b"" and ends(out) == ["rst"]
    r, out2 = run([c.seg(True, 0, b"GET /", flags=SYN)], flush=True)  # never answered
    assert data(out2) == b"" and r.stats.syn_data_refused_bytes == 5
    assert r.buffered_bytes == 0


def test_fast_open_partly_acknowledged() -> None:
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    segs = [c.seg(True, 0, b"abcde", flags=SYN), syn_ack(c, 2), c.seg(True, 2, b"cdefg")]
    r, out = run(segs)
    assert data(out) == b"abcdefg"
    assert r.stats.syn_data_bytes == 2 and r.stats.syn_data_refused_bytes == 3


@pytest.mark.parametrize(("next_offset", "expect", "refused"),
                         [(5, b"GET /x", 0), (0, b"GET /x", 5)], ids=["taken", "refused"])
def test_fast_open_without_a_usable_syn_ack_is_settled_by_the_next_data(
        next_offset: int, expect: bytes, refused: int) -> None:
    """No SYN-ACK captured (XDP sees ingress only), or one whose ACK number the client would
    reject: where the client's data goes on says what the server took. A bare ACK does not
    (its number is past refused data)."""
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    rest = b"GET /x"[next_offset:]
    segs = [c.seg(True, 0, b"GET /", flags=SYN),
            c.seg(False, 0, flags=SYN | ACK, ack=123),  # not an ACK the client accepts
            c.seg(True, 5, flags=ACK), c.seg(True, next_offset, rest)]
    r, out = run(segs)
    assert data(out) == expect and r.stats.syn_data_refused_bytes == refused


def test_syn_sent_again_with_its_data_adds_nothing() -> None:
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    segs = [c.seg(True, 0, b"hello", flags=SYN), c.seg(True, 0, b"hello", flags=SYN),
            syn_ack(c, 5), c.seg(True, 0, b"hello", flags=SYN), c.seg(True, 5, b"!")]
    r, out = run(segs)
    assert data(out) == b"hello!" and r.stats.syn_data_bytes == 5


def test_fast_open_with_fin_taken_ends_the_direction() -> None:
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    segs = [c.seg(True, 0, b"ping", flags=SYN | FIN), syn_ack(c, 5)]
    _, out = run(segs)
    assert data(out) == b"ping"
    assert [o.from_addr for o in out if isinstance(o, DirectionEnd)] == ["192.0.2.1:40000"]


def test_merged_output_matches_with_fast_open() -> None:
    c = Conversation(client_isn=CLIENT_ISN, server_isn=SERVER_ISN)
    segs = [c.seg(True, 0, b"GET /", flags=SYN), syn_ack(c, 5), c.seg(True, 5, b"x"),
            c.seg(True, 6, b"y"), c.seg(False, 0, b"ok")]
    plain = Reassembler().process(segs)
    merged: Output = []
    Reassembler().feed_batch(segs, merged)
    assert data(merged) == data(plain) == b"GET /xy"
    assert data(merged, False) == b"ok"


def test_stats_are_declared_counters() -> None:
    keys = set(Reassembler().stats.as_dict())
    assert {"rst_ignored_in_window", "rst_ignored_out_of_window", "rst_unchecked",
            "rst_payload_bytes", "syn_data_bytes", "syn_data_refused_bytes"} <= keys


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 3000),
    syn_len=st.integers(1, 600),
    taken_frac=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
    isn=st.sampled_from([0, CLIENT_ISN, 2**32 - 1, 2**32 - 300, 2**31]),
    reorder=st.floats(0, 1),
    rsts=st.integers(0, 6),
)
def test_fast_open_and_blind_rsts_deliver_every_byte_once(
    size: int, syn_len: int, taken_frac: float, seed: int, isn: int, reorder: float,
    rsts: int,
) -> None:
    """Any part of the SYN's data acknowledged, the rest sent again in random pieces in a
    locally shuffled order, with blind RSTs (past every byte sent so far, both ways) among
    them: the stream comes out exactly once, and the flow ends by its FINs."""
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    syn_len = min(syn_len, size)
    taken = round(taken_frac * syn_len)
    c = Conversation(client_isn=isn, server_isn=SERVER_ISN)
    head = [c.seg(True, 0, payload[:syn_len], flags=SYN),
            c.seg(False, 0, flags=SYN | ACK, ack=(isn + 1 + taken) & 0xFFFFFFFF)]
    pieces = [(taken + off, piece)
              for off, piece in split(payload[taken:], rng, max_size=rng.choice([30, 300]))]
    for i in range(len(pieces)):
        if rng.random() < reorder:
            j = min(len(pieces) - 1, i + rng.randint(1, 6))
            pieces[i], pieces[j] = pieces[j], pieces[i]
    body = [c.seg(True, off, piece) for off, piece in pieces]
    for at in sorted((rng.randint(0, len(pieces)) for _ in range(rsts)), reverse=True):
        sent = max([taken, *(off + len(piece) for off, piece in pieces[:at])])
        body[at:at] = [c.seg(False, rng.randint(1, 5000), flags=RST, window=0),
                       c.seg(True, sent + rng.randint(1, 5000), flags=RST | ACK)]
    segs = head + body + c.fins(size, 0)
    for i, s in enumerate(segs):
        s.ts = 1_700_000_000.0 + i * 0.001
    merged: Output = []
    r = Reassembler()
    r.feed_batch(segs, merged)
    assert data(merged) == payload
    assert ends(merged) == ["fin"] and r.stats.gap_bytes == 0
    assert r.stats.syn_data_bytes == taken
    assert r.stats.syn_data_refused_bytes == syn_len - taken
    assert r.stats.rst_ignored_in_window + r.stats.rst_ignored_out_of_window == 2 * rsts
