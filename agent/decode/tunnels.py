"""Tunnels: VXLAN and Geneve (over UDP), GRE (RFC 2784/2890, and PPTP's enhanced GRE) with
IP, Ethernet (transparent bridging), PPP or ERSPAN (types I, II and III) inside.

The tunnel identity
-------------------
Overlapping tenants (the same inner addresses in two virtual networks) must stay apart, so a
segment's flow is keyed by its inner 4-tuple *and* the identity of the tunnels it came
through, outermost first, joined with ``/``: ``vxlan:<VNI>``, ``geneve:<VNI>``,
``gre:<key>`` (only when the GRE header has a key), ``erspan:<session id>``,
``pppoe:<session id>`` (:mod:`agent.decode.linktypes`). Outer addresses are not part of it:
the two directions of a connection may cross different tunnel endpoints. VLAN tags, keyless
GRE, PPTP's call ids (one per direction) and IP-in-IP add nothing.
"""

from __future__ import annotations

import struct

from agent.decode.layers import (
    ERSPAN2,
    ERSPAN3,
    ETHERNET,
    GENEVE,
    PPP,
    U16,
    U32,
    VXLAN,
    Cursor,
    by_ethertype,
)

__all__ = ["GENEVE_PORT", "VXLAN_PORT", "erspan2", "erspan3", "geneve", "gre", "udp",
           "vxlan"]

#: The IANA ports (RFC 7348, RFC 8926); a decoder may be given others.
VXLAN_PORT = 4789
GENEVE_PORT = 6081

_UDP = struct.Struct("!HHH")  # source port, destination port, length
_GRE_CSUM, _GRE_ROUTING, _GRE_KEY, _GRE_SEQ, _GRE_ACK = 0x8000, 0x4000, 0x2000, 0x1000, 0x0080
_ERSPAN_II, _ERSPAN_III = 0x88BE, 0x22EB
_PPTP_PPP = 0x880B


def udp(c: Cursor, vxlan_ports: frozenset[int], geneve_ports: frozenset[int]) -> int | str:
    """A UDP header: VXLAN or Geneve by port (the destination first, then the source: a
    sender may pick either), anything else is ``not_tcp``. Its length bounds the tunnel
    (0, as UDP over IPv6 jumbograms have it: as far as the IP datagram goes)."""
    if not c.has(8):
        return "truncated"
    sport, dport, length = _UDP.unpack_from(c.buf, c.off)
    inner: int | str = "not_tcp"
    for port in (dport, sport):
        if port in vxlan_ports:
            inner = VXLAN
            break
        if port in geneve_ports:
            inner = GENEVE
            break
    else:
        return inner
    if (length and length < 8) or (length and not c.bound(c.off + length)):
        return "bad_udp_header"
    c.off += 8
    return inner


def vxlan(c: Cursor) -> int | str:
    """A VXLAN header (RFC 7348): flags with the I bit set, the 24-bit VNI; Ethernet
    inside."""
    if not c.has(8):
        return "truncated"
    b, o = c.buf, c.off
    if not b[o] & 0x08:
        return "bad_vxlan_header"
    vni = U32.unpack_from(b, o + 4)[0] >> 8
    c.off += 8
    c.enter("vxlan", f"vxlan:{vni}")
    return ETHERNET


def geneve(c: Cursor) -> int | str:
    """A Geneve header (RFC 8926): version 0, options length, protocol type (Ethernet or
    an EtherType), the 24-bit VNI, then the options."""
    if not c.has(8):
        return "truncated"
    b, o = c.buf, c.off
    if b[o] >> 6:
        return "bad_geneve_header"
    size = 8 + (b[o] & 0x3F) * 4
    if not c.has(size):
        return "truncated"
    proto = U16.unpack_from(b, o + 2)[0]
    vni = U32.unpack_from(b, o + 4)[0] >> 8
    c.off += size
    c.enter("geneve", f"geneve:{vni}")
    return by_ethertype(proto)


def gre(c: Cursor) -> int | str:
    """A GRE header: version 0 (RFC 2784 with RFC 2890's key and sequence number; the
    checksum is not verified) or version 1 (PPTP, RFC 2637: key, sequence, acknowledgment,
    PPP inside). Source routing (RFC 1701) is not supported (``bad_gre_header``)."""
    if not c.has(4):
        return "truncated"
    b, o = c.buf, c.off
    flags, proto = U16.unpack_from(b, o)[0], U16.unpack_from(b, o + 2)[0]
    version = flags & 7
    if flags & _GRE_ROUTING or version > 1 or (version == 1 and proto != _PPTP_PPP):
        return "bad_gre_header"
    size = 4
    key = None
    if flags & _GRE_CSUM:
        size += 4
    if flags & _GRE_KEY:
        if not c.has(size + 4):
            return "truncated"
        key = U32.unpack_from(b, o + size)[0]
        size += 4
    if flags & _GRE_SEQ:
        size += 4
    if version == 1 and flags & _GRE_ACK:
        size += 4
    if not c.has(size):
        return "truncated"
    c.off += size
    c.enter("gre", f"gre:{key}" if key is not None and version == 0 else "")
    if proto == _ERSPAN_II:  # type II has a sequence number and a header; type I neither
        return ERSPAN2 if flags & _GRE_SEQ else _erspan1(c)
    if proto == _ERSPAN_III:
        return ERSPAN3
    return PPP if proto == _PPTP_PPP else by_ethertype(proto)


def _erspan1(c: Cursor) -> int:
    c.enter("erspan")
    return ETHERNET


def erspan2(c: Cursor) -> int | str:
    """An ERSPAN type II header: version 1, VLAN, COS/encapsulation/truncated bits, the
    10-bit session id, index; the mirrored Ethernet frame follows."""
    if not c.has(8):
        return "truncated"
    b, o = c.buf, c.off
    if b[o] >> 4 != 1:
        return "bad_erspan_header"
    session = U16.unpack_from(b, o + 2)[0] & 0x3FF
    c.off += 8
    c.enter("erspan", f"erspan:{session}")
    return ETHERNET


def erspan3(c: Cursor) -> int | str:
    """An ERSPAN type III header: version 2, VLAN, COS/BSO/T, the 10-bit session id,
    timestamp, SGT, then P/frame type/hardware id/D/granularity/O; with O set an 8-byte
    platform-specific subheader follows. Only frame type 0 (Ethernet) is decoded."""
    if not c.has(12):
        return "truncated"
    b, o = c.buf, c.off
    if b[o] >> 4 != 2:
        return "bad_erspan_header"
    session = U16.unpack_from(b, o + 2)[0] & 0x3FF
    word = U16.unpack_from(b, o + 10)[0]
    size = 20 if word & 1 else 12
    if not c.has(size):
        return "truncated"
    c.off += size
    c.enter("erspan", f"erspan:{session}")
    return ETHERNET if not (word >> 10) & 0x1F else "not_ip"


#: The tunnel layers by kind that need no settings (UDP needs its ports).
LAYERS = {VXLAN: vxlan, GENEVE: geneve, ERSPAN2: erspan2, ERSPAN3: erspan3}
