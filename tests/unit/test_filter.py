"""Headless BPF: tcpdump expressions compiled by libpcap, matched against bytes."""

from __future__ import annotations

import pytest

from agent.model import SYN, Segment
from agent.sources.filter import (
    BpfFilter,
    FilterError,
    FrameMatcher,
    SegmentMatcher,
    synthesize_frame,
)

A, B = bytes([127, 0, 0, 1]), bytes([192, 0, 2, 5])


def test_match_synthesized_packet() -> None:
    f = BpfFilter("tcp dst port 21")
    assert f.matches(synthesize_frame(A, A, 3345, 21))
    assert not f.matches(synthesize_frame(A, A, 21, 3345))


def test_expressions_on_hosts_flags_payload_and_v6() -> None:
    frame = synthesize_frame(A, B, 4000, 80, b"GET / HTTP/1.1\r\n", flags=SYN)
    assert BpfFilter("host 192.0.2.5 and tcp[tcpflags] & tcp-syn != 0").matches(frame)
    assert not BpfFilter("src host 192.0.2.5").matches(frame)
    v6 = synthesize_frame(bytes(15) + b"\x01", bytes(15) + b"\x02", 1, 443)
    assert BpfFilter("ip6 and port 443").matches(v6)


def test_checksums_are_valid() -> None:
    import subprocess
    import tempfile

    # tshark validates checksums when asked; a bad one would show in the expert info.
    frame = synthesize_frame(A, B, 4000, 80, b"abc")
    with tempfile.NamedTemporaryFile(suffix=".pcap") as f:
        import struct
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        f.write(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame)
        f.flush()
        res = subprocess.run(["tshark", "-r", f.name, "-o", "tcp.check_checksum:TRUE",
                              "-o", "ip.check_checksum:TRUE", "-Y", "tcp.checksum.status==1 "
                              "and ip.checksum.status==1"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("tshark unavailable")
    assert res.stdout.strip(), "checksums not valid"


def test_bad_expression() -> None:
    with pytest.raises(FilterError, match="bad filter"):
        BpfFilter("tcp port banana")


def test_classic_bpf_instructions() -> None:
    insns = BpfFilter("tcp").instructions()
    assert insns and insns[-1][0] == 0x06  # BPF_RET


def test_frame_and_segment_matchers() -> None:
    m = FrameMatcher("port 8080")
    assert m(1, synthesize_frame(A, B, 1, 8080)) and not m(1, synthesize_frame(A, B, 1, 9))
    sm = SegmentMatcher("src port 5000")
    assert sm(Segment(A, 5000, B, 80, 1, 0, 0, b"x", 0.0))
    assert not sm(Segment(A, 5001, B, 80, 1, 0, 0, b"x", 0.0))
