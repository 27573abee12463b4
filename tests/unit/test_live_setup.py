"""Live-capture set-up that needs no privileges: the AF_PACKET kernel filter and the start-up
checks' messages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from agent.model import ACK, FIN, PSH, RST, SYN
from agent.sources import SourceError
from agent.sources.afpacket import capture_expression
from agent.sources.ebpf.source import check_environment, default_buffer_mib
from agent.sources.filter import BpfFilter, synthesize_frame

V4 = (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
V6 = (bytes(15) + b"\x01", bytes(15) + b"\x02")


@pytest.mark.parametrize("addrs", [V4, V6], ids=["ipv4", "ipv6"])
def test_afpacket_filter_keeps_what_the_ebpf_program_keeps(addrs: tuple[bytes, bytes]) -> None:
    f = BpfFilter(capture_expression([8080, 9090]))
    src, dst = addrs

    def frame(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
        return synthesize_frame(src, dst, sport, dport, payload, flags=flags)

    assert f.matches(frame(40000, 8080, SYN))
    assert f.matches(frame(9090, 40000, SYN | ACK))
    assert f.matches(frame(40000, 8080, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n"))
    assert f.matches(frame(8080, 40000, FIN | ACK))
    assert f.matches(frame(40000, 9090, RST))
    assert not f.matches(frame(40000, 8080, ACK))  # pure ACK: nothing for user space
    assert not f.matches(frame(40000, 8081, ACK | PSH, b"x"))  # not our port


def test_afpacket_filter_adds_the_user_expression() -> None:
    f = BpfFilter(capture_expression([80], "src host 10.0.0.1"))
    assert f.matches(synthesize_frame(*V4, 40000, 80, b"x"))
    assert not f.matches(synthesize_frame(V4[1], V4[0], 40000, 80, b"x"))


def test_missing_kernel_headers_say_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as e:
        check_environment(modules=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / os.uname().release / "build") in msg
    assert "linux-headers" in msg and "ln -sfn" in msg and "/source" in msg


def test_missing_bcc_says_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)  # import bcc → ImportError
    with pytest.raises(SourceError, match="python3-bpfcc"):
        check_environment(modules=Path("/nonexistent"))


def test_afpacket_needs_neither_bcc_nor_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("the capability check comes first for non-root")
    monkeypatch.setitem(sys.modules, "bcc", None)
    check_environment(ebpf=False, modules=Path("/nonexistent"))


def test_default_kernel_buffer_shrinks_per_cpu_on_big_hosts() -> None:
    assert [default_buffer_mib(n) for n in (1, 2, 8, 16, 32, 64, 256)] == [16, 16, 16, 8, 4,
                                                                            4, 4]


@pytest.mark.parametrize("addrs", [V4, V6], ids=["ipv4", "ipv6"])
def test_afpacket_filter_skips_the_agents_own_forwarded_connections(
        addrs: tuple[bytes, bytes]) -> None:
    """Either port in the forward source range: a shadow connection, never captured."""
    f = BpfFilter(capture_expression([8080], own_ports=(61000, 65535)))
    src, dst = addrs
    assert f.matches(synthesize_frame(src, dst, 60999, 8080, b"GET /"))
    assert not f.matches(synthesize_frame(src, dst, 61000, 8080, b"GET /"))
    assert not f.matches(synthesize_frame(dst, src, 8080, 65535, b"HTTP/1.1 200"))
    assert not f.matches(synthesize_frame(src, dst, 61234, 8080, b"", flags=SYN))
