"""``--record-format pcapng``: the recorded connections as synthesised packets, which
Wireshark and tshark open and follow (``tshark -z follow,tcp,raw``) to the recorded bytes.

Each file is a pcapng section (Section Header Block, one Interface Description Block of
link type RAW: IPv4 and IPv6 packets without a link layer, microsecond timestamps), then one
Enhanced Packet Block per packet. Per connection (``flow_id``):

- a three-way handshake (SYN, SYN-ACK, ACK) before its first chunk in each file, so every
  rotated file is followable alone; its comment names the flow. Initial sequence numbers are
  derived from the flow id (the same recording gives the same file);
- each chunk as ACK segments of at most the MSS (1460 bytes over IPv4, 1440 over IPv6), PSH on
  the last, at the chunk's ``seen_at``, then an ACK from the other side;
- a gap (``gap_bytes``) as a gap: the sequence number skips the missing bytes, and the first
  segment after it carries a comment saying how many (Wireshark: "previous segment not
  captured");
- its end: FIN from each side and a last ACK (``fin``), or an RST (``rst``), with the reason
  (and a trailing gap) as the comment; other ends (``idle``, ``flush``, ...) add no packet.

The client is the sender of the first chunk that went to the observed port (or came from
it: then the receiver); addresses are the recorded ones (an address that is not an IP, or a
pair of mixed families, is replaced by one of 198.18.0.0/15, named in the SYN's comment).
IP and TCP checksums are correct. A whole chunk (its packets) is one record, so a file never
holds half of one.
"""

from __future__ import annotations

import ipaddress
import math
import struct
import zlib
from typing import BinaryIO

from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record.files import RecordFiles
from agent.sinks.record.writers import FileWriter

__all__ = ["PREAMBLE", "PcapngWriter"]

LINKTYPE_RAW = 101
_SHB, _IDB, _EPB = 0x0A0D0D0A, 1, 6
_FIN, _SYN, _RST, _PSH, _ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_M32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_TCP = struct.Struct("!HHIIBBHHH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_EPB_HEAD = struct.Struct("<IIIIIII")  # type, length, interface, ts high, ts low, cap, orig
_PER_PACKET = 32 + 40 + 12  # EPB framing + IPv6/TCP headers + a little: rotation estimate


def _options(*opts: tuple[int, bytes]) -> bytes:
    """pcapng options (code, value), each padded to 4 bytes, then opt_endofopt."""
    if not opts:
        return b""
    out = b"".join(struct.pack("<HH", code, len(v)) + v + b"\0" * (-len(v) % 4)
                   for code, v in opts)
    return out + b"\0\0\0\0"


def _block(kind: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", kind, n) + body + struct.pack("<I", n)


#: Every pcapng file of a recording starts with this: the section and its one interface.
PREAMBLE = (
    _block(_SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _options((4, b"mirror-agent")))
    + _block(_IDB, struct.pack("<HHI", LINKTYPE_RAW, 0, 262144)
             + _options((2, b"mirror-agent"), (9, b"\x06")))
)


def _epb(ts: float, packet: bytes, comment: str = "") -> bytes:
    """One Enhanced Packet Block: ``packet`` at ``ts`` (seconds), with an optional comment."""
    # The block's time is 64-bit microseconds: a damaged capture's time past it (or not a
    # number) is written at the nearest end rather than failing the recording.
    us = min(max(0, round(ts * 1_000_000)), _U64) if math.isfinite(ts) else 0
    opts = _options((1, comment.encode())) if comment else b""
    pad = b"\0" * (-len(packet) % 4)
    n = _EPB_HEAD.size + len(packet) + len(pad) + len(opts) + 4
    return b"".join((_EPB_HEAD.pack(_EPB, n, 0, us >> 32, us & _M32, len(packet), len(packet)),
                     packet, pad, opts, struct.pack("<I", n)))


def _sum16(*parts: bytes) -> int:
    """The Internet checksum of ``parts`` concatenated (all but the last of even length):
    a big-endian number is congruent to the sum of its 16-bit words modulo 0xFFFF."""
    total = 0
    for p in parts:
        total += int.from_bytes(p, "big") << (8 if len(p) % 2 else 0)
    s = total % 0xFFFF
    return ~(s or 0xFFFF) & 0xFFFF  # the data is never all zeros (protocol 6 is in it)


def _endpoint(text: str) -> tuple[bytes, int] | None:
    """(packed IP, port) of ``ip:port`` / ``[ip]:port``; None if it is not one."""
    host, _, port = text.rpartition(":")
    try:
        return ipaddress.ip_address(host.strip("[]")).packed, int(port) & 0xFFFF
    except ValueError:
        return None


def _stand_in(text: str, n: int) -> tuple[bytes, int]:
    """An address of 198.18.0.0/15 (benchmarking, never routed) standing in for ``text``."""
    h = zlib.crc32(text.encode()) & 0x1FFFF
    port = text.rpartition(":")[2]
    return bytes([198, 18 | (h >> 16), (h >> 8) & 0xFF, (h & 0xFF) | n]), \
        int(port) & 0xFFFF if port.isdigit() else 0


class _Conn:
    """One connection's packets: both ends, the next sequence number of each side."""

    __slots__ = ("flow_id", "ip", "mss", "next", "note", "port", "shaken", "text", "ts")

    def __init__(self, flow_id: int, client: str, server: str) -> None:
        self.flow_id = flow_id
        self.text = (client, server)
        a, b = _endpoint(client), _endpoint(server)
        self.note = ""
        if a is None or b is None or len(a[0]) != len(b[0]):
            a, b = _stand_in(client, 0), _stand_in(server, 1)
            self.note = f" (stand-in addresses for {client} -> {server})"
        self.ip = (a[0], b[0])
        self.port = (a[1], b[1])
        self.mss = 1460 if len(self.ip[0]) == 4 else 1440
        isn = (flow_id * 0x9E3779B1 + 1) & _M32
        self.next = [isn, isn ^ 0x5BD1E995]
        self.shaken = False
        self.ts = 0.0

    def packet(self, side: int, flags: int, payload: bytes = b"") -> bytes:
        """An IP packet from ``side`` (0 client, 1 server) at its next sequence number."""
        src, dst = self.ip[side], self.ip[1 - side]
        ack = self.next[1 - side] & _M32 if flags & _ACK else 0
        tcp = _TCP.pack(self.port[side], self.port[1 - side], self.next[side] & _M32, ack,
                        5 << 4, flags, 65535, 0, 0)
        n = len(tcp) + len(payload)
        if len(src) == 4:
            pseudo = src + dst + struct.pack("!BBH", 0, 6, n)
            ip = _IP4.pack(0x45, 0, 20 + n, 0, 0x4000, 64, 6, 0, src, dst)
            ip = ip[:10] + struct.pack("!H", _sum16(ip)) + ip[12:]
        else:
            pseudo = src + dst + struct.pack("!I3xB", n, 6)
            ip = _IP6.pack(6 << 28, n, 6, 64, src, dst)
        csum = _sum16(pseudo, tcp, payload)
        return b"".join((ip, tcp[:16], struct.pack("!H", csum), tcp[18:], payload))

    def handshake(self, ts: float) -> list[bytes]:
        """SYN, SYN-ACK, ACK, ending at the sequence numbers the sides are at."""
        self.next[0] -= 1
        self.next[1] -= 1
        out = [_epb(ts, self.packet(0, _SYN), f"mirror-agent flow {self.flow_id}: "
                    f"synthesised handshake{self.note}")]
        self.next[0] += 1
        out.append(_epb(ts, self.packet(1, _SYN | _ACK)))
        self.next[1] += 1
        out.append(_epb(ts, self.packet(0, _ACK)))
        self.shaken = True
        return out

    def chunk(self, chunk: TrafficChunk, data: bytes) -> bytes:
        """The packets of one chunk (after the handshake if this file has none yet)."""
        side = 0 if chunk.from_addr == self.text[0] else 1
        ts = self.ts = chunk.seen_at
        out = [] if self.shaken else self.handshake(ts)
        comment = ""
        if chunk.gap_bytes:
            self.next[side] += chunk.gap_bytes
            comment = f"mirror-agent: {chunk.gap_bytes} bytes missing before this segment"
        mss = self.mss
        for i in range(0, len(data), mss):
            seg = data[i : i + mss]
            flags = _ACK | (_PSH if i + mss >= len(data) else 0)
            out.append(_epb(ts, self.packet(side, flags, seg), comment))
            comment = ""
            self.next[side] += len(seg)
        out.append(_epb(ts, self.packet(1 - side, _ACK)))
        return b"".join(out)

    def end(self, end: FlowEnd) -> bytes:
        """The packets of the connection's end: FINs and an ACK, an RST, or none."""
        comment = f"mirror-agent: connection ended ({end.reason})"
        if end.trailing_gap:
            comment += f", {end.trailing_gap} bytes missing at the end"
        if end.reason == "rst":
            return _epb(self.ts, self.packet(0, _RST | _ACK), comment)
        if end.reason != "fin":
            return b""
        out = [_epb(self.ts, self.packet(0, _FIN | _ACK), comment)]
        self.next[0] += 1
        out.append(_epb(self.ts, self.packet(1, _FIN | _ACK)))
        self.next[1] += 1
        out.append(_epb(self.ts, self.packet(0, _ACK)))
        return b"".join(out)


class PcapngWriter(FileWriter):
    """Writes the recorded connections as a pcapng capture (see the module docstring)."""

    preamble = PREAMBLE

    def __init__(self, out: BinaryIO | RecordFiles) -> None:
        super().__init__(out)
        self._conns: dict[int, _Conn] = {}
        self._generation = 0

    def _write(self, chunk: TrafficChunk, data: bytes) -> None:
        out = self._out
        if out.error is not None or not data:
            out.add(b"", b"", len(data), chunk.flow_id)  # lost, or nothing to show
            return
        if out.rotating:
            self._file(out.begin(len(data) + _PER_PACKET * (len(data) // 1440 + 5)))
        conn = self._conns.get(chunk.flow_id)
        if conn is None:
            client, server = chunk.from_addr, chunk.to_addr
            if chunk.direction is Direction.FROM_OBSERVED:
                client, server = server, client
            conn = self._conns[chunk.flow_id] = _Conn(chunk.flow_id, client, server)
        out.add(conn.chunk(chunk, data), b"", len(data), chunk.flow_id)

    def _flow_end(self, end: FlowEnd) -> None:
        out = self._out
        conn = self._conns.pop(end.flow_id, None)
        if out.error is not None:
            out.add(b"", b"", -1, end.flow_id)  # its closing packets: lost
            return
        if conn is not None and out.rotating:
            self._file(out.begin(_PER_PACKET * 3))
        blob = conn.end(end) if conn is not None and conn.shaken else b""
        if blob:  # (its handshake is in this file)
            out.add(blob, b"", -1, end.flow_id)
        else:
            out.settled(end.flow_id, end=True)  # nothing of it to show

    def _file(self, generation: int) -> None:
        """A new file started: every connection needs a handshake in it again."""
        if generation != self._generation:
            self._generation = generation
            for conn in self._conns.values():
                conn.shaken = False
