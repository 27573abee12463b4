"""One memory budget: every buffer of the process derived from one limit (``--memory-limit``).

Pure arithmetic (:func:`derive`) plus one function that reads the host (:func:`host_limit`).

The limit
---------
``--memory-limit SIZE`` when given. Otherwise the memory cgroup's limit (v2 ``memory.max``, v1
``memory.limit_in_bytes``, the smallest on the way up, :func:`agent.sources.ebpf.privileges.
cgroup_memory_limit`) less 1/8 headroom; the headroom is what the cgroup is charged for
outside the process's own buffers: the page cache of the recording being written (dirty pages
cannot be reclaimed at once), socket buffers (charged on cgroup v2: a shadow that never reads
holds up to ``tcp_wmem`` per connection), and the short-lived compile child at start. Without a
cgroup limit: :data:`DEFAULT_LIMIT` (1 GiB, the DaemonSet's figure, so a host install behaves
as the pod does), but at most a quarter of MemTotal, so a small VM keeps room for the service
it watches.

What counts
-----------
The budget is resident memory (RSS), not only what the cgroup charges: the perf rings are not
charged to the memory cgroup (the kernel allocates them without accounting) but they are the
process's resident pages once written, and the node has to hold them, so they count in full.
The BPF ring buffer is charged; its data pages are mapped twice (so records never wrap) and
RSS counts both mappings, so it counts twice.

The derivation (``L`` = the limit; numbers for L = 896 MiB, a 1 GiB cgroup, on 2 CPUs)::

    base        = 64 MiB (interpreter, libraries; idle RSS is 41-42 MiB)
                  + 3 MiB per live source (the native decoder's 2.8 MiB)          =  67 MiB
    kernel      = perf: per-CPU ring x CPUs, the per-CPU size the old default
                  (16 MiB, less above 8 CPUs) but at most L/8 in all, a power of
                  two: min(16, 112/2) = 16 MiB x 2                                 =  32 MiB
                  (ringbuf: 2 x the one ring; afpacket: the socket's receive buffer)
    flow table  = max_flows x 1,640 B (~1.6 KiB per tracked flow); max_flows =
                  min(100,000, L/8 / 1,640 B) = 71,610                             = 112 MiB
    defrag      = IP fragments waiting for the rest of their datagram: Linux's own
                  bound (ipfrag_high_thresh, 4 MiB), at most L/64, at least 128 KiB
                  (one whole 64 KiB datagram and its bookkeeping): min(4, 14)      =   4 MiB
    flow pcaps  = only with --flow-pcap-dir (0 without): open files x (a 64 KiB
                  write buffer + 64 KiB of writer queue, + 288 KiB of zlib state with
                  --flow-pcap-gzip), the open files min(64, L/32 / that) but at least
                  4; + 400 B per tracked flow (its file name, counters):
                  64 x 128 KiB + 71,610 x 400 B (gzip: 64 x 416 KiB + ...)     = 35 MiB
                                                              (gzip: 53 MiB)
    pool        = L - base - kernel - flow table - defrag (- flow pcaps)           = 681 MiB
    slack       = pool x 2/5: what the shares below do not count (measured, next)  = 272 MiB
    buffers     = pool - slack, in four equal shares                              = 409 MiB
      drain_backlog     payload drained from the rings, not yet taken (pause)   = 102 MiB
      reassembly_total  out-of-order bytes across all flows (--max-buffer)      = 102 MiB
      record_queue      record data waiting for the disk (drop)                 = 102 MiB
      forward_total     bytes handed to the forward sink, not yet taken (drop)  = 102 MiB
    reassembly_flow = min(4 MiB, reassembly_total/16)                             =   4 MiB
    forward_flow    = min(8 MiB, forward_total/8)                                 =   8 MiB

The slack, measured (bench/overload_memory.py, 512 MiB: shares of 57.5 MiB before, 51.75
now; glibc's ``mallinfo2`` and tracemalloc sampled in the agent): idle, the interpreter holds
42 MiB resident, 12 MiB of it in malloc (inside ``base``). Under overload malloc's in-use
beyond what the four buffers held and that idle heap was 71 MiB at the median and up to
186 MiB (the drain's spare chunks, inside its share, included): the mirror thread's Python
copy of one drain take while the C chunks are still held (up to a drain share), the joined
copy a skipped hole releases while its pieces are still referenced (145 + 49 MiB of payload
objects traced at one peak; up to a reassembly share), and object headers (~200 B a segment
or chunk). So the slack holds two shares and a tenth
of the pool more: 2/5 (a third was exactly the two shares; a quarter measured 526 MiB peak
RSS against 512 MiB).

Allocator fragmentation is not in the slack: glibc kept up to 227 MiB of freed heap (508 MiB
of heap for 280 MiB in use) and never gave it back, so RSS reached 616 MiB against 512 MiB.
The memory guard (:mod:`agent.mirror.memory_guard`) gives it back (``malloc_trim``) above 80 %
of the limit and sheds load above 88 %: the measured truth behind this arithmetic.

An explicit value (``--buffer-mib``, ``--max-flows``, ``--max-buffer``, ``--max-flow-buffer``)
replaces its derived figure; the shares not given split what is left. When what is given does
not fit, or a share would be under :data:`MIN_SHARE`, :func:`derive` raises
:class:`BudgetError` with one line saying what does not fit (the CLI exits 2).

Offline (``transport="none"``) has no rings, no decoder and no drain: the same arithmetic with
those at 0 (the drain backlog too; the other shares stay quarters). The library default
(:func:`default`, what :class:`~agent.mirror.config.MirrorConfig` and
:class:`~agent.sources.ebpf.source.EbpfSource` use when given nothing) is the CLI's ``run`` default.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUFFERS", "DEFAULT_LIMIT", "Budget", "BudgetError", "default", "derive",
           "flow_pcap_bytes", "format_size", "host_limit", "parse_size"]

MIB = 1 << 20
#: The limit without a flag or a cgroup limit (at most a quarter of MemTotal).
DEFAULT_LIMIT = 1 << 30
#: Taken off a cgroup's limit for what the cgroup is charged outside the process (1/8).
HEADROOM_DIVISOR = 8
#: The origin of a default limit taken while this process is in a memory cgroup whose limit
#: it cannot read (its filesystem is not mounted here, e.g. under ``ip netns exec``).
UNREAD_CGROUP = "default; the memory cgroup's limit is not readable here"
#: The share of the pool left for what the buffers do not count (see above): 2/5.
SLACK_NUM, SLACK_DEN = 2, 5
#: Interpreter, libraries and metrics: idle RSS 41-42 MiB (docs/performance.md, bench/idle_rss.py).
BASE_BYTES = 64 * MIB
#: The native decoder's buffers (2.8 MiB), per live source.
DECODER_BYTES = 3 * MIB
#: One tracked flow: its table entry, two stream buffers and the sinks' per-flow state.
FLOW_BYTES = 1640
#: The flow cap when memory allows it.
MAX_FLOWS = 100_000
#: The smallest share a derived buffer may get.
MIN_SHARE = 4 * MIB
#: IP defragmentation (agent.decode.defrag): Linux's ipfrag_high_thresh, at most L/64, at
#: least one whole datagram (64 KiB) with its bookkeeping.
DEFRAG_BYTES = 4 * MIB
DEFRAG_MIN = 128 << 10
#: Per-flow caps when memory allows them.
REASSEMBLY_FLOW = 4 * MIB
FORWARD_FLOW = 8 * MIB
#: Per-flow pcap files (agent.sinks.flow_pcap): open files at most, each one's write buffer
#: (plus one packet past it), a gzip member's zlib state (deflate: 128 KiB window + 128 KiB
#: hash at memLevel 8, and its output), and per tracked flow its file name and counters.
FLOW_PCAP_FILES = 64
FLOW_PCAP_MIN_FILES = 4
FLOW_PCAP_BUFFER = 64 << 10
FLOW_PCAP_GZIP = 288 << 10
FLOW_PCAP_STATE = 400
#: AF_PACKET --buffer-mib default (the socket's receive buffer is 8 x this MiB).
AFPACKET_MIB = 8
TRANSPORTS = ("perf", "ringbuf", "afpacket", "none")
#: The budgets, as logged and as ``mirror_agent_budget_bytes{buffer=...}``.
BUFFERS = ("limit", "base", "kernel_rings", "flow_table", "defrag", "slack", "drain_backlog",
           "reassembly_total", "reassembly_flow", "record_queue", "forward_total",
           "forward_flow", "flow_pcap")


class BudgetError(ValueError):
    """The limit cannot hold what is asked for: one line saying what does not fit."""


@dataclass(frozen=True)
class Budget:
    """Every buffer's size in bytes (``buffer_mib``: per CPU, as ``--buffer-mib``)."""

    limit: int
    origin: str  # "--memory-limit", "cgroup", "default"
    transport: str
    buffer_mib: int
    base: int
    kernel_rings: int
    max_flows: int
    flow_table: int
    slack: int
    drain_backlog: int
    reassembly_total: int
    reassembly_flow: int
    record_queue: int
    forward_total: int
    forward_flow: int
    defrag: int = DEFRAG_BYTES
    """IP fragments held for reassembly (``DecodeConfig.defrag_bytes``)."""
    flow_pcap: int = 0
    """Per-flow pcap files (``--flow-pcap-dir``): their buffers and per-flow state; 0 without."""
    flow_pcap_files: int = 0
    """Per-flow pcap files open at once (0 without ``--flow-pcap-dir``)."""

    def as_dict(self) -> dict[str, int]:
        """``{buffer: bytes}`` for :data:`BUFFERS`, plus ``max_flows``."""
        out = {name: getattr(self, name) for name in BUFFERS}
        out["max_flows"] = self.max_flows
        return out

    def log_fields(self) -> dict[str, object]:
        """The start-up log line's fields: MiB with one decimal, the origin, max_flows."""
        out: dict[str, object] = {"origin": self.origin, "transport": self.transport,
                                  "buffer_mib": self.buffer_mib, "max_flows": self.max_flows}
        out.update({f"{n}_mib": round(getattr(self, n) / MIB, 1) for n in BUFFERS})
        return out


def parse_size(text: str) -> int:
    """``512MiB``, ``1GiB``, ``1G``, ``300M``, ``65536`` → bytes (binary units; ``K``/``M``/``G``
    are taken as KiB/MiB/GiB, as cgroups and systemd do); ValueError saying why."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise ValueError(f"{text!r} is not a size (e.g. 512MiB, 1GiB, or bytes)")
    scale = 1 << (10 * " KMGT".index(m.group(2).upper() or " "))
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return value


def format_size(n: int) -> str:
    """Bytes as the largest binary unit that keeps one decimal (``896 MiB``, ``1.5 GiB``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def host_limit(cgroup_limit: int | None, mem_total: int) -> tuple[int, str]:
    """(limit, origin) without ``--memory-limit``: the cgroup's limit less 1/8 headroom, else
    :data:`DEFAULT_LIMIT` but at most a quarter of ``mem_total``."""
    if cgroup_limit is not None:
        return cgroup_limit - cgroup_limit // HEADROOM_DIVISOR, "cgroup"
    return min(DEFAULT_LIMIT, mem_total // 4), "default"


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _ring_bytes(transport: str, mib: int, cpus: int, possible: int) -> int:
    """Resident bytes of the kernel buffers for ``mib`` (see the module doc)."""
    page = mmap.PAGESIZE

    def pow2_pages(n: int) -> int:  # as perf and the ring buffer round (privileges.ring_bytes)
        pages = max(1, n // page)
        return (1 << (pages - 1).bit_length()) * page

    if transport == "perf":
        return cpus * (pow2_pages(mib * MIB) + page)
    if transport == "ringbuf":
        return 2 * pow2_pages(mib * MIB * possible)
    if transport == "afpacket":
        # The socket's receive buffer (--buffer-mib x 8), which the kernel doubles for its
        # bookkeeping (SO_RCVBUF / SO_RCVBUFFORCE): up to twice that in queued skbs.
        return 2 * mib * 8 * MIB
    return 0


def flow_pcap_bytes(limit: int, flows: int, flow_pcap: str) -> tuple[int, int]:
    """(bytes, open files) of per-flow pcap files (``flow_pcap``: "" none, "pcap", "gzip")
    for ``limit`` and ``flows`` tracked flows (see the module doc)."""
    if not flow_pcap:
        return 0, 0
    per_file = 2 * FLOW_PCAP_BUFFER + (FLOW_PCAP_GZIP if flow_pcap == "gzip" else 0)
    files = max(FLOW_PCAP_MIN_FILES, min(FLOW_PCAP_FILES, limit // 32 // per_file))
    return files * per_file + flows * FLOW_PCAP_STATE, files


def derive(limit: int, *, cpus: int, possible_cpus: int | None = None,
           transport: str = "perf", origin: str = "--memory-limit",
           buffer_mib: int | None = None, max_flows: int | None = None,
           max_buffer: int | None = None, max_flow_buffer: int | None = None,
           flow_pcap: str = "") -> Budget:
    """Every budget from ``limit`` (see the module doc); explicit values win but must fit.
    ``flow_pcap``: "pcap" or "gzip" with ``--flow-pcap-dir`` (its buffers are taken first)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    possible = possible_cpus or cpus
    live = transport != "none"
    what = f"--memory-limit {format_size(limit)}" + (
        "" if origin == "--memory-limit" else f" ({origin})")

    base = BASE_BYTES + (DECODER_BYTES if live else 0)
    # Kernel rings: the given --buffer-mib, else the old default capped at L/8 in all.
    if not live:
        mib = 0
    elif buffer_mib is not None:
        mib = buffer_mib
    elif transport == "afpacket":
        mib = max(1, min(AFPACKET_MIB, _floor_pow2(limit // 8 // (8 * MIB))))
    else:
        per_cpu = max(4, min(16, 128 // max(1, cpus)))  # ebpf.default_buffer_mib
        share = 2 * possible if transport == "ringbuf" else cpus  # ringbuf: counted twice
        mib = max(1, min(per_cpu, _floor_pow2(limit // 8 // share // MIB)))
    rings = _ring_bytes(transport, mib, cpus, possible)
    # The flow table: max_flows x FLOW_BYTES, max_flows capped so it takes at most L/8.
    flows = max_flows if max_flows is not None else max(
        1, min(MAX_FLOWS, limit // 8 // FLOW_BYTES))
    table = flows * FLOW_BYTES
    defrag = max(DEFRAG_MIN, min(DEFRAG_BYTES, limit // 64))

    pcaps, pcap_files = flow_pcap_bytes(limit, flows, flow_pcap)
    pool = limit - base - rings - table - defrag - pcaps
    slack = max(0, pool) * SLACK_NUM // SLACK_DEN
    buffers = max(0, pool) - slack
    fixed = f"base {format_size(base)}"
    if rings:
        fixed += f" + kernel rings {format_size(rings)}"
        if buffer_mib is not None:
            fixed += f" (--buffer-mib {buffer_mib})"
    fixed += f" + flow table {format_size(table)} ({flows:,} flows"
    fixed += ", --max-flows)" if max_flows is not None else ")"
    fixed += f" + defragmentation {format_size(defrag)}"
    if pcaps:
        fixed += f" + flow pcap files {format_size(pcaps)}"
    need = 4 * MIN_SHARE
    if buffers < need:
        raise BudgetError(
            f"{what} is too small: {fixed} leave {format_size(max(0, buffers))} for buffers "
            f"(after 2/5 slack), at least {format_size(need)} needed; raise --memory-limit"
            + (" or lower --buffer-mib/--max-flows" if buffer_mib or max_flows else ""))
    share = buffers // 4
    if max_buffer is not None:
        rest = buffers - max_buffer
        if rest < 3 * MIN_SHARE:
            raise BudgetError(
                f"--max-buffer {format_size(max_buffer)} does not fit {what}: {fixed} leave "
                f"{format_size(buffers)} for buffers (after 2/5 slack), and the drain backlog, "
                f"record queue and forward hand-over need {format_size(3 * MIN_SHARE)} of it")
        share = rest // 3
        reassembly = max_buffer
    else:
        reassembly = share
    return Budget(
        limit=limit, origin=origin, transport=transport, buffer_mib=mib, base=base,
        kernel_rings=rings, max_flows=flows, flow_table=table, slack=slack,
        drain_backlog=share if live else 0, reassembly_total=reassembly,
        reassembly_flow=max_flow_buffer if max_flow_buffer is not None else min(
            REASSEMBLY_FLOW, reassembly // 16),
        record_queue=share, forward_total=share,
        forward_flow=min(FORWARD_FLOW, share // 8), defrag=defrag, flow_pcap=pcaps,
        flow_pcap_files=pcap_files)


def _mem_total(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 4 * DEFAULT_LIMIT


def for_host(memory_limit: int | None = None, transport: str = "perf",
             flow_pcap: str = "", **explicit: int | None) -> Budget:
    """:func:`derive` for this host: ``memory_limit`` or the cgroup's or default limit."""
    from agent.sources.ebpf.privileges import cgroup_memory_limit, unseen_memory_cgroup
    from agent.sources.ring.perfbuf import online_cpus, possible_cpus

    if memory_limit is not None:
        limit, origin = memory_limit, "--memory-limit"
    else:
        limit, origin = host_limit(cgroup_memory_limit(), _mem_total())
        if origin == "default" and unseen_memory_cgroup() is not None:
            origin = UNREAD_CGROUP
    try:
        cpus = len(online_cpus())
        possible = possible_cpus()
    except OSError:
        cpus = possible = os.cpu_count() or 1
    return derive(limit, cpus=cpus, possible_cpus=possible, transport=transport,
                  origin=origin, flow_pcap=flow_pcap, **explicit)


@functools.cache
def default(transport: str = "perf") -> Budget:
    """The budget when nothing is given (the library's defaults; ``run``'s too)."""
    return for_host(None, transport)
