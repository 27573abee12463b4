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

Bounds. At most ``max_open`` files are open: writing to another one closes the least
recently written (its buffer flushed), and a closed file is opened again in append mode when
its flow has more packets (a pcap file takes appended records as they are). Each open file
buffers at most ``buffer_bytes`` (plus one packet) before it is written; a closed file holds
no buffer. A batch's packets are written flow by flow, so a file opens at most once per
batch. Per flow, only its name and counters are kept until its end; a flow ends (its file
complete and closed) with the reassembler's :class:`~agent.model.FlowEnd`. Packets after a
flow's end (the last ACK of a close, a late retransmission) belong to no flow: counted
(``packets_unattributed``), not saved.

Faults stay local: a file that cannot be created or written is closed, its flow's later
packets are counted (``packets_lost``) and not saved, and the failure is logged once per
outage; the other flows and the pipeline go on.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import gzip
import io
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.model import ACK, FIN, SYN, Segment, format_ip
from agent.sinks.outage import OutageLog

__all__ = ["LINKTYPE_RAW", "MIN_SNAPLEN", "FlowPcapConfig", "FlowPcapSaver", "flow_name",
           "ip_packets"]

log = structlog.get_logger("agent.flow_pcap")

LINKTYPE_RAW = 101
#: The snaplen in a file's header when packets are kept whole.
MAX_SNAPLEN = 262144
#: The smallest ``snaplen``: an IPv6 and a TCP header.
MIN_SNAPLEN = 60
_MAX_PIECE = 65535 - 40  # payload bytes per packet: IPv4's total length holds 40 of headers
_M32 = 0xFFFFFFFF
_REC = struct.Struct("<IIII")
_TCP = struct.Struct("!HHIIBBHHH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
_MAX_NUMBER = 1000


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

    def __post_init__(self) -> None:
        if self.snaplen and not MIN_SNAPLEN <= self.snaplen <= MAX_SNAPLEN:
            raise ValueError(f"flow pcap snaplen {self.snaplen} is not 0 (whole packets) or "
                             f"{MIN_SNAPLEN}-{MAX_SNAPLEN}")
        if self.max_open < 1 or self.buffer_bytes < 1:
            raise ValueError("flow pcap max_open and buffer_bytes must be >= 1")

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


# ---------------------------------------------------------------- names


def flow_name(ts: float, client: tuple[bytes, int], server: tuple[bytes, int],
              tunnel: str = "", gz: bool = False) -> str:
    """The file name of a flow first seen at ``ts`` (see the module docstring); addresses
    are packed, already anonymised if they should be."""
    when = datetime.datetime.fromtimestamp(ts, datetime.UTC)
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


def _create(directory: Path, name: str) -> tuple[int, str]:
    """A new file for ``name`` in ``directory``, never an existing one: (fd, its name)."""
    stem, dot, ext = name.partition(".pcap")
    for n in range(_MAX_NUMBER):
        candidate = name if n == 0 else f"{stem}.{n}{dot}{ext}"
        with contextlib.suppress(FileExistsError):
            return os.open(directory / candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                           0o644), candidate
    raise FileExistsError(errno.EEXIST, f"{name} and {_MAX_NUMBER - 1} numbered names exist")


# ---------------------------------------------------------------- files


class _File:
    """One flow's file: its name, and while open, the file and its buffer."""

    __slots__ = ("buf", "failed", "name", "raw", "stream")

    def __init__(self, name: str) -> None:
        self.name = name
        self.raw: io.FileIO | None = None
        self.stream: io.FileIO | gzip.GzipFile | None = None  # ``raw``, or gzip over it
        self.buf = bytearray()
        self.failed = False

    def attach(self, fd: int, gz: bool) -> None:
        raw = self.raw = os.fdopen(fd, "wb", buffering=0)
        self.stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1,
                                    mtime=0) if gz else raw

    def flush(self) -> None:
        if self.buf and self.stream is not None:
            self.stream.write(self.buf)
            self.buf.clear()

    def close(self) -> None:
        """Flush and close (the gzip member ends); OSError goes up, the file is closed."""
        stream, raw, self.stream, self.raw = self.stream, self.raw, None, None
        try:
            if stream is not None and self.buf:
                stream.write(self.buf)
            if stream is not None and stream is not raw:
                stream.close()
        finally:
            self.buf = bytearray()
            if raw is not None:
                raw.close()



def _reason(e: OSError) -> str:
    """An outage's reason: the error's name (``ENOSPC``), else its text."""
    return errno.errorcode.get(e.errno or 0, "") or (e.strerror or type(e).__name__)


class FlowPcapSaver:
    """Writes each flow's packets to its own pcap file (see the module docstring).

    ``ports()`` gives the observed ports now (they tell the client in a file's name);
    ``anonymize`` rewrites every address first. Single-threaded: the mirror's loop calls
    :meth:`packets` and :meth:`flow_end` in capture order, :meth:`close` at the end.
    """

    def __init__(self, config: FlowPcapConfig, ports: Callable[[], frozenset[int]],
                 anonymize: Callable[[bytes], bytes] | None = None) -> None:
        self.config = config
        self._ports = ports
        self._anonymize = anonymize
        self._flows: dict[int, _File] = {}
        self._open: OrderedDict[int, _File] = OrderedDict()  # least recently written first
        self._outage = OutageLog(log, "flow pcap file failed; that flow's packets are not "
                                 "saved, the others go on", "flow pcap files work again",
                                 directory=str(config.directory))
        self.counters: dict[str, int] = dict.fromkeys(
            ("files", "files_completed", "files_reopened", "files_evicted", "files_failed",
             "packets", "packets_truncated", "written_bytes", "packets_lost",
             "packets_unattributed", "open_files_peak"), 0)

    @property
    def open_files(self) -> int:
        """Files open now (at most ``config.max_open``)."""
        return len(self._open)

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
            f = self._flows.get(fid)
            if f is None:
                f = self._flows[fid] = self._new(fid, segs[0])
            elif not f.failed and f.stream is None:
                self._reopen(fid, f)
            if f.failed:
                self.counters["packets_lost"] += len(segs)
                continue
            self._open.move_to_end(fid)
            self._write(fid, f, segs)

    def flow_end(self, flow_id: int) -> None:
        """The flow is over: its file is complete and closed (nothing more is kept)."""
        f = self._flows.pop(flow_id, None)
        if f is None:
            return
        if self._open.pop(flow_id, None) is not None:
            self._close(flow_id, f)
        if not f.failed:
            self.counters["files_completed"] += 1

    def close(self) -> None:
        """Close every open file (end of the run); flows not ended keep what was saved."""
        for fid, f in list(self._open.items()):
            del self._open[fid]
            self._close(fid, f)
        self._flows.clear()

    def stats(self) -> dict[str, int]:
        """The counters (see :mod:`agent.metrics`, stage ``flowpcap``) and ``open_files``."""
        return {**self.counters, "open_files": len(self._open)}

    # ---------------------------------------------------------------- files

    def _new(self, fid: int, seg: Segment) -> _File:
        """The file of a flow whose first packet is ``seg``: named, created, open."""
        client, server = (seg.src_ip, seg.src_port), (seg.dst_ip, seg.dst_port)
        if not _client_first(seg, self._ports()):
            client, server = server, client
        if self._anonymize is not None:
            client = (self._anonymize(client[0]), client[1])
            server = (self._anonymize(server[0]), server[1])
        f = _File(flow_name(seg.ts, client, server, seg.tunnel, self.config.gzip))
        try:
            self._make_room()
            fd, f.name = _create(self.config.directory, f.name)
            f.attach(fd, self.config.gzip)
        except OSError as e:
            self._fail(fid, f, e)
            return f
        f.buf += _file_header(self.config.snaplen)
        self.counters["files"] += 1
        self._outage.recovered()
        self._add_open(fid, f)
        return f

    def _reopen(self, fid: int, f: _File) -> None:
        """Open a file the LRU closed again, to append (never creating it anew)."""
        try:
            self._make_room()
            f.attach(os.open(self.config.directory / f.name, os.O_WRONLY | os.O_APPEND),
                     self.config.gzip)
        except OSError as e:
            self._fail(fid, f, e)
            return
        self.counters["files_reopened"] += 1
        self._add_open(fid, f)

    def _add_open(self, fid: int, f: _File) -> None:
        self._open[fid] = f
        if len(self._open) > self.counters["open_files_peak"]:
            self.counters["open_files_peak"] = len(self._open)

    def _make_room(self) -> None:
        """Close least recently written files until one more may open."""
        while len(self._open) >= self.config.max_open:
            fid, f = self._open.popitem(last=False)
            self.counters["files_evicted"] += 1
            self._close(fid, f)

    def _write(self, fid: int, f: _File, segs: list[Segment]) -> None:
        """Append the packets of ``segs`` to ``f``'s buffer, writing it when it is full."""
        snap = self.config.snaplen
        limit = self.config.buffer_bytes
        buf = f.buf
        c = self.counters
        anon = self._anonymize
        try:
            for seg in segs:
                us = max(0, round(seg.ts * 1_000_000))
                for pkt, wire in ip_packets(seg, anon):
                    if snap and len(pkt) > snap:
                        pkt = pkt[:snap]
                        c["packets_truncated"] += 1
                    buf += _REC.pack(us // 1_000_000, us % 1_000_000, len(pkt), wire)
                    buf += pkt
                    c["packets"] += 1
                    c["written_bytes"] += len(pkt)
                if len(buf) >= limit:
                    f.flush()
        except OSError as e:
            self._fail(fid, f, e)

    def _close(self, fid: int, f: _File) -> None:
        try:
            f.close()
        except OSError as e:
            self._fail(fid, f, e)

    def _fail(self, fid: int, f: _File, e: OSError) -> None:
        """``f`` cannot be written: closed quietly, its flow's later packets only counted."""
        self._open.pop(fid, None)
        if not f.failed:
            f.failed = True
            self.counters["files_failed"] += 1
            self._outage.failed(_reason(e), file=f.name, error=e.strerror or str(e))
        with contextlib.suppress(OSError):
            f.close()
