"""`mirror-agent offline` on captures of real traffic recorded here must match, byte for byte
and per direction, what tshark reassembles from the same capture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import NetNS, Tcpdump, run_clients, start_nginx, start_python_server
from tests.integration.truth import assert_same_streams, jsonl_streams, tshark_streams

HERE = Path(__file__).resolve().parent
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]


def _offline(pcap: Path, port: int, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*AGENT, "offline", str(pcap), "--port", str(port), "--record", str(out),
                          "--record-format", "jsonl", "--both-directions", *extra],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def test_nginx_keepalive_upload_parallel(tmp_path: Path) -> None:
    pcap = tmp_path / "nginx.pcap"
    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(range(251)) * 16000)  # ~4 MB, non-repeating at 256
    with NetNS() as ns:
        start_nginx(ns, 8080, tmp_path / "nginx")
        cap = Tcpdump(ns, "lo", pcap, "tcp port 8080")
        urls = [f"http://127.0.0.1:8080/k{i}" for i in range(5)]
        ns.run("curl", "-sf", "-o", "/dev/null", *urls)  # keep-alive: one connection
        ns.run("curl", "-sf", "-o", "/dev/null", "--data-binary", f"@{upload}",
               "http://127.0.0.1:8080/upload")
        ns.run("curl", "-sf", "-o", "/dev/null", "--parallel", "--parallel-max", "20",
               *[f"http://127.0.0.1:8080/p{i}" for i in range(60)])
        assert "0 packets dropped by kernel" in cap.stop()
    out = tmp_path / "out.jsonl"
    res = _offline(pcap, 8080, out)
    ours, gaps = jsonl_streams(out)
    truth = tshark_streams(pcap, 8080)
    assert gaps == 0
    assert_same_streams(ours, truth)
    assert any(len(v) > 3_000_000 for v in ours.values())  # the upload made it whole
    assert "mirror-agent summary" in res.stderr


def test_python_server_many_keepalive_clients(tmp_path: Path) -> None:
    pcap = tmp_path / "py.pcap"
    with NetNS() as ns:
        start_python_server(ns, 9000)
        cap = Tcpdump(ns, "lo", pcap, "tcp port 9000")
        done = run_clients(ns, "127.0.0.1", 9000, 40, 10, 5000)
        assert done == 400
        assert "0 packets dropped by kernel" in cap.stop()
    out = tmp_path / "out.jsonl"
    _offline(pcap, 9000, out)
    ours, gaps = jsonl_streams(out)
    assert gaps == 0
    truth = tshark_streams(pcap, 9000)
    assert len(truth) == 80  # 40 connections, both directions
    assert_same_streams(ours, truth)


def test_ipv6_over_veth_and_filter(tmp_path: Path) -> None:
    pcap = tmp_path / "v6.pcap"
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "2001:db8::1/64", "2001:db8::2/64")
        start_python_server(server, 8443, host="2001:db8::1")
        cap = Tcpdump(server, server.veth, pcap, "tcp port 8443")
        run_clients(client, "2001:db8::1", 8443, 4, 5, 20000)
        assert "0 packets dropped by kernel" in cap.stop()
    out = tmp_path / "out.jsonl"
    _offline(pcap, 8443, out)
    ours, _ = jsonl_streams(out)
    truth = tshark_streams(pcap, 8443)
    assert len(truth) == 8
    assert all(k[0].startswith("[2001:db8::") for k in ours)
    assert_same_streams(ours, truth)
    # A tcpdump filter narrows to one client port: exactly that connection's two directions.
    one_port = next(k[0] for k in truth if k[1] == "[2001:db8::1]:8443").rsplit(":", 1)[1]
    filtered = tmp_path / "filtered.jsonl"
    _offline(pcap, 8443, filtered, "--filter", f"tcp port {one_port}")
    sub, _ = jsonl_streams(filtered)
    ports = {k: (k[0].rsplit(":", 1)[1], k[1].rsplit(":", 1)[1]) for k in truth}
    assert set(sub) == {k for k, ps in ports.items() if one_port in ps}


@pytest.mark.parametrize("fmt", ["native"])
def test_native_recording_roundtrip_and_shadow(tmp_path: Path, fmt: str) -> None:
    """Replay into a real shadow server: it gets exactly the requests of the capture."""
    pcap = tmp_path / "s.pcap"
    with NetNS() as ns:
        start_python_server(ns, 8080)
        cap = Tcpdump(ns, "lo", pcap, "tcp port 8080")
        run_clients(ns, "127.0.0.1", 8080, 5, 8, 3000)
        cap.stop()
        shadow_log = tmp_path / "shadow.log"
        start_python_server(ns, 18080, log=shadow_log)
        rec = tmp_path / "rec.bin"
        res = ns.run(*AGENT, "offline", str(pcap), "--port", "8080", "--target",
                     "127.0.0.1:18080", "--record", str(rec), "--inject-header", "X-Mirror: 1",
                     check=False)
        assert res.returncode == 0, res.stderr
        lines = shadow_log.read_text().splitlines()
    assert len(lines) == 40
    assert all("X-Mirror=1" in line for line in lines)
    text = subprocess.run([*AGENT, "inspect", str(rec)], capture_output=True, text=True, check=True)
    assert text.stdout.count(" to_observed ") >= 5
