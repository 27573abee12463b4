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

The records are read, and ``data_tail`` moved, by the decoder (``drain_perf`` of
:class:`~agent.sources.ring.native.NativeDecoder`, or of the Python
:class:`~agent.sources.ring.events.EventDecoder`): the native one loads ``data_head`` with acquire
and stores ``data_tail`` with release ordering, as ``perf_event.h`` asks.
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

__all__ = ["DrainPerf", "PerfReader", "online_cpus", "possible_cpus", "ring_bytes"]

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_WATERMARK = 1 << 14  # wakeup_watermark (bytes) instead of wakeup_events
PERF_EVENT_IOC_ENABLE = 0x2400
_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}

#: ``drain(ctrl, data, size) -> (bytes released, bytes waiting when read)``: a decoder's
#: ``drain_perf``, given the addresses of a ring's control page and data area.
DrainPerf = Callable[[int, int, int], tuple[int, int]]


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


class _Ring:
    __slots__ = ("addr", "cpu", "fd", "map", "pin", "size")

    def __init__(self, cpu: int, fd: int, ring: mmap.mmap, size: int) -> None:
        self.cpu = cpu
        self.fd = fd
        self.map = ring
        self.size = size
        self.pin: ctypes.c_char | None = ctypes.c_char.from_buffer(ring)  # the address
        self.addr = ctypes.addressof(self.pin)

    def close(self) -> None:
        self.pin = None  # an exported buffer cannot be unmapped
        try:
            self.map.close()
        finally:
            os.close(self.fd)


class PerfReader:
    """Per-CPU perf rings of ``pages`` pages each, filled by ``bpf_perf_event_output``.

    ``install(cpu, fd)`` puts a ring's event fd into the BPF map (the caller owns the map);
    ``drain`` (a decoder's ``drain_perf``) decodes a ring's new records and releases them.
    The kernel wakes :meth:`wait` each time a ring has taken ``wakeup_bytes`` more (perf's
    watermark); :meth:`consume` reads what is there regardless. Not thread-safe.
    """

    def __init__(self, pages: int, wakeup_bytes: int, install: Callable[[int, int], None],
                 drain: DrainPerf, cpus: list[int] | None = None) -> None:
        self._pages = ring_bytes(pages) // mmap.PAGESIZE
        self._wakeup = max(1, wakeup_bytes)
        self._drain = drain
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

    def addresses(self) -> list[tuple[int, int, int, int, int]]:
        """Each ring as ``pump.py`` takes it: (0 = perf, control page, data area, 0, size)."""
        return [(0, r.addr, r.addr + mmap.PAGESIZE, 0, r.size) for r in self._rings]

    def poll_fd(self) -> int:
        """The epoll fd the rings' fds are in (readable when one passes its watermark)."""
        return self._poller.fileno()

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less if a ring reaches its wakeup watermark."""
        self._poller.poll(timeout)

    def consume(self) -> int:
        """Read every ring up to its current head and release the space; returns bytes read."""
        total = 0
        page = mmap.PAGESIZE
        for r in self._rings:
            used, pending = self._drain(r.addr, r.addr + page, r.size)
            if pending > self.peak_bytes:
                self.peak_bytes = pending
            total += used
        return total

    def close(self) -> None:
        """Unmap and close every ring (the map's entries die with the program's maps)."""
        for r in self._rings:
            r.close()
        self._rings.clear()
        self._poller.close()
