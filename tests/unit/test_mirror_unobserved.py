"""Only connections of observed ports belong in a recording or on the shadow, whatever the
hooks (issue 13): a capture holding a connection to another port must not leak it."""

from __future__ import annotations

import base64
import json
import socket
import struct
from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.hooks import KeepAll
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.model import ACK, FIN, PSH, SYN
from agent.sinks.record import NativeReader
from agent.sources.channel import ChannelSource
from agent.sources.filter import synthesize_frame
from tests.unit.segments import Conversation

# Metrics (agent/metrics.py) this file reads from stats.
UNOBSERVED_FORWARD = 'mirror_agent_mirror_unobserved_bytes_total{hook="forward"}'
UNOBSERVED_RECORD = 'mirror_agent_mirror_unobserved_bytes_total{hook="record"}'

CLIENT, SERVER = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 1])


def connection(client_port: int, server_port: int, request: bytes,
               response: bytes) -> list[bytes]:
    """The frames of one whole connection: handshake, request, response, both FINs."""
    c_isn, s_isn = 1000 + client_port, 9000 + server_port

    def frame(from_client: bool, offset: int, payload: bytes = b"",
              flags: int = ACK | PSH) -> bytes:
        if from_client:
            seq = c_isn if flags & SYN else c_isn + 1 + offset
            return synthesize_frame(CLIENT, SERVER, client_port, server_port, payload, seq,
                                    s_isn + 1, flags)
        seq = s_isn if flags & SYN else s_isn + 1 + offset
        return synthesize_frame(SERVER, CLIENT, server_port, client_port, payload, seq,
                                c_isn + 1, flags)

    return [frame(True, 0, flags=SYN), frame(False, 0, flags=SYN | ACK),
            frame(True, 0, flags=ACK), frame(True, 0, request), frame(False, 0, response),
            frame(True, len(request), flags=FIN | ACK),
            frame(False, len(response), flags=FIN | ACK)]


def write_pcap(path: Path, frames: list[bytes]) -> None:
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for n, fr in enumerate(frames):
            out.write(struct.pack("<IIII", 1_700_000_000, n, len(fr), len(fr)))
            out.write(fr)


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    """A connection to the observed port 8090 and one to 9999, interleaved."""
    observed = connection(40001, 8090, b"GET /observed HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n")
    other = connection(40002, 9999, b"SECRET other service", b"other reply")
    frames = [f for pair in zip(observed, other, strict=True) for f in pair]
    path = tmp_path / "two-ports.pcap"
    write_pcap(path, frames)
    return path


def test_jsonl_recording_holds_only_the_observed_port(tmp_path: Path, capture: Path) -> None:
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    assert main(["offline", str(capture), "--port", "8090", "--both-directions", "--record",
                 str(out), "--record-format", "jsonl", "--stats-json", str(stats)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["from"], r["to"]) for r in recs} == {
        ("192.0.2.1:40001", "198.51.100.1:8090"), ("198.51.100.1:8090", "192.0.2.1:40001")}
    assert b"".join(base64.b64decode(r["data"]) for r in recs) == (
        b"GET /observed HTTP/1.1\r\n\r\nHTTP/1.1 200 OK\r\n")
    # The other connection's bytes are not silently gone: counted as unobserved.
    assert json.loads(stats.read_text())[UNOBSERVED_RECORD] == len(
        b"SECRET other service") + len(b"other reply")


def test_native_recording_holds_no_trace_of_the_other_port(tmp_path: Path,
                                                            capture: Path) -> None:
    out = tmp_path / "out.bin"
    assert main(["offline", str(capture), "--port", "8090", "--both-directions", "--record",
                 str(out)]) == 0
    with out.open("rb") as f:
        recs = list(NativeReader(f))
    assert [r.kind for r in recs] == ["chunk", "chunk", "end"]
    assert {r.flow_id for r in recs} == {recs[0].flow_id}  # no end record of the other flow
    assert all(b"SECRET" not in r.data for r in recs)


def test_the_shadow_is_never_dialled_for_an_unobserved_connection() -> None:
    dialed: list[str] = []

    def dial(addr: str) -> socket.socket:
        dialed.append(addr)
        raise OSError("no shadow here")

    c = Conversation(server=(bytes([192, 0, 2, 2]), 9999))
    src = ChannelSource()
    for s in [*c.handshake(), c.seg(True, 0, b"SECRET"), *c.fins(6, 0)]:
        src.put(s)
    src.end()
    m = TrafficMirror(MirrorConfig(observed_port=8080, target_addr="192.0.2.99:80", dial=dial,
                                   forward_hook=KeepAll(), record_hook=KeepAll(),
                                   write_func=lambda ch, d: pytest.fail("recorded")))
    m.run(src)
    assert dialed == []
    assert m.stats()[UNOBSERVED_FORWARD] == 6 == m.stats()[UNOBSERVED_RECORD]
