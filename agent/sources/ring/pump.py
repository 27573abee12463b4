"""The native drain: a C thread (``ring_pump.c``) empties the kernel's rings into a bounded
backlog of decoded chunks; the mirror thread takes them and makes the Segments.

The same job as :class:`~agent.sources.ring.drain.RingDrain` (the Python ``ring-drain`` thread,
kept for the Python decoder), with the same interface and counters, minus the GIL: a Python
thread needs the GIL (and then a CPU) at every step between its C calls, and on a busy
machine it waited long enough (30-90 ms on the run queue, measured) for 16 MiB rings to
overflow at 4 Gbit/s. The C thread runs as soon as the scheduler lets it; only building the
Segments is Python, on the mirror thread that consumes them anyway.

Hand-off policy: *pause*, as the Python drain's: the backlog holds up to ``budget`` bytes of
chunk memory (payload, run headers, and the slack of chunks less than full, at most about
half); past that the thread stops emptying the rings until the mirror takes what waits, and
the kernel's own drops (counted there, reported as gaps) take over. At most one turn (the
rings' contents) is held past the budget. The hand-off counters (``ring_drain``) count
payload bytes, as before.

Health: the ``ring-drain`` heartbeat beats with the C thread's turns (and every interval
while it pauses); ``/healthz`` says ``ring-drain: thread is dead`` if the thread ended while
it should run.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

from agent.mirror.handoff import HandoffStats, Policy
from agent.mirror.heartbeat import Heartbeat
from agent.model import Segment
from agent.sources.ring.drain import DRAIN_SILENCE
from agent.sources.ring.native import NativeDecoder, _Stats, load, loaded

__all__ = ["PERF", "RINGBUF", "NativeDrain", "RingAddress", "hold_all"]

PERF, RINGBUF = 0, 1
#: (kind, a, b, c, size): perf: (PERF, control page, data area, 0, size); ring buffer:
#: (RINGBUF, consumer page, producer page, data area, size). ring_pump.c's struct mp_ring.
RingAddress = tuple[int, int, int, int, int]
#: Chunks one take hands over at most (more wait for the next take, which returns at once).
MAX_TAKE = 256


def hold_all(on: bool) -> bool:
    """Pause (``on``) or resume every native drain of the process from its next turn (any
    thread): paused, a drain empties no ring, as at its budget (counted in its ``pauses``;
    the kernel keeps what fits and counts its drops), and gives its spare buffers back.
    For the memory guard (``agent/mirror/memory_guard.py``). False if no native drain could run
    (the library is not loaded): nothing to pause."""
    lib = loaded()
    if lib is None:
        return False
    lib.md_pump_hold(1 if on else 0)
    return True


class _Ring(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("kind", "a", "b", "c", "size")]


class _Chunk(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "buf", "used", "runs", "payload", "started_ns")]


class _PumpStats(ctypes.Structure):
    """struct mp_stats (ring_pump.c)."""

    _fields_ = [("dec", _Stats), *((name, ctypes.c_uint64) for name in (
        "items", "bytes", "taken_items", "taken_bytes", "queued_items", "peak_queued_bytes",
        "held_bytes", "pauses", "turns", "turn_started_ns", "beat_ns", "gap_max_ns",
        "ring_peak_bytes", "alloc_failed", "alive"))]


class _PumpHeartbeat(Heartbeat):
    """``ring-drain``'s heartbeat, beaten by the C thread (its latest turn, or pause)."""

    def __init__(self, read: Callable[[], _PumpStats]) -> None:
        super().__init__("ring-drain", DRAIN_SILENCE)
        self._read = read

    def silence(self) -> float:
        return max(0.0, time.monotonic() - float(self._read().beat_ns) / 1e9)

    def problem(self) -> str | None:
        if not self.running:
            return None
        if not self._read().alive:
            return f"{self.name}: thread is dead"
        quiet = self.silence()
        if quiet > self.max_silence:
            return f"{self.name}: no progress for {quiet:.1f} s (limit {self.max_silence:g} s)"
        return None


class NativeDrain:
    """Drains ``rings`` with ``decoder`` on a C thread, turns at least ``interval`` seconds
    apart (sooner when ``poll_fd``, an epoll fd holding the rings' fds, says a ring passed its
    watermark; -1: on the timer only); ``take()`` yields the Segments. The interface of
    :class:`~agent.sources.ring.drain.RingDrain`.

    Threads: the C thread produces; the mirror thread (:meth:`take`, :meth:`stop`) consumes;
    the counters and :attr:`heartbeat` may be read from any thread. Raises OSError if the
    thread cannot start.
    """

    def __init__(self, decoder: NativeDecoder, rings: list[RingAddress], poll_fd: int,
                 interval: float, budget: int, *, max_take: int = MAX_TAKE) -> None:
        self._lib = load()
        self._decoder = decoder
        self._rings = (_Ring * len(rings))(*(_Ring(*r) for r in rings))
        self._poll_fd = poll_fd
        self._interval = interval
        self.budget = budget
        self._pump: int | None = None
        self._lock = threading.Lock()  # readers (any thread) vs stop() freeing the pump
        self._using = threading.Lock()  # take() vs stop(), should they be on two threads
        self._final = _PumpStats()  # the counters once stopped
        self._chunks = (_Chunk * max_take)()
        self._turn = ctypes.c_uint64()
        self._drained_at = 0.0
        self.heartbeat: Heartbeat = _PumpHeartbeat(self._read)

    def _read(self) -> _PumpStats:
        with self._lock:
            if self._pump is None:
                return self._final
            out = _PumpStats()
            self._lib.md_pump_stats(self._pump, ctypes.byref(out))
            return out

    def _sync(self, into: _Stats) -> None:
        ctypes.pointer(into)[0] = self._read().dec

    @property
    def gap_max(self) -> float:
        """Longest time between the starts of two drains, seconds."""
        return float(self._read().gap_max_ns) / 1e9

    @property
    def pauses(self) -> int:
        """Times the drain paused because the mirror had not taken ``budget`` bytes yet."""
        return int(self._read().pauses)

    @property
    def peak_bytes(self) -> int:
        """The most bytes any ring held when its drain began."""
        return int(self._read().ring_peak_bytes)

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.mirror.handoff.HasHandoffs`: this stage's hand-off."""
        return [self.handoff_stats()]

    def handoff_stats(self) -> HandoffStats:
        """The backlog's counters, as :class:`agent.mirror.handoff.Handoff` counts them (payload
        bytes, released when taken)."""
        s = self._read()
        return HandoffStats(
            "ring_drain", Policy.PAUSE.value, self.budget, items=s.items, bytes=s.bytes,
            taken_items=s.taken_items, taken_bytes=s.taken_bytes,
            released_bytes=s.taken_bytes, queued_items=s.queued_items,
            peak_queued_bytes=s.peak_queued_bytes, pauses=s.pauses)

    def start(self) -> None:
        """Start the C thread (and the heartbeat)."""
        handle, stats = self._decoder.lend(self._sync)
        pump = self._lib.md_pump_start(handle, self._rings, len(self._rings), self._poll_fd,
                                       int(self._interval * 1e9), self.budget,
                                       ctypes.byref(stats))
        if not pump:
            self._decoder.give_back()
            raise OSError("cannot start the native ring drain thread (no memory or threads)")
        self._pump = pump
        self.heartbeat.start()

    def take(self, timeout: float) -> tuple[list[Segment], float]:
        """What was drained since the last call (waiting up to ``timeout`` for a drain to
        end; at most ``max_take`` chunks), and the time up to which nothing older is still
        waiting (monotonic seconds): when the latest completed drain started, or if chunks
        were left for the next take, when the drain before theirs did."""
        with self._using:
            if self._pump is None:
                return [], self._drained_at
            return self._take(self._pump, timeout)

    def _take(self, pump: int, timeout: float) -> tuple[list[Segment], float]:
        lib, chunks = self._lib, self._chunks
        n = lib.md_pump_take(pump, max(0, int(timeout * 1e9)), chunks, len(chunks),
                             ctypes.byref(self._turn))
        segs: list[Segment] = []
        taken = chunks[:n]
        views = [memoryview((ctypes.c_char * c.used).from_address(c.buf)).cast("B")
                 for c in taken]
        try:
            self._decoder.segments_of(
                [(v, c.runs) for v, c in zip(views, taken, strict=True)], segs)
        finally:
            for v in views:
                v.release()
            lib.md_pump_release(pump)
        if self._turn.value:
            self._drained_at = self._turn.value / 1e9
        return segs, self._drained_at

    def stop(self) -> list[Segment]:
        """Stop and join the thread; returns what it drained and nobody took yet. The
        decoder is the caller's again (to drain the rest of the rings itself)."""
        self.heartbeat.stop()
        with self._using:
            return self._stop()

    def _stop(self) -> list[Segment]:
        pump, out = self._pump, []
        if pump is None:
            return []
        self._lib.md_pump_stop(pump)
        while True:
            segs, _ = self._take(pump, 0)
            if not segs and not self._read().queued_items:
                break
            out.extend(segs)
        self._decoder.give_back()  # its counters: the pump's final totals
        with self._lock:
            self._lib.md_pump_stats(pump, ctypes.byref(self._final))
            self._pump = None
        self._lib.md_pump_free(pump)
        return out
