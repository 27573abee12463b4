"""IP layers: IPv4 (with options) and IPv6 (with extension headers), as the outermost
network layer or inside any tunnel (IPv4/IPv6 in IPv4/IPv6, GRE, VXLAN ...).

An IP header sets the cursor's addresses, narrows its end to the datagram's, and hands on to
the protocol it carries. A fragment is handed on as :data:`~agent.decode.layers.FRAGMENT`
with ``cursor.frag`` describing it, for :mod:`agent.decode.defrag`.
"""

from __future__ import annotations

import struct

from agent.decode.layers import FRAGMENT, IPV4, IPV6, U16, U32, UNBOUNDED, Cursor, by_ipproto

__all__ = ["LAYERS", "carried", "ipv4", "ipv6"]

_IPV4_HEAD = struct.Struct("!BxHHHxB")  # ver/ihl, total length, id, flags/frag, proto
_IPV6_HEAD = struct.Struct("!4xHB")  # payload length, next header
# IPv6 extension headers walked past (hop-by-hop, routing, destination options, mobility,
# HIP, shim6, AH: its length in 4-byte units), and the fragment header.
_IPV6_AH = 51
_IPV6_FRAGMENT = 44
_IPV6_WALKED = frozenset((0, 43, 60, 135, 139, 140, _IPV6_AH, _IPV6_FRAGMENT))


def _datagram_end(c: Cursor, declared: int) -> int:
    """Where a datagram of ``declared`` bytes from ``c.off`` ends; 0 (a TSO/"big TCP"
    capture) means as far as the layer around it goes."""
    if declared:
        return c.off + declared
    return c.end if c.end < UNBOUNDED else len(c.buf)


_IP_IN_IP = {4: "4", 41: "6"}


def carried(c: Cursor, proto: int) -> int | str:
    """The layer an IP header's protocol announces; IP in IP (``ip4in4``, ``ip6in4``,
    ``ip4in6``, ``ip6in6``) is counted as an encapsulation (no tunnel identity: the inner
    addresses are the flow's)."""
    inner = _IP_IN_IP.get(proto)
    if inner is not None:
        c.enter(f"ip{inner}in{4 if len(c.src) == 4 else 6}")
    return by_ipproto(proto)


def ipv4(c: Cursor) -> int | str:
    """An IPv4 header (RFC 791) and its options."""
    if not c.has(20):
        return "truncated"
    b, o = c.buf, c.off
    vihl, total, ident, frag, proto = _IPV4_HEAD.unpack_from(b, o)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or (total and total < ihl):
        return "bad_ip_header"
    if not c.has(ihl):
        return "truncated"
    if not c.bound(_datagram_end(c, total)):
        return "bad_ip_header"
    c.src, c.dst = b[o + 12 : o + 16], b[o + 16 : o + 20]
    c.off = o + ihl
    if frag & 0x3FFF:  # more fragments, or an offset
        c.frag = (4, ident, (frag & 0x1FFF) * 8, bool(frag & 0x2000), proto)
        return FRAGMENT
    return carried(c, proto)


def ipv6(c: Cursor) -> int | str:
    """An IPv6 header (RFC 8200) and its extension headers up to the upper layer (or a
    fragment header that is not an atomic fragment)."""
    if not c.has(40):
        return "truncated"
    b, o = c.buf, c.off
    if b[o] >> 4 != 6:
        return "bad_ip_header"
    plen, nxt = _IPV6_HEAD.unpack_from(b, o)
    c.off = o + 40
    if not c.bound(_datagram_end(c, plen)):
        return "bad_ip_header"
    c.src, c.dst = b[o + 8 : o + 24], b[o + 24 : o + 40]
    while nxt in _IPV6_WALKED:
        if nxt == _IPV6_FRAGMENT:
            if not c.has(8):
                return "truncated"
            pos = c.off
            offset_flags = U16.unpack_from(b, pos + 2)[0]
            nxt = b[pos]
            c.off = pos + 8
            if offset_flags & 0xFFF9:  # an offset or more fragments: not atomic (RFC 6946)
                c.frag = (6, U32.unpack_from(b, pos + 4)[0], offset_flags & 0xFFF8,
                          bool(offset_flags & 1), nxt)
                return FRAGMENT
            continue
        if not c.has(2):
            return "truncated"
        size = (b[c.off + 1] + 2) * 4 if nxt == _IPV6_AH else (b[c.off + 1] + 1) * 8
        nxt = b[c.off]
        c.off += size
        if c.off > c.end:
            return "bad_ip_header"
    return carried(c, nxt)


#: The IP layers by kind (for the decoder's table).
LAYERS = {IPV4: ipv4, IPV6: ipv6}
