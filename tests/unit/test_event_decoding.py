"""Perf ring records → Segments: the Python decoder (events.py) and the native one
(ring_decode.c) against the same hand-built rings, and against each other. The ring buffer
transport and the native decoder's bounds: test_native_ring.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import ACK, FIN, RST, SYN, Segment
from agent.sources.ring import native
from agent.sources.ring.events import EventDecoder
from agent.sources.ring.native import NativeDecoder, NativeUnavailable
from tests.unit.rings import SIZE, PerfRing, event

CLIENT = ("10.0.0.1", 40000)
SERVICE = ("10.0.0.2", 8080)

Decoder = EventDecoder | NativeDecoder


def make(kind: str, keep: Callable[[Segment], bool] | None = None) -> Decoder:
    if kind == "python":
        return EventDecoder(0.0, keep)
    return NativeDecoder(0.0, keep)


def decode(kind: str, records: list[bytes | int], tail: int = 0,
           keep: Callable[[Segment], bool] | None = None) -> tuple[list[Segment], Decoder]:
    ring = PerfRing(list(records), tail)
    dec = make(kind, keep)
    dec.drain_perf(*ring.args())
    assert ring.tail == ring.head  # the decoder released everything, itself
    return dec.take(), dec


def fields(seg: Segment) -> tuple[Any, ...]:
    return (seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port, seg.seq, seg.ack, seg.flags,
            seg.payload, seg.ts, seg.window, seg.lost)


KINDS = pytest.mark.parametrize("kind", ["python", "native"])


@KINDS
def test_in_order_payload_of_a_direction_becomes_one_segment(kind: str) -> None:
    other = ("10.0.0.3", 40001)
    recs: list[bytes | int] = []
    for i in range(5):  # two connections interleaved, each in order
        recs.append(event(CLIENT, SERVICE, 100 + 10 * i, b"%010d" % i, ts=10 + i, ack=i))
        recs.append(event(other, SERVICE, 5000 + 3 * i, b"abc", ts=20 + i))
    segs, dec = decode(kind, recs)
    assert [(s.src_port, s.seq, s.payload) for s in segs] == [
        (40000, 100, b"".join(b"%010d" % i for i in range(5))), (40001, 5000, b"abc" * 5)]
    first = segs[0]
    assert first.ts == 10 / 1e9 and first.ack == 4  # first record's time, last one's ack
    assert first.src_ip == bytes([10, 0, 0, 1])  # IPv4: 4-byte addresses
    assert (dec.events, dec.coalesced) == (10, 8)


@KINDS
def test_boundaries_and_odd_records_stand_alone(kind: str) -> None:
    c, s = CLIENT, SERVICE
    recs: list[bytes | int] = [
        event(c, s, 99, flags=SYN),
        event(c, s, 100, b"aa"), event(c, s, 102, b"bb"),
        event(s, c, 500, flags=ACK | FIN),           # the other direction's FIN ends the run
        event(c, s, 104, b"cc"),
        event(c, s, 104, b"cc"),                      # a retransmission: a new run
        event(c, s, 106, b"dd", win=0),               # a zero window: alone
        event(c, s, 108, b"ee", lost=5, paylen=7),   # known loss: alone
        event(c, s, 113, b"ff"), event(c, s, 115, b"gg"),
        event(c, s, 117, flags=ACK | RST),
    ]
    segs, dec = decode(kind, recs)
    assert [(x.seq, x.payload, x.flags & (SYN | FIN | RST), x.lost) for x in segs] == [
        (99, b"", SYN, 0), (100, b"aabb", 0, 0), (500, b"", FIN, 0), (104, b"cc", 0, 0),
        (104, b"cc", 0, 0), (106, b"dd", 0, 0), (108, b"ee", 0, 5), (113, b"ffgg", 0, 0),
        (117, b"", RST, 0)]
    assert dec.coalesced == 2


@KINDS
def test_pieces_of_a_big_packet_take_their_own_position(kind: str) -> None:
    data = bytes(range(256)) * 3
    c, s = CLIENT, SERVICE
    recs: list[bytes | int] = [
        event(c, s, 1000, data[:256], flags=ACK | FIN, paylen=768),
        event(c, s, 1256, data[256:512], flags=ACK | FIN, poff=256, paylen=768),
        event(c, s, 1512, data[512:], flags=ACK | FIN, poff=512, paylen=768),
    ]  # each piece with its own sequence number, as the kernel sends them
    segs, _ = decode(kind, recs)
    # FIN belongs after the last piece only; the first two pieces join.
    assert [(x.seq, x.payload, x.flags & FIN) for x in segs] == [
        (1000, data[:512], 0), (1512, data[512:], FIN)]


@KINDS
def test_ipv6_and_elided_records(kind: str) -> None:
    c, s = ("2001:db8::1", 40000), ("2001:db8::2", 8080)
    recs: list[bytes | int] = [
        event(c, s, 1, b"x"), event(c, s, 2, b"y"),
        event(s, c, 9, flags=ACK | FIN, paylen=300, elided=1),  # payload not copied on purpose
    ]
    segs, _ = decode(kind, recs)
    assert [(len(x.src_ip), x.payload, x.flags & FIN) for x in segs] == [
        (16, b"xy", 0), (16, b"", FIN)]


@KINDS
def test_a_record_wrapping_the_ring_end_and_lost_records(kind: str) -> None:
    body = bytes(range(200))
    recs: list[bytes | int] = [event(CLIENT, SERVICE, 1 + 200 * i, body) for i in range(3)]
    recs.insert(1, 42)  # the kernel lost 42 samples here
    # The LOST record and the second sample straddle the ring's end.
    segs, dec = decode(kind, recs, tail=SIZE - 304)
    assert [(x.seq, x.payload) for x in segs] == [(1, body * 3)]  # contiguous: one run
    assert dec.lost_samples == 42


@KINDS
def test_a_filter_sees_every_record_alone(kind: str) -> None:
    recs: list[bytes | int] = [event(CLIENT, SERVICE, 1 + i, b"z") for i in range(4)]
    segs, dec = decode(kind, recs, keep=lambda seg: seg.seq % 2 == 1)
    assert [x.seq for x in segs] == [1, 3]
    assert (dec.filtered, dec.coalesced) == (2, 0)


# A stream of records from a few connections: in-order payload, with retransmissions,
# boundaries and loss mixed in at random.
_ops = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(
    ["data", "data", "data", "resend", "fin", "rst", "zero", "lost", "reply"]),
    st.binary(min_size=1, max_size=40)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, tail=st.integers(0, SIZE - 1).map(lambda t: t & ~7))
def test_native_and_python_decoders_agree(ops: list[tuple[int, str, bytes]], tail: int
                                          ) -> None:
    clients = [(f"10.0.1.{i}", 41000 + i) for i in range(3)]
    nxt = [1000, 2000, 3000]
    recs: list[bytes | int] = []
    for ts, (conn, op, data) in enumerate(ops):
        c = clients[conn]
        kw: dict[str, Any] = {"ts": ts}
        if op == "reply":
            recs.append(event(SERVICE, c, 9, data, **kw))
            continue
        if op == "resend":
            recs.append(event(c, SERVICE, nxt[conn] - len(data), data, **kw))
            continue
        kw.update({"fin": {"flags": ACK | FIN}, "rst": {"flags": ACK | RST},
                   "zero": {"win": 0}, "lost": {"lost": 3, "paylen": len(data) + 3}}.get(op, {}))
        recs.append(event(c, SERVICE, nxt[conn], data, **kw))
        nxt[conn] += len(data) + (3 if op == "lost" else 0)
    py, py_dec = decode("python", recs, tail)
    nat, nat_dec = decode("native", recs, tail)
    assert [fields(s) for s in nat] == [fields(s) for s in py]
    assert (nat_dec.events, nat_dec.coalesced) == (py_dec.events, py_dec.coalesced)
    # Coalescing never changes a direction's bytes, only how they are cut.
    alone, _ = decode("python", recs, tail, keep=lambda _s: True)

    def stream(segs: list[Segment]) -> dict[tuple[bytes, int], bytes]:
        out: dict[tuple[bytes, int], bytes] = {}
        for s in segs:
            out[s.src_ip, s.src_port] = out.get((s.src_ip, s.src_port), b"") + s.payload
        return out

    assert stream(py) == stream(alone)


def test_a_package_installed_without_the_library_is_one_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed where no compiler was (the extension is optional): NativeUnavailable says
    what to do, and nothing is built at run time."""
    monkeypatch.setattr(native, "__file__", str(tmp_path / "native.py"))
    monkeypatch.setattr(native, "_lib", None)
    with pytest.raises(NativeUnavailable, match="not built when the package was installed"):
        native.load()
    assert list(tmp_path.iterdir()) == []
