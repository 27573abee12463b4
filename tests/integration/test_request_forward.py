"""Issue 18: request-level forwarding (``--forward-mode request``) with the real eBPF capture.

Connection churn (one request per connection, ``Connection: close``) against nginx as the
service; the shadow is a Python server that logs every request it reads and counts its
connections. Every request the client got answered reaches the shadow exactly once, over a
few pooled connections, and ``requests == completed + dropped + in_flight`` in
``--stats-json`` at exit with nothing in flight and nothing dropped (exit 0).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from agent.metrics import split_key
from lab.netns import LAB, LiveAgent, NetNS, start_nginx, wait_port

SERVICE, SHADOW = 8091, 18091
FWD = "mirror_agent_forward_"
POOL = 8

#: A keep-alive HTTP/1.1 shadow: logs each request line's target, one a line, and its
#: connection count to COUNT_FILE when stopped (SIGTERM). Requests are body-less GETs.
SHADOW_SERVER = """
import asyncio, signal, sys
log = open(sys.argv[2], "w", buffering=1)
conns = 0

class Shadow(asyncio.Protocol):
    def connection_made(self, transport):
        global conns
        conns += 1
        self.t, self.buf = transport, b""
    def data_received(self, data):
        self.buf += data
        while (end := self.buf.find(b"\\r\\n\\r\\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            log.write(head.split(b" ", 2)[1].decode() + "\\n")
            self.t.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n")

async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_server(Shadow, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with server:
        await stop.wait()
    open(sys.argv[3], "w").write(str(conns))

asyncio.run(main())
"""


def test_churn_in_request_mode_reaches_the_shadow_once_over_few_connections(
        tmp_path: Path) -> None:
    """400 new connections/s for 5 s, each one ``Connection: close`` request."""
    script, log, count = tmp_path / "shadow.py", tmp_path / "shadow.log", tmp_path / "conns"
    script.write_text(SHADOW_SERVER)
    ok_file, stats = tmp_path / "ok.txt", tmp_path / "stats.json"
    with NetNS() as ns:
        start_nginx(ns, SERVICE, tmp_path / "service", max_conns=8192)
        shadow = ns.popen(sys.executable, str(script), str(SHADOW), str(log), str(count))
        wait_port(ns, SHADOW)
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", str(SERVICE), "--target",
                          f"127.0.0.1:{SHADOW}", "--forward-mode", "request",
                          "--forward-pool", str(POOL), "--stats-json", str(stats))
        out = ns.run(sys.executable, str(LAB / "churn_client.py"), "127.0.0.1", str(SERVICE),
                     "--rate", "400", "--duration", "5", "--tag", "rq", "--ok-file",
                     str(ok_file), timeout=90).stdout
        client = json.loads(out.strip().splitlines()[-1])
        time.sleep(2)
        agent.signal(signal.SIGTERM)
        code = agent.proc.wait(60)
        shadow.send_signal(signal.SIGTERM)
        shadow.wait(10)
    ok = ok_file.read_text().split()
    assert client["ok"] == len(ok) >= 0.99 * 2000, client
    seen = Counter(log.read_text().split())
    assert not [p for p, n in seen.items() if n > 1], "a request reached the shadow twice"
    missing = set(ok) - set(seen)
    assert not missing, f"{len(missing)} of {len(ok)} requests never reached the shadow"
    # Pooled: the shadow sees few connections (one more: wait_port's probe).
    assert int(count.read_text()) <= POOL + 1, f"{count.read_text()} shadow connections"

    snap: dict[str, float] = json.loads(stats.read_text())
    fwd = [(*split_key(k), v) for k, v in snap.items() if k.startswith(FWD)]
    one = {name: v for name, labels, v in fwd if not labels}
    dropped = {labels["reason"]: v for name, labels, v in fwd
               if name == FWD + "requests_dropped_total" and v}
    requests, completed = one[FWD + "requests_total"], one[FWD + "requests_completed_total"]
    books = f"requests={requests} completed={completed} dropped={dropped} exit={code}"
    assert requests == completed + sum(dropped.values()) + one[FWD + "requests_in_flight"]
    assert one[FWD + "requests_in_flight"] == 0 and not dropped and code == 0, books
    assert requests == completed == len(seen) >= len(ok), books
    assert one[FWD + "pool_connections_total"] <= POOL
    assert one[FWD + "connections_total"] == 0  # connection mode's counters stay 0
