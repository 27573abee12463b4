"""`mirror-agent replay` with real traffic: a recording of nginx traffic (tcpdump, then
`offline --both-directions`), replayed into a server that keeps every connection's bytes:
each must get exactly the recorded client bytes; a build that fails one path must be named
in the diff; with a noisy baseline only the real difference is reported."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from agent.cli.replay import load
from agent.replay.sources import open_sources
from lab.netns import NetNS, Tcpdump, run_clients, start_nginx, wait_port

HERE = Path(__file__).resolve().parent
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
BROKEN = "/broken/x"


def _record(ns: NetNS, tmp: Path) -> tuple[Path, Path]:
    """Traffic to nginx on 8080, captured and recorded (both directions)."""
    pcap, rec = tmp / "live.pcap", tmp / "live.bin"
    start_nginx(ns, 8080, tmp / "nginx")
    cap = Tcpdump(ns, "lo", pcap, "tcp port 8080")
    urls = [f"http://127.0.0.1:8080{p}" for p in ("/a", BROKEN, "/b?x=1", BROKEN, "/c")]
    ns.run("curl", "-sf", "-o", "/dev/null", *urls)  # keep-alive: one connection
    ns.run("curl", "-s", "-o", "/dev/null", "--parallel", "--parallel-max", "10",
           *[f"http://127.0.0.1:8080/p{i}" for i in range(20)])
    assert run_clients(ns, "127.0.0.1", 8080, 6, 25) == 150
    assert "0 packets dropped by kernel" in cap.stop()
    ns.run(*AGENT, "offline", str(pcap), "--port", "8080", "--record", str(rec),
           "--both-directions")
    return pcap, rec


def _server(ns: NetNS, port: int, out: Path, *extra: str) -> None:
    out.mkdir()
    ns.popen(sys.executable, str(HERE / "replay_server.py"), "127.0.0.1", str(port), str(out),
             *extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(ns, port)


def _replay(ns: NetNS, report: Path, *args: str) -> dict[str, object]:
    res = ns.run(*AGENT, "replay", *args, "--report-json", str(report), check=False)
    assert res.returncode == 0, res.stderr + res.stdout
    rep: dict[str, object] = json.loads(report.read_text())
    return rep


def _received(out: Path, n: int) -> list[bytes]:
    """Every connection's bytes (not wait_port's empty probe)."""
    def got() -> list[bytes]:
        return sorted(data for p in out.iterdir() if (data := p.read_bytes()))

    deadline = time.monotonic() + 5
    while len(got()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return got()


def test_replay_bytes_per_connection_and_broken_path(tmp_path: Path) -> None:
    with NetNS() as ns:
        pcap, rec = _record(ns, tmp_path)
        conns, src = load(open_sources([rec], []))
        assert src.problems == [] and src.requests == 5 + 20 + 150
        want = sorted(b"".join(b.data for b in c.bursts) for c in conns)
        for i, (source, extra) in enumerate(((rec, ()), (pcap, ("--port", "8080")))):
            out = tmp_path / f"got{i}"
            _server(ns, 9090 + i, out, "--fail-path", BROKEN)
            rep = _replay(ns, tmp_path / f"r{i}.json", str(source), *extra,
                          "--target", f"127.0.0.1:{9090 + i}", "--speed", "max")
            assert _received(out, len(want)) == want
            diff = rep["diff"]
            assert isinstance(diff, dict)
            assert (diff["compared"], diff["different_status"]) == (src.requests, 2)
            assert [p["path"] for p in diff["paths"]] == [f"GET {BROKEN}"]
            assert diff["paths"][0]["status_changes"] == {"200 -> 500": 2}


def test_baseline_filters_noise(tmp_path: Path) -> None:
    with NetNS() as ns:
        _pcap, rec = _record(ns, tmp_path)
        _server(ns, 9090, tmp_path / "cand", "--noisy", "--fail-path", BROKEN)
        _server(ns, 9091, tmp_path / "base", "--noisy")
        rep = _replay(ns, tmp_path / "r.json", str(rec), "--target", "127.0.0.1:9090",
                      "--baseline", "127.0.0.1:9091", "--speed", "4", "--connections", "8",
                      "--ignore-headers=Date,Server,Content-Length,Connection")
        diff = rep["diff"]
        assert isinstance(diff, dict)
        assert diff["reference"] == "baseline, noise filtered with production"
        assert (diff["different_status"], diff["different_headers"], diff["different_body"]
                ) == (2, 0, 0)
        assert [p["path"] for p in diff["paths"]] == [f"GET {BROKEN}"]
        assert "header x-request-id" in diff["noise"] and "body $.ts" in diff["noise"]
