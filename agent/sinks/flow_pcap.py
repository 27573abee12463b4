"""Per-flow pcap files (``--flow-pcap-dir``, after m-lab's packet-headers): one pcap file per
connection, with every packet the reassembler took into it.

Packets. Each captured :class:`~agent.model.Segment` is written as one IP packet (pcap link
type RAW: IPv4/IPv6 without a link layer, microsecond timestamps) with its real addresses,
ports, sequence and acknowledgement numbers, flags, window and payload, and correct IP and TCP
checksums. The packets are rebuilt from the segment whatever the source: the eBPF source
hands over no frames, only what the kernel program copied, and offline sources take the same
path (no frame bytes ride on a segment: that would cost every capture, saver or not). So IP
options, TCP options (MSS, SACK, timestamps, window scale), TTL, IP ID, VLAN and tunnel
headers are not kept; a payload above 65,495 bytes (a GSO packet) becomes several packets,
and bytes a source could not copy (``Segment.lost``) count in the packet's original length
but are absent. ``snaplen`` keeps only the first bytes of each packet (original length kept,
as tcpdump ``-s`` does). With anonymisation, addresses are anonymised in the packets (and the
checksums computed over them) and in the file names.

Files. Named ``YYYYmmddTHHMMSS.ffffff_<client ip>_<cport>_<server ip>_<sport>[_<tunnel>]
.pcap[.gz]``: the time (UTC) of the flow's first packet; the client is the side that sends to
an observed port (else the SYN's sender, else the first packet's); ``:`` in IPv6 addresses
and anything but letters, digits, ``.`` and ``-`` in the tunnel are written ``-``. A file is
created exclusively, never over another (``NAME.1.pcap``, ``NAME.2.pcap``, ... if it exists).
With ``gzip`` each file is gzip (level 1) and every time it is opened again it gets another
gzip member, which gzip readers (Python, zcat, tshark) read as one stream.

Times. A classic pcap record holds unsigned 32-bit seconds and microseconds: 1970-01-01 to
2106-02-07T06:28:15.999999 UTC. A packet time outside that (a capture's damaged or absurd
timestamp: year 3000, ``2**63`` ns, NaN) is clamped to the nearest end, in the packet and in
a file name, and counted (``packets_clamped``); the packet is kept, since its bytes are in
the connection the other sinks got, and only its time is lost, which was wrong already.

Threads. The files are written on a thread of their own (:mod:`agent.sinks.flow_pcap_files`:
the open-file bound, buffers, reopening, faults). This side, on the capture thread, names
each flow, turns its packets into pcap records and hands them over through a bounded queue
(:attr:`FlowPcapConfig.queue_budget` bytes), flow by flow, in pieces of about
``buffer_bytes``. Live (:attr:`FlowPcapConfig.live`) it never waits: when the queue is
full, the flow is dropped whole: the refused packets (``packets_dropped_queue_full``) and
every later one of that flow (``packets_dropped_flow_dropped``) are counted, not saved; its
file keeps what came before (and is not counted completed). Offline it waits for room
instead: nothing is dropped, and a run takes as long as the disk needs. Per flow, only its
name and two flags are kept here until its end (the reassembler's
:class:`~agent.model.FlowEnd`). Packets after a flow's end (the last ACK of a close, a late
retransmission) belong to no flow: counted (``packets_unattributed``), not saved.
:meth:`FlowPcapSaver.close` writes everything handed over and closes every file before it
returns (end of input, SIGTERM).

Faults stay local: a file that cannot be created or written costs its flow only
(``files_failed``, ``packets_lost``), logged once per outage; a full queue costs the flows
it refuses (logged once per outage). Neither makes the run degraded (exit 3).
"""

from __future__ import annotations

import datetime
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.mirror.handoff import HandoffStats
from agent.model import ACK, FIN, SYN, Segment, format_ip
from agent.sinks.flow_pcap_files import FlowPcapWriter, Item
from agent.sinks.outage import OutageLog

__all__ = ["LINKTYPE_RAW", "MIN_SNAPLEN", "PCAP_TIME_MAX", "FlowPcapConfig", "FlowPcapSaver",
           "flow_name", "ip_packets", "pcap_time"]

log = structlog.get_logger("agent.flow_pcap")

LINKTYPE_RAW = 101
#: The snaplen in a file's header when packets are kept whole.
MAX_SNAPLEN = 262144
#: The smallest ``snaplen``: an IPv6 and a TCP header.
MIN_SNAPLEN = 60
_MAX_PIECE = 65535 - 40  # payload bytes per packet: IPv4's total length holds 40 of headers
_M32 = 0xFFFFFFFF
#: The last time (seconds since 1970, UTC) a classic pcap record holds: 2106-02-07T06:28:15.999999.
PCAP_TIME_MAX = _M32 + 0.999999
_LAST_US = _M32 * 1_000_000 + 999_999
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_REC = struct.Struct("<IIII")
_TCP = struct.Struct("!HHIIBBHHH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
#: Why packets are not saved (``packets_dropped_<reason>``; agent/metrics.py).
DROP_REASONS = ("queue_full", "flow_dropped")
#: The counters the capture side writes (see :mod:`agent.metrics`, stage ``flowpcap``).
_CAPTURE_COUNTERS = ("packets_unattributed", "packets_clamped", "packets_truncated",
                     *(f"packets_dropped_{r}" for r in DROP_REASONS))


@dataclass(frozen=True, slots=True)
class FlowPcapConfig:
    """Where the files go and what bounds them (see the module docstring)."""

    directory: Path
    snaplen: int = 0
    """Bytes kept of each packet (from its IP header on); 0: whole packets."""
    gzip: bool = False
    max_open: int = 64
    """Files open at once (the budget's ``flow_pcap_files``)."""
    buffer_bytes: int = 64 << 10
    """Bytes an open file buffers before they are written."""
    queue_bytes: int = 0
    """Bytes of records waiting for the writer thread at most; 0: :attr:`queue_budget`'s
    default."""
    live: bool = False
    """A live capture: when the queue is full, flows are dropped (counted) and the capture
    thread never waits. Not live (offline, the library's default, as
    :attr:`~agent.mirror.config.MirrorConfig.record_in_background`): the capture thread waits for
    room instead, so every packet is saved, as fast as the disk takes them."""

    def __post_init__(self) -> None:
        if self.snaplen and not MIN_SNAPLEN <= self.snaplen <= MAX_SNAPLEN:
            raise ValueError(f"flow pcap snaplen {self.snaplen} is not 0 (whole packets) or "
                             f"{MIN_SNAPLEN}-{MAX_SNAPLEN}")
        if self.max_open < 1 or self.buffer_bytes < 1:
            raise ValueError("flow pcap max_open and buffer_bytes must be >= 1")
        if self.queue_bytes and self.queue_bytes < self.buffer_bytes:
            raise ValueError("flow pcap queue_bytes must be 0 (default) or hold one "
                             "buffer_bytes piece")

    @property
    def queue_budget(self) -> int:
        """Bytes of pcap records (16-byte record headers, rebuilt IP and TCP headers and the
        payload kept) that may wait for the writer thread: ``queue_bytes``, else
        ``max_open x buffer_bytes``.

        The default is the budget's own (agent/mirror/budget.py ``flow_pcap``: per open file a
        64 KiB write buffer plus 64 KiB for "one packet past it"). Written on the capture
        thread, a buffer could hold a packet past its 64 KiB; the writer thread's buffers
        never do (longer writes go through), so that second 64 KiB per file is the queue's:
        64 x 64 KiB = 4 MiB (4,194,304 bytes) with the default 64 files, 4 x 64 KiB =
        256 KiB at the smallest budget (4 files). 4 MiB holds 34 ms of saved packets at
        1 Gbit/s (125 MB/s) and 0.34 s at 100 Mbit/s: the slow writes, opens and closes of a
        busy disk pass unnoticed; a disk stalled for longer costs whole flows, counted.
        Not counted: ~150 B of objects per item (one per flow per batch, or per
        ``buffer_bytes`` of records), which the budget's slack holds."""
        return self.queue_bytes or self.max_open * self.buffer_bytes

    def check_directory(self) -> None:
        """ValueError (one line, naming ``--flow-pcap-dir``) unless the directory exists and
        this process may create files in it."""
        d = self.directory
        if not d.is_dir():
            raise ValueError(f"--flow-pcap-dir {d}: not an existing directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise ValueError(f"--flow-pcap-dir {d}: this process may not create files in it")


# ---------------------------------------------------------------- packets


def _csum(*parts: bytes) -> int:
    """The Internet checksum of ``parts`` concatenated (all but the last of even length): a
    big-endian number is congruent to the sum of its 16-bit words modulo 0xFFFF."""
    total = 0
    for p in parts:
        total += int.from_bytes(p, "big") << (8 if len(p) % 2 else 0)
    s = total % 0xFFFF
    return ~(s or 0xFFFF) & 0xFFFF


def _packet(src: bytes, dst: bytes, seg: Segment, seq: int, flags: int, payload: bytes,
            lost: int) -> tuple[bytes, int]:
    """(the IP packet, its original length) of one piece of ``seg``."""
    tcp = _TCP.pack(seg.src_port, seg.dst_port, seq & _M32, seg.ack & _M32, 5 << 4,
                    flags & 0xFF, seg.window & 0xFFFF, 0, 0)
    n = len(tcp) + len(payload)
    wire = min(0xFFFF, n + lost)
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, n)
        ip = _IP4.pack(0x45, 0, min(0xFFFF, 20 + wire), 0, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    else:
        pseudo = src + dst + struct.pack("!I3xB", n, 6)
        ip = _IP6.pack(6 << 28, wire, 6, 64, src, dst)
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo, tcp, payload)) + tcp[18:]
    return b"".join((ip, tcp, payload)), len(ip) + 20 + len(payload) + lost


def ip_packets(seg: Segment, anonymize: Callable[[bytes], bytes] | None = None,
               ) -> list[tuple[bytes, int]]:
    """The IP packets (with their original lengths) that stand for ``seg``: one, or several
    for a payload above 65,495 bytes (FIN on the last only); addresses anonymised first."""
    src, dst = seg.src_ip, seg.dst_ip
    if anonymize is not None:
        src, dst = anonymize(src), anonymize(dst)
    payload = seg.payload
    if len(payload) <= _MAX_PIECE:
        return [_packet(src, dst, seg, seg.seq, seg.flags, payload, seg.lost)]
    out = []
    last = (len(payload) - 1) // _MAX_PIECE * _MAX_PIECE
    for i in range(0, len(payload), _MAX_PIECE):
        flags = seg.flags if i == last else seg.flags & ~FIN
        out.append(_packet(src, dst, seg, seg.seq + i, flags, payload[i : i + _MAX_PIECE],
                           seg.lost if i == last else 0))
    return out


def _file_header(snaplen: int) -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen or MAX_SNAPLEN,
                       LINKTYPE_RAW)


# ---------------------------------------------------------------- times and names


def pcap_time(ts: float) -> tuple[tuple[int, int], bool]:
    """((seconds, microseconds), clamped) of ``ts`` (seconds since 1970, UTC) as a classic
    pcap record holds it: within 0 and :data:`PCAP_TIME_MAX`; a time outside (negative,
    NaN, past 2106, infinite, or rounding past the last microsecond) is clamped to the
    nearest end, and ``clamped`` is True."""
    if not ts >= 0.0:  # negative or NaN
        return (0, 0), True
    if ts > PCAP_TIME_MAX:
        return (_M32, 999_999), True
    us = round(ts * 1_000_000)
    if us > _LAST_US:
        return (_M32, 999_999), True
    sec, usec = divmod(us, 1_000_000)
    return (sec, usec), False


def flow_name(ts: float, client: tuple[bytes, int], server: tuple[bytes, int],
              tunnel: str = "", gz: bool = False) -> str:
    """The file name of a flow first seen at ``ts`` (see the module docstring; the time as
    :func:`pcap_time` saves it, so any ``ts`` names a file); addresses are packed, already
    anonymised if they should be."""
    (sec, usec), _ = pcap_time(ts)
    when = _EPOCH + datetime.timedelta(seconds=sec, microseconds=usec)
    parts = [when.strftime("%Y%m%dT%H%M%S.%f"), format_ip(client[0]).replace(":", "-"),
             str(client[1]), format_ip(server[0]).replace(":", "-"), str(server[1])]
    if tunnel:
        parts.append(_UNSAFE.sub("-", tunnel))
    return "_".join(parts) + (".pcap.gz" if gz else ".pcap")


def _client_first(seg: Segment, ports: frozenset[int]) -> bool:
    """Is ``seg``'s sender the client? (It sends to an observed port, or sends a SYN, or,
    with neither side telling, it is the first packet's sender.)"""
    if seg.dst_port in ports:
        return True
    if seg.src_port in ports:
        return False
    return not (seg.flags & SYN and seg.flags & ACK)


def _pieces(seg: Segment) -> int:
    """How many packets stand for ``seg`` (see :func:`ip_packets`)."""
    return max(1, math.ceil(len(seg.payload) / _MAX_PIECE))


# ---------------------------------------------------------------- the capture side


@dataclass(slots=True)
class _Flow:
    """A flow the capture side knows: its file's name; whether any of it was handed over,
    and whether it is dropped (a piece of it did not fit the queue)."""

    name: str
    sent: bool = False
    dropped: bool = False


@dataclass(slots=True)
class _Records:
    """A piece of a flow's pcap records, with what it holds (``end``: the index of the
    segment after its last)."""

    data: bytearray = field(default_factory=bytearray)
    packets: int = 0
    packet_bytes: int = 0
    clamped: int = 0
    truncated: int = 0
    end: int = 0


class FlowPcapSaver:
    """Writes each flow's packets to its own pcap file (see the module docstring).

    ``ports()`` gives the observed ports now (they tell the client in a file's name);
    ``anonymize`` rewrites every address first. The mirror's loop (the capture thread)
    calls :meth:`packets` and :meth:`flow_end` in capture order, :meth:`close` at the end.
    Live, :meth:`packets` and :meth:`flow_end` never wait for the disk (offline they wait
    for room in the queue); :meth:`close` waits for everything to be written.
    :meth:`stats` may be called from any thread.
    """

    def __init__(self, config: FlowPcapConfig, ports: Callable[[], frozenset[int]],
                 anonymize: Callable[[bytes], bytes] | None = None) -> None:
        self.config = config
        self._ports = ports
        self._anonymize = anonymize
        self._flows: dict[int, _Flow] = {}
        self._writer = FlowPcapWriter(config, _file_header(config.snaplen))
        self._outage = OutageLog(log, "flow pcap files cannot keep up; dropping whole flows "
                                 "(counted)", "flow pcap files keep up again",
                                 directory=str(config.directory))
        self._dropping = False  # the queue refused the latest piece
        self.counters: dict[str, int] = dict.fromkeys(_CAPTURE_COUNTERS, 0)

    @property
    def open_files(self) -> int:
        """Files open now (at most ``config.max_open``)."""
        return self._writer.open_files

    def packets(self, segments: Sequence[Segment], flow_ids: Sequence[int]) -> None:
        """Save a batch: ``flow_ids[i]`` is the flow ``segments[i]`` went into (0: none)."""
        groups: dict[int, list[Segment]] = {}
        unattributed = 0
        for seg, fid in zip(segments, flow_ids, strict=True):
            if fid:
                groups.setdefault(fid, []).append(seg)
            else:
                unattributed += 1
        self.counters["packets_unattributed"] += unattributed
        for fid, segs in groups.items():
            flow = self._flows.get(fid)
            if flow is None:
                flow = self._flows[fid] = _Flow(self._name(segs[0]))
            if flow.dropped:
                self.counters["packets_dropped_flow_dropped"] += sum(map(_pieces, segs))
            else:
                self._hand_over(fid, flow, segs)

    def flow_end(self, flow_id: int) -> None:
        """The flow is over: its file is completed and closed (nothing more is kept)."""
        flow = self._flows.pop(flow_id, None)
        if flow is not None and flow.sent:
            self._writer.put(Item(flow_id, flow.name, end=True, complete=not flow.dropped))

    def close(self) -> None:
        """Write everything handed over and close every file (end of the run; flows not
        ended keep what was saved); waits for the writer thread."""
        self._flows.clear()
        self._writer.close()

    def stats(self) -> dict[str, int]:
        """The counters (see :mod:`agent.metrics`, stage ``flowpcap``) and ``open_files``."""
        return {**self.counters, **self._writer.stats()}

    def handoffs(self) -> list[HandoffStats]:
        """:class:`agent.mirror.handoff.HasHandoffs`: the writer thread's queue."""
        return [self._writer.handoff_stats()]

    def _name(self, seg: Segment) -> str:
        """The file name of a flow whose first packet is ``seg``."""
        client, server = (seg.src_ip, seg.src_port), (seg.dst_ip, seg.dst_port)
        if not _client_first(seg, self._ports()):
            client, server = server, client
        if self._anonymize is not None:
            client = (self._anonymize(client[0]), client[1])
            server = (self._anonymize(server[0]), server[1])
        return flow_name(seg.ts, client, server, seg.tunnel, self.config.gzip)

    def _hand_over(self, fid: int, flow: _Flow, segs: list[Segment]) -> None:
        """Hand ``segs``' records over in pieces; at the first piece refused the flow is
        dropped: that piece and the rest counted, not saved."""
        c = self.counters
        for rec in self._records(segs):
            if self._writer.put(Item(fid, flow.name, rec.data, rec.packets, rec.packet_bytes)):
                flow.sent = True
                c["packets_clamped"] += rec.clamped
                c["packets_truncated"] += rec.truncated
                if self._dropping:
                    self._dropping = False
                    self._outage.recovered()
                continue
            flow.dropped = True
            c["packets_dropped_queue_full"] += rec.packets
            c["packets_dropped_flow_dropped"] += sum(map(_pieces, segs[rec.end:]))
            self._dropping = True
            self._outage.failed("queue_full", queue_bytes=self.config.queue_budget)
            return

    def _records(self, segs: list[Segment]) -> Iterator[_Records]:
        """``segs`` as pcap records, in pieces of about ``buffer_bytes`` (one more packet
        at most), so that any piece fits an empty queue."""
        snap, limit, anon = self.config.snaplen, self.config.buffer_bytes, self._anonymize
        rec = _Records()
        for i, seg in enumerate(segs):
            (sec, usec), clamped = pcap_time(seg.ts)
            rec.clamped += clamped
            for pkt, wire in ip_packets(seg, anon):
                if snap and len(pkt) > snap:
                    pkt = pkt[:snap]
                    rec.truncated += 1
                rec.data += _REC.pack(sec, usec, len(pkt), wire)
                rec.data += pkt
                rec.packets += 1
                rec.packet_bytes += len(pkt)
            rec.end = i + 1
            if len(rec.data) >= limit and rec.end < len(segs):
                yield rec
                rec = _Records()
        yield rec
