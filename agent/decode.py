"""Raw frame bytes → :class:`~agent.model.Segment`.

Supports Ethernet (with any number of 802.1Q / 802.1ad / QinQ tags), Linux cooked capture v1
and v2, raw IP, BSD null/loop; IPv4 with options, IPv6 with extension headers; TCP with
options. Anything else is skipped and counted by reason in a :class:`DecodeStats`: this module
never raises on bad input.
"""

from __future__ import annotations

import struct
from collections import Counter

from agent.model import Segment

__all__ = [
    "ETH_IPV4_TCP",
    "ETH_IPV4_TCP_MIN",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_NULL",
    "LINKTYPE_RAW",
    "SUPPORTED_LINKTYPES",
    "DecodeStats",
    "Decoder",
    "fast_frame",
]

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
# DLT_RAW has the values 12 and 14 on some platforms; pcap files written there keep them.
_RAW_ALIASES = (LINKTYPE_RAW, 12, 14, LINKTYPE_IPV4, LINKTYPE_IPV6)

SUPPORTED_LINKTYPES = frozenset(
    {LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_LOOP, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2}
    | set(_RAW_ALIASES)
)

_ETH_IPV4 = 0x0800
_ETH_IPV6 = 0x86DD
_VLAN_TAGS = (0x8100, 0x88A8, 0x9100, 0x9200)
_IPPROTO_TCP = 6
# IPv6 extension headers we walk past (hop-by-hop, routing, destination options, mobility).
_IPV6_EXT = (0, 43, 60, 135)
_IPV6_FRAGMENT = 44
_IPV6_AH = 51

_U16 = struct.Struct("!H")
_TCP = struct.Struct("!HHIIBBH")  # sport dport seq ack off flags window
#: Ethernet, IPv4 and TCP headers read in one call from a frame's first byte: ethertype,
#: version/IHL, total length, flags/fragment offset, protocol, source, destination, then
#: the TCP fields of ``_TCP``. The common frame (untagged, no IP options, not a fragment) is
#: whole after it: see :func:`fast_frame`.
ETH_IPV4_TCP = struct.Struct("!12xHBxHxxHxB2x4s4sHHIIBBH")
#: The shortest such frame: Ethernet (14) + IPv4 (20) + TCP (20) headers.
ETH_IPV4_TCP_MIN = 54
_IPV4_HEAD = struct.Struct("!BxHxxHxB")  # ver/ihl, total length, frag, proto
_IPV6_HEAD = struct.Struct("!4xHB")  # payload length, next header


def fast_frame(etype: int, vihl: int, frag: int, proto: int, start: int, end: int,
               n: int) -> bool:
    """Do the fields of :data:`ETH_IPV4_TCP` describe a whole common segment: untagged
    Ethernet, IPv4 without options and not a fragment, TCP, its payload at ``[start, end)``
    within the ``n`` captured bytes (``start`` after a whole TCP header, ``end`` from the IP
    total length)? Anything else takes the general path of :meth:`Decoder.decode`."""
    return (etype == _ETH_IPV4 and vihl == 0x45 and proto == _IPPROTO_TCP
            and not frag & 0x3FFF and ETH_IPV4_TCP_MIN <= start <= end <= n)


class DecodeStats:
    """Counts of frames the decoder skipped, by reason (``truncated``, ``not_tcp`` …)."""

    __slots__ = ("decoded", "skipped")

    def __init__(self) -> None:
        self.decoded = 0
        self.skipped: Counter[str] = Counter()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self) -> dict[str, int]:
        return {"decoded": self.decoded, **{f"skipped_{k}": v for k, v in self.skipped.items()}}


class Decoder:
    """Decodes frames of one link type; skipped frames are counted in :attr:`stats`."""

    __slots__ = ("linktype", "stats")

    def __init__(self, linktype: int, stats: DecodeStats | None = None) -> None:
        if linktype not in SUPPORTED_LINKTYPES:
            raise ValueError(f"unsupported link type {linktype}")
        self.linktype = linktype
        self.stats = stats if stats is not None else DecodeStats()

    def decode(self, frame: bytes, ts: float, orig_len: int = 0) -> Segment | None:
        """Decode one captured frame; ``orig_len`` is its length on the wire (0 = as captured).

        Returns ``None`` (and counts why) for anything that is not a well-formed TCP segment.
        Bytes cut off by the capture's snap length are reported in ``Segment.lost``.
        """
        lt = self.linktype
        n = len(frame)
        # Fast path (fast_frame); the bytes checked first keep other frames from paying for
        # the unpack: IPv4 without options, untagged.
        if lt == LINKTYPE_ETHERNET and n >= ETH_IPV4_TCP_MIN and frame[14] == 0x45 \
                and frame[12] == 8 and frame[13] == 0:
            (etype, vihl, total, frag, proto, src, dst, sport, dport, seq, ack, doff, flags,
             window) = ETH_IPV4_TCP.unpack_from(frame)
            start = 34 + (doff >> 4) * 4
            end = 14 + total
            if fast_frame(etype, vihl, frag, proto, start, end, n):
                self.stats.decoded += 1
                return Segment(src, sport, dst, dport, seq, ack, flags, frame[start:end], ts,
                               window)
        if lt == LINKTYPE_ETHERNET:
            if n < 14:
                return self._skip("truncated")
            off = 12
            etype = (frame[12] << 8) | frame[13]
            while etype in _VLAN_TAGS:
                off += 4
                if n < off + 2:
                    return self._skip("truncated")
                etype = (frame[off] << 8) | frame[off + 1]
            off += 2
        elif lt == LINKTYPE_LINUX_SLL:
            if n < 16:
                return self._skip("truncated")
            etype = (frame[14] << 8) | frame[15]
            off = 16
        elif lt == LINKTYPE_LINUX_SLL2:
            if n < 20:
                return self._skip("truncated")
            etype = (frame[0] << 8) | frame[1]
            off = 20
        elif lt in (LINKTYPE_NULL, LINKTYPE_LOOP):
            if n < 5:
                return self._skip("truncated")
            off = 4
            etype = _ETH_IPV4 if frame[4] >> 4 == 4 else _ETH_IPV6
        else:
            if n < 1:
                return self._skip("truncated")
            off = 0
            etype = _ETH_IPV4 if frame[0] >> 4 == 4 else _ETH_IPV6
        if etype == _ETH_IPV4:
            return self._ipv4(frame, off, ts, orig_len)
        if etype == _ETH_IPV6:
            return self._ipv6(frame, off, ts, orig_len)
        return self._skip("not_ip")

    def _skip(self, reason: str) -> Segment | None:
        """Count a skipped frame; returns None so callers can ``return self._skip(...)``."""
        self.stats.skipped[reason] += 1
        return None

    def _ipv4(self, frame: bytes, off: int, ts: float, orig_len: int) -> Segment | None:
        n = len(frame)
        if n < off + 20:
            return self._skip("truncated")
        vihl, total, frag, proto = _IPV4_HEAD.unpack_from(frame, off)
        if vihl >> 4 != 4:
            return self._skip("bad_ip_header")
        ihl = (vihl & 0x0F) * 4
        if ihl < 20:
            return self._skip("bad_ip_header")
        if proto != _IPPROTO_TCP:
            return self._skip("not_tcp")
        if frag & 0x1FFF:
            return self._skip("ip_fragment")
        if total == 0:
            # TSO/"big TCP" captures may carry 0 here; trust the captured length.
            total = (orig_len or n) - off
        elif total < ihl:
            return self._skip("bad_ip_header")
        if n < off + ihl:
            return self._skip("truncated")
        return self._tcp(
            frame, off + ihl, off + total, frame[off + 12 : off + 16], frame[off + 16 : off + 20],
            ts, orig_len,
        )

    def _ipv6(self, frame: bytes, off: int, ts: float, orig_len: int) -> Segment | None:
        n = len(frame)
        if n < off + 40:
            return self._skip("truncated")
        if frame[off] >> 4 != 6:
            return self._skip("bad_ip_header")
        plen, nxt = _IPV6_HEAD.unpack_from(frame, off)
        src = frame[off + 8 : off + 24]
        dst = frame[off + 24 : off + 40]
        end = off + 40 + plen if plen else (orig_len or n)
        pos = off + 40
        while nxt != _IPPROTO_TCP:
            if nxt in _IPV6_EXT or nxt == _IPV6_AH:
                if n < pos + 2:
                    return self._skip("truncated")
                hlen = (frame[pos + 1] + 2) * 4 if nxt == _IPV6_AH else (frame[pos + 1] + 1) * 8
                nxt = frame[pos]
                pos += hlen
            elif nxt == _IPV6_FRAGMENT:
                if n < pos + 8:
                    return self._skip("truncated")
                if ((frame[pos + 2] << 8) | frame[pos + 3]) & 0xFFF8:
                    return self._skip("ip_fragment")
                nxt = frame[pos]
                pos += 8
            else:
                return self._skip("not_tcp")
            if pos > end:
                return self._skip("bad_ip_header")
        return self._tcp(frame, pos, end, src, dst, ts, orig_len)

    def _tcp(
        self, frame: bytes, off: int, ip_end: int, src: bytes, dst: bytes, ts: float,
        orig_len: int,
    ) -> Segment | None:
        n = len(frame)
        if n < off + 20:
            return self._skip("truncated")
        sport, dport, seq, ack, doff, flags, window = _TCP.unpack_from(frame, off)
        hlen = (doff >> 4) * 4
        if hlen < 20 or off + hlen > ip_end:
            return self._skip("bad_tcp_header")
        if n < off + hlen:
            return self._skip("truncated")
        start = off + hlen
        lost = 0
        if ip_end > n:
            # Cut by the snap length: the bytes exist but we do not have them.
            lost = ip_end - n
            ip_end = n
        self.stats.decoded += 1
        return Segment(
            src, sport, dst, dport, seq, ack, flags, frame[start:ip_end], ts, window, lost
        )
