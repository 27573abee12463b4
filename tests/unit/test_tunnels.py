"""Tunnels and link types in the decoder: the tunnel identity on segments and chunks, every
malformed or cut header counted by reason (never raised), the layer bound, the settings."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import GRE, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw

from agent.decode import (
    LINKTYPE_ETHERNET,
    LINKTYPE_NULL,
    DecodeConfig,
    Decoder,
)
from agent.model import Direction, TrafficChunk
from agent.reassembly import Reassembler
from agent.sinks.record import chunk_json
from agent.sources.files.pcapfile import PcapFileSource
from tests.integration import encap_corpus as corpus

INNER = IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=40000, dport=8080, flags="PA",
                                                      seq=1000) / Raw(b"hello")
#: Every reason a frame may be skipped for here.
REASONS = {"truncated", "not_ip", "not_tcp", "bad_ip_header", "bad_tcp_header", "too_deep",
           "bad_udp_header", "bad_vxlan_header", "bad_geneve_header", "bad_gre_header",
           "bad_erspan_header", "bad_pppoe_header", "bad_ppp_header", "bad_chdlc_header",
           "bad_fragment"}


def _one(frame: bytes | Packet, linktype: int = LINKTYPE_ETHERNET,
         config: DecodeConfig | None = None, orig: int = -1) -> tuple[object, Decoder]:
    """Decode one frame, whose length on the wire is ``orig`` (default: as captured)."""
    d = Decoder(linktype, config=config)
    raw = bytes(frame)
    return d.decode(raw, 1.0, len(raw) if orig < 0 else orig), d


@pytest.mark.parametrize("name", sorted(corpus.CASES))
def test_every_case_decodes_with_its_tunnel_and_every_cut_is_counted(name: str) -> None:
    linktype, wrap, _v6, tunnel = corpus.CASES[name]
    frame = wrap(INNER, True)
    seg, d = _one(frame, linktype)
    assert seg is not None and seg.payload == b"hello" and seg.tunnel == tunnel  # type: ignore[attr-defined]
    for n in range(len(frame)):
        cut, d = _one(frame[:n], linktype, orig=len(frame))
        reasons = set(d.stats.skipped)
        if cut is None:
            assert len(reasons) == 1 and reasons <= REASONS, (n, reasons)
        else:  # cut in the payload only: the rest is lost, not malformed
            assert cut.lost == len(frame) - n  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(corpus.CASES))
def test_flipped_bytes_never_raise(name: str) -> None:
    linktype, wrap, _v6, _tunnel = corpus.CASES[name]
    frame = wrap(INNER, True)
    d = Decoder(linktype)
    for i in range(len(frame) - 5):
        for bit in (0x01, 0x10, 0x80, 0xFF):
            d.decode(frame[:i] + bytes([frame[i] ^ bit]) + frame[i + 1 :], 1.0)
    d.finish()
    assert set(d.stats.skipped) <= REASONS | {"fragment_headers_missing"}


def _vxlan(inner: Packet, flags: int = 0x08, vni: int = 5, dport: int = 4789) -> bytes:
    return bytes(Ether() / IP(src="203.0.113.1", dst="203.0.113.2") / UDP(sport=1, dport=dport)
                 / VXLAN(flags=flags, vni=vni) / Ether() / inner)


@pytest.mark.parametrize(("frame", "reason"), [
    (_vxlan(INNER, flags=0), "bad_vxlan_header"),
    (bytes(Ether() / IP() / UDP(dport=6081) / GENEVE(version=1, proto=0x6558) / Ether()
           / INNER), "bad_geneve_header"),
    (bytes(Ether() / IP() / GRE(routing_present=1, proto=0x0800) / INNER), "bad_gre_header"),
    (bytes(Ether() / IP() / GRE(version=2, proto=0x0800) / INNER), "bad_gre_header"),
    (bytes(Ether() / IP() / GRE(seqnum_present=1, proto=0x88BE) / Raw(
        b"\x30\x00\x00\x01" + bytes(4) + bytes(Ether() / INNER))), "bad_erspan_header"),
    (bytes(Ether(type=0x8864) / b"\x12\x00\x00\x01\x00\x40\x00\x21" / INNER),
     "bad_pppoe_header"),
    (bytes(Ether(type=0x8864) / b"\x11\x00\x00\x01\xff\xff\x00\x21" / INNER),
     "bad_pppoe_header"),  # its length runs past the frame's end as declared
    (bytes(Ether() / IP() / UDP(dport=4789, len=4) / VXLAN() / Ether() / INNER),
     "bad_udp_header"),
    (bytes(Ether() / IP() / UDP(dport=4789) / VXLAN() / Ether() /
           IP(bytes(INNER)[:2] + b"\x05\xdc" + bytes(INNER)[4:])), "bad_ip_header"),
    (bytes(Ether() / IP() / UDP(sport=1, dport=4790) / VXLAN() / Ether() / INNER), "not_tcp"),
    (bytes(Ether(type=0x8863) / bytes(20)), "not_ip"),
])
def test_malformed_tunnel_headers_are_counted(frame: bytes, reason: str) -> None:
    seg, d = _one(frame, LINKTYPE_ETHERNET, DecodeConfig())
    assert seg is None and dict(d.stats.skipped) == {reason: 1}


def test_the_layer_bound_and_the_ports_are_settings() -> None:
    frame = _vxlan(INNER)  # Ethernet, IP, UDP, VXLAN, Ethernet, IP: 6 layers
    assert _one(frame, config=DecodeConfig(max_layers=6))[0] is not None
    seg, d = _one(frame, config=DecodeConfig(max_layers=5))
    assert seg is None and d.stats.skipped["too_deep"] == 1
    linux = _vxlan(INNER, dport=8472)  # the Linux kernel's old default port
    assert _one(linux)[1].stats.skipped["not_tcp"] == 1
    seg, _d = _one(linux, config=DecodeConfig(vxlan_ports=frozenset({8472})))
    assert seg is not None and seg.tunnel == "vxlan:5"  # type: ignore[attr-defined]


def test_null_link_type_families() -> None:
    ip = bytes(INNER)
    for head in (struct.pack("<I", 2), struct.pack(">I", 2)):
        assert _one(head + ip, LINKTYPE_NULL)[0] is not None
    seg, d = _one(struct.pack("<I", 17) + ip, LINKTYPE_NULL)
    assert seg is None and d.stats.skipped["not_ip"] == 1


def test_an_atomic_ipv6_fragment_is_no_fragment() -> None:
    p = (IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=0, m=0)
         / TCP(sport=1, dport=2) / Raw(b"x"))
    seg, d = _one(Ether() / p)
    assert seg is not None and seg.payload == b"x" and d.defrag.pending == 0  # type: ignore[attr-defined]


def test_encapsulations_are_counted_per_segment() -> None:
    d = Decoder(LINKTYPE_ETHERNET)
    gre_in_vxlan = _vxlan(IP(src="203.0.113.3", dst="203.0.113.4") / GRE(
        key_present=1, key=3, proto=0x0800) / INNER)
    seg = d.decode(gre_in_vxlan, 0.0)
    assert seg is not None and seg.tunnel == "vxlan:5/gre:3"
    assert d.stats.as_dict()["encap_vxlan"] == d.stats.as_dict()["encap_gre"] == 1


def test_tenants_are_two_flows_and_chunks_carry_their_tunnel() -> None:
    d = Decoder(LINKTYPE_ETHERNET)
    segs = [d.decode(_vxlan(INNER, vni=v), 1.0) for v in (1, 2)]
    r = Reassembler(classify=lambda s, dp: Direction.TO_OBSERVED)
    out = r.process([s for s in segs if s is not None])
    chunks = [c for c in out if isinstance(c, TrafficChunk)]
    assert r.flow_count == 2 and [c.tunnel for c in chunks] == ["vxlan:1", "vxlan:2"]
    assert chunks[0].flow_id != chunks[1].flow_id
    assert chunk_json(chunks[0], b"")["tunnel"] == "vxlan:1"
    assert "tunnel" not in chunk_json(TrafficChunk(b"", "a", "b", Direction.UNKNOWN, 0.0, 1),
                                      b"")
    assert chunks[1].with_data(b"x").tunnel == "vxlan:2"


def test_a_pcap_header_announcing_a_frame_check_sequence(tmp_path: Path) -> None:
    """The link type field's high bits (FCS present, 4 bytes) leave the link type alone."""
    frame = _vxlan(INNER) + b"\xde\xad\xbe\xef"  # the FCS, after the IP datagram's end
    pcap = tmp_path / "fcs.pcap"
    corpus.write_pcap(pcap, LINKTYPE_ETHERNET | 0x1 << 26 | 4 << 28, [frame])
    (seg,) = [s for b in PcapFileSource([pcap]).batches() for s in b]
    assert seg.payload == b"hello" and seg.tunnel == "vxlan:5" and seg.lost == 0
