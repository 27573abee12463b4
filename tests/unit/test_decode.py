"""Decoding of every supported framing; malformed input is counted, never raised."""

from __future__ import annotations

import struct

import pytest

from agent.decode import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    Decoder,
)
from agent.model import ACK, PSH
from agent.sources.filter import synthesize_frame

V4A, V4B = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 2])
V6A = bytes.fromhex("20010db8000000000000000000000001")
V6B = bytes.fromhex("20010db8000000000000000000000002")


def eth_v4(payload: bytes = b"hello") -> bytes:
    return synthesize_frame(V4A, V4B, 1234, 80, payload, seq=7, ack=9)


def test_ethernet_ipv4_tcp() -> None:
    seg = Decoder(LINKTYPE_ETHERNET).decode(eth_v4(), 1.5)
    assert seg is not None
    assert (seg.src_ip, seg.src_port, seg.dst_ip, seg.dst_port) == (V4A, 1234, V4B, 80)
    assert (seg.seq, seg.ack, seg.flags, seg.payload, seg.ts) == (7, 9, ACK | PSH, b"hello", 1.5)


def test_vlan_and_qinq() -> None:
    f = eth_v4()
    tagged = f[:12] + b"\x88\xa8\x00\x05" + b"\x81\x00\x00\x07" + f[12:]
    seg = Decoder(LINKTYPE_ETHERNET).decode(tagged, 0)
    assert seg is not None and seg.payload == b"hello"


def test_linux_cooked_v1_v2_and_raw() -> None:
    ip = eth_v4()[14:]
    sll = b"\x00\x00\x00\x01\x00\x06" + b"\0" * 8 + b"\x08\x00"
    sll2 = b"\x08\x00\x00\x00" + b"\0\0\0\x01" + b"\x00\x01\x00\x06" + b"\0" * 8
    for lt, frame in ((LINKTYPE_LINUX_SLL, sll + ip), (LINKTYPE_LINUX_SLL2, sll2 + ip),
                      (LINKTYPE_RAW, ip)):
        seg = Decoder(lt).decode(frame, 0)
        assert seg is not None and seg.payload == b"hello", lt


def test_ipv4_options_and_tcp_options() -> None:
    f = bytearray(eth_v4(b"data"))
    ip = f[14:34]
    tcp = f[34:54]
    ip[0] = 0x46  # IHL 6: 4 bytes of options
    struct.pack_into("!H", ip, 2, 24 + 24 + 4)
    tcp[12] = 6 << 4  # data offset 6: 4 bytes of options
    frame = bytes(f[:14] + ip + b"\x01\x01\x01\x00" + tcp + b"\x01\x01\x01\x01" + b"data")
    seg = Decoder(LINKTYPE_ETHERNET).decode(frame, 0)
    assert seg is not None and seg.payload == b"data"


def test_ipv6_with_extension_headers() -> None:
    f = synthesize_frame(V6A, V6B, 5555, 443, b"six")
    ip, rest = bytearray(f[14:54]), f[54:]
    hop = bytes([6, 0]) + b"\0" * 6  # hop-by-hop, next = TCP
    ip[6] = 0  # next header: hop-by-hop
    struct.pack_into("!H", ip, 4, len(rest) + 8)
    seg = Decoder(LINKTYPE_ETHERNET).decode(f[:14] + bytes(ip) + hop + rest, 0)
    assert seg is not None
    assert seg.payload == b"six" and seg.src_ip == V6A and seg.dst_port == 443


def test_ethernet_padding_is_not_payload() -> None:
    f = eth_v4(b"")
    seg = Decoder(LINKTYPE_ETHERNET).decode(f + b"\0" * 6, 0)
    assert seg is not None and seg.payload == b""


def test_snaplen_cut_is_reported_as_lost() -> None:
    f = eth_v4(b"0123456789")
    seg = Decoder(LINKTYPE_ETHERNET).decode(f[:-4], 0)
    assert seg is not None and seg.payload == b"012345" and seg.lost == 4


@pytest.mark.parametrize("mutate,reason", [
    (lambda f: f[:10], "truncated"),
    (lambda f: f[:12] + b"\x08\x06" + f[14:], "not_ip"),
    (lambda f: f[:23] + b"\x11" + f[24:], "not_tcp"),
    (lambda f: f[:14] + b"\x43" + f[15:], "bad_ip_header"),
    (lambda f: f[:46] + b"\x20" + f[47:], "bad_tcp_header"),
    (lambda f: f[:40], "truncated"),
])
def test_malformed_frames_are_counted(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    d = Decoder(LINKTYPE_ETHERNET)
    assert d.decode(mutate(eth_v4()), 0) is None
    assert d.stats.skipped[reason] == 1


def test_random_garbage_never_raises() -> None:
    import random
    rng = random.Random(1)
    for lt in (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW):
        d = Decoder(lt)
        for _ in range(3000):
            n = rng.randint(0, 120)
            base = eth_v4() if rng.random() < 0.5 else b""
            frame = bytearray(base[:n] or rng.randbytes(n))
            for _ in range(rng.randint(0, 5)):
                if frame:
                    frame[rng.randrange(len(frame))] = rng.randrange(256)
            d.decode(bytes(frame), 0)
