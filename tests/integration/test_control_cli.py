"""The control API as the command line runs it: ``serve`` (capture files by ``POST /pcap``),
``run --listen`` (readiness around attach, ports changed while traffic flows, metrics and
status of a live capture) and ``probe``. Real processes, real sockets, the real BPF program
in a namespace of the test's own."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.control import ask, wait_for
from lab.netns import LAB, LiveAgent, NetNS, run_clients, start_python_server
from tests.integration.truth import jsonl_streams
from tests.unit.shadow import Shadow

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "agent" / "data" / "demo.pcap"
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_truth(shadow: Shadow) -> list[bytes]:
    res = subprocess.run([*AGENT, "offline", str(DEMO), "--port", "8080", "--target",
                          shadow.addr], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return sorted(shadow.received)


def test_serve_replays_posted_captures_like_offline(tmp_path: Path) -> None:
    truth = offline_truth(Shadow())
    shadow = Shadow()
    pcaps = tmp_path / "pcaps"
    pcaps.mkdir()
    (pcaps / "demo.pcap").write_bytes(DEMO.read_bytes())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rec = tmp_path / "rec.jsonl"
    proc = subprocess.Popen([*AGENT, "serve", "--listen", f"127.0.0.1:{port}", "--pcap-dir",
                             str(pcaps), "--port", "8080", "--target", shadow.addr,
                             "--record", str(rec), "--record-format", "jsonl"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(f"{base}/readyz", 200) == {"ready": True, "status": "ready"}
        for _ in range(2):  # the same file twice: two jobs, each like one offline run
            code, job = ask(f"{base}/pcap", "POST", json.dumps({"path": str(pcaps / "demo.pcap")}))
            assert code == 202 and isinstance(job, dict)
            deadline = time.monotonic() + 30
            while (state := ask(f"{base}/pcap/{job['id']}")[1]) and isinstance(state, dict) \
                    and state["state"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert isinstance(state, dict) and state["state"] == "done", state
            assert state["segments"] == 474
        code, answer = ask(f"{base}/pcap", "POST", json.dumps({"path": "/etc/passwd"}))
        assert code == 403, answer
        probe = subprocess.run([*AGENT, "probe", "--listen", f"127.0.0.1:{port}", "/healthz"],
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0 and '"ok"' in probe.stdout, probe.stderr
        code, metrics = ask(f"{base}/metrics")
        assert code == 200 and "mirror_agent_source_pcap_jobs_done_total 2.0" in str(metrics)
        time.sleep(1.5)  # a long-running serve flushes its recording at least every second
        streams, _ = jsonl_streams(rec)
        # The file was posted twice: each connection's bytes twice, by the same addresses.
        assert sorted(streams.values()) == sorted(t * 2 for t in truth), "not yet recorded"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sorted(shadow.received) == sorted(truth * 2)
    assert "mirror-agent summary" in err


def test_not_ready_while_stopping_and_probe_says_why(tmp_path: Path) -> None:
    stuck = Shadow(read=False, rcvbuf=4096)  # takes a few KB, then never reads
    pcaps = tmp_path / "pcaps"
    pcaps.mkdir()
    (pcaps / "demo.pcap").write_bytes(DEMO.read_bytes())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*AGENT, "serve", "--listen", f"127.0.0.1:{port}", "--pcap-dir",
                             str(pcaps), "--port", "8080", "--target", stuck.addr],
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(f"{base}/readyz", 200)
        code, _ = ask(f"{base}/pcap", "POST", json.dumps({"path": str(pcaps / "demo.pcap")}))
        assert code == 202
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)  # the forward sink now waits up to 5 s
        assert wait_for(f"{base}/readyz", 503, timeout=4) == {"ready": False,
                                                              "status": "stopping"}
        probe = subprocess.run([*AGENT, "probe", "--listen", f"127.0.0.1:{port}", "/readyz"],
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode == 1 and "503" in probe.stderr and "stopping" in probe.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    dead = subprocess.run([*AGENT, "probe", "--listen", f"127.0.0.1:{port}", "/healthz"],
                          capture_output=True, text=True, timeout=30)
    assert dead.returncode == 1 and "not answered" in dead.stderr


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "80", "--pcap-dir", "/tmp", "--listen", "0.0.0.0:9464"],
    ["serve", "--port", "80", "--pcap-dir", "/nonexistent", "--listen", "127.0.0.1:9464"],
    ["serve", "--port", "80", "--listen", "127.0.0.1:9464"],
    ["serve", "--port", "80", "--pcap-dir", "/tmp"],
    ["run", "--iface", "lo", "--port", "80", "--pcap-dir", "/tmp"],
    ["run", "--iface", "lo", "--port", "80", "--listen", "myhost:9464"],
    ["probe", "/healthz"],
])
def test_control_misuse_exits_2_with_one_line(argv: list[str]) -> None:
    res = subprocess.run([*AGENT, *argv], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("engine", ["tc", "afpacket"])
def test_run_listen_ready_after_attach_and_ports_change_while_traffic_flows(
        tmp_path: Path, engine: str) -> None:
    """Ready once attached (eBPF: not while bcc compiles); healthy (mirror loop and ring
    drain) while traffic flows; ports added and removed under a running client, with exact
    request counts at the shadow, on the eBPF program's port map and on the AF_PACKET
    socket's filter alike."""
    shadow_log = tmp_path / "shadow.log"
    with NetNS() as ns:
        start_python_server(ns, 9000)
        start_python_server(ns, 9001)
        start_python_server(ns, 19000, log=shadow_log)
        base = "http://127.0.0.1:19464"
        first: list[int] = []
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000", "--engine", engine,
                          "--listen", "127.0.0.1:19464", "--target", "127.0.0.1:19000",
                          wait=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            code, _ = ask(f"{base}/readyz", ns=ns)
            if code:
                first.append(code)
            if code == 200:
                break
            time.sleep(0.05)
        assert first[-1] == 200, first
        if engine == "tc":
            assert first[0] == 503, first  # not ready while bcc compiles
        status = ask(f"{base}/status", ns=ns)[1]
        assert isinstance(status, dict) and status["interfaces"] == ["lo"], status
        assert [(a["name"], a["side"]) for a in status["attachments"]] == [  # type: ignore
            ("lo", "all")]
        # A client on 9000 all along; 9001 is added while it runs.
        busy = ns.popen(sys.executable, str(LAB / "http_client.py"),
                        "127.0.0.1", "9000", "4", "300", "500", stdout=subprocess.PIPE)
        time.sleep(0.5)
        assert ask(f"{base}/healthz", ns=ns) == (200, {"status": "ok"})
        code, body = ask(f"{base}/ports", "PUT", '{"ports": [9000, 9001]}', ns=ns)
        assert (code, body) == (200, {"ports": [9000, 9001]})
        out, _ = busy.communicate(timeout=120)
        assert int(out) == 1200
        assert run_clients(ns, "127.0.0.1", 9001, 2, 10) == 20
        code, body = ask(f"{base}/ports", "PUT", '{"ports": [9001]}', ns=ns)
        assert (code, body) == (200, {"ports": [9001]})
        time.sleep(0.5)  # the last packets of 9001's connections are in
        seen = _captured(base, ns, engine)
        assert seen > 0
        assert run_clients(ns, "127.0.0.1", 9000, 2, 10) == 20  # no longer observed...
        time.sleep(0.5)
        assert _captured(base, ns, engine) == seen  # ...not even by the kernel filter
        assert ask(f"{base}/ports", "PUT", '{"ports": [62000]}', ns=ns)[0] == 409
        code, metrics = ask(f"{base}/metrics", ns=ns)
        assert code == 200
        if engine == "tc":
            assert "mirror_agent_kernel_packets_skipped_total" in str(metrics)
        assert ask(f"{base}/healthz", ns=ns) == (200, {"status": "ok"})
        status = ask(f"{base}/status", ns=ns)[1]
        assert isinstance(status, dict) and status["health"] == [], status
        agent.stop(settle=1.0)
    lines = shadow_log.read_text().splitlines()
    assert len(lines) == 1220, (len(lines), agent.err.read_text()[-2000:])


def _captured(base: str, ns: NetNS, engine: str) -> float:
    """What the kernel let through so far: ring records (eBPF) or socket frames."""
    name = ("mirror_agent_ring_records_total" if engine == "tc"
            else "mirror_agent_source_frames_total")
    code, text = ask(f"{base}/metrics", ns=ns)
    assert code == 200 and isinstance(text, str)
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_run_replays_a_posted_capture_alongside_live_traffic(tmp_path: Path) -> None:
    """``run --pcap-dir``: a capture file posted while live traffic flows goes through the
    same pipeline and sinks: the shadow gets both the live requests and the file's
    client->service streams, and the live ones lose nothing while the file is read."""
    truth = offline_truth(Shadow())  # demo.pcap's streams, as `offline` forwards them
    pcaps = tmp_path / "pcaps"
    pcaps.mkdir()
    (pcaps / "demo.pcap").write_bytes(DEMO.read_bytes())
    rec = tmp_path / "rec.jsonl"
    with NetNS() as ns:
        start_python_server(ns, 8080)
        base = "http://127.0.0.1:19464"
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "8080", "--listen",
                          "127.0.0.1:19464", "--pcap-dir", str(pcaps), "--record", str(rec),
                          "--record-format", "jsonl")
        wait_for(f"{base}/readyz", 200, ns=ns)
        busy = ns.popen(sys.executable, str(LAB / "http_client.py"),
                        "127.0.0.1", "8080", "2", "200", "300", stdout=subprocess.PIPE)
        code, job = ask(f"{base}/pcap", "POST", json.dumps({"path": str(pcaps / "demo.pcap")}),
                        ns=ns)
        assert code == 202 and isinstance(job, dict), job
        out, _ = busy.communicate(timeout=120)
        assert int(out) == 400
        deadline = time.monotonic() + 30
        while (state := ask(f"{base}/pcap/{job['id']}", ns=ns)[1]) and isinstance(state, dict) \
                and state["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert isinstance(state, dict) and state["state"] == "done", state
        agent.stop(settle=1.0)
    streams, gaps = jsonl_streams(rec)
    # demo.pcap was captured on loopback too: its streams are told apart by their bytes.
    replayed = sorted(data for data in streams.values() if data in truth)
    live = [data for data in streams.values() if data not in truth]
    assert gaps == 0 and replayed == truth and len(live) == 2
    assert sum(d.count(b"POST /") + d.count(b"GET /") for d in live) == 400
