"""Ring decoding cost: the native ring path (ring_decode.c) vs the Python decoder, per
transport, on hand-built rings of realistic traffic shapes.

For each shape a ring's data area (``--ring-mib``, default 16: the default perf ring per CPU
here) is filled with mirror_event records as the BPF program writes them, laid out as the
kernel lays out a perf ring and a BPF ring buffer (the latter mapped twice in a row). Each
decoder then drains the full ring once to warm up and ``--rounds`` times timed (the consumer
position reset between drains, the decoder reused as a source reuses it), Segments included:
what one drain of a full ring costs the ring-drain thread; the median is reported.

Shapes:

- ``http``: 2,000 connections interleaved, each a SYN, one 300-byte request, a FIN: nothing
  to coalesce, the per-record cost;
- ``mtu``: 16 connections interleaved, 1,448-byte in-order segments: most records join;
- ``bulk``: 4 connections, 32 KiB pieces (loopback GSO packets) in order: the per-byte cost.

Reported per shape and decoder: µs per event, payload MB/s, Segments out. ``--out-sizes``
also times the native decoder with other output buffer sizes (the choice of OUT_BYTES).
Writes bench/out/decode_rings.json.

usage: python bench/decode_rings.py [--rounds 7] [--ring-mib 16] [--out-sizes 256,1024,4096]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.model import ACK, FIN, PSH, SYN
from agent.sources.ebpf.layout import EVENT, EVENT_SIZE
from agent.sources.ring.events import EventDecoder
from agent.sources.ring.native import OUT_BYTES, NativeDecoder

OUT = Path(__file__).resolve().parent / "out"
PAGE = 4096
_U64 = struct.Struct("<Q")
SERVER = bytes([198, 51, 100, 1]).ljust(16, b"\0")


def _event(conn: int, seq: int, payload: bytes, flags: int, ts: int) -> bytes:
    client = bytes([192, 0, 2, 1 + conn % 250]).ljust(16, b"\0")
    return EVENT.pack(ts, 1, 0, 4, flags, 0, client, SERVER, 20000 + conn, 8080, seq, 1, 512,
                      len(payload), 0, len(payload), 0).ljust(EVENT_SIZE, b"\0") + payload


def records(shape: str, budget: int) -> tuple[list[bytes], int]:
    """Records of ``shape`` until ``budget`` ring bytes; (records, payload bytes)."""
    out: list[bytes] = []
    used = payload = ts = 0

    def add(rec: bytes, n: int) -> bool:
        nonlocal used, payload, ts
        if used + len(rec) + 32 > budget:
            return False
        out.append(rec)
        used += len(rec) + 32  # header + padding, roughly
        payload += n
        ts += 1
        return True

    if shape == "http":
        req = b"GET /api/items/42 HTTP/1.1\r\nHost: svc\r\n".ljust(300, b"x")
        conn = 0
        while True:
            batch = [(c, _event(c, 100, b"", SYN, ts)) for c in range(conn, conn + 2000)]
            ok = all(add(r, 0) for _, r in batch)
            ok = ok and all(add(_event(c, 101, req, ACK | PSH, ts), len(req))
                            for c in range(conn, conn + 2000))
            ok = ok and all(add(_event(c, 401, b"", ACK | FIN, ts), 0)
                            for c in range(conn, conn + 2000))
            if not ok:
                return out, payload
            conn += 2000
    size, conns = {"mtu": (1448, 16), "bulk": (32768, 4)}[shape]
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size]
    seq = [1000 * c for c in range(conns)]
    while True:
        for c in range(conns):
            if not add(_event(c, seq[c], body, ACK | PSH, ts), size):
                return out, payload
            seq[c] += size


class Ring:
    """A perf mmap or a BPF ring buffer mmap holding ``recs``, positions from 0."""

    def __init__(self, transport: str, recs: list[bytes], size: int) -> None:
        self.transport = transport
        self.size = size
        blobs = []
        for rec in recs:
            if transport == "perf":
                raw = rec + bytes(-(len(rec) + 4) % 8)
                blobs.append(struct.pack("<IHHI", 9, 0, 12 + len(raw), len(raw)) + raw)
            else:
                blob = struct.pack("<II", len(rec), 0) + rec
                blobs.append(blob + bytes(-len(blob) % 8))
        data = b"".join(blobs)
        assert len(data) <= size, "records do not fit the ring"
        self.head = len(data)
        if transport == "perf":
            self.buf = bytearray(PAGE + size)
            self.buf[PAGE:PAGE + len(data)] = data
            _U64.pack_into(self.buf, 1024, self.head)
        else:
            self.buf = bytearray(2 * PAGE + 2 * size)
            self.buf[2 * PAGE:2 * PAGE + len(data)] = data
            self.buf[2 * PAGE + size:] = self.buf[2 * PAGE:2 * PAGE + size]
            _U64.pack_into(self.buf, PAGE, self.head)
        self._pin = ctypes.c_char.from_buffer(self.buf)
        self.addr = ctypes.addressof(self._pin)

    def reset(self) -> None:
        _U64.pack_into(self.buf, 1032 if self.transport == "perf" else 0, 0)

    def drain(self, dec: EventDecoder | NativeDecoder) -> tuple[int, int]:
        if self.transport == "perf":
            return dec.drain_perf(self.addr, self.addr + PAGE, self.size)
        return dec.drain_ringbuf(self.addr, self.addr + PAGE, self.addr + 2 * PAGE, self.size)


def measure(ring: Ring, make: Callable[[], EventDecoder | NativeDecoder], rounds: int
            ) -> tuple[float, int, int]:
    """Median seconds of a full drain (Segments made) by one decoder, as a source reuses
    it, after a warm-up drain; events and Segments of one drain."""
    dec = make()
    times = []
    events = segs = 0
    for i in range(rounds + 1):
        ring.reset()
        before = dec.events
        t0 = time.perf_counter()
        released, _ = ring.drain(dec)
        out = dec.take()
        if i:
            times.append(time.perf_counter() - t0)
        assert released == ring.head
        events, segs = dec.events - before, len(out)
        del out
    dec.close()
    return statistics.median(times), events, segs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ring-mib", type=int, default=16)
    ap.add_argument("--out-sizes", default="256,4096,16384",
                    help="KiB, comma-separated: other native output buffer sizes to time")
    ap.add_argument("--shapes", default="http,mtu,bulk")
    args = ap.parse_args()
    size = args.ring_mib << 20
    results = []
    for shape in args.shapes.split(","):
        recs, payload = records(shape, size - size // 64)
        decoders: list[tuple[str, Callable[[], EventDecoder | NativeDecoder]]] = [
            (f"native (out {OUT_BYTES >> 10} KiB)", lambda: NativeDecoder(0.0)),
            *((f"native (out {kib} KiB)",
               lambda kib=kib: NativeDecoder(0.0, out_bytes=kib << 10))
              for kib in map(int, filter(None, args.out_sizes.split(",")))),
            ("python", lambda: EventDecoder(0.0)),
        ]
        for transport in ("perf", "ringbuf"):
            ring = Ring(transport, recs, size)
            for i, (name, make) in enumerate(decoders):
                if transport == "perf" or i in (0, len(decoders) - 1):  # other sizes: perf
                    secs, events, segs = measure(ring, make, args.rounds)
                    row = {"shape": shape, "transport": transport, "decoder": name,
                           "events": events, "segments": segs, "payload_bytes": payload,
                           "us_per_event": round(secs / events * 1e6, 4),
                           "mb_per_s": round(payload / secs / 1e6, 1),
                           "ms_per_drain": round(secs * 1e3, 2)}
                    results.append(row)
                    print(f"{shape:5} {transport:8} {name:24} {events:8} ev -> {segs:7} segs  "
                          f"{row['us_per_event']:8.4f} us/ev  {row['mb_per_s']:8.1f} MB/s  "
                          f"{row['ms_per_drain']:8.2f} ms/drain", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "decode_rings.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
