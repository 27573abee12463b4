"""Resets, TCP Fast Open and IPv4-mapped addresses in captures, checked against what the
receiving socket really read and against tshark where tshark follows the same bytes.

tshark's ``follow,tcp`` follows what is on the wire: it keeps the data of a RST (and bytes
sent after the reset), which the receiving stack never delivers. There the mirror follows the
receiver, as agent/reassembly.py documents, and the test says so.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import sys
from pathlib import Path

from agent.model import ACK, FIN, PSH, SYN
from agent.sources.filter import synthesize_frame
from lab.netns import NetNS, Tcpdump
from tests.integration.truth import Streams, assert_same_streams, jsonl_streams, tshark_streams

HERE = Path(__file__).resolve().parent
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
REASSEMBLY = "mirror_agent_reassembly_"


def _offline(pcap: Path, ports: str, tmp: Path) -> tuple[Streams, dict[str, float]]:
    """Record ``pcap`` (both directions, JSON lines); the streams and the stats."""
    out, stats = tmp / "out.jsonl", tmp / "stats.json"
    res = subprocess.run([*AGENT, "offline", str(pcap), "--port", ports, "--record", str(out),
                          "--record-format", "jsonl", "--both-directions", "--stats-json",
                          str(stats)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    streams, gaps = jsonl_streams(out)
    assert gaps == 0
    return streams, json.loads(stats.read_text())


def test_resets_and_fast_open_follow_the_receiving_socket(tmp_path: Path) -> None:
    pcap = tmp_path / "edge.pcap"
    with NetNS() as ns:
        # Fast Open on both sides, no cookie needed (client 0x1|0x4, server 0x2|0x200).
        ns.run("sysctl", "-w", "net.ipv4.tcp_fastopen=519")
        cap = Tcpdump(ns, "lo", pcap, "tcp port 8080 or tcp port 8081")
        peer = ns.run(sys.executable, str(HERE / "tcp_edge_peer.py"), timeout=60)
        assert "0 packets dropped by kernel" in cap.stop()
    runs = json.loads(peer.stdout)
    ours, stats = _offline(pcap, "8080,8081", tmp_path)
    truth = {**tshark_streams(pcap, 8080), **tshark_streams(pcap, 8081)}

    def request(name: str) -> tuple[str, str]:
        return (f"127.0.0.1:{runs[name]['port']}",
                "127.0.0.1:8080" if name == "tfo_taken" else "127.0.0.1:8081")

    # Each server socket read exactly what the mirror delivered.
    for name, run in runs.items():
        assert ours[request(name)] == bytes.fromhex(run["received"]), name
    assert runs["blind_rst"]["received"] == b"part1part2".hex()  # the kernel ignored them
    assert runs["rst_data"]["reset"] and runs["rst_data"]["received"] == b"part1".hex()
    # The scenarios happened as meant: data on a SYN taken once, refused once, two blind
    # resets ignored, one RST with 4 bytes taken.
    assert stats[REASSEMBLY + "syn_data_bytes_total"] == len(b"hello-on-syn")
    assert stats[REASSEMBLY + "syn_data_refused_bytes_total"] == len(b"refused-on-syn")
    assert stats[REASSEMBLY + 'rst_ignored_total{reason="in_window"}'] == 2
    assert stats[REASSEMBLY + "rst_payload_bytes_total"] == len(b"EVIL")
    assert stats[REASSEMBLY + 'flows_closed_total{reason="rst"}'] == 1
    # tshark agrees everywhere but on the reset connection's request: it keeps the RST's
    # data and what came after the reset; the server read neither.
    reset = request("rst_data")
    assert truth[reset].startswith(b"part1EVIL") and ours[reset] == b"part1"
    assert_same_streams({k: v for k, v in ours.items() if k != reset},
                        {k: v for k, v in truth.items() if k != reset})


def _write_pcap(path: Path, frames: list[bytes]) -> None:
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for i, frame in enumerate(frames):
            out.write(struct.pack("<IIII", 1_700_000_000, i, len(frame), len(frame)))
            out.write(frame)


def test_ipv4_mapped_addresses_are_written_as_tshark_writes_them(tmp_path: Path) -> None:
    """Issue 13: ``[::ffff:5.6.7.8]:40000``, not ``[::ffff:506:708]:40000``."""
    client = ipaddress.IPv6Address("::ffff:5.6.7.8").packed
    server = ipaddress.IPv6Address("2001:db8::1").packed
    c_isn, s_isn = 100, 900

    def frame(from_client: bool, seq: int, ack: int, flags: int, data: bytes = b"") -> bytes:
        if from_client:
            return synthesize_frame(client, server, 40000, 8080, data, seq, ack, flags)
        return synthesize_frame(server, client, 8080, 40000, data, seq, ack, flags)

    frames = [frame(True, c_isn, 0, SYN), frame(False, s_isn, c_isn + 1, SYN | ACK),
              frame(True, c_isn + 1, s_isn + 1, ACK | PSH, b"GET / HTTP/1.0\r\n\r\n"),
              frame(False, s_isn + 1, c_isn + 19, ACK | PSH, b"HTTP/1.0 200 OK\r\n\r\n"),
              frame(True, c_isn + 19, s_isn + 20, FIN | ACK),
              frame(False, s_isn + 20, c_isn + 20, FIN | ACK)]
    pcap = tmp_path / "mapped.pcap"
    _write_pcap(pcap, frames)
    ours, _ = _offline(pcap, "8080", tmp_path)
    truth = tshark_streams(pcap, 8080)
    assert set(ours) == {("[::ffff:5.6.7.8]:40000", "[2001:db8::1]:8080"),
                         ("[2001:db8::1]:8080", "[::ffff:5.6.7.8]:40000")}
    assert_same_streams(ours, truth)
