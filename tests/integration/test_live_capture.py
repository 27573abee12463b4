"""`mirror-agent run` with the real eBPF program, real servers and clients in namespaces.

The agent's both-directions recording must equal, per connection and direction, what tcpdump
captured in the same run reassembles to under tshark; the shadow must receive every request.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.netns import NetNS, Tcpdump, start_python_server
from tests.integration.truth import assert_same_streams, jsonl_streams, tshark_streams

HERE = Path(__file__).resolve().parent
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json", "run"]


class LiveAgent:
    def __init__(self, ns: NetNS, workdir: Path, *args: str) -> None:
        self.err = workdir / "agent.err"
        self.proc = ns.popen(*AGENT, *args, stderr=self.err.open("w"),
                             stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "capture live" not in self.err.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent did not start: {self.err.read_text()}")
            time.sleep(0.1)

    def stop(self) -> str:
        time.sleep(0.5)  # let the last events drain
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.err.read_text()
        return self.err.read_text()


def test_tc_loopback_matches_tcpdump_and_shadow(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    pcap = tmp_path / "truth.pcap"
    upload = tmp_path / "up.bin"
    upload.write_bytes(bytes(range(251)) * 12000)
    with NetNS() as ns:
        start_python_server(ns, 9000)
        start_python_server(ns, 19000, log=tmp_path / "shadow.log")
        cap = Tcpdump(ns, "lo", pcap, "tcp port 9000")
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000", "--target",
                          "127.0.0.1:19000", "--record", str(rec), "--record-format", "jsonl",
                          "--both-directions")
        done = ns.run(sys.executable, str(HERE / "http_client.py"), "127.0.0.1", "9000",
                      "8", "10", "3000")
        assert done.stdout.strip() == "80"
        ns.run("curl", "-sf", "-o", "/dev/null", "-H", "Expect:", "--data-binary",
               f"@{upload}", "http://127.0.0.1:9000/upload")
        err = agent.stop()
        assert "0 packets dropped by kernel" in cap.stop()
        qdiscs = ns.run("tc", "qdisc", "show", "dev", "lo").stdout
    assert "clsact" not in qdiscs
    ours, gaps = jsonl_streams(rec)
    assert gaps == 0
    assert_same_streams(ours, tshark_streams(pcap, 9000))
    shadow = (tmp_path / "shadow.log").read_text().splitlines()
    assert len(shadow) == 81, err
    assert "mirror-agent summary" in err


def _veth_run(tmp_path: Path, engine: str) -> tuple[Path, Path, list[str]]:
    rec, pcap = tmp_path / "rec.jsonl", tmp_path / "truth.pcap"
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "2001:db8::1/64", "2001:db8::2/64")
        start_python_server(server, 8443, host="2001:db8::1")
        start_python_server(server, 18443, log=tmp_path / "shadow.log")
        cap = Tcpdump(server, server.veth, pcap, "tcp port 8443")
        agent = LiveAgent(server, tmp_path, "--iface", server.veth, "--port", "8443",
                          "--engine", engine, "--target", "127.0.0.1:18443", "--record",
                          str(rec), "--record-format", "jsonl", "--both-directions")
        done = client.run(sys.executable, str(HERE / "http_client.py"), "2001:db8::1", "8443",
                          "4", "6", "20000")
        assert done.stdout.strip() == "24"
        agent.stop()
        assert "0 packets dropped by kernel" in cap.stop()
        assert "xdp" not in server.run("ip", "link", "show", server.veth).stdout
    return rec, pcap, (tmp_path / "shadow.log").read_text().splitlines()


def test_tc_ipv6_veth(tmp_path: Path) -> None:
    rec, pcap, shadow = _veth_run(tmp_path, "tc")
    ours, gaps = jsonl_streams(rec)
    assert gaps == 0
    assert all(k[0].startswith("[2001:db8::") for k in ours)
    assert_same_streams(ours, tshark_streams(pcap, 8443))
    assert len(shadow) == 24


def test_xdp_ipv6_veth_request_direction(tmp_path: Path) -> None:
    rec, pcap, shadow = _veth_run(tmp_path, "xdp")
    ours, gaps = jsonl_streams(rec)
    truth = tshark_streams(pcap, 8443)
    requests = {k: v for k, v in truth.items() if k[1] == "[2001:db8::1]:8443"}
    assert gaps == 0
    assert_same_streams({k: v for k, v in ours.items() if k in requests}, requests)
    assert len(shadow) == 24
