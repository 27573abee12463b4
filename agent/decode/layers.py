"""What every decoding layer shares: the :class:`Cursor`, the layer kinds, the dispatch by
EtherType and by IP protocol.

A layer is a function ``(cursor) -> int | str``: it checks that its header is within the
captured bytes (and within what the layer around it declared) *before* reading it, moves
``cursor.off`` past it, and returns the kind of the next layer, or a skip reason (a ``str``)
for a frame that cannot be decoded further. Layers never raise on bad input.
"""

from __future__ import annotations

import struct

__all__ = ["CHDLC", "ERSPAN2", "ERSPAN3", "ETHERNET", "FRAGMENT", "GENEVE", "GRE", "IPV4",
           "IPV6", "KIND_NAMES", "LOOP", "NULL", "PPP", "PPPOE", "PPP_HDLC", "RAW", "SLL",
           "SLL2", "TCP", "U16", "U32", "UDP", "UNBOUNDED", "VLAN", "VXLAN", "Cursor",
           "by_ethertype", "by_ipproto"]

# Layer kinds: what the bytes at Cursor.off are.
(ETHERNET, VLAN, SLL, SLL2, NULL, LOOP, RAW, PPP, PPP_HDLC, CHDLC, PPPOE, IPV4, IPV6, FRAGMENT,
 UDP, GRE, VXLAN, GENEVE, ERSPAN2, ERSPAN3, TCP) = range(21)
KIND_NAMES = ("ethernet", "vlan", "sll", "sll2", "null", "loop", "raw", "ppp", "ppp_hdlc",
              "chdlc", "pppoe", "ipv4", "ipv6", "fragment", "udp", "gre", "vxlan", "geneve",
              "erspan2", "erspan3", "tcp")

#: ``Cursor.end`` when nothing bounds the frame (a source that did not give its length on the
#: wire): a snap-length cut cannot be told from a bogus length, so both count as lost bytes.
UNBOUNDED = 1 << 40

U16 = struct.Struct("!H")
U32 = struct.Struct("!I")

_ETHERTYPES: dict[int, int] = {
    0x0800: IPV4, 0x86DD: IPV6,
    0x8100: VLAN, 0x88A8: VLAN, 0x9100: VLAN, 0x9200: VLAN,  # 802.1Q, 802.1ad, old QinQ
    0x6558: ETHERNET,  # transparent Ethernet bridging (GRE, Geneve, Linux cooked on a gretap)
    0x8864: PPPOE,  # PPPoE session stage (0x8863, discovery, carries no IP)
    0x880B: PPP,  # PPP (over GRE)
}
_IPPROTOS: dict[int, int] = {6: TCP, 4: IPV4, 41: IPV6, 47: GRE, 17: UDP}


class Cursor:
    """Where decoding of one frame (or one reassembled datagram) stands.

    ``buf`` holds the bytes; ``off`` is where the current layer's header starts; ``end`` is
    where the current layer's bytes end as the layers around it declared (an IP total
    length, a UDP length). ``end`` may be past ``len(buf)``: the capture's snap length cut
    the frame, and those bytes are lost, not malformed. :attr:`limit` bounds every header
    read. ``src``/``dst`` are the addresses of the innermost IP header so far; ``tunnel``
    is the identity of the tunnels passed (see :mod:`agent.decode.tunnels`); ``encaps``
    names them for the counters; ``frag`` describes the fragment an IP layer found
    (``(version, ident, offset, more, proto)``); ``depth`` counts the layers decoded.
    """

    __slots__ = ("buf", "depth", "dst", "encaps", "end", "frag", "off", "src", "tunnel")

    def __init__(self, buf: bytes, end: int) -> None:
        self.buf = buf
        self.off = 0
        self.end = end
        self.src = b""
        self.dst = b""
        self.tunnel = ""
        self.encaps: tuple[str, ...] = ()
        self.frag: tuple[int, int, int, bool, int] = (0, 0, 0, False, 0)
        self.depth = 0

    @property
    def limit(self) -> int:
        """The end of the bytes a header may be read from: captured and declared."""
        n = len(self.buf)
        return n if n < self.end else self.end

    def has(self, size: int) -> bool:
        """Are ``size`` bytes from :attr:`off` on within :attr:`limit`? The check before
        every header read."""
        return self.off + size <= self.limit

    def enter(self, encap: str, tag: str = "") -> None:
        """Note an encapsulation passed: ``encap`` for the counters, ``tag`` (e.g.
        ``vxlan:42``) appended to the tunnel identity."""
        self.encaps += (encap,)
        if tag:
            self.tunnel = f"{self.tunnel}/{tag}" if self.tunnel else tag

    def bound(self, end: int) -> bool:
        """Narrow :attr:`end` to a length the current layer declares; False (malformed) if
        the declared end runs past the layer around it."""
        if end > self.end:
            return False
        self.end = end
        return True


def by_ethertype(etype: int) -> int | str:
    """The layer an EtherType (or GRE/PPP protocol type) announces, or ``not_ip``."""
    return _ETHERTYPES.get(etype, "not_ip")


def by_ipproto(proto: int) -> int | str:
    """The layer an IP protocol number announces, or ``not_tcp``."""
    return _IPPROTOS.get(proto, "not_tcp")
