"""Fleet recording to NATS JetStream with real parts: Debian's ``nats-server -js`` on the
loopback of a namespace the test makes (its own store directory; stopped by PID, always).

- offline: ``offline demo.pcap --record nats://...`` then ``replay nats://...``: the shadow
  gets exactly the client bytes per connection that an offline run forwarding directly
  delivers; replay from a broker that is gone exits 1 naming the cause.
- live: ``run --iface lo`` records nginx-like traffic while the broker is killed (SIGKILL)
  and restarted: capture never stalls (every connection is still forwarded to the shadow),
  the records of the outage are dropped and counted, publishing resumes after the restart,
  and the stream replays exactly the connections recorded before and after the outage.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from lab.netns import LiveAgent, NetNS, run_clients, wait_port
from tests.unit.nats_server import NatsServer

HERE = Path(__file__).resolve().parent
DEMO = HERE.parents[1] / "agent" / "data" / "demo.pcap"
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
PORT = 14222


def _server(ns: NetNS, port: int, out: Path) -> Path:
    """A raw HTTP server on ``port`` keeping each connection's bytes in ``out``."""
    out.mkdir()
    ns.popen(sys.executable, str(HERE / "replay_server.py"), "127.0.0.1", str(port), str(out),
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(ns, port)
    return out


def _received(out: Path, n: int) -> list[bytes]:
    """Every connection's bytes, sorted (not wait_port's empty probe), once ``n`` came."""
    def got() -> list[bytes]:
        return sorted(data for p in out.iterdir() if (data := p.read_bytes()))

    deadline = time.monotonic() + 10
    while len(got()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return got()


def test_offline_recording_replays_exactly(tmp_path: Path) -> None:
    with NetNS() as ns:
        broker = NatsServer(tmp_path / "store", PORT, ns.cmd()).start()
        try:
            url = f"nats://127.0.0.1:{PORT}/mirror.test"
            ns.run(*AGENT, "offline", str(DEMO), "--port", "8080", "--record", url)
            direct = _server(ns, 9091, tmp_path / "direct")
            ns.run(*AGENT, "offline", str(DEMO), "--port", "8080", "--target",
                   "127.0.0.1:9091")
            want = _received(direct, 7)
            assert len(want) == 7
            replayed = _server(ns, 9090, tmp_path / "replayed")
            res = ns.run(*AGENT, "replay", url, "--target", "127.0.0.1:9090", "--speed", "max",
                         check=False)
            assert res.returncode == 0, res.stderr
            assert _received(replayed, 7) == want
            broker.stop()
            res = ns.run(*AGENT, "replay", url, "--target", "127.0.0.1:9090", check=False)
            assert res.returncode == 1 and "cannot reach nats://127.0.0.1" in res.stderr
        finally:
            broker.stop()


def _wait_log(err: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in err.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in the agent's log"
        time.sleep(0.05)


def test_live_recording_survives_the_broker_killed_and_restarted(tmp_path: Path) -> None:
    with NetNS() as ns:
        broker = NatsServer(tmp_path / "store", PORT, ns.cmd()).start()
        try:
            service = _server(ns, 8080, tmp_path / "service")
            shadow = _server(ns, 9090, tmp_path / "shadow")
            stats = tmp_path / "stats.json"
            agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "8080", "--target",
                              "127.0.0.1:9090", "--record",
                              f"nats://127.0.0.1:{PORT}/mirror.live", "--stats-json",
                              str(stats))
            _wait_log(agent.err, "NATS recording: connected")
            assert run_clients(ns, "127.0.0.1", 8080, 4, 10) == 40
            time.sleep(0.5)  # published and acknowledged
            broker.kill()
            assert run_clients(ns, "127.0.0.1", 8080, 4, 10) == 40  # recorded nowhere
            time.sleep(0.5)
            broker.start()
            _wait_log(agent.err, "NATS recording: publishing again")
            assert run_clients(ns, "127.0.0.1", 8080, 4, 10) == 40
            time.sleep(0.5)
            agent.signal(signal.SIGTERM)
            assert agent.proc.wait(60) == 3, agent.err.read_text()  # degraded: drops
            err = agent.err.read_text()
            assert "NATS recording dropped" in err
            s = json.loads(stats.read_text())
            assert s['mirror_agent_record_nats_records_dropped_total{reason="broker_down"}'] > 0
            assert s["mirror_agent_record_nats_connects_total"] == 2
            assert s["mirror_agent_record_nats_disconnects_total"] == 1
            # Capture never stalled: every connection of all three rounds was forwarded.
            assert s["mirror_agent_forward_connections_completed_total"] == 12
            served = _received(service, 12)
            assert _received(shadow, 12) == served
            # The stream replays the rounds before and after the outage, exactly.
            replayed = _server(ns, 9191, tmp_path / "replayed")
            res = ns.run(*AGENT, "replay", f"nats://127.0.0.1:{PORT}/mirror.live", "--target",
                         "127.0.0.1:9191", "--speed", "max", check=False)
            assert res.returncode == 0, res.stderr
            got = _received(replayed, 8)
            assert len(got) == 8 and not Counter(got) - Counter(served)
        finally:
            broker.stop()
