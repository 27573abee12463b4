"""Live capture with the eBPF program in ``bpf/``: the stages wired into one packet source.

    program.py   the kernel object: flags, load (in a child), ports, attach, counters
    perfbuf.py / ringbuf.py   the rings, read straight from their mmaps
    events.py / native.py     records → Segments, a direction's in-order payload joined
    pump.py      the ring-drain thread (C, native decoder) and its bounded backlog
    drain.py     the ring-drain thread (Python decoder) and its bounded hand-off
    reorder.py   per-CPU rings merged into kernel-timestamp order

The kernel keeps only the observed ports' packets that carry payload, SYN, FIN or RST and
copies payload in pieces of up to 32 KiB, so 64 KiB GSO/GRO packets arrive whole. Transport is
a per-CPU perf buffer (default) or one BPF ring buffer (``transport="ringbuf"``, kernel 5.8+).
The rings are drained on a 20 ms timer, sooner when the kernel wakes the drain because a ring
is a quarter full, so a lone request still arrives within ~20 ms and bulk traffic never waits
for the timer. Losses (perf lost records, kernel counters) reach :meth:`EbpfSource.stats`.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.mirror.handoff import HandoffStats
from agent.mirror.heartbeat import Heartbeat
from agent.model import Segment
from agent.sources import SourceError
from agent.sources.ebpf import privileges
from agent.sources.ebpf.bpfsys import BpfError
from agent.sources.ebpf.decap import Decap
from agent.sources.ebpf.follow import AttachedIface, Follower
from agent.sources.ebpf.layout import BPF_DIR
from agent.sources.ebpf.links import IfaceSpec
from agent.sources.ebpf.program import Build, MirrorProgram
from agent.sources.ring.drain import RingDrain
from agent.sources.ring.events import EventDecoder
from agent.sources.ring.native import NativeDecoder, NativeUnavailable
from agent.sources.ring.perfbuf import PerfReader, possible_cpus
from agent.sources.ring.pump import NativeDrain
from agent.sources.ring.reorder import Reorderer
from agent.sources.ring.ringbuf import RingBufReader

__all__ = ["BPF_DIR", "DECODERS", "TRANSPORTS", "EbpfSource", "check_environment",
           "default_buffer_mib"]

log = structlog.get_logger("agent.ebpf")

#: Seconds of the newest events held back to merge other CPUs' older events in order.
REORDER_WINDOW = 0.002
#: Seconds between drains at least (see :meth:`EbpfSource.batches`).
BATCH_INTERVAL = 0.02
#: A ring this full wakes the reader before the timer does.
FILL_FRACTION = 0.25
TRANSPORTS = ("perf", "ringbuf")
DECODERS = ("auto", "native", "python")


def default_buffer_mib(cpus: int) -> int:
    """MiB of kernel buffer per CPU when not given: 16, less on hosts with many CPUs (where
    traffic spreads over more rings) so that all rings together stay near 128 MiB, never
    under 4 MiB per CPU."""
    return max(4, min(16, 128 // max(1, cpus)))


@dataclass(frozen=True)
class RingGeometry:
    """Ring sizes for ``--buffer-mib``, worked out once.

    perf: one ring of ``perf_pages`` per online CPU (a power of two of pages); the ring
    buffer: one ring of ``ringbuf_pages`` shared by all CPUs, as much as all perf rings
    together. ``capacity`` is what one ring holds (perf: one CPU may get all the traffic);
    ``wakeup`` the bytes written to a ring (perf) or by one CPU (ring buffer) after which the
    kernel wakes the drain: a quarter of ``capacity``, so even all CPUs together wake it well
    before the ring is full.
    """

    perf_pages: int
    ringbuf_pages: int
    capacity: int
    wakeup: int

    @classmethod
    def of(cls, buffer_mib: int, transport: str, possible: int) -> RingGeometry:
        page = os.sysconf("SC_PAGE_SIZE")
        perf = privileges.perf_ring_size(buffer_mib) // page
        ring = privileges.ringbuf_size(buffer_mib, possible) // page
        capacity = (ring if transport == "ringbuf" else perf) * page
        share = possible if transport == "ringbuf" else 1
        return cls(perf, ring, capacity, int(capacity * FILL_FRACTION) // share)


def check_environment(ebpf: bool = True, modules: Path = Path("/lib/modules"), *,
                      buffer_mib: int | None = None, transport: str = "perf",
                      default: bool = False) -> None:
    """Start-up checks with the exact fix; raises SourceError (exit 2) when one fails.

    In order: the ``buffer_mib`` range (None: the default; ``default``: it is a derived
    default, not given), capabilities (whatever the uid),
    locked memory for ``transport``'s rings, bcc, kernel headers (``privileges.py``).
    ``ebpf=False`` checks only what the AF_PACKET engine needs.
    """
    host = privileges.Host.read()
    mib = default_buffer_mib(host.cpus) if buffer_mib is None else buffer_mib
    if ebpf or buffer_mib is not None:
        privileges.check_buffer_mib(host, mib, ebpf, transport,
                                    default=default or buffer_mib is None)
    privileges.check_capabilities(host, ebpf)
    if not ebpf:
        return
    privileges.check_memlock(host, mib, transport)
    # Found, not imported: importing bcc maps LLVM into this process for good (loader.py).
    if importlib.util.find_spec("bcc") is None:
        raise SourceError("bcc is not importable: apt-get install python3-bpfcc and use a venv "
                          "made with --system-site-packages (make setup does both)")
    build = modules / os.uname().release / "build"
    if not (build / "include").exists():
        raise SourceError(
            f"kernel headers missing at {build}: apt-get install linux-headers-amd64, then "
            f"ln -sfn /usr/src/linux-headers-<ver>-amd64 {build} and "
            f"ln -sfn /usr/src/linux-headers-<ver>-common {build.parent}/source "
            "(make setup does this)")


class EbpfSource:
    """Captures ``ports`` on ``ifaces`` with TC (default) or XDP; a live packet source.

    ``ifaces``: an :class:`~agent.sources.ebpf.links.IfaceSpec`, or its text or a list of its
    entries (names, fnmatch patterns, ``any``). Fixed names must exist (SourceError); a
    pattern or ``any`` is followed as interfaces come and go, with one capture per
    connection (``follow.py``); :meth:`interfaces` says what is attached now.

    ``requests_only``: service→client payload is not copied in the kernel (only those
    packets' SYN/FIN/RST come through, without payload); for mirrors that do not track
    responses (``MirrorConfig.track_responses=False``). ``own_ports``: packets with a port in
    this range are never captured (the forward sink's source ports). ``tc_mode``: see
    :func:`agent.sources.ebpf.attach.attach_tc`.

    ``decoder``: how ring records become Segments, for either transport: ``native``
    (``ring_decode.c``, SourceError if it cannot be built), ``python`` (``events.py``) or
    ``auto`` (native if it can be had, else Python with a warning).

    ``decap``: the tunnels the kernel looks inside (``bpf/decap.h``; segments carry the
    tunnel's identity).

    ``buffer_mib`` / ``backlog_bytes`` (the drain's pause budget): from
    :func:`agent.mirror.budget.default` when not given, as the command line derives them.
    """

    def __init__(self, ifaces: IfaceSpec | str | Sequence[str], ports: list[int],
                 engine: str = "tc",
                 buffer_mib: int | None = None,
                 segment_filter: Callable[[Segment], bool] | None = None,
                 transport: str = "perf", requests_only: bool = False,
                 decoder: str = "auto", own_ports: tuple[int, int] | None = None,
                 tc_mode: str = "auto", backlog_bytes: int | None = None,
                 decap: Decap | None = None) -> None:
        for what, value, allowed in (("engine", engine, ("tc", "xdp")),
                                     ("transport", transport, TRANSPORTS),
                                     ("decoder", decoder, DECODERS)):
            if value not in allowed:
                raise SourceError(f"unknown {what} {value!r}")
        self.spec = ifaces if isinstance(ifaces, IfaceSpec) else IfaceSpec.parse(ifaces)
        self.engine = engine
        self.transport = transport
        if buffer_mib is None or backlog_bytes is None:  # the default memory budget's
            from agent.mirror import budget
            mem = budget.default(transport)
            buffer_mib = buffer_mib or mem.buffer_mib
            backlog_bytes = mem.drain_backlog if backlog_bytes is None else backlog_bytes
        self.buffer_mib = buffer_mib
        cpus = possible_cpus()
        self._geometry = RingGeometry.of(self.buffer_mib, transport, cpus)
        self._clock = time.time() - time.monotonic()  # ktime (CLOCK_MONOTONIC) → epoch
        self._decoder = self._make_decoder(decoder, segment_filter)
        self._order = Reorderer()
        self._closed = False
        self._final_stats: dict[str, int] = {}
        self._counter_error = False
        self._discarded = 0  # payload bytes drained but never taken (see close)
        self._prog = MirrorProgram(Build(
            engine, cpus, own_ports or (1, 0), requests_only,
            self._geometry.ringbuf_pages if transport == "ringbuf" else 0,
            self._geometry.wakeup, decap))
        try:
            try:
                self._prog.set_ports(ports)
            except ValueError as e:  # too many ports: a usage problem (exit 2)
                raise SourceError(str(e)) from None
            self._follower = Follower(self.spec, self._prog, tc_mode)
        except BaseException:
            self._prog.close()
            raise
        try:
            self._ring = self._open_ring()
        except BaseException:
            self._follower.close()
            self._prog.close()
            raise
        self._drain = self._make_drain(backlog_bytes)
        self._follower.start()

    def _make_decoder(self, kind: str, segment_filter: Callable[[Segment], bool] | None
                      ) -> EventDecoder | NativeDecoder:
        if kind != "python":
            try:
                return NativeDecoder(self._clock, segment_filter)
            except NativeUnavailable as e:
                if kind == "native":
                    raise SourceError(str(e)) from None
                log.warning("using the Python decoder (slower)", reason=str(e))
        return EventDecoder(self._clock, segment_filter)

    def _make_drain(self, budget: int) -> RingDrain | NativeDrain:
        """The native decoder's C drain thread (``pump.py``), or the Python one."""
        if isinstance(self._decoder, NativeDecoder):
            return NativeDrain(self._decoder, self._ring.addresses(), self._ring.poll_fd(),
                               BATCH_INTERVAL, budget)
        return RingDrain(self._ring, self._decoder.take, BATCH_INTERVAL, budget)

    def _start_drain(self) -> None:
        try:
            self._drain.start()
        except OSError as e:  # no thread for the C drain: the Python one does the job
            log.warning("native drain thread unavailable; draining from Python", error=str(e))
            self._drain = RingDrain(self._ring, self._decoder.take, BATCH_INTERVAL,
                                    self._drain.budget)
            self._drain.start()

    def _open_ring(self) -> RingBufReader | PerfReader:
        events = self._prog.events
        if self.transport == "ringbuf":
            return RingBufReader(events.fd, self._geometry.ringbuf_pages * os.sysconf(
                "SC_PAGE_SIZE"), self._decoder.drain_ringbuf)

        def install(cpu: int, fd: int) -> None:
            events.update(cpu.to_bytes(4, "little"), fd.to_bytes(4, "little"))

        try:
            return PerfReader(self._geometry.perf_pages, self._geometry.wakeup, install,
                              self._decoder.drain_perf)
        except PermissionError as e:  # the start-up check passed, the kernel did not
            raise SourceError(
                f"the kernel refused to lock the perf rings ({e.strerror}): grant "
                "CAP_IPC_LOCK, raise the memlock limit, or use a smaller --buffer-mib "
                "or --transport ringbuf") from None

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.mirror.handoff.HasHandoffs`: the ring drain's hand-off."""
        return self._drain.handoffs()

    def heartbeats(self) -> list[Heartbeat]:
        """:class:`agent.sources.HasHeartbeats`: the ring-drain thread's."""
        return [self._drain.heartbeat]

    @property
    def decoder(self) -> str:
        """``native`` or ``python``: the decoder in use."""
        return "native" if isinstance(self._decoder, NativeDecoder) else "python"

    @property
    def ifaces(self) -> list[str]:
        """The names of the interfaces attached now."""
        return [i.name for i in self._follower.interfaces()]

    def interfaces(self) -> list[AttachedIface]:
        """The interfaces attached now: name, ifindex, how, side (for ``/status``)."""
        return self._follower.interfaces()

    def attachments(self) -> list[dict[str, str | int]]:
        """:class:`agent.sources.HasAttachments`: :meth:`interfaces` as dicts."""
        return [i.as_dict() for i in self._follower.interfaces()]

    def tracked(self) -> dict[str, int]:
        """What the interface follower holds (:meth:`Follower.tracked`): for leak checks."""
        return self._follower.tracked()

    @property
    def ports(self) -> list[int]:
        return sorted(self._prog.ports)

    def set_ports(self, ports: list[int]) -> None:
        """Observe exactly ``ports`` from now on, without reloading; nothing on the ports
        that stay is lost. All or nothing: ValueError (PortLimitError: more than
        :data:`~agent.sources.MAX_PORTS`) with the previous ports kept
        (:meth:`MirrorProgram.set_ports`)."""
        self._prog.set_ports(ports)

    def kernel_ports(self) -> list[int]:
        """The ports in the kernel's map, read back: :attr:`ports`, unless a bug."""
        return sorted(self._prog.kernel_ports())

    # ---------------------------------------------------------------- source API

    def batches(self) -> Iterator[list[Segment]]:
        """Segments in kernel-timestamp order (``reorder.py``), each batch what the drain
        thread (``drain.py``) took from the rings since the last one, minus the newest
        ``REORDER_WINDOW`` seconds, held for the next batch in case another CPU was still
        writing older ones.

        Drains begin ``BATCH_INTERVAL`` apart: every per-batch cost downstream (sorting, one
        send per flow, waking the forward and writer threads, the shadow's reads) is then paid
        once per few thousand events, and a direction's packets of a batch are one Segment.
        The kernel wakes the drain sooner when a ring is ``FILL_FRACTION`` full (perf's
        watermark; the ring buffer program forces a wakeup), so a burst does not wait for the
        timer. Yields at least every ``BATCH_INTERVAL`` or so, an empty list when idle.
        """
        self._start_drain()
        while not self._closed:
            segs, drained_at = self._drain.take(2 * BATCH_INTERVAL)
            self._order.add(segs)
            yield self._order.release(drained_at + self._clock - REORDER_WINDOW)

    def drain(self) -> list[Segment]:
        """Everything still in the rings or held back (for a clean stop)."""
        self._order.add(self._drain.stop())
        self._ring.consume()
        self._order.add(self._decoder.take())
        return self._order.release_all()

    def stats(self) -> dict[str, int]:
        if self._closed:
            return self._final_stats
        d = self._decoder
        out = {"events": d.events, "coalesced": d.coalesced,
               "perf_lost_samples": d.lost_samples, "filtered": d.filtered,
               "ring_bytes": self._geometry.capacity, "ring_peak_bytes": max(
                   self._ring.peak_bytes, self._drain.peak_bytes),
               "drain_gap_max_ms": round(self._drain.gap_max * 1000),
               "drain_pauses": self._drain.pauses,
               "drain_discarded_bytes": self._discarded, "ringbuf_discarded": d.discarded,
               "records_malformed": d.malformed, "coalesce_no_slot": d.no_slot,
               **self._follower.stats()}
        try:
            out.update({f"kernel_{k}": v for k, v in self._prog.counters().items()})
        except BpfError as e:  # keep the rest; say (once) why these are missing
            if not self._counter_error:
                log.warning("cannot read the kernel counters", error=str(e))
            self._counter_error = True
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._final_stats = self.stats()
        # Drained but never taken (the run failed before drain()): counted, not silent.
        self._discarded += sum(len(seg.payload) for seg in self._drain.stop())
        self._final_stats["drain_discarded_bytes"] = self._discarded
        self._closed = True
        self._follower.close()
        self._ring.close()
        self._decoder.close()
        self._prog.close()
