"""Adversarial captures of encapsulated and fragmented TCP, made with scapy: one TCP
conversation (handshake, data both ways, FINs) wrapped in each encapsulation and link type
the decoder supports, written as pcap files for ``mirror-agent offline`` and tshark."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

from scapy.contrib.erspan import ERSPAN_II, ERSPAN_III
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import GRE, CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw

from agent.decode import (
    LINKTYPE_C_HDLC,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_PPP,
    LINKTYPE_PPP_HDLC,
    LINKTYPE_RAW,
)

CLIENT, SERVER = "192.0.2.1", "198.51.100.2"
CLIENT6, SERVER6 = "2001:db8::1", "2001:db8::2"
VTEP_A, VTEP_B = "203.0.113.1", "203.0.113.2"
VTEP6_A, VTEP6_B = "2001:db8:ff::1", "2001:db8:ff::2"
PORT = 8080

#: A wrapper: the inner IP packet and whether it goes client→server → the frame's bytes.
Wrap = Callable[[Packet, bool], bytes]


def conversation(v6: bool = False, seed: int = 0, sport: int = 40000,
                 sizes: tuple[int, ...] = (300, 1200, 7, 900)) -> list[tuple[Packet, bool]]:
    """One TCP connection as inner IP packets, each with its direction: SYN, SYN-ACK, ACK,
    data from the client (``sizes`` alternating client/server), FINs."""
    rng = random.Random(seed)
    ip: Callable[..., Packet] = IPv6 if v6 else IP
    c, s = (CLIENT6, SERVER6) if v6 else (CLIENT, SERVER)
    cseq, sseq = rng.getrandbits(32), rng.getrandbits(32)
    out: list[tuple[Packet, bool]] = []

    def pkt(up: bool, flags: str, payload: bytes = b"") -> None:
        nonlocal cseq, sseq
        seq, ack = (cseq, sseq) if up else (sseq, cseq)
        t = TCP(sport=sport if up else PORT, dport=PORT if up else sport, flags=flags,
                seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF)
        layer = ip(src=c, dst=s) if up else ip(src=s, dst=c)
        out.append((layer / t / Raw(payload) if payload else layer / t, up))
        step = len(payload) + (1 if "S" in flags or "F" in flags else 0)
        if up:
            cseq += step
        else:
            sseq += step

    pkt(True, "S")
    pkt(False, "SA")
    pkt(True, "A")
    for i, n in enumerate(sizes):
        pkt(i % 2 == 0, "PA", rng.randbytes(n))
    pkt(True, "FA")
    pkt(False, "FA")
    pkt(True, "A")
    return out


def eth(payload: Packet, etype: int | None = None) -> Packet:
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if etype is not None:
        e.type = etype
    return e / payload


def outer_ip(up: bool, proto: int | None = None) -> Packet:
    o = IP(src=VTEP_A, dst=VTEP_B) if up else IP(src=VTEP_B, dst=VTEP_A)
    if proto is not None:
        o.proto = proto
    return o


def vxlan(vni: int, vlans: tuple[int, int] | None = None) -> Wrap:
    """VXLAN (optionally VLAN-tagged outside and inside: a VLAN inside VXLAN inside a VLAN)."""
    def wrap(p: Packet, up: bool) -> bytes:
        inner = eth(Dot1Q(vlan=vlans[1]) / p) if vlans else eth(p)
        tunnel = outer_ip(up) / UDP(sport=51000 + vni, dport=4789) / VXLAN(vni=vni) / inner
        return bytes(eth(Dot1Q(vlan=vlans[0]) / tunnel) if vlans else eth(tunnel))
    return wrap


def geneve(vni: int) -> Wrap:
    def wrap(p: Packet, up: bool) -> bytes:
        g = GENEVE(vni=vni, proto=0x6558, optionlen=2, options=b"\x01\x02\x03\x04" * 2)
        return bytes(eth(outer_ip(up) / UDP(sport=52000, dport=6081) / g / eth(p)))
    return wrap


def gre_ip(key: int | None) -> Wrap:
    """GRE carrying IP, with a key, sequence numbers and a checksum (or none of them)."""
    seq = iter(range(1, 1000))

    def wrap(p: Packet, up: bool) -> bytes:
        proto = 0x0800 if p.version == 4 else 0x86DD
        g = (GRE(key_present=1, key=key, seqnum_present=1, sequence_number=next(seq),
                 chksum_present=1, proto=proto) if key is not None else GRE(proto=proto))
        return bytes(eth(outer_ip(up) / g / p))
    return wrap


def gre_teb(key: int) -> Wrap:
    def wrap(p: Packet, up: bool) -> bytes:
        return bytes(eth(outer_ip(up) / GRE(key_present=1, key=key, proto=0x6558) / eth(p)))
    return wrap


def erspan(version: int, session: int) -> Wrap:
    seq = iter(range(1, 1000))

    def wrap(p: Packet, up: bool) -> bytes:
        if version == 2:
            head = GRE(seqnum_present=1, sequence_number=next(seq), proto=0x88BE) / ERSPAN_II(
                session_id=session, index=7)
        else:
            head = GRE(proto=0x22EB) / ERSPAN_III(session_id=session, timestamp=12345)
        return bytes(eth(outer_ip(up) / head / eth(p)))
    return wrap


def ip_in_ip(outer6: bool) -> Wrap:
    def wrap(p: Packet, up: bool) -> bytes:
        nh = 4 if p.version == 4 else 41
        o: Packet
        if outer6:
            o = IPv6(src=VTEP6_A, dst=VTEP6_B, nh=nh) if up else IPv6(src=VTEP6_B, dst=VTEP6_A,
                                                                        nh=nh)
        else:
            o = outer_ip(up, nh)
        return bytes(eth(o / p))
    return wrap


def pppoe(session: int) -> Wrap:
    def wrap(p: Packet, up: bool) -> bytes:
        proto = 0x0021 if p.version == 4 else 0x0057
        return bytes(eth(PPPoE(sessionid=session) / PPP(proto=proto) / p, 0x8864))
    return wrap


def ppp_hdlc(p: Packet, _up: bool) -> bytes:
    return b"\xff\x03" + struct.pack("!H", 0x0021 if p.version == 4 else 0x0057) + bytes(p)


def ppp_compressed(p: Packet, _up: bool) -> bytes:
    """PPP without address/control bytes, protocol field compressed to one byte."""
    return bytes([0x21 if p.version == 4 else 0x57]) + bytes(p)


def cisco_hdlc(p: Packet, up: bool) -> bytes:
    return bytes([0x0F if up else 0x8F, 0]) + struct.pack(
        "!H", 0x0800 if p.version == 4 else 0x86DD) + bytes(p)


def null_family(byteorder: str) -> Wrap:
    def wrap(p: Packet, _up: bool) -> bytes:
        fam = 2 if p.version == 4 else 30
        return struct.pack(byteorder + "I", fam) + bytes(p)
    return wrap


def sll(p: Packet, _up: bool) -> bytes:
    return bytes(CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6,
                             proto=0x0800 if p.version == 4 else 0x86DD) / p)


def sll2(p: Packet, _up: bool) -> bytes:
    return bytes(CookedLinuxV2(proto=0x0800 if p.version == 4 else 0x86DD, ifindex=2,
                               lladdrtype=1, lladdrlen=6) / p)


def raw(p: Packet, _up: bool) -> bytes:
    return bytes(p)


#: name → (link type, wrapper, IPv6 inside?, the tunnel identity expected on the flow).
CASES: dict[str, tuple[int, Wrap, bool, str]] = {
    "vxlan": (LINKTYPE_ETHERNET, vxlan(42), False, "vxlan:42"),
    "vxlan_vlans": (LINKTYPE_ETHERNET, vxlan(7, (10, 20)), False, "vxlan:7"),
    "vxlan_v6_inside": (LINKTYPE_ETHERNET, vxlan(43), True, "vxlan:43"),
    "geneve": (LINKTYPE_ETHERNET, geneve(5), False, "geneve:5"),
    "gre_key_seq_csum": (LINKTYPE_ETHERNET, gre_ip(9), False, "gre:9"),
    "gre_plain_v6": (LINKTYPE_ETHERNET, gre_ip(None), True, ""),
    "gre_teb": (LINKTYPE_ETHERNET, gre_teb(11), False, "gre:11"),
    "erspan2": (LINKTYPE_ETHERNET, erspan(2, 3), False, "erspan:3"),
    "erspan3": (LINKTYPE_ETHERNET, erspan(3, 4), False, "erspan:4"),
    "ip4in4": (LINKTYPE_ETHERNET, ip_in_ip(False), False, ""),
    "ip6in4": (LINKTYPE_ETHERNET, ip_in_ip(False), True, ""),
    "ip4in6": (LINKTYPE_ETHERNET, ip_in_ip(True), False, ""),
    "ip6in6": (LINKTYPE_ETHERNET, ip_in_ip(True), True, ""),
    "pppoe": (LINKTYPE_ETHERNET, pppoe(0x11), False, "pppoe:17"),
    "pppoe_v6": (LINKTYPE_ETHERNET, pppoe(0x12), True, "pppoe:18"),
    "ppp": (LINKTYPE_PPP, ppp_hdlc, False, ""),
    "ppp_compressed": (LINKTYPE_PPP, ppp_compressed, True, ""),
    "ppp_in_hdlc": (LINKTYPE_PPP_HDLC, ppp_hdlc, False, ""),
    "cisco_hdlc": (LINKTYPE_C_HDLC, cisco_hdlc, True, ""),
    "null_le": (LINKTYPE_NULL, null_family("<"), False, ""),
    "null_be_v6": (LINKTYPE_NULL, null_family(">"), True, ""),
    "loop": (LINKTYPE_LOOP, null_family(">"), False, ""),
    "sll": (LINKTYPE_LINUX_SLL, sll, True, ""),
    "sll2": (LINKTYPE_LINUX_SLL2, sll2, False, ""),
    "raw": (LINKTYPE_RAW, raw, True, ""),
}


def frames(name: str, seed: int = 0) -> tuple[int, list[bytes]]:
    """The link type and frames of one case's conversation."""
    linktype, wrap, v6, _tunnel = CASES[name]
    return linktype, [wrap(p, up) for p, up in conversation(v6, seed)]


def ip_fragments(p: Packet, size: int, ident: int) -> list[Packet]:
    """``p`` (IPv4 or IPv6, no extension headers) cut into fragments of ``size`` payload
    bytes (a multiple of 8), in order."""
    v6 = p.version == 6
    raw_ = bytes(p)
    head = 40 if v6 else (raw_[0] & 0x0F) * 4
    payload = raw_[head:]
    proto = raw_[6] if v6 else raw_[9]
    out: list[Packet] = []
    for off in range(0, len(payload), size):
        chunk = payload[off : off + size]
        more = off + size < len(payload)
        out.append(fragment_at(p, off, chunk, more, ident, proto))
    return out


def fragment_at(p: Packet, off: int, chunk: bytes, more: bool, ident: int,
                proto: int) -> Packet:
    """One fragment of ``p``'s datagram: ``chunk`` at payload offset ``off``."""
    if p.version == 6:
        return IPv6(src=p.src, dst=p.dst, nh=44) / IPv6ExtHdrFragment(
            nh=proto, offset=off // 8, m=int(more), id=ident) / Raw(chunk)
    return IP(src=p.src, dst=p.dst, id=ident, proto=proto, flags="MF" if more else 0,
              frag=off // 8) / Raw(chunk)


def fragmented(v6: bool, seed: int = 0, order: str = "shuffle", size: int = 400,
               extra: Callable[[Packet, list[Packet], int], list[Packet]] | None = None,
               ) -> list[tuple[Packet, bool]]:
    """The conversation with each data segment (4000+ bytes) in IP fragments of ``size``
    bytes, ``order`` ``in``, ``reverse`` or ``shuffle``d within each datagram; ``extra``
    may rewrite each datagram's fragment list (drop one, add overlapping copies)."""
    rng = random.Random(seed)
    out: list[tuple[Packet, bool]] = []
    for p, up in conversation(v6, seed, sizes=(4000, 5000, 4100, 4500)):
        if Raw not in p:
            out.append((p, up))
            continue
        ident = rng.getrandbits(32 if v6 else 16)
        frags = ip_fragments(p, size, ident)
        if extra is not None:
            frags = extra(p, frags, ident)
        if order == "reverse":
            frags.reverse()
        elif order == "shuffle":
            rng.shuffle(frags)
        out += [(f, up) for f in frags]
    return out


def overlapping(conflict: bool) -> Callable[[Packet, list[Packet], int], list[Packet]]:
    """Adds, before each datagram's last fragment, a copy overlapping the first three:
    bytes [size-8, 2*size+8) again; with ``conflict`` those bytes differ (the first copy
    must win)."""
    def extra(p: Packet, frags: list[Packet], ident: int) -> list[Packet]:
        v6 = p.version == 6
        raw_ = bytes(p)
        head = 40 if v6 else (raw_[0] & 0x0F) * 4
        payload = raw_[head:]
        size = len(frags[0][Raw].load)
        chunk = payload[size - 8 : 2 * size + 8]
        if conflict:
            chunk = bytes(b ^ 0xFF for b in chunk)
        proto = raw_[6] if v6 else raw_[9]
        return [*frags[:-1], fragment_at(p, size - 8, chunk, True, ident, proto), frags[-1]]
    return extra


def dropping(index: int) -> Callable[[Packet, list[Packet], int], list[Packet]]:
    """Drops each datagram's fragment ``index`` (0: the first, with the TCP header)."""
    def extra(_p: Packet, frags: list[Packet], _ident: int) -> list[Packet]:
        return [f for i, f in enumerate(frags) if i != index]
    return extra


def write_pcap(path: Path, linktype: int, frames_: list[bytes], step: float = 0.001,
               start: float = 1_700_000_000.0, times: list[float] | None = None) -> None:
    """A little-endian microsecond pcap of ``frames_``, ``step`` seconds apart (or at
    ``times``)."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype)]
    for i, f in enumerate(frames_):
        ts = times[i] if times is not None else start + i * step
        sec = int(ts)
        out.append(struct.pack("<IIII", sec, round((ts - sec) * 1e6), len(f), len(f)) + f)
    path.write_bytes(b"".join(out))
