"""The memory guard: the process's measured resident memory held under the one limit.

:mod:`agent.mirror.budget` divides ``--memory-limit`` among the buffers by arithmetic; this module
checks the truth. A thread (``memory-guard``) reads the process's RSS from
``/proc/self/statm`` (one ``pread``, ~5 µs) every :data:`INTERVAL` and climbs a ladder:

==========  =====================  ======================================================
threshold   of the limit           what the guard does at or above it
==========  =====================  ======================================================
trim        :data:`TRIM` (80 %)    give freed heap back to the OS (glibc ``malloc_trim``),
                                   at most every :data:`TRIM_EVERY` (every
                                   :data:`TRIM_EVERY_HIGH` at high)
high        :data:`HIGH` (88 %)    level 1: new connections are refused whole (reason
                                   ``memory``) and intake pauses (the native ring drain
                                   stops emptying the rings; the kernel counts its drops)
critical    :data:`CRITICAL` (95%) level 2: also drop queued data, whole flows: the forward
                                   sink drops the shadow connections holding the most bytes
                                   (``memory``), the record writer refuses records (gaps,
                                   ``memory``). High for :data:`STUCK_AFTER` escalates here.
low         :data:`LOW` (80 %)     back to level 0: everything resumes
==========  =====================  ======================================================

Why trimming: glibc keeps what Python frees in its heap. Measured under
``bench/overload_memory.py`` (512 MiB): 280-340 MiB in use but 508 MiB of heap, 227 MiB of
it free and fragmented, never given back; one ``malloc_trim(0)`` above 70 % gave back 67 MiB
(median, up to 170 MiB) in ~10 ms (median, at most 39 ms). Without it RSS would not come
down to ``low`` and the guard could not resume. (A fixed ``M_MMAP_THRESHOLD`` of 128 KiB
also ended the fragmentation, but every large payload then cost fresh page faults: about
half the bytes delivered under the same overload.)

The interval, by arithmetic: the fastest growth measured (same bench, RSS read every 1 ms
from outside) is 10 MiB in 5 ms, 20 MiB in 10 ms, 100 MiB in 100 ms: ~2 GB/s in bursts, the
mirror thread copying drained payload into Python objects. Between crossing high and intake
stopping: one interval (10 ms) plus the GIL's switch interval (5 ms) before this thread
runs, 2 GB/s x 15 ms = 30 MiB, plus the drain turn under way when the hold is set, at most
the rings' contents (32 MiB at 512 MiB: 16 MiB per CPU x 2), copied out once: ~62 MiB, 12 %
of 512 MiB, hence high at 88 %. What the hand-offs hold when intake stops is inside their
budgets. Measured (``tests/integration/test_memory_budget.py``, 192 MiB, a hook hoarding
copies): RSS peaked 10-12 MiB past high. A look costs ~20 µs (0.2 % of a CPU at 10 ms).

Why RSS and not the cgroup's usage: the cgroup is also charged the page cache of the
recording being written, reclaimable, which fills it to its limit under this load (every
cgroup round of the bench: max usage = the limit, failcnt 60,000-100,000, no OOM kill), so
usage says nothing about the risk; the process's own RSS does, and the budget's 1/8 headroom
under a cgroup's limit is for those other charges (:mod:`agent.mirror.budget`).

Intake pauses only for the native drain (``ring_pump.c``, the default); with the Python
decoder or AF_PACKET the guard still trims, refuses new connections and drops queued data.

The policy is :class:`MemoryGuard`, sans-I/O (RSS samples and times in, a level and drop
requests out); :class:`GuardThread` reads, trims and applies it through :class:`Actions`.
"""

from __future__ import annotations

import ctypes
import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Protocol

import structlog

from agent.mirror.lograte import RateLimitedLog

__all__ = ["CRITICAL", "HIGH", "INTERVAL", "LOW", "TRIM", "Actions", "GuardThread", "Level",
           "MemoryGuard", "PipelineActions", "Thresholds", "Verdict", "read_rss", "trim_heap"]

log = structlog.get_logger("agent.memory")

#: Seconds between two looks at RSS (see the module doc for the arithmetic).
INTERVAL = 0.01
#: Thresholds, as fractions of the limit.
TRIM, LOW, HIGH, CRITICAL = 0.80, 0.80, 0.88, 0.95
#: Seconds between two trims above the trim threshold, and at or above high.
TRIM_EVERY, TRIM_EVERY_HIGH = 0.25, 0.05
#: A trim that gives back less than limit / this is not repeated for longer (up to 2 s).
TRIM_USEFUL = 100
TRIM_BACKOFF_MAX = 2.0
#: Seconds at high before the guard escalates to critical (the queues are not emptying).
STUCK_AFTER = 1.0
#: Seconds between two drop requests at critical (for the frees to show in RSS).
DROP_EVERY = 0.1


class Level(enum.IntEnum):
    """How near the limit the process is (see the module doc)."""

    OK = 0
    HIGH = 1
    CRITICAL = 2


@dataclass(frozen=True)
class Thresholds:
    """The guard's thresholds in bytes, all of ``limit`` (``low <= high <= critical``)."""

    limit: int
    trim: int
    low: int
    high: int
    critical: int

    @classmethod
    def of(cls, limit: int, trim: float = TRIM, low: float = LOW, high: float = HIGH,
           critical: float = CRITICAL) -> Thresholds:
        """Thresholds at these fractions of ``limit``; ValueError if out of order."""
        if not 0 < low <= high <= critical <= 1 or not 0 < trim <= 1:
            raise ValueError("memory guard thresholds must be 0 < low <= high <= critical <= 1")
        return cls(limit, int(limit * trim), int(limit * low), int(limit * high),
                   int(limit * critical))

    def as_dict(self) -> dict[str, int]:
        return {"trim": self.trim, "low": self.low, "high": self.high,
                "critical": self.critical}


@dataclass(frozen=True)
class Verdict:
    """One look's outcome: the level now, whether it changed, and bytes of queued data to
    drop now (0: none)."""

    level: Level
    changed: bool = False
    drop_bytes: int = 0


class MemoryGuard:
    """The policy (sans-I/O): feed it RSS samples with their (monotonic) times.

    Per look: :meth:`should_trim`; if it says so, trim, then :meth:`trimmed` with RSS
    before and after; then :meth:`observe` with the RSS now, and act on the
    :class:`Verdict`. Counters: :meth:`stats`.
    """

    def __init__(self, thresholds: Thresholds) -> None:
        self.t = thresholds
        self.level = Level.OK
        self.rss = self.peak = self.samples = 0
        self.trims = self.trimmed_bytes = self.drops = 0
        self.episodes = {Level.HIGH: 0, Level.CRITICAL: 0}
        self.shed_seconds = 0.0
        self._since = 0.0  # when the level last changed
        self._last: float | None = None  # the previous look
        self._trim_at = -1e9
        self._trim_gap = TRIM_EVERY
        self._drop_at = -1e9
        self._freed = False  # a drop freed memory: trim at once

    def should_trim(self, rss: int, now: float) -> bool:
        """Give freed heap back now? Only at or above the trim threshold: at once after a
        drop, every :data:`TRIM_EVERY_HIGH` at or above high, else every trim interval (which
        grows while trims give little back)."""
        if rss < self.t.trim:
            return False
        since = now - self._trim_at
        if self._freed or rss >= self.t.high:
            return since >= TRIM_EVERY_HIGH
        return since >= self._trim_gap

    def trimmed(self, before: int, after: int, now: float) -> None:
        """A trim ran at ``now``: RSS went from ``before`` to ``after``."""
        freed = max(0, before - after)
        self.trims += 1
        self.trimmed_bytes += freed
        self._trim_at = now
        self._freed = False
        useful = freed >= self.t.limit // TRIM_USEFUL
        self._trim_gap = TRIM_EVERY if useful else min(TRIM_BACKOFF_MAX, 2 * self._trim_gap)

    def observe(self, rss: int, now: float) -> Verdict:
        """The level for ``rss`` at ``now`` (with hysteresis: high holds until ``low``), and
        what to drop."""
        self.samples += 1
        self.rss = rss
        self.peak = max(self.peak, rss)
        if self._last is not None and self.level:
            self.shed_seconds += now - self._last
        self._last = now
        level = self._next_level(rss, now)
        changed = level != self.level
        if changed:
            if level > self.level:
                self.episodes[level] += 1
            self.level, self._since = level, now
        drop = 0
        if level is Level.CRITICAL and now - self._drop_at >= DROP_EVERY:
            drop = max(1, rss - self.t.low)
            self.drops += 1
            self._drop_at = now
            self._freed = True
        return Verdict(level, changed, drop)

    def _next_level(self, rss: int, now: float) -> Level:
        t, level = self.t, self.level
        if rss >= t.critical:
            return Level.CRITICAL
        if rss > t.low and level is Level.CRITICAL:
            return Level.CRITICAL if rss >= t.high else Level.HIGH
        if rss >= t.high or (rss > t.low and level is Level.HIGH):
            stuck = level is Level.HIGH and now - self._since >= STUCK_AFTER
            return Level.CRITICAL if stuck else Level.HIGH
        return Level.OK

    def stats(self) -> dict[str, int]:
        """Counters and gauges, keyed as :mod:`agent.metrics` declares the ``memory`` stage
        (``rss_ppm``: RSS per million of the limit)."""
        out = {
            "rss_bytes": self.rss, "rss_peak_bytes": self.peak,
            "rss_ppm": self.rss * 1_000_000 // self.t.limit, "level": int(self.level),
            "episodes_high": self.episodes[Level.HIGH],
            "episodes_critical": self.episodes[Level.CRITICAL],
            "shed_ms": int(self.shed_seconds * 1000), "drops": self.drops,
            "trims": self.trims, "trimmed_bytes": self.trimmed_bytes}
        out.update({f"threshold_{k}": v for k, v in self.t.as_dict().items()})
        return out


# ---------------------------------------------------------------- I/O: reading, trimming


class _StatM:
    """``/proc/self/statm``'s resident pages, read with one ``pread`` of a descriptor kept
    open (~5 µs)."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __call__(self) -> int:
        return int(os.pread(self._fd, 256, 0).split()[1]) * self._page

    def close(self) -> None:
        os.close(self._fd)


def read_rss() -> int:
    """This process's resident memory now, in bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> Callable[[], object] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: fn(0)


#: Give every arena's free pages back to the OS (glibc ``malloc_trim(0)``; ctypes lets go of
#: the GIL meanwhile); None where the C library has no such call.
trim_heap = _malloc_trim()


# ---------------------------------------------------------------- the thread


class Actions(Protocol):
    """What the guard does to the pipeline (called from the guard's thread)."""

    def set_level(self, level: Level) -> None:
        """OK: everything resumes. HIGH: refuse new connections, pause intake. CRITICAL:
        also refuse records."""

    def drop(self, nbytes: int) -> None:
        """Drop about ``nbytes`` of queued data, whole flows (largest first)."""


class _Refusing(Protocol):
    reason: str | None


class PipelineActions:
    """:class:`Actions` on a mirror's stages: the reassembler's ``refusals`` (reason
    ``memory`` from high on), the native ring drains (``hold``, default
    :func:`agent.sources.ring.pump.hold_all`), a record writer with a ``shed`` flag (set at
    critical) and a forward sink's ``shed(nbytes)`` (``forward()``: the sink, or None)."""

    def __init__(self, refusals: _Refusing, writer: object | None,
                 forward: Callable[[], object | None],
                 hold: Callable[[bool], object] | None = None) -> None:
        self._refusals = refusals
        self._writer = writer
        self._forward = forward
        self._hold = hold

    def set_level(self, level: Level) -> None:
        shedding = level >= Level.HIGH
        self._refusals.reason = "memory" if shedding else None
        if self._hold is None:
            from agent.sources.ring.pump import hold_all

            self._hold = hold_all
        self._hold(shedding)
        if hasattr(self._writer, "shed"):
            self._writer.shed = level is Level.CRITICAL

    def drop(self, nbytes: int) -> None:
        shed = getattr(self._forward(), "shed", None)
        if shed is not None:
            shed(nbytes)


class GuardThread:
    """Runs a :class:`MemoryGuard` on the ``memory-guard`` thread: a look every
    ``interval`` seconds (:meth:`tick`), trims when told, applies level changes and drops
    through ``actions``. :meth:`stop` returns everything to level 0. ``read`` and ``trim``
    are for tests (default: this process's RSS, :data:`trim_heap`)."""

    def __init__(self, guard: MemoryGuard, actions: Actions, *, interval: float = INTERVAL,
                 read: Callable[[], int] | None = None,
                 trim: Callable[[], object] | None = trim_heap,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.guard = guard
        self._actions = actions
        self._interval = interval
        self._statm = _StatM() if read is None else None
        self._read: Callable[[], int] = read or self._statm or read_rss
        self._trim = trim
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = RateLimitedLog(SimpleNamespace(info=log.warning), 10.0, clock)

    def start(self) -> None:
        """Start looking (once; no-op if running)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memory-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop looking and return to level 0 (intake resumes, nothing is refused)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.guard.level:
            self.guard.level = Level.OK
            self._actions.set_level(Level.OK)
        if self._statm is not None:
            self._statm.close()
            self._statm = None
            self._read = read_rss

    def stats(self) -> dict[str, int]:
        return self.guard.stats()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.tick()
            except Exception:  # never let the guard die quietly: log, go on
                log.exception("memory guard error")

    def tick(self) -> Verdict:
        """One look: read, maybe trim (and read again), judge, act."""
        guard, now = self.guard, self._clock()
        rss = self._read()
        if self._trim is not None and guard.should_trim(rss, now):
            self._trim()
            after = self._read()
            guard.trimmed(rss, after, now)
            rss = after
        verdict = guard.observe(rss, now)
        if verdict.changed:
            self._actions.set_level(verdict.level)
            self._report(verdict.level, rss)
        if verdict.drop_bytes:
            self._actions.drop(verdict.drop_bytes)
        return verdict

    def _report(self, level: Level, rss: int) -> None:
        mib = 1 << 20
        fields = {"rss_mib": round(rss / mib, 1), "limit_mib": round(self.guard.t.limit / mib, 1)}
        if level is Level.OK:
            log.info("memory back under the low threshold: intake resumed, new connections "
                     "tracked again", **fields)
        else:
            self._log.info("memory near the limit: new connections refused, intake paused"
                           + (", queued data dropped" if level is Level.CRITICAL else ""),
                           level.name.lower(), guard_level=level.name.lower(), **fields)
