"""The types every stage shares: no I/O, no clock, no dependencies beyond the standard library.

A *source* produces :class:`Segment` objects, the reassembler turns them into
:class:`TrafficChunk` objects (contiguous bytes of one direction of one connection),
:class:`DirectionEnd` and :class:`FlowEnd` notices, and the mirror hands chunks to hooks and
sinks.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ACK",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "Direction",
    "DirectionEnd",
    "FlowEnd",
    "FlowKey",
    "Segment",
    "TrafficChunk",
    "flow_key",
    "format_addr",
    "format_ip",
]

# TCP flag bits, as in the TCP header's flags byte.
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

#: A direction-free connection key: the lower (ip, port) endpoint first, so both directions
#: of a connection map to the same key. IP addresses are packed bytes (4 or 16 long); the
#: last item is the tunnel identity (``Segment.tunnel``, "" outside tunnels).
FlowKey = tuple[bytes, int, bytes, int, str]


def flow_key(src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
             tunnel: str = "") -> FlowKey:
    """Return the direction-free key of a 4-tuple (lowest address/port pair first) in the
    tunnel ``tunnel``."""
    if (src_ip, src_port) <= (dst_ip, dst_port):
        return (src_ip, src_port, dst_ip, dst_port, tunnel)
    return (dst_ip, dst_port, src_ip, src_port, tunnel)


#: The first 12 bytes of an IPv4-mapped IPv6 address (``::ffff:0:0/96``, RFC 4291 §2.5.5.2).
_V4_MAPPED = bytes(10) + b"\xff\xff"


def format_ip(ip: bytes) -> str:
    """Packed 4- or 16-byte address → text (``192.0.2.1``, ``2001:db8::1``).

    IPv6 follows RFC 5952, including its §5: an IPv4-mapped address keeps its IPv4 part
    dotted (``::ffff:192.0.2.1``, as ``inet_ntop`` and tshark write it, not
    ``::ffff:c000:201``), whatever the Python version. Other IPv6 addresses are plain hex.
    """
    if len(ip) == 16 and ip[:12] == _V4_MAPPED:
        return "::ffff:" + ".".join(map(str, ip[12:]))
    return str(ipaddress.ip_address(ip))


def format_addr(ip: bytes, port: int, anonymize: Callable[[bytes], bytes] | None = None) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6; ``anonymize`` rewrites the address first."""
    if anonymize is not None:
        ip = anonymize(ip)
    text = format_ip(ip)
    return f"[{text}]:{port}" if len(ip) == 16 else f"{text}:{port}"


class Segment:
    """One TCP segment as a source saw it.

    ``seq`` is the raw 32-bit sequence number of the first payload byte's position (for a SYN,
    the SYN's own number). ``lost`` counts payload bytes known to exist right after ``payload``
    that the source could not deliver (for example a piece the kernel failed to copy): the
    reassembler reports them as a gap at once instead of waiting for them. ``tunnel`` is
    the identity of the tunnels the segment came through (``vxlan:42``, outermost first,
    joined with ``/``; see :mod:`agent.decode.tunnels`), "" outside tunnels: part of the
    flow's key, so the same addresses in two tenants' networks are two flows.
    """

    __slots__ = (
        "ack",
        "dst_ip",
        "dst_port",
        "flags",
        "lost",
        "payload",
        "seq",
        "src_ip",
        "src_port",
        "ts",
        "tunnel",
        "window",
    )

    def __init__(
        self,
        src_ip: bytes,
        src_port: int,
        dst_ip: bytes,
        dst_port: int,
        seq: int,
        ack: int,
        flags: int,
        payload: bytes,
        ts: float,
        window: int = 65535,
        lost: int = 0,
        tunnel: str = "",
    ) -> None:
        self.src_ip = src_ip
        self.src_port = src_port
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.payload = payload
        self.ts = ts
        self.window = window
        self.lost = lost
        self.tunnel = tunnel

    def __repr__(self) -> str:
        return (
            f"Segment({format_addr(self.src_ip, self.src_port)}>"
            f"{format_addr(self.dst_ip, self.dst_port)} seq={self.seq} flags={self.flags:#x} "
            f"len={len(self.payload)} lost={self.lost})"
        )


class Direction(enum.StrEnum):
    """Which way a chunk travels relative to the observed service."""

    TO_OBSERVED = "to_observed"
    FROM_OBSERVED = "from_observed"
    UNKNOWN = "unknown"


@dataclass(slots=True)
class TrafficChunk:
    """Contiguous reassembled bytes of one direction of one connection.

    ``gap_bytes`` is the number of bytes known to be missing right before ``data`` (a hole
    the reassembler gave up on). ``from_addr``/``to_addr`` are ``ip:port`` (``[ip]:port`` for
    IPv6). ``seen_at`` is the capture time (seconds since the epoch) of the newest segment
    that contributed to the chunk.
    """

    data: bytes
    from_addr: str
    to_addr: str
    direction: Direction
    seen_at: float
    flow_id: int
    gap_bytes: int = 0
    type: str = "tcp"
    tunnel: str = ""
    """The flow's tunnel identity (``Segment.tunnel``); "" outside tunnels."""

    def with_data(self, data: bytes) -> TrafficChunk:
        """A copy with other bytes (what a hook hands to the next stage)."""
        return TrafficChunk(data, self.from_addr, self.to_addr, self.direction, self.seen_at,
                            self.flow_id, self.gap_bytes, self.type, self.tunnel)


@dataclass(slots=True)
class DirectionEnd:
    """One direction of a connection is complete: its FIN was reached with every byte before
    it delivered (or reported as a gap). No chunk from ``from_addr`` follows in ``flow_id``;
    the other direction's chunks and the :class:`FlowEnd` still come. Sent at most once per
    direction, before the flow's :class:`FlowEnd`.
    """

    flow_id: int
    direction: Direction
    from_addr: str


class EndReason(enum.StrEnum):
    """Why the reassembler ended a connection (``FlowEnd.reason``; the ``reason`` label of
    ``mirror_agent_reassembly_flows_closed_total``)."""

    FIN = "fin"
    """Both directions reached their FIN in sequence."""
    RST = "rst"
    """A reset its receiver takes (RFC 5961)."""
    IDLE = "idle"
    """No segment for ``idle_timeout``."""
    FLUSH = "flush"
    """End of input, or shutdown."""
    EVICTED = "evicted"
    """The flow table was full (``max_flows``): a limit."""
    LIFETIME = "lifetime"
    """Tracked longer than ``max_lifetime``: a limit."""
    REUSED = "reused"
    """A new connection (a SYN with another ISN) on the same addresses."""


@dataclass(slots=True)
class FlowEnd:
    """A connection is finished: no chunk of ``flow_id`` follows.

    ``reason`` is an :class:`EndReason` (a ``str``: ``"fin"`` compares equal to
    ``EndReason.FIN``). ``trailing_gap`` counts bytes known to be missing at the end of the
    connection, after the last chunk (both directions together).
    """

    flow_id: int
    reason: str
    trailing_gap: int = 0
