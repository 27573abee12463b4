"""Prometheus for real: Debian's prometheus scrapes a live agent's /metrics every second with
the bearer token, and its query API gives the forwarded bytes and connections the shadow
itself counted. Everything runs in a network namespace of the test's own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from lab.netns import LiveAgent, NetNS, run_clients, start_python_server, wait_port

PROMETHEUS = shutil.which("prometheus")

#: A shadow that counts what it receives: one line "BYTES" per connection, at its EOF.
COUNTING_SHADOW = """
import socket, sys, threading
log = open(sys.argv[2], "a", buffering=1)
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def serve(conn):
    n = 0
    while data := conn.recv(65536):
        n += len(data)
    log.write(f"{n}\\n")
    conn.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def query(ns: NetNS, expr: str) -> float | None:
    url = "http://127.0.0.1:19090/api/v1/query?query=" + urllib.parse.quote(expr)
    out = ns.run("curl", "-s", "-m", "5", url, check=False).stdout
    try:
        result = json.loads(out)["data"]["result"]
    except (ValueError, KeyError):
        return None
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_counters_the_shadow_agrees_with(tmp_path: Path) -> None:
    assert PROMETHEUS is not None, "make setup installs Debian's prometheus"
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-test\n")
    shadow_log = tmp_path / "shadow.log"
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: mirror-agent
    authorization: {{credentials_file: {token}}}
    static_configs: [{{targets: ["127.0.0.1:19464"]}}]
""")
    with NetNS() as ns:
        start_python_server(ns, 9000)
        shadow = ns.popen(sys.executable, "-c", COUNTING_SHADOW, "19000", str(shadow_log))
        prom = None
        try:
            wait_port(ns, 19000)
            agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000",
                              "--target", "127.0.0.1:19000", "--listen", "127.0.0.1:19464",
                              "--listen-token-file", str(token))
            prom = ns.popen(PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                            "--web.listen-address=127.0.0.1:19090",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(ns, 19090, timeout=30)
            assert run_clients(ns, "127.0.0.1", 9000, 6, 20, 3000) == 120
            deadline = time.monotonic() + 60
            seen: tuple[float | None, ...] = ()
            while time.monotonic() < deadline:
                text = shadow_log.read_text() if shadow_log.exists() else ""
                lines = [n for n in text.split() if n != "0"]  # "0": wait_port's probe
                want = (float(len(lines)), float(sum(map(int, lines))), 1.0)
                seen = (query(ns, "mirror_agent_forward_connections_total"),
                        query(ns, "mirror_agent_forward_forwarded_bytes_total"),
                        query(ns, 'up{job="mirror-agent"}'))
                if len(lines) == 6 and seen == want:
                    break
                time.sleep(0.5)
            assert len(lines) == 6 and seen == want, (lines, seen)
            assert want[1] > 6 * 20 * 40  # every request's bytes, not a few
            assert query(ns, "mirror_agent_forward_dropped_bytes_total") == 0.0
            agent.stop()
        finally:
            for proc in (prom, shadow):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
