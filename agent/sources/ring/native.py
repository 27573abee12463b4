"""The native ring path (``ring_decode.c``), built and loaded on demand.

``ring_decode.c`` walks a perf ring or the BPF ring buffer, counts perf LOST records and
discarded ring buffer records, joins each direction's in-order payload into runs (the contract
of :class:`~agent.sources.ring.events.EventDecoder`, the Python reference and fallback) and releases
the walked bytes to the kernel itself, with an acquire load of the producer position and a
release store of the consumer position. It is compiled when the package is installed
(``setup.py``: the extension ``agent.sources.ring._ring_native``, a plain shared library loaded with
ctypes), so the running host needs no compiler and writes nothing. The library carries the hash
of the sources it was built from, and :func:`load` refuses one whose hash is not that of the
installed sources: a stale build is never used (``make setup`` rebuilds after a change). Where
the package was installed without it (no compiler at install time), the agent logs one warning
and uses the Python decoder.

Memory is bounded per decoder and allocated once (``md_new``), whatever the rings' sizes. With
the defaults below (sizes from ``md_footprint``, x86-64):

- runs: ``MAX_EVENTS`` x 96 B (a 72-byte ``md_run`` plus links) = 1,572,864 B; pieces:
  ``MAX_EVENTS`` x 16 B = 262,144 B: a call decodes at most ``MAX_EVENTS`` records, each
  making at most one run and one piece;
- the open-run table: ``TABLE_SLOTS`` x 4 B = 131,072 B, twice ``MAX_EVENTS`` so it is at
  most half full; a lookup probes 16 slots at most;
- the wrapped perf record: 65,536 B (a perf record's size is a u16);
- the output: ``OUT_BYTES`` = 1,048,576 B (see there), which also bounds the payload one
  call turns into Segments;

3,080,280 B (2.9 MiB) in all with the handle (``NativeDecoder.footprint``), allocated once
per source: neither the rings' size nor the traffic's shape changes it. A drain calls the
decoder until the ring is empty up to the producer position its first call saw, each call
releasing what it decoded, so a drain ends even while the kernel keeps writing. The Segments
one drain makes hold at most what the rings held; ``drain.py``'s budget bounds what waits
after that. Live, the decoder is lent to ``ring_pump.c``'s thread (``pump.py``), which calls
it with 1 MiB chunks of its backlog (bounded by the same budget) as the output instead;
:meth:`NativeDecoder.segments_of` turns a take of those chunks into Segments.

Run ``python -m agent.sources.ring.native`` to check it: the library's path, or exit 1 and why not.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import struct
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

from agent.model import FIN, RST, SYN, Segment
from agent.sources.ebpf.layout import BPF_DIR, tunnel_name

__all__ = ["MAX_EVENTS", "OUT_BYTES", "TABLE_SLOTS", "NativeDecoder", "NativeUnavailable",
           "library_path", "load", "source_digest"]

SOURCE = Path(__file__).with_name("ring_decode.c")
#: Compiled together with SOURCE: the pump thread (``pump.py``) and the shared header.
SOURCES = (SOURCE, SOURCE.with_name("ring_pump.c"))
HEADER = SOURCE.with_name("ring_decode.h")
#: struct md_run (ring_decode.c). A call's output: its runs' headers, then their payloads.
RUN = struct.Struct("<QIIIIHHHBB16s16sIB3x")
#: Records one call decodes at most (runs and pieces are sized for it).
MAX_EVENTS = 16384
#: Open-run table slots: twice MAX_EVENTS, so the table is at most half full.
TABLE_SLOTS = 2 * MAX_EVENTS
#: Output bytes of one call. It must take one record's run (64 KiB + 64 B); beyond that a
#: larger buffer only saves calls, and a call's fixed cost (a few µs: ctypes, the loop) is
#: about 1% of copying 1 MiB twice (ring -> output -> Segment). Not as large as the ring: at
#: 1 MiB the output stays in cache between C writing it and Python copying the runs out. In
#: bench/decode_rings.py 256 KiB to 4 MiB decode within noise of each other, while 16 MiB
#: (a ring's size) is slower on bulk data (4.3-6.5 vs 7.5-8.5 GB/s); 1 MiB also keeps a bulk
#: connection's drain in a few large Segments. A full 16 MiB ring of bulk data takes 16 calls.
OUT_BYTES = 1 << 20
_NO_LIMIT = (1 << 64) - 1
_BOUNDARY = SYN | FIN | RST
_SEQ = 0xFFFFFFFF
#: RUN's fields.
_Hdr = tuple[int, int, int, int, int, int, int, int, int, int, bytes, bytes, int, int]
#: A run while :meth:`NativeDecoder.segments_of` joins runs across chunks: its header, its
#: payload pieces, and [the sequence number after it, the last ack, the last window].
_Open = tuple[_Hdr, list[memoryview], list[int]]


def _stamp(run: tuple[_Hdr, memoryview]) -> int:
    return run[0][0]


class NativeUnavailable(RuntimeError):
    """The native decoder cannot be built or loaded (the message says why)."""


class _Stats(ctypes.Structure):
    """struct md_stats: running totals."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "events", "coalesced", "lost_samples", "discarded", "no_slot", "malformed", "runs",
        "calls", "bounded")]


class _Call(ctypes.Structure):
    """struct md_call: what one call did."""

    _fields_ = [("head", ctypes.c_uint64), ("pending", ctypes.c_uint64),
                ("consumed", ctypes.c_uint64), ("out_used", ctypes.c_uint64),
                ("runs", ctypes.c_uint32), ("more", ctypes.c_uint32)]


def source_digest() -> str:
    """The hash of the installed sources, as ``setup.py`` computes it into the library."""
    digest = hashlib.sha256()
    for path in (*SOURCES, HEADER, BPF_DIR / "mirror_event.h"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """The library the install built beside this module; raises NativeUnavailable."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_ring_native{suffix}"
        if path.exists():
            return path
    raise NativeUnavailable("the native decoder was not built when the package was installed "
                            "(no C compiler then?); reinstall with gcc present (make setup)")


_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The loaded library; raises NativeUnavailable."""
    global _lib
    if _lib is None:
        path = library_path()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise NativeUnavailable(f"loading the native decoder failed: {e}") from None
        lib.md_source_digest.restype = ctypes.c_char_p
        lib.md_source_digest.argtypes = []
        built, wanted = lib.md_source_digest().decode(), source_digest()
        if built != wanted:
            raise NativeUnavailable(f"{path.name} was built from other sources ({built}, these "
                                    f"are {wanted}); reinstall the package (make setup)")
        u64, ptr = ctypes.c_uint64, ctypes.c_void_p
        lib.md_new.restype = ptr
        lib.md_new.argtypes = [ctypes.c_uint32, ctypes.c_uint32, u64, ctypes.c_int]
        lib.md_free.restype = None
        lib.md_free.argtypes = [ptr]
        lib.md_out.restype = ptr
        lib.md_out.argtypes = [ptr]
        lib.md_footprint.restype = u64
        lib.md_footprint.argtypes = [ptr]
        call, stats = ctypes.POINTER(_Call), ctypes.POINTER(_Stats)
        lib.md_perf.restype = ctypes.c_int64
        lib.md_perf.argtypes = [ptr, ptr, ptr, u64, u64, call, stats]
        lib.md_ringbuf.restype = ctypes.c_int64
        lib.md_ringbuf.argtypes = [ptr, ptr, ptr, ptr, u64, u64, call, stats]
        _bind_pump(lib)
        _lib = lib
    return _lib


def loaded() -> ctypes.CDLL | None:
    """The library if it is loaded already (never builds or loads it)."""
    return _lib


def _bind_pump(lib: ctypes.CDLL) -> None:
    """The pump's functions (ring_pump.c; used by pump.py)."""
    u64, u32, ptr = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p
    lib.md_pump_start.restype = ptr
    lib.md_pump_start.argtypes = [ptr, ptr, u32, ctypes.c_int, u64, u64, ptr]
    lib.md_pump_take.restype = u32
    lib.md_pump_take.argtypes = [ptr, u64, ptr, u32, ctypes.POINTER(u64)]
    for name in ("md_pump_release", "md_pump_stop", "md_pump_free"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ptr]
    lib.md_pump_stats.restype = None
    lib.md_pump_stats.argtypes = [ptr, ptr]
    lib.md_pump_hold.restype = None
    lib.md_pump_hold.argtypes = [ctypes.c_int]


class NativeDecoder:
    """Decodes perf rings and the BPF ring buffer with ``ring_decode.c``; the interface of
    :class:`~agent.sources.ring.events.EventDecoder`.

    :meth:`drain_perf` and :meth:`drain_ringbuf` take a ring's addresses, decode everything
    up to the producer position and release it; :meth:`take` returns the Segments so far.
    ``max_events``, ``out_bytes`` and ``table_slots`` (a power of two) bound one call (see the
    module's arithmetic; tests make them small). Raises NativeUnavailable if the library
    cannot be had. :meth:`close` frees the C state (also done when collected).

    A direction's in-order records join within one call: across the calls of one drain (a
    ring larger than one call's bounds, or several perf rings) a run may come out in a few
    Segments, which the reassembler joins.
    """

    def __init__(self, clock: float, segment_filter: Callable[[Segment], bool] | None = None,
                 *, max_events: int = MAX_EVENTS, out_bytes: int = OUT_BYTES,
                 table_slots: int = TABLE_SLOTS) -> None:
        lib = load()
        handle = lib.md_new(max_events, table_slots, out_bytes, segment_filter is None)
        if not handle:
            raise MemoryError(f"native decoder: cannot allocate {max_events} events, "
                              f"{table_slots} slots, {out_bytes} output bytes")
        self._lib = lib
        self._handle: int | None = handle
        self._free = weakref.finalize(self, lib.md_free, handle)
        self.footprint = int(lib.md_footprint(handle))
        self._out = (ctypes.c_char * out_bytes).from_address(lib.md_out(handle))
        self._view = memoryview(self._out).cast("B")
        self._clock = clock
        self._filter = segment_filter
        self._stats = _Stats()
        self._call = _Call()
        self._segments: list[Segment] = []
        self._sync: Callable[[_Stats], None] | None = None  # set while lent to a pump
        self.filtered = 0

    def lend(self, sync: Callable[[_Stats], None]) -> tuple[int, _Stats]:
        """For ``pump.py``: the C decoder's handle and its running totals, from which the
        pump's start. Until :meth:`give_back`, the pump's thread owns the C decoder: the
        counters are read through ``sync`` (which copies the pump's totals in) and the
        ``drain_*`` methods refuse."""
        if self._handle is None:
            raise ValueError("native decoder is closed")
        if self._sync is not None:
            raise ValueError("native decoder is lent already")
        self._sync = sync
        return self._handle, self._stats

    def give_back(self) -> None:
        """The pump stopped (its final totals synced): the decoder is the caller's again."""
        if self._sync is not None:
            self._sync(self._stats)
        self._sync = None

    def _totals(self) -> _Stats:
        if self._sync is not None:
            self._sync(self._stats)
        return self._stats

    @property
    def events(self) -> int:
        return int(self._totals().events)

    @property
    def coalesced(self) -> int:
        return int(self._totals().coalesced)

    @property
    def lost_samples(self) -> int:
        return int(self._totals().lost_samples)

    @property
    def discarded(self) -> int:
        return int(self._totals().discarded)

    @property
    def no_slot(self) -> int:
        return int(self._totals().no_slot)

    @property
    def malformed(self) -> int:
        return int(self._totals().malformed)

    @property
    def calls(self) -> int:
        return int(self._totals().calls)

    def drain_perf(self, ctrl: int, data: int, size: int) -> tuple[int, int]:
        """Decode the perf ring whose ``perf_event_mmap_page`` is at ``ctrl`` and whose
        ``size``-byte data area is at ``data``; returns (bytes released, bytes waiting when
        read)."""
        return self._drain(self._lib.md_perf, (ctrl, data, size))

    def drain_ringbuf(self, cons: int, prod: int, data: int, size: int) -> tuple[int, int]:
        """Decode the BPF ring buffer whose consumer page is at ``cons``, producer page at
        ``prod`` and doubly mapped ``size``-byte data area at ``data``; as :meth:`drain_perf`.
        """
        return self._drain(self._lib.md_ringbuf, (cons, prod, data, size))

    def _drain(self, fn: Callable[..., int], ring: tuple[int, ...]) -> tuple[int, int]:
        if self._handle is None:
            raise ValueError("native decoder is closed")
        if self._sync is not None:
            raise ValueError("native decoder is lent to a running pump")
        call, call_ref, stats_ref = self._call, ctypes.byref(self._call), ctypes.byref(
            self._stats)
        until, consumed, pending = _NO_LIMIT, 0, -1
        while True:
            used = fn(self._handle, *ring, until, call_ref, stats_ref)
            if pending < 0:  # the first call: stop at what the producer had written then
                pending, until = call.pending, call.head
            consumed += call.consumed
            self.segments(self._view, used, call.runs, self._segments)
            if not call.more:
                return consumed, pending

    def segments(self, view: memoryview, used: int, runs: int, into: list[Segment]) -> None:
        """Appends to ``into`` the Segments of one call's output in ``view``: ``runs`` runs,
        ``used`` bytes (the decoder's own output, or a chunk of the pump's)."""
        clock, keep = self._clock, self._filter
        append = into.append
        off = runs * RUN.size  # the payloads, in the headers' order
        for (ts, seq, ack, lost, length, sport, dport, win, fam, flags, saddr,
             daddr, tid, kind) in RUN.iter_unpack(view[:off]):
            end = off + length
            if fam == 4:
                saddr, daddr = saddr[:4], daddr[:4]
            seg = Segment(saddr, sport, daddr, dport, seq, ack, flags, view[off:end].tobytes(),
                          ts / 1e9 + clock, win, lost, tunnel_name(kind, tid) if kind else "")
            off = end
            if keep is not None and not keep(seg):
                self.filtered += 1
                continue
            append(seg)
        assert off == used, "native decoder: output and run headers disagree"

    def segments_of(self, chunks: list[tuple[memoryview, int]], into: list[Segment]) -> None:
        """Appends to ``into`` the Segments of several calls' outputs (``(view, runs)``, in
        order: the pump's chunks of one take), each direction's in-order runs joined across
        them, so a bulk connection's take is one Segment per direction, made with one copy:
        the reassembler then has nothing left to join.

        The runs are taken in kernel-timestamp order (stable; the order the source's
        reorderer gives the reassembler anyway), since one sender's packets land in several
        per-CPU rings, and joined by ring_decode.c's rule: a run that could have joined
        (payload, an open window, no loss, no SYN/FIN/RST) continues its direction's open
        run if its sequence number is right after it, else opens its own; any other run
        stands alone and closes both directions' open runs. Without coalescing (a segment
        filter) this is :meth:`segments` per chunk."""
        if self._filter is not None:
            for view, runs in chunks:
                self.segments(view, len(view), runs, into)
            return
        found: list[tuple[_Hdr, memoryview]] = []
        for view, runs in chunks:
            off = runs * RUN.size
            hdr: _Hdr
            for hdr in RUN.iter_unpack(view[:off]):
                found.append((hdr, view[off:off + hdr[4]]))
                off += hdr[4]
        if len(chunks) > 1:
            found.sort(key=_stamp)
        self._make(self._joined(found), into)

    @staticmethod
    def _joined(found: list[tuple[_Hdr, memoryview]]) -> list[_Open]:
        made: list[_Open] = []
        open_runs: dict[tuple[bytes, int, bytes, int, int, int], _Open] = {}
        for hdr, piece in found:
            (_ts, seq, ack, lost, length, sport, dport, win, _fam, flags, saddr, daddr,
             tid, kind) = hdr
            key = (saddr, sport, daddr, dport, tid, kind)
            if length and win and not lost and not flags & _BOUNDARY:
                run = open_runs.get(key)
                if run is not None and run[2][0] == seq:
                    run[1].append(piece)
                    run[2][:] = ((seq + length) & _SEQ, ack, win)  # the last ack, window
                    continue
                run = (hdr, [piece], [(seq + length) & _SEQ, ack, win])
                open_runs[key] = run
            else:
                open_runs.pop(key, None)
                open_runs.pop((daddr, dport, saddr, sport, tid, kind), None)
                run = (hdr, [piece], [0, ack, win])
            made.append(run)
        return made

    def _make(self, made: list[_Open], into: list[Segment]) -> None:
        clock, append = self._clock, into.append
        for (ts, seq, _, lost, _, sport, dport, _, fam, flags, saddr, daddr, tid,
             kind), pieces, (_, ack, win) in made:
            if fam == 4:
                saddr, daddr = saddr[:4], daddr[:4]
            data = pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)
            append(Segment(saddr, sport, daddr, dport, seq, ack, flags, data,
                           ts / 1e9 + clock, win, lost, tunnel_name(kind, tid) if kind else ""))

    def take(self) -> list[Segment]:
        out, self._segments = self._segments, []
        return out

    def close(self) -> None:
        """Free the C state; the counters stay readable."""
        if self._handle is not None:
            self._view.release()
            self._handle = None
            self._free()


if __name__ == "__main__":
    try:
        load()
    except NativeUnavailable as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(1)
    print(library_path())
