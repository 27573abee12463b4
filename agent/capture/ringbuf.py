"""A consumer of a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) read straight from its mmap.

bcc's ``open_ring_buffer`` calls a Python function per record through ctypes, which costs more
than the rest of the per-record work. The ring's layout is a stable kernel ABI
(``kernel/bpf/ringbuf.c``), so records are read here directly in batches:

- offset 0: one page holding ``consumer_pos`` (u64), writable by the consumer;
- offset PAGE: one page holding ``producer_pos`` (u64), then the data area mapped twice in
  a row, so a record that wraps is still contiguous;
- each record: a u32 length (bit 31: still being written, bit 30: discarded), a u32 page
  offset, then the data, padded to 8 bytes.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable

__all__ = ["RingBufReader"]

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBufReader:
    """Reads records of one ring buffer map; ``on_record(view, offset, length)`` per record.

    The view is only valid during the call. Not thread-safe; one reader per ring.
    """

    def __init__(self, map_fd: int, size: int, on_record: Callable[[memoryview, int, int], None]
                 ) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError("ring buffer size must be a power of two")
        page = mmap.PAGESIZE
        self._mask = size - 1
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=page)
        self._view = memoryview(self._prod)
        self._data_off = page
        self._on_record = on_record
        #: The most bytes the ring held when read: how close it came to dropping.
        self.peak_bytes = 0
        self._poller = select.epoll()
        self._poller.register(map_fd, select.EPOLLIN)

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less if the BPF program forces a wakeup."""
        self._poller.poll(timeout)

    def consume(self) -> int:
        """Hand every complete record to ``on_record`` and release the space; returns bytes."""
        prod_map, view = self._prod, self._view
        mask, base, cb = self._mask, self._data_off, self._on_record
        start = cons = _U64.unpack_from(self._cons, 0)[0]
        prod = _U64.unpack_from(prod_map, 0)[0]
        if prod - start > self.peak_bytes:
            self.peak_bytes = prod - start
        u32 = _U32.unpack_from
        while cons < prod:
            off = base + (cons & mask)
            length = u32(prod_map, off)[0]
            if length & _BUSY:
                break  # still being written; records after it wait for it
            if not length & _DISCARD:
                cb(view, off + _HDR, length)
            cons += (length & ~(_BUSY | _DISCARD)) + _HDR + 7 & ~7
        _U64.pack_into(self._cons, 0, cons)
        return int(cons - start)

    def close(self) -> None:
        self._poller.close()
        self._view.release()
        self._prod.close()
        self._cons.close()
