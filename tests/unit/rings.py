"""Hand-built kernel rings for the decoders: a perf ring (control page + data area) and a BPF
ring buffer (consumer page, producer page, data area mapped twice), laid out as the kernel
lays them out, in memory whose addresses the decoders are given."""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from typing import Any

from agent.model import ACK, PSH
from agent.sources.ebpf.layout import EVENT, EVENT_SIZE

PAGE = 4096
SIZE = 1 << 16  # ring data area
_U64 = struct.Struct("<Q")


def event(src: tuple[str, int], dst: tuple[str, int], seq: int, payload: bytes = b"",
          flags: int = ACK | PSH, ts: int = 1_000_000_000, ack: int = 7, win: int = 512,
          poff: int = 0, paylen: int | None = None, lost: int = 0, elided: int = 0) -> bytes:
    """One mirror_event record (as the BPF program submits it) and its piece."""
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    fam = s.version
    return EVENT.pack(ts, 1, 0, fam, flags, elided, s.packed.ljust(16, b"\0"),
                      d.packed.ljust(16, b"\0"), src[1], dst[1], seq, ack, win, len(payload),
                      poff, len(payload) if paylen is None else paylen, lost).ljust(
                          EVENT_SIZE, b"\0") + payload


class _Memory:
    """A zeroed buffer with a fixed address."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self._pin = ctypes.c_char.from_buffer(self.buf)
        self.addr = ctypes.addressof(self._pin)


class PerfRing(_Memory):
    """A perf mmap: ``struct perf_event_mmap_page`` (data_head at 1024, data_tail at 1032),
    then a ``size``-byte data area. ``records`` are written from ``tail`` on (wrapping): bytes
    are a sample's raw data, an int a LOST record of that many samples, ``("raw", blob)`` a
    record written as it is."""

    def __init__(self, records: list[Any], tail: int = 0, size: int = SIZE) -> None:
        super().__init__(PAGE + size)
        self.size = size
        pos = tail
        for rec in records:
            if isinstance(rec, int):
                blob = struct.pack("<IHHQQ", 2, 0, 24, 1, rec)
            elif isinstance(rec, tuple):
                blob = rec[1]
            else:
                raw = rec + bytes(-(len(rec) + 4) % 8)
                blob = struct.pack("<IHHI", 9, 0, 12 + len(raw), len(raw)) + raw
            for i, b in enumerate(blob):
                self.buf[PAGE + (pos + i) % size] = b
            pos += len(blob)
        self.head = pos
        _U64.pack_into(self.buf, 1024, pos)
        _U64.pack_into(self.buf, 1032, tail)

    @property
    def tail(self) -> int:
        return int(_U64.unpack_from(self.buf, 1032)[0])

    def args(self) -> tuple[int, int, int]:
        """(ctrl, data, size) for ``drain_perf``."""
        return self.addr, self.addr + PAGE, self.size


BUSY = 1 << 31
DISCARD = 1 << 30


class RingBuf(_Memory):
    """A BPF ring buffer mmap: the consumer page, the producer page, then the ``size``-byte
    data area twice in a row (as the kernel maps it). ``records`` are written from ``pos``
    on: bytes are committed samples, ``("discard", data)`` a discarded record,
    ``("busy", data)`` one still being written."""

    def __init__(self, records: list[Any], pos: int = 0, size: int = SIZE) -> None:
        super().__init__(2 * PAGE + 2 * size)
        self.size = size
        data = 2 * PAGE
        cur = pos
        for rec in records:
            bits, body = 0, rec
            if isinstance(rec, tuple):
                bits = {"discard": DISCARD, "busy": BUSY}[rec[0]]
                body = rec[1]
            blob = struct.pack("<II", len(body) | bits, 0) + body
            blob += bytes(-len(blob) % 8)
            for i, b in enumerate(blob):
                self.buf[data + (cur + i) % size] = b
            cur += len(blob)
        self.buf[data + size:data + 2 * size] = self.buf[data:data + size]  # the 2nd mapping
        self.head = cur
        _U64.pack_into(self.buf, 0, pos)
        _U64.pack_into(self.buf, PAGE, cur)

    @property
    def tail(self) -> int:
        return int(_U64.unpack_from(self.buf, 0)[0])

    def args(self) -> tuple[int, int, int, int]:
        """(cons, prod, data, size) for ``drain_ringbuf``."""
        return self.addr, self.addr + PAGE, self.addr + 2 * PAGE, self.size
