"""Addresses as text (records, logs, chunks): RFC 5952, with IPv4-mapped IPv6 addresses in the
conventional ``::ffff:a.b.c.d`` form (issue 13), as inet_ntop and tshark write them."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from agent.model import ACK, PSH, Segment, TrafficChunk, format_addr, format_ip
from agent.reassembly import Reassembler
from agent.sinks.record.format import chunk_json

MAPPED = bytes(10) + b"\xff\xff" + bytes([5, 6, 7, 8])


@pytest.mark.parametrize(("text", "expect"), [
    ("::ffff:5.6.7.8", "::ffff:5.6.7.8"),
    ("::ffff:0.0.0.0", "::ffff:0.0.0.0"),
    ("::ffff:255.255.255.255", "::ffff:255.255.255.255"),
    ("2001:db8::1", "2001:db8::1"),
    ("::1", "::1"),
    ("::", "::"),
    ("::fffe:506:708", "::fffe:506:708"),  # not mapped: plain hex
    ("::ffff:0:506:708", "::ffff:0:506:708"),  # IPv4-translated, not mapped
    ("1::ffff:506:708", "1::ffff:506:708"),
    ("fe80::ffff:506:708", "fe80::ffff:506:708"),
])
def test_ipv6_text(text: str, expect: str) -> None:
    assert format_ip(ipaddress.IPv6Address(text).packed) == expect


def test_mapped_matches_inet_ntop() -> None:
    for last in (b"\x05\x06\x07\x08", b"\xc0\x00\x02\x01", b"\x00\x00\x00\x01"):
        packed = bytes(10) + b"\xff\xff" + last
        assert format_ip(packed) == socket.inet_ntop(socket.AF_INET6, packed)


def test_ipv4_and_addr_with_port() -> None:
    assert format_ip(bytes([192, 0, 2, 1])) == "192.0.2.1"
    assert format_addr(MAPPED, 443) == "[::ffff:5.6.7.8]:443"
    assert format_addr(bytes([192, 0, 2, 1]), 80) == "192.0.2.1:80"
    # The anonymiser's output is formatted the same way.
    assert format_addr(bytes(16), 1, lambda _ip: MAPPED) == "[::ffff:5.6.7.8]:1"


def test_chunks_records_and_log_lines_use_it() -> None:
    client = ipaddress.IPv6Address("2001:db8::7").packed
    seg = Segment(MAPPED, 40000, client, 8080, 100, 0, ACK | PSH, b"GET /", 1.0)
    out = Reassembler().process([seg])
    chunk = out[0]
    assert isinstance(chunk, TrafficChunk)
    assert (chunk.from_addr, chunk.to_addr) == ("[::ffff:5.6.7.8]:40000", "[2001:db8::7]:8080")
    assert chunk_json(chunk, chunk.data)["from"] == "[::ffff:5.6.7.8]:40000"
    assert "[::ffff:5.6.7.8]:40000>" in repr(seg)
