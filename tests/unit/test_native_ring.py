"""The native ring path (ring_decode.c) against the Python reference (events.py) on hand-built
perf rings and BPF ring buffers: the same Segments and counters from the same records, the
same consumer position written back; and the native decoder's bounds (events per call,
output bytes, table probes, memory)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import ACK, FIN, RST, SYN, Segment
from agent.sources.ebpf.layout import EVENT_SIZE
from agent.sources.ring.events import EventDecoder
from agent.sources.ring.native import MAX_EVENTS, OUT_BYTES, TABLE_SLOTS, NativeDecoder
from agent.sources.ring.pump import PERF, RINGBUF, NativeDrain, RingAddress
from tests.unit.rings import SIZE, PerfRing, RingBuf, event

SERVICE = ("10.0.0.2", 8080)
SERVICE6 = ("2001:db8::2", 8080)
CLIENTS = [(("10.0.1.1", 41000), SERVICE), (("10.0.1.2", 41001), SERVICE),
           (("2001:db8::1", 41002), SERVICE6)]
Decoder = EventDecoder | NativeDecoder
Fields = tuple[Any, ...]


def fields(seg: Segment) -> Fields:
    return (seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port, seg.seq, seg.ack, seg.flags,
            seg.payload, seg.ts, seg.window, seg.lost)


def streams(segs: list[Segment]) -> dict[tuple[bytes, int], bytes]:
    """Each direction's payload, in order: what coalescing must never change."""
    out: dict[tuple[bytes, int], bytes] = {}
    for s in segs:
        out[s.src_ip, s.src_port] = out.get((s.src_ip, s.src_port), b"") + s.payload
    return out


def counters(dec: Decoder) -> tuple[int, ...]:
    return dec.events, dec.coalesced, dec.lost_samples, dec.discarded, dec.malformed


def run(transport: str, records: list[Any], start: int, dec: Decoder, size: int = SIZE
        ) -> tuple[list[Segment], tuple[int, int], int, int]:
    """Decode a fresh ring of ``records``: (Segments, the drain's return, the consumer
    position written back, the producer position)."""
    if transport == "perf":
        ring: PerfRing | RingBuf = PerfRing(records, start, size)
        got = dec.drain_perf(*ring.args())
    else:
        ring = RingBuf(records, start, size)
        got = dec.drain_ringbuf(*ring.args())
    return dec.take(), got, ring.tail, ring.head


# A stream of records from three connections (one IPv6): in-order payload, retransmissions,
# boundaries, known loss, big packets in pieces (a FIN on their last piece, a SYN on the
# first), elided replies, and the transport's own non-samples (perf: LOST records; the ring
# buffer: discarded records).
OPS = ["data", "data", "data", "data", "resend", "fin", "rst", "syn", "zero", "lost",
       "reply", "pieces", "pieces", "elided", "other"]
_ops = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(OPS),
                          st.binary(min_size=1, max_size=120), st.booleans()), max_size=60)


def records(ops: list[tuple[int, str, bytes, bool]], transport: str, ts0: int = 1000
            ) -> list[Any]:
    nxt = [1000, 2000, 0xFFFFFF00]  # the third wraps the sequence space
    out: list[Any] = []
    for ts, (conn, op, data, flag) in enumerate(ops):
        c, s = CLIENTS[conn]
        kw: dict[str, Any] = {"ts": ts0 + ts, "ack": ts}
        seq = nxt[conn]
        if op == "reply":
            out.append(event(s, c, 9, data, **kw))
        elif op == "elided":
            out.append(event(s, c, 9, flags=ACK | FIN, paylen=len(data), elided=1, **kw))
        elif op == "resend":
            out.append(event(c, s, (seq - len(data)) & 0xFFFFFFFF, data, **kw))
        elif op == "other":
            if transport == "perf":
                out.append(len(data))  # the kernel lost that many samples here
            else:  # discarded: whatever it holds is skipped, even a well-formed event
                out.append(("discard", event(c, s, seq, data, **kw)))
        elif op == "pieces":  # one packet's payload in up to three pieces
            flags = ACK | (FIN if flag else 0) | (SYN if data[0] & 1 else 0)
            cuts = sorted({0, len(data), *(b % len(data) for b in data[1:3])})
            for lo, hi in itertools.pairwise(cuts):
                out.append(event(c, s, seq, data[lo:hi], flags=flags, poff=lo,
                                 paylen=len(data), **kw))
            nxt[conn] = (seq + len(data) + (1 if flags & SYN else 0)) & 0xFFFFFFFF
        else:
            kw.update({"fin": {"flags": ACK | FIN}, "rst": {"flags": ACK | RST},
                       "syn": {"flags": SYN}, "zero": {"win": 0},
                       "lost": {"lost": 3, "paylen": len(data) + 3}}.get(op, {}))
            out.append(event(c, s, seq, b"" if op == "syn" else data, **kw))
            step = 1 if op == "syn" else len(data) + (3 if op == "lost" else 0)
            nxt[conn] = (seq + step) & 0xFFFFFFFF
    return out


@settings(max_examples=300, deadline=None)
@given(ops=_ops, start=st.integers(0, 4 * SIZE).map(lambda t: t & ~7),
       transport=st.sampled_from(["perf", "ringbuf"]), busy=st.integers(0, 80),
       keep=st.booleans())
def test_native_equals_python(ops: list[tuple[int, str, bytes, bool]], start: int,
                              transport: str, busy: int, keep: bool) -> None:
    recs = records(ops, transport)
    if transport == "ringbuf" and busy < len(recs):  # a record still being written: stop
        recs.insert(busy, ("busy", event(*CLIENTS[0], 1, b"not yet")))
    keep_fn: Callable[[Segment], bool] | None = (lambda s: s.seq % 3 != 0) if keep else None
    py_dec, nat_dec = EventDecoder(0.0, keep_fn), NativeDecoder(0.0, keep_fn)
    py = run(transport, recs, start, py_dec)
    nat = run(transport, recs, start, nat_dec)
    assert [fields(s) for s in nat[0]] == [fields(s) for s in py[0]]
    assert nat[1:] == py[1:]  # same (released, waiting), same position written back
    assert counters(nat_dec) == counters(py_dec)
    assert nat_dec.filtered == py_dec.filtered
    released, waiting = nat[1]
    assert waiting == nat[3] - start and nat[2] == start + released
    if transport == "perf" or busy >= len(recs):
        assert nat[2] == nat[3]  # everything released


@settings(max_examples=150, deadline=None)
@given(ops=_ops, start=st.integers(0, 4 * SIZE).map(lambda t: t & ~7),
       transport=st.sampled_from(["perf", "ringbuf"]), max_events=st.integers(1, 8),
       table_slots=st.sampled_from([1, 2, 4, 1024]))
def test_bounded_calls_keep_every_byte(ops: list[tuple[int, str, bytes, bool]], start: int,
                                       transport: str, max_events: int,
                                       table_slots: int) -> None:
    """Few events per call, or a tiny open-run table: Segments are cut differently, but each
    direction's bytes, every counter and the released ring are the same."""
    recs = records(ops, transport)
    py_dec = EventDecoder(0.0)
    nat_dec = NativeDecoder(0.0, max_events=max_events, table_slots=table_slots)
    py = run(transport, recs, start, py_dec)
    nat = run(transport, recs, start, nat_dec)
    assert streams(nat[0]) == streams(py[0])
    assert nat[1:] == py[1:] and nat[2] == nat[3]
    assert counters(nat_dec)[0] == py_dec.events and counters(nat_dec)[2:] == counters(
        py_dec)[2:]
    assert nat_dec.coalesced <= py_dec.coalesced
    assert nat_dec.calls >= -(-py_dec.events // max_events)
    if max_events >= 60 and table_slots >= 1024:
        assert [fields(s) for s in nat[0]] == [fields(s) for s in py[0]]


@pytest.mark.parametrize("transport", ["perf", "ringbuf"])
def test_output_bound_splits_a_drain_into_calls(transport: str) -> None:
    c, s = CLIENTS[0]
    body = bytes(range(256)) * 100  # 25,600 bytes a record
    recs: list[Any] = [event(c, s, 1 + len(body) * i, body) for i in range(6)]
    dec = NativeDecoder(0.0, out_bytes=70_000)  # the least it takes, plus a little
    start = 4 * SIZE - 100  # the second record wraps the ring's end
    segs, (released, waiting), tail, head = run(transport, recs, start, dec, 4 * SIZE)
    assert released == waiting == head - start and tail == head
    assert b"".join(x.payload for x in segs) == body * 6
    assert [x.seq for x in segs] == [1 + len(body) * i for i in range(0, 6, 2)]  # 2 a call
    assert dec.calls == 3


def test_a_full_table_stops_joining_not_decoding() -> None:
    """With 4 slots and 16 connections, lookups give up after the probe bound: the runs
    that found no slot stand alone, counted, and every byte is there."""
    conns = [((f"10.0.2.{i}", 42000 + i), SERVICE) for i in range(16)]
    recs: list[Any] = [event(c, s, 100 + 10 * k, b"%010d" % k)
                       for k in range(3) for c, s in conns]
    dec = NativeDecoder(0.0, table_slots=4)
    segs, *_ = run("perf", recs, 0, dec)
    py_dec = EventDecoder(0.0)
    py, *_ = run("perf", recs, 0, py_dec)
    assert streams(segs) == streams(py) and len(py) == 16
    assert dec.no_slot > 0 and dec.coalesced < py_dec.coalesced
    assert len(segs) == 48 - dec.coalesced


def test_a_decoder_holds_what_its_bounds_say() -> None:
    dec = NativeDecoder(0.0)
    # runs (96 B) and pieces (16 B) per event, 4 B per table slot, the wrapped record, the
    # output, the handle: the arithmetic in native.py's docstring.
    assert dec.footprint < MAX_EVENTS * (96 + 16) + TABLE_SLOTS * 4 + 65536 + OUT_BYTES + 256
    assert dec.footprint < 3 << 20
    dec.close()
    dec.close()
    with pytest.raises(ValueError, match="closed"):
        dec.drain_perf(*PerfRing([]).args())


@pytest.mark.parametrize("kind", ["python", "native"])
def test_malformed_records_are_counted_and_skipped(kind: str) -> None:
    c, s = CLIENTS[0]
    good = event(c, s, 1, b"ok")
    short_piece = bytearray(event(c, s, 3, b"xy"))
    short_piece[62:64] = (500).to_bytes(2, "little")  # piece_len past the record's end
    dec: Decoder = EventDecoder(0.0) if kind == "python" else NativeDecoder(0.0)
    segs, *_ = run("ringbuf", [good, bytes(short_piece), b"tiny", good], 0, dec)
    assert [x.payload for x in segs] == [b"ok", b"ok"] and dec.malformed == 2
    # perf: a record without a size leaves no way to the next one: the rest is skipped.
    dec = EventDecoder(0.0) if kind == "python" else NativeDecoder(0.0)
    segs, (released, _), tail, head = run(
        "perf", [good, ("raw", bytes(8)), good], 0, dec)
    assert [x.payload for x in segs] == [b"ok"] and dec.malformed == 1 and tail == head
    assert released == head


def test_event_layout_offsets_used_by_the_c_walk() -> None:
    # ring_decode.c reads piece_len at offsetof(struct mirror_event, piece_len) == 62 before
    # it decodes (to check the output bound); the tests above poke it there too.
    rec = event(CLIENTS[0][0], SERVICE, 1, b"abc")
    assert int.from_bytes(rec[62:64], "little") == 3 and len(rec) == EVENT_SIZE + 3


def test_a_drain_ends_at_the_head_its_first_call_saw(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel writing on during a drain does not keep the drain going: what came after
    the first call read the head waits for the next drain."""
    c, s = CLIENTS[0]
    ring = PerfRing([event(c, s, 1 + i, b"x") for i in range(5)])
    full = ring.head
    first = full * 3 // 5  # 3 records of 96 bytes each
    ring.buf[1024:1032] = first.to_bytes(8, "little")
    dec = NativeDecoder(0.0, max_events=1)
    convert = dec.segments

    def runs(view: memoryview, used: int, n: int, into: list[Segment]) -> None:
        ring.buf[1024:1032] = full.to_bytes(8, "little")  # the kernel writes 2 more meanwhile
        convert(view, used, n, into)

    monkeypatch.setattr(dec, "segments", runs)
    assert dec.drain_perf(*ring.args()) == (first, first) and ring.tail == first
    assert dec.drain_perf(*ring.args()) == (full - first, full - first) and ring.tail == full
    assert b"".join(x.payload for x in dec.take()) == b"xxxxx" and dec.calls == 5


# ------------------------------------------------------------------ the native drain (pump)


def pump_over(rings: Sequence[PerfRing | RingBuf], dec: NativeDecoder, budget: int = 1 << 30,
              interval: float = 0.001) -> NativeDrain:
    """A started NativeDrain over hand-built rings (no epoll: it turns on the timer)."""
    addrs: list[RingAddress] = [
        (PERF, *r.args()[:2], 0, r.size) if isinstance(r, PerfRing) else (RINGBUF, *r.args())
        for r in rings]
    drain = NativeDrain(dec, addrs, -1, interval, budget)
    drain.start()
    return drain


def after_turns(drain: NativeDrain, turns: int) -> None:
    deadline = time.monotonic() + 5
    while drain._read().turns < turns:
        assert time.monotonic() < deadline, "the pump made no turn"
        time.sleep(0.001)


@settings(max_examples=120, deadline=None)
@given(ops=_ops, start=st.integers(0, 4 * SIZE).map(lambda t: t & ~7),
       transport=st.sampled_from(["perf", "ringbuf"]), busy=st.integers(0, 80),
       max_events=st.integers(1, 64), table_slots=st.sampled_from([1, 4, 1024]))
def test_pump_equals_python(ops: list[tuple[int, str, bytes, bool]], start: int,
                            transport: str, busy: int, max_events: int,
                            table_slots: int) -> None:
    """The C thread's chunks, joined across by segments_of, are exactly the Python
    decoder's Segments, whatever bounds cut the calls (and a second perf ring, written
    after the first); the same counters and the same consumer positions."""
    recs = records(ops, transport)
    later = records(ops, transport, 10**6)[:busy]  # another CPU's ring, later
    if transport == "ringbuf" and busy < len(recs):
        recs.insert(busy, ("busy", event(*CLIENTS[0], 1, b"not yet")))
    py_dec = EventDecoder(0.0)
    py_rings: list[PerfRing | RingBuf] = (
        [PerfRing(recs, start), PerfRing(later)] if transport == "perf"
        else [RingBuf(recs, start)])
    py: list[Segment] = []
    for r in py_rings:
        if isinstance(r, PerfRing):
            py_dec.drain_perf(*r.args())
        else:
            py_dec.drain_ringbuf(*r.args())
        py += py_dec.take()
    nat_dec = NativeDecoder(0.0, max_events=max_events, table_slots=table_slots)
    rings: list[PerfRing | RingBuf] = (
        [PerfRing(recs, start), PerfRing(later)] if transport == "perf"
        else [RingBuf(recs, start)])
    drain = pump_over(rings, nat_dec)
    after_turns(drain, 1)
    segs, drained_at = drain.take(0)
    segs += drain.stop()
    assert [fields(s) for s in segs] == [fields(s) for s in py]
    assert drained_at > 0
    assert [r.tail for r in rings] == [r.tail for r in py_rings]
    assert counters(nat_dec)[0] == py_dec.events and counters(nat_dec)[2:] == counters(
        py_dec)[2:]
    handoff = drain.handoff_stats()
    assert handoff.bytes == handoff.taken_bytes == sum(len(s.payload) for s in segs)
    assert handoff.queued_bytes == 0 and handoff.pauses == 0
    nat_dec.drain_perf(*PerfRing([]).args())  # the decoder is the caller's again


def test_pump_pauses_over_budget_and_resumes_when_taken() -> None:
    """Over its budget the thread stops emptying the rings (the kernel keeps the bytes)
    until the consumer takes what waits; a stop hands back what nobody took."""
    c, s = CLIENTS[0]
    first = PerfRing([event(c, s, 1, b"a" * 1000)])
    drain = pump_over([first], NativeDecoder(0.0), budget=1)
    after_turns(drain, 1)
    deadline = time.monotonic() + 5
    while drain.pauses == 0:  # the next turn finds the backlog over budget
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert drain.heartbeat.problem() is None
    segs, _ = drain.take(0)
    assert [x.payload for x in segs] == [b"a" * 1000]
    turns = drain._read().turns
    after_turns(drain, turns + 2)  # running again
    stats = drain.handoff_stats()
    assert stats.pauses == 1 and stats.items == stats.taken_items == 1
    assert stats.peak_queued_bytes == 1000 and drain.peak_bytes == first.head
    assert drain.stop() == [] and drain.stop() == []
    assert drain.heartbeat.problem() is None and drain.gap_max > 0


def test_pump_stop_returns_what_was_not_taken() -> None:
    c, s = CLIENTS[0]
    ring = PerfRing([event(c, s, 1, b"xyz"), event(s, c, 5, b"reply")])
    drain = pump_over([ring], NativeDecoder(0.0))
    after_turns(drain, 1)
    assert sorted(x.payload for x in drain.stop()) == [b"reply", b"xyz"]
    assert drain.handoff_stats().discarded_items == 0 and drain.take(0) == ([], drain.take(0)[1])


def test_pump_heartbeat_beats_with_the_c_thread() -> None:
    ring = RingBuf([])  # the rings outlive the pump, as the readers' mmaps do
    drain = pump_over([ring], NativeDecoder(0.0))
    after_turns(drain, 3)
    assert drain.heartbeat.running and drain.heartbeat.problem() is None
    assert drain.heartbeat.silence() < 1
    drain.stop()
    assert not drain.heartbeat.running


def test_a_lent_decoder_refuses_to_drain() -> None:
    dec, ring = NativeDecoder(0.0), PerfRing([])
    drain = pump_over([ring], dec)
    with pytest.raises(ValueError, match="lent"):
        dec.drain_perf(*PerfRing([]).args())
    drain.stop()


def test_segments_of_joins_runs_across_chunks() -> None:
    """A bulk direction cut into many calls (tiny output) comes out as one Segment per
    direction; a FIN in between ends the runs of both directions."""
    c, s = CLIENTS[0]
    body = b"z" * 30_000
    recs: list[Any] = [event(c, s, 1 + len(body) * i, body) for i in range(6)]
    recs.append(event(s, c, 9, b"reply"))
    recs.append(event(c, s, 1 + len(body) * 6, flags=ACK | FIN))
    recs.append(event(c, s, 2 + len(body) * 6, b"after"))
    dec = NativeDecoder(0.0, out_bytes=70_000)  # two records a call at most
    ring = PerfRing(recs, 0, 4 * SIZE)
    drain = pump_over([ring], dec)
    after_turns(drain, 1)
    segs = drain.take(0)[0] + drain.stop()
    assert [(x.seq, len(x.payload)) for x in segs] == [
        (1, 6 * len(body)), (9, 5), (1 + 6 * len(body), 0), (2 + 6 * len(body), 5)]
    assert dec.calls >= 3


def test_a_take_that_leaves_chunks_waiting_reports_a_time_before_them() -> None:
    """Chunks left for the next take hold records newer than the turn before theirs only:
    the time a take reports lets the reorderer release nothing newer than that."""
    c, s = CLIENTS[0]
    body = b"q" * 40_000
    ring = PerfRing([event(c, s, 1 + len(body) * i, body) for i in range(3)], 0, 4 * SIZE)
    dec = NativeDecoder(0.0, out_bytes=70_000)  # one record a call: three chunks
    drain = NativeDrain(dec, [(PERF, *ring.args()[:2], 0, ring.size)], -1, 0.05, 1 << 30,
                        max_take=1)
    drain.start()
    after_turns(drain, 1)
    first, at = drain.take(0)
    turn = drain._read().turn_started_ns / 1e9
    assert [x.seq for x in first] == [1] and at < turn
    rest, at = drain.take(0)  # still one left
    assert at < turn
    last, at = drain.take(0)
    assert [x.seq for x in rest + last] == [1 + len(body), 1 + 2 * len(body)]
    assert at >= turn  # none left: the latest completed turn
    drain.stop()


def test_a_sender_spread_over_two_rings_is_one_segment_per_take() -> None:
    """One sender's packets alternate between two CPUs' rings: in timestamp order they are
    contiguous, so the take makes one Segment of them (the reassembler joins nothing)."""
    c, s = CLIENTS[0]
    body = b"w" * 1000
    recs = [event(c, s, 1 + len(body) * i, body, ts=100 + i) for i in range(6)]
    rings = [PerfRing(recs[0::2]), PerfRing(recs[1::2])]
    drain = pump_over(rings, NativeDecoder(0.0))
    after_turns(drain, 1)
    segs = drain.take(0)[0] + drain.stop()
    assert [(x.seq, x.payload, x.ts) for x in segs] == [(1, body * 6, 100 / 1e9)]
