"""A consumer of a ``BPF_MAP_TYPE_PERF_EVENT_ARRAY``, read straight from the per-CPU rings.

bcc's ``open_perf_buffer`` calls a Python function per sample through ctypes, which costs more
than decoding the sample. The perf ring's layout is a stable kernel ABI
(``include/uapi/linux/perf_event.h``), so this module opens one ``PERF_COUNT_SW_BPF_OUTPUT``
event per online CPU itself, puts its fd in the map, and reads samples in batches:

- the mmap's first page is ``struct perf_event_mmap_page``: ``data_head`` (u64, written by
  the kernel) at offset 1024, ``data_tail`` (u64, written by us) at 1032;
- the data area follows: a power-of-two number of pages, records 8-byte aligned, each a
  ``perf_event_header`` (u32 type, u16 misc, u16 size). A record may wrap the area's end.
- ``PERF_RECORD_SAMPLE`` (9) with ``PERF_SAMPLE_RAW``: u32 size, then the BPF program's bytes;
  ``PERF_RECORD_LOST`` (2): u64 id, u64 number of samples lost.

Ordering note: data is read after ``data_head`` and ``data_tail`` is written after the reads;
CPython's loads and stores are program-ordered on x86-64 (TSO), the architecture this runs on.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import select
import struct
from collections.abc import Callable
from pathlib import Path

__all__ = ["PerfReader", "consume_ring", "online_cpus", "possible_cpus", "ring_bytes"]

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_WATERMARK = 1 << 14  # wakeup_watermark (bytes) instead of wakeup_events
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
_HEAD = 1024  # offsetof(struct perf_event_mmap_page, data_head)
_TAIL = 1032
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_REC = struct.Struct("<IHH")

OnRecord = Callable[[bytes | memoryview, int, int], None]
#: ``consume(ring, base, size, tail, head) -> new tail``: decodes one ring's records.
Consume = Callable[[mmap.mmap, int, int, int, int], int]


def online_cpus(path: Path = Path("/sys/devices/system/cpu/online")) -> list[int]:
    """CPU ids in a kernel CPU list such as ``0-3,6``."""
    cpus: list[int] = []
    for part in path.read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def possible_cpus() -> int:
    """Highest possible CPU id + 1: the size per-CPU structures (and map values) need."""
    return max(online_cpus(Path("/sys/devices/system/cpu/possible"))) + 1


def ring_bytes(pages: int) -> int:
    """Bytes of a ring's data area for ``pages`` pages: the kernel wants a power of two."""
    return (1 << max(0, pages - 1).bit_length()) * mmap.PAGESIZE


def consume_ring(buf: bytes | bytearray | memoryview | mmap.mmap, base: int, size: int,
                 tail: int, head: int, on_record: OnRecord, on_lost: Callable[[int], None]
                 ) -> int:
    """Hand every record of ``buf[base:base + size]`` between ``tail`` and ``head`` over.

    ``size`` is a power of two; ``tail``/``head`` are free-running byte counters. Samples go to
    ``on_record(view, offset, raw_size)``, lost-record counts to ``on_lost``. A record that
    wraps the area's end is copied to make it contiguous. Returns the new tail.
    """
    mask = size - 1
    view = memoryview(buf)
    rec = _REC.unpack_from
    u32 = _U32.unpack_from
    while tail < head:
        pos = tail & mask
        typ, _misc, length = rec(view, base + pos)  # 8-aligned: a header never wraps
        if length < 8:
            break  # cannot happen with a sane kernel; never spin on it
        if pos + length > size:
            data: bytes | memoryview = bytes(view[base + pos:base + size]) + bytes(
                view[base:base + pos + length - size])
            off = 0
        else:
            data, off = view, base + pos
        if typ == PERF_RECORD_SAMPLE:
            on_record(data, off + 12, u32(data, off + 8)[0])
        elif typ == PERF_RECORD_LOST:
            on_lost(_U64.unpack_from(data, off + 16)[0])
        tail += length
    view.release()
    return tail


class _Ring:
    __slots__ = ("cpu", "fd", "map", "size")

    def __init__(self, cpu: int, fd: int, ring: mmap.mmap, size: int) -> None:
        self.cpu = cpu
        self.fd = fd
        self.map = ring
        self.size = size


class PerfReader:
    """Per-CPU perf rings of ``pages`` pages each, filled by ``bpf_perf_event_output``.

    ``install(cpu, fd)`` puts a ring's event fd into the BPF map (the caller owns the map);
    ``consume`` decodes a ring's new records (:func:`consume_ring` with a decoder's callbacks,
    or the native decoder). The kernel wakes :meth:`wait` each time a ring
    has taken ``wakeup_bytes`` more (perf's watermark); :meth:`consume` reads what is there
    regardless. Not thread-safe.
    """

    def __init__(self, pages: int, wakeup_bytes: int, install: Callable[[int, int], None],
                 consume: Consume, cpus: list[int] | None = None) -> None:
        self._pages = ring_bytes(pages) // mmap.PAGESIZE
        self._wakeup = max(1, wakeup_bytes)
        self._consume = consume
        #: The most bytes any one ring held when read: how close it came to dropping.
        self.peak_bytes = 0
        self._rings: list[_Ring] = []
        self._poller = select.epoll()
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        try:
            for cpu in online_cpus() if cpus is None else cpus:
                ring = self._open(cpu)
                self._rings.append(ring)
                self._poller.register(ring.fd, select.EPOLLIN)
                install(cpu, ring.fd)
        except BaseException:
            self.close()
            raise

    def _open(self, cpu: int) -> _Ring:
        nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
        if nr is None:
            raise OSError(errno.ENOSYS, f"perf_event_open: unknown syscall on "
                          f"{platform.machine()}")
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<IIQQQQQI", attr, 0, PERF_TYPE_SOFTWARE, _ATTR_SIZE,
                         PERF_COUNT_SW_BPF_OUTPUT, 1, PERF_SAMPLE_RAW, 0,
                         PERF_ATTR_WATERMARK, self._wakeup)  # ..., read_format, flags, watermark
        fd = self._syscall(ctypes.c_long(nr), attr, ctypes.c_long(-1), ctypes.c_long(cpu),
                           ctypes.c_long(-1), ctypes.c_long(PERF_FLAG_FD_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"perf_event_open on CPU {cpu}: {os.strerror(err)}")
        size = self._pages * mmap.PAGESIZE
        try:
            ring = mmap.mmap(fd, mmap.PAGESIZE + size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
        except BaseException:
            os.close(fd)
            raise
        return _Ring(cpu, fd, ring, size)

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less if a ring reaches its wakeup watermark."""
        self._poller.poll(timeout)

    def consume(self) -> int:
        """Read every ring up to its current head and release the space; returns bytes read."""
        total = 0
        page = mmap.PAGESIZE
        for r in self._rings:
            head = _U64.unpack_from(r.map, _HEAD)[0]
            tail = _U64.unpack_from(r.map, _TAIL)[0]
            if head == tail:
                continue
            if head - tail > self.peak_bytes:
                self.peak_bytes = head - tail
            new = self._consume(r.map, page, r.size, tail, head)
            _U64.pack_into(r.map, _TAIL, new)
            total += new - tail
        return total

    def close(self) -> None:
        """Unmap and close every ring (the map's entries die with the program's maps)."""
        for r in self._rings:
            try:
                r.map.close()
            finally:
                os.close(r.fd)
        self._rings.clear()
        self._poller.close()
