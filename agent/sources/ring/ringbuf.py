"""A consumer of a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) read straight from its mmap.

bcc's ``open_ring_buffer`` calls a Python function per record through ctypes, which costs more
than the rest of the per-record work. The ring's layout is a stable kernel ABI
(``kernel/bpf/ringbuf.c``), so records are read here directly in batches:

- offset 0: one page holding ``consumer_pos`` (u64), writable by the consumer;
- offset PAGE: one page holding ``producer_pos`` (u64), then the data area mapped twice in
  a row, so a record that wraps is still contiguous (read-only);
- each record: a u32 length (bit 31: still being written, bit 30: discarded), a u32 page
  offset, then the data, padded to 8 bytes.

The records are read, and ``consumer_pos`` moved, by the decoder (``drain_ringbuf`` of
:class:`~agent.sources.ring.native.NativeDecoder`, or of the Python
:class:`~agent.sources.ring.events.EventDecoder`): the native one loads ``producer_pos`` and each
record's length with acquire and stores ``consumer_pos`` with release ordering, as libbpf does.
The pages are mapped with libc's ``mmap`` rather than Python's, whose read-only mappings do
not give their address.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
from collections.abc import Callable

__all__ = ["DrainRingbuf", "RingBufReader"]

#: ``drain(cons, prod, data, size) -> (bytes released, bytes waiting when read)``: a
#: decoder's ``drain_ringbuf``, given the addresses of the consumer page, the producer page
#: and the (doubly mapped) data area.
DrainRingbuf = Callable[[int, int, int, int], tuple[int, int]]

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map(fd: int, length: int, prot: int, offset: int) -> int:
    addr = _mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of the ring buffer: {os.strerror(err)}")
    return int(addr)


class RingBufReader:
    """Reads the records of one ring buffer map of ``size`` bytes with ``drain`` (a decoder's
    ``drain_ringbuf``). Not thread-safe; one reader per ring."""

    def __init__(self, map_fd: int, size: int, drain: DrainRingbuf) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError("ring buffer size must be a power of two")
        page = mmap.PAGESIZE
        self._size = size
        self._drain = drain
        self._maps: list[tuple[int, int]] = []
        self._poller = select.epoll()
        try:
            self._cons = _map(map_fd, page, mmap.PROT_READ | mmap.PROT_WRITE, 0)
            self._maps.append((self._cons, page))
            self._prod = _map(map_fd, page + 2 * size, mmap.PROT_READ, page)
            self._maps.append((self._prod, page + 2 * size))
            self._poller.register(map_fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        self._data = self._prod + page
        #: The most bytes the ring held when read: how close it came to dropping.
        self.peak_bytes = 0

    def addresses(self) -> list[tuple[int, int, int, int, int]]:
        """The ring as ``pump.py`` takes it: (1 = ring buffer, consumer page, producer page,
        data area, size)."""
        if not self._maps:
            raise ValueError("ring buffer reader is closed")
        return [(1, self._cons, self._prod, self._data, self._size)]

    def poll_fd(self) -> int:
        """The epoll fd the map's fd is in (readable when the program wakes readers)."""
        return self._poller.fileno()

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less if the BPF program forces a wakeup."""
        self._poller.poll(timeout)

    def consume(self) -> int:
        """Decode every complete record and release the space; returns bytes released."""
        if not self._maps:
            raise ValueError("ring buffer reader is closed")
        used, pending = self._drain(self._cons, self._prod, self._data, self._size)
        if pending > self.peak_bytes:
            self.peak_bytes = pending
        return used

    def close(self) -> None:
        self._poller.close()
        while self._maps:
            addr, length = self._maps.pop()
            _munmap(addr, length)
