"""Link layers: the header a capture file's link type puts before each frame, and the
Ethernet-level headers that can appear anywhere (802.1Q tags, PPPoE, PPP, Cisco HDLC).

Link types (the pcap/pcapng header's ``LINKTYPE_*``): Ethernet, Linux cooked v1 and v2, raw
IPv4/IPv6 (with the platform aliases of ``DLT_RAW``), BSD null and loopback (the address
family in either byte order), PPP (with or without HDLC-like address and control bytes),
PPP in HDLC-like framing, PPPoE without Ethernet, Cisco HDLC.
"""

from __future__ import annotations

from agent.decode.layers import (
    CHDLC,
    ETHERNET,
    IPV4,
    IPV6,
    LOOP,
    NULL,
    PPP,
    PPP_HDLC,
    PPPOE,
    RAW,
    SLL,
    SLL2,
    U16,
    Cursor,
    by_ethertype,
)

__all__ = ["FIRST_LAYER", "LINKTYPE_C_HDLC", "LINKTYPE_ETHERNET", "LINKTYPE_IPV4",
           "LINKTYPE_IPV6", "LINKTYPE_LINUX_SLL", "LINKTYPE_LINUX_SLL2", "LINKTYPE_LOOP",
           "LINKTYPE_NULL", "LINKTYPE_PPP", "LINKTYPE_PPP_ETHER", "LINKTYPE_PPP_HDLC",
           "LINKTYPE_RAW", "SUPPORTED_LINKTYPES", "chdlc", "ethernet", "family", "ppp",
           "ppp_hdlc", "pppoe", "raw", "sll", "sll2", "vlan"]

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_PPP = 9
LINKTYPE_PPP_HDLC = 50
LINKTYPE_PPP_ETHER = 51
LINKTYPE_RAW = 101
LINKTYPE_C_HDLC = 104
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

#: Link type → the kind of its first layer. DLT_RAW has the values 12 and 14 on some
#: platforms; pcap files written there keep them.
FIRST_LAYER: dict[int, int] = {
    LINKTYPE_NULL: NULL, LINKTYPE_LOOP: LOOP, LINKTYPE_ETHERNET: ETHERNET,
    LINKTYPE_LINUX_SLL: SLL, LINKTYPE_LINUX_SLL2: SLL2,
    LINKTYPE_RAW: RAW, 12: RAW, 14: RAW, LINKTYPE_IPV4: RAW, LINKTYPE_IPV6: RAW,
    LINKTYPE_PPP: PPP, LINKTYPE_PPP_HDLC: PPP_HDLC, LINKTYPE_PPP_ETHER: PPPOE,
    LINKTYPE_C_HDLC: CHDLC,
}
SUPPORTED_LINKTYPES = frozenset(FIRST_LAYER)

# BSD address families of DLT_NULL/DLT_LOOP: AF_INET is 2 everywhere; AF_INET6 is 24
# (NetBSD, OpenBSD), 28 (FreeBSD), 30 (macOS) or 10 (Linux).
_FAMILIES = {2: IPV4, 24: IPV6, 28: IPV6, 30: IPV6, 10: IPV6}
# PPP protocol numbers (RFC 1661): IPv4, IPv6.
_PPP_PROTOCOLS = {0x0021: IPV4, 0x0057: IPV6}


def _ethertype_header(c: Cursor, size: int, at: int) -> int | str:
    """A fixed ``size``-byte header whose next-layer EtherType is at offset ``at``: skipped,
    and the EtherType's layer returned (``truncated`` if the frame is shorter)."""
    if not c.has(size):
        return "truncated"
    etype = U16.unpack_from(c.buf, c.off + at)[0]
    c.off += size
    return by_ethertype(etype)


def ethernet(c: Cursor) -> int | str:
    """Ethernet II: destination, source, EtherType (an 802.3 length field is ``not_ip``)."""
    return _ethertype_header(c, 14, 12)


def vlan(c: Cursor) -> int | str:
    """One 802.1Q/802.1ad tag after its TPID: the TCI, then the next EtherType."""
    return _ethertype_header(c, 4, 2)


def sll(c: Cursor) -> int | str:
    """Linux cooked v1: packet type, ARPHRD type, address length, 8 address bytes,
    protocol (an EtherType; on a GRE device, the GRE protocol type, which is one too)."""
    return _ethertype_header(c, 16, 14)


def sll2(c: Cursor) -> int | str:
    """Linux cooked v2: protocol first, then interface, ARPHRD type, packet type, address."""
    return _ethertype_header(c, 20, 0)


def family(c: Cursor) -> int | str:
    """BSD null/loopback: a 4-byte address family, in the writing host's byte order
    (``DLT_NULL``) or network order (``DLT_LOOP``; some writers differ): both are tried,
    as the families are small numbers."""
    if not c.has(4):
        return "truncated"
    b = c.buf
    o = c.off
    le = b[o] | b[o + 1] << 8 | b[o + 2] << 16 | b[o + 3] << 24
    be = b[o + 3] | b[o + 2] << 8 | b[o + 1] << 16 | b[o] << 24
    c.off += 4
    return _FAMILIES.get(le if le < 0x10000 else be, "not_ip")


def raw(c: Cursor) -> int | str:
    """Raw IP: the version nibble says which."""
    if not c.has(1):
        return "truncated"
    v = c.buf[c.off] >> 4
    return IPV4 if v == 4 else IPV6 if v == 6 else "bad_ip_header"


def ppp(c: Cursor) -> int | str:
    """A PPP frame: the HDLC-like address and control bytes (0xff 0x03) if present, then
    the protocol, one byte when compressed (RFC 1661: an odd first byte)."""
    if not c.has(1):
        return "truncated"
    b = c.buf
    if b[c.off] == 0xFF:
        if not c.has(2) or b[c.off + 1] != 0x03:
            return "bad_ppp_header"
        c.off += 2
    if not c.has(1):
        return "truncated"
    if b[c.off] & 1:
        proto = b[c.off]
        c.off += 1
    else:
        if not c.has(2):
            return "truncated"
        proto = U16.unpack_from(b, c.off)[0]
        c.off += 2
    c.enter("ppp")
    return _PPP_PROTOCOLS.get(proto, "not_ip")


def ppp_hdlc(c: Cursor) -> int | str:
    """``LINKTYPE_PPP_HDLC``: PPP in HDLC-like framing, or Cisco HDLC framing (an address
    byte of 0x0f or 0x8f), which libpcap files under the same link type."""
    if not c.has(1):
        return "truncated"
    return CHDLC if c.buf[c.off] in (0x0F, 0x8F) else PPP


def chdlc(c: Cursor) -> int | str:
    """Cisco HDLC: address (0x0f unicast, 0x8f broadcast), control, EtherType."""
    if not c.has(4):
        return "truncated"
    if c.buf[c.off] not in (0x0F, 0x8F):
        return "bad_chdlc_header"
    etype = U16.unpack_from(c.buf, c.off + 2)[0]
    c.off += 4
    c.enter("chdlc")
    return by_ethertype(etype)


def pppoe(c: Cursor) -> int | str:
    """A PPPoE session header (RFC 2516: version and type 1, code 0, session id, length)
    followed by PPP; the session id is part of the tunnel identity (``pppoe:<id>``)."""
    if not c.has(6):
        return "truncated"
    b, o = c.buf, c.off
    if b[o] != 0x11 or b[o + 1] != 0:
        return "bad_pppoe_header"
    sid, length = U16.unpack_from(b, o + 2)[0], U16.unpack_from(b, o + 4)[0]
    if not c.bound(o + 6 + length):
        return "bad_pppoe_header"
    c.off += 6
    c.enter("pppoe", f"pppoe:{sid}")
    return PPP
