"""Live capture with the eBPF program in ``bpf/``: events from a perf buffer → Segments.

The kernel keeps only the observed ports' packets that carry payload, SYN, FIN or RST and
copies payload in pieces of up to 32 KiB, so 64 KiB GSO/GRO packets arrive whole. Transport is
a per-CPU perf buffer (default) or one BPF ring buffer (``transport="ringbuf"``, kernel 5.8+).
Both are read straight from their mmaps (``perfbuf.py``, ``ringbuf.py``), not through a ctypes
callback per record, and records become Segments in ``events.py``, which joins a direction's
in-order payload. The reader drains on a 20 ms timer, sooner when the kernel wakes it because
a buffer is a quarter full, so a lone request still arrives within ~20 ms and bulk traffic
never waits for the timer.
Losses (perf lost records, kernel counters) reach :meth:`stats`.
"""

from __future__ import annotations

import bisect
import importlib.util
import os
import threading
import time
from collections.abc import Callable, Iterator
from operator import attrgetter
from pathlib import Path

import structlog

from agent.capture import SourceError, privileges
from agent.capture.attach import Attachment, XdpAttachment, attach_tc
from agent.capture.bpfsys import SCHED_CLS, XDP, BpfError
from agent.capture.events import EventDecoder
from agent.capture.layout import BPF_DIR, COUNTERS
from agent.capture.loader import LoadedProgram, LoadError, load
from agent.capture.native import NativeDecoder, NativeUnavailable
from agent.capture.perfbuf import PerfReader, online_cpus, possible_cpus, ring_bytes
from agent.capture.ringbuf import RingBufReader
from agent.model import Segment

__all__ = ["BPF_DIR", "DECODERS", "TRANSPORTS", "EbpfSource", "check_environment",
           "default_buffer_mib"]

log = structlog.get_logger("agent.ebpf")

#: Seconds of the newest events held back to merge other CPUs' older events in order.
REORDER_WINDOW = 0.002
#: Seconds between drains at least (see :meth:`EbpfSource.batches`).
BATCH_INTERVAL = 0.02
#: A ring this full wakes the reader before the timer does.
FILL_FRACTION = 0.25
#: Payload bytes drained but not yet taken by the mirror before the drain pauses.
BACKLOG_BYTES = 256 << 20
_ts = attrgetter("ts")
TRANSPORTS = ("perf", "ringbuf")
DECODERS = ("auto", "native", "python")


def default_buffer_mib(cpus: int) -> int:
    """MiB of kernel buffer per CPU when not given: 16, less on hosts with many CPUs (where
    traffic spreads over more rings) so that all rings together stay near 128 MiB, never
    under 4 MiB per CPU."""
    return max(4, min(16, 128 // max(1, cpus)))


def check_environment(ebpf: bool = True, modules: Path = Path("/lib/modules"), *,
                      buffer_mib: int | None = None, transport: str = "perf") -> None:
    """Start-up checks with the exact fix; raises SourceError (exit 2) when one fails.

    In order: the ``buffer_mib`` range (None: the default), capabilities (whatever the uid),
    locked memory for ``transport``'s rings, bcc, kernel headers (``privileges.py``).
    ``ebpf=False`` checks only what the AF_PACKET engine needs.
    """
    host = privileges.Host.read()
    mib = default_buffer_mib(host.cpus) if buffer_mib is None else buffer_mib
    if ebpf or buffer_mib is not None:
        privileges.check_buffer_mib(host, mib, ebpf, transport, default=buffer_mib is None)
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

    ``requests_only``: service→client payload is not copied in the kernel (only those
    packets' SYN/FIN/RST come through, without payload); for mirrors that do not track
    responses (``MirrorConfig.track_responses=False``).

    ``decoder``: how perf records become Segments: ``native`` (``perf_decode.c``, SourceError
    if it cannot be built), ``python`` (``events.py``) or ``auto`` (native if it can be had,
    else Python with a warning). The ring buffer transport always uses the Python decoder.
    """

    live = True

    def __init__(self, ifaces: list[str], ports: list[int], engine: str = "tc",
                 buffer_mib: int | None = None,
                 segment_filter: Callable[[Segment], bool] | None = None,
                 transport: str = "perf", requests_only: bool = False,
                 decoder: str = "auto", own_ports: tuple[int, int] | None = None,
                 tc_mode: str = "auto") -> None:
        if engine not in ("tc", "xdp"):
            raise SourceError(f"unknown engine {engine!r}")
        if transport not in TRANSPORTS:
            raise SourceError(f"unknown transport {transport!r}")
        if decoder not in DECODERS:
            raise SourceError(f"unknown decoder {decoder!r}")
        self.ifaces = ifaces
        self.ports = ports
        self.engine = engine
        self.transport = transport
        self.requests_only = requests_only
        #: Packets with a port in this range are never captured (the forward sink's source
        #: ports: the agent's own shadow connections). ``(1, 0)``, an empty range, for None.
        self.own_ports = own_ports or (1, 0)
        self._cpus = possible_cpus()
        page = os.sysconf("SC_PAGE_SIZE")
        if buffer_mib is None:
            buffer_mib = default_buffer_mib(len(online_cpus()))
        self.buffer_mib = buffer_mib
        self._perf_pages = privileges.perf_ring_size(buffer_mib) // page
        # The ring buffer is shared: as much as all per-CPU perf buffers, a power of two.
        self._ring_pages = privileges.ringbuf_size(buffer_mib, self._cpus) // page
        #: Bytes one ring holds (perf: per CPU, and one CPU may get all the traffic).
        self._ring_capacity = (self._ring_pages if transport == "ringbuf"
                               else self._perf_pages) * page
        # Bytes written to a ring (perf) or by one CPU (ring buffer) that wake the reader.
        self._wakeup = int(self._ring_capacity * FILL_FRACTION) // (
            self._cpus if transport == "ringbuf" else 1)
        self._attached: list[Attachment] = []
        self._held: list[Segment] = []
        self._gap_max = 0.0  # longest time between the starts of two drains, seconds
        self._cv = threading.Condition()
        self._inbox: list[list[Segment]] = []  # drained, not yet taken by batches()
        self._backlog = 0  # payload bytes in _inbox
        self._drained_at = 0.0  # monotonic start of the latest drain in _inbox
        self._drainer: threading.Thread | None = None
        self._stop_drain = False
        self._drain_error: BaseException | None = None
        self._closed = False
        self._final_stats: dict[str, int] = {}
        self._counter_error = False
        self._ring: RingBufReader | PerfReader | None = None
        self._clock = time.time() - time.monotonic()  # ktime (CLOCK_MONOTONIC) → epoch
        self._decoder = self._make_decoder(decoder, segment_filter)
        self._prog = self._load(tc_mode)

    def _make_decoder(self, kind: str, segment_filter: Callable[[Segment], bool] | None
                      ) -> EventDecoder | NativeDecoder:
        if self.transport == "perf" and kind != "python":
            try:
                return NativeDecoder(self._clock, ring_bytes(self._perf_pages), segment_filter)
            except NativeUnavailable as e:
                if kind == "native":
                    raise SourceError(str(e)) from None
                log.warning("using the Python decoder (slower)", reason=str(e))
        return EventDecoder(self._clock, segment_filter)

    @property
    def decoder(self) -> str:
        """``native`` or ``python``: the decoder in use."""
        return "native" if isinstance(self._decoder, NativeDecoder) else "python"

    def _load(self, tc_mode: str) -> LoadedProgram:
        """Compile and load in a child (``loader.py``: this process never holds LLVM), set
        the ports, attach, and open the rings."""
        lo, hi = self.own_ports
        cflags = [f"-I{BPF_DIR}", f"-DMAX_CPUS={self._cpus}", "-Wno-macro-redefined",
                  f"-DMIRROR_OWN_PORT_LO={lo}", f"-DMIRROR_OWN_PORT_HI={hi}"]
        if self.requests_only:
            cflags.append("-DMIRROR_REQUESTS_ONLY")
        if self.transport == "ringbuf":
            cflags += ["-DMIRROR_RINGBUF", f"-DMIRROR_RINGBUF_PAGES={self._ring_pages}",
                       f"-DMIRROR_WAKEUP_BYTES={self._wakeup}"]
        funcs = ([("mirror_tc_ingress", SCHED_CLS), ("mirror_tc_egress", SCHED_CLS)]
                 if self.engine == "tc" else [("mirror_xdp", XDP)])
        try:
            prog = load(BPF_DIR / "mirror.bpf.c", cflags, funcs,
                        ["ports", "counters", "events"])
        except LoadError as e:
            hint = (" (the BPF ring buffer needs kernel 5.8+; try --transport perf)"
                    if self.transport == "ringbuf" else "")
            raise SourceError(f"cannot compile/load bpf/mirror.bpf.c: {e}{hint}") from None
        try:
            ports = prog.maps["ports"]
            for p in self.ports:
                ports.update(p.to_bytes(2, "little"), b"\x01")
            self._attach(prog, tc_mode)
            events = prog.maps["events"]
            if self.transport == "ringbuf":
                assert isinstance(self._decoder, EventDecoder)
                self._ring = RingBufReader(events.fd,
                                           self._ring_pages * os.sysconf("SC_PAGE_SIZE"),
                                           self._decoder.record)
            else:

                def install(cpu: int, fd: int) -> None:
                    events.update(cpu.to_bytes(4, "little"), fd.to_bytes(4, "little"))

                try:
                    self._ring = PerfReader(self._perf_pages, self._wakeup, install,
                                            self._decoder.consume_perf)
                except PermissionError as e:  # the start-up check passed, the kernel did not
                    raise SourceError(
                        f"the kernel refused to lock the perf rings ({e.strerror}): grant "
                        "CAP_IPC_LOCK, raise the memlock limit, or use a smaller --buffer-mib "
                        "or --transport ringbuf") from None
        except BaseException:
            self._detach()
            prog.close()
            raise
        return prog

    def _attach(self, prog: LoadedProgram, tc_mode: str) -> None:
        for name in self.ifaces:
            if self.engine == "tc":
                fn = prog.functions
                self._attached.append(attach_tc(name, fn["mirror_tc_ingress"],
                                                fn["mirror_tc_egress"], tc_mode))
            else:
                x = XdpAttachment(name, prog.functions["mirror_xdp"])
                x.attach()
                self._attached.append(x)

    # ---------------------------------------------------------------- source API

    def batches(self) -> Iterator[list[Segment]]:
        """Segments in kernel-timestamp order.

        Each CPU has its own ring, so one drain can return a connection's later packets (from
        one CPU) before its earlier ones (from another). Every drain is merged by timestamp,
        and segments from the last ``REORDER_WINDOW`` seconds are held for the next drain, in
        case another CPU was still writing older ones.

        The rings are drained by a thread of their own (``ring-drain``), so that the time
        the mirror spends on a batch is not time the kernel has to hold the bytes: the
        decoder's copying runs in C without the GIL, and the drained segments wait in user
        space (up to ``BACKLOG_BYTES``; past that the drain pauses and the kernel's drops are
        counted) until this generator takes them.

        Drains begin ``BATCH_INTERVAL`` apart: every per-batch cost downstream (sorting, one
        send per flow, waking the forward and writer threads, the shadow's reads) is then paid
        once per few thousand events, and a direction's packets of a batch are one Segment.
        The kernel wakes the drain sooner when a ring is ``FILL_FRACTION`` full (perf's
        watermark; the ring buffer program forces a wakeup), so a burst does not wait for the
        timer. Yields at least every ``BATCH_INTERVAL`` or so, an empty list when idle.
        """
        if self._drainer is None:
            self._drainer = threading.Thread(target=self._drain_loop, name="ring-drain",
                                             daemon=True)
            self._drainer.start()
        cv = self._cv
        while not self._closed:
            with cv:
                if not self._inbox and self._drain_error is None:
                    cv.wait(2 * BATCH_INTERVAL)
                drained_at = self._drained_at
            if self._drain_error is not None:
                raise self._drain_error
            self._take_inbox()
            yield self._release(drained_at + self._clock - REORDER_WINDOW)

    def _drain_loop(self) -> None:
        """The ``ring-drain`` thread: consume the rings, hand the segments to batches()."""
        ring, cv = self._ring, self._cv
        assert ring is not None
        last = time.monotonic()
        try:
            while not self._stop_drain:
                wait = last + BATCH_INTERVAL - time.monotonic()
                if wait > 0:
                    ring.wait(wait)
                with cv:
                    while self._backlog > BACKLOG_BYTES and not self._stop_drain:
                        cv.wait(BATCH_INTERVAL)
                    if self._stop_drain:
                        break
                started = time.monotonic()
                self._gap_max = max(self._gap_max, started - last)
                last = started
                ring.consume()
                segs = self._decoder.take()
                size = sum(len(seg.payload) for seg in segs)
                with cv:
                    self._inbox.append(segs)
                    self._backlog += size
                    self._drained_at = started
                    cv.notify_all()
        except BaseException as e:  # handed to the mirror thread by batches()
            with cv:
                self._drain_error = e
                cv.notify_all()

    def _take_inbox(self) -> None:
        """Move what the drain thread handed over to the held segments (and unpause it)."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
            self._backlog = 0
            self._cv.notify_all()
        for segs in inbox:
            self._held += segs

    def _stop_drainer(self) -> None:
        if self._drainer is None:
            return
        with self._cv:
            self._stop_drain = True
            self._cv.notify_all()
        self._drainer.join()
        self._drainer = None

    def _release(self, cutoff: float) -> list[Segment]:
        pending = self._held
        pending.sort(key=_ts)
        i = bisect.bisect_right(pending, cutoff, key=_ts)
        self._held = pending[i:]
        return pending[:i]

    def drain(self) -> list[Segment]:
        """Everything still in the rings or held back (for a clean stop)."""
        self._stop_drainer()
        self._take_inbox()
        if self._ring is not None:
            self._ring.consume()
            self._held += self._decoder.take()
        return self._release(float("inf"))

    def stats(self) -> dict[str, int]:
        if self._closed:
            return self._final_stats
        d = self._decoder
        out = {"events": d.events, "coalesced": d.coalesced,
               "perf_lost_samples": d.lost_samples, "filtered": d.filtered,
               "ring_bytes": self._ring_capacity,
               "ring_peak_bytes": self._ring.peak_bytes if self._ring is not None else 0,
               "drain_gap_max_ms": round(self._gap_max * 1000)}
        try:
            out.update(self._kernel_counters())
        except BpfError as e:  # keep the rest; say (once) why these are missing
            if not self._counter_error:
                log.warning("cannot read the kernel counters", error=str(e))
            self._counter_error = True
        return out

    def _kernel_counters(self) -> dict[str, int]:
        """The program's per-CPU counters, summed over CPUs."""
        counters = self._prog.maps["counters"]
        if counters.max_entries != len(COUNTERS):  # cannot be: both come from the header
            raise BpfError(0, f"{counters.max_entries} kernel counters, {len(COUNTERS)} names")
        out = {}
        for i, (name, _help) in enumerate(COUNTERS):
            raw = counters.lookup(i.to_bytes(4, "little"), self._cpus) or b""
            # One u64 per possible CPU (per-CPU values are 8-byte aligned).
            out[f"kernel_{name}"] = sum(int.from_bytes(raw[c:c + 8], "little")
                                        for c in range(0, len(raw), 8))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._final_stats = self.stats()
        self._closed = True
        self._stop_drainer()
        self._detach()
        if self._ring is not None:
            self._ring.close()
        self._prog.close()

    def _detach(self) -> None:
        for a in reversed(self._attached):
            try:
                a.detach()
            except Exception as e:  # keep going: every attachment must be tried
                log.error("detach failed", iface=a.ifname, error=str(e))
        self._attached.clear()
