"""Scale and memory: 10,000 idle connections plus 1,000 active ones, and floods against the caps.

Part 1 (live, private namespace over loopback): nginx on 8080 and ``mirror-agent run --iface
lo --port 8080 --record FILE``. A client opens ``--idle`` keep-alive connections and sends one
request on each, so every one is a tracked flow, then leaves them open; then wrk drives
``--active`` connections for ``--seconds``. The agent's RSS is read before the idle
connections, with them open, and at its peak (VmHWM) after the active load: per-flow overhead
is (RSS with idle flows - RSS before) / idle flows.

Part 2 (in process, no network): the reassembler alone, in a fresh subprocess each:

- an out-of-order flood: ``--ooo-flows`` connections whose first bytes never arrive, each
  then sending data past the hole, far more than ``max_total_buffer`` (64 MiB here) in all;
- a SYN flood: ``--syns`` SYNs from distinct ports against ``max_flows`` (100,000).

Both report peak RSS and the counters that show the caps held (limit skips, evictions).
Writes bench/out/scale_memory.json.

usage: python bench/scale_memory.py [--idle 10000] [--active 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stats import load, metric
from lab.netns import LiveAgent, NetNS, start_nginx

OUT = Path(__file__).resolve().parent / "out"

IDLE_CLIENT = """
import resource, socket, sys, time
n = int(sys.argv[1])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, hard))
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", 8080))
    s.sendall(b"GET /idle/%d HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" % i)
    socks.append(s)
for s in socks:
    s.recv(4096)
print("open", flush=True)
time.sleep(3600)
"""


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def live(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mirror-scale-", dir="/dev/shm") as tmp, \
            NetNS("mirscale") as ns:
        work = Path(tmp)
        start_nginx(ns, 8080, work / "nginx", max_conns=args.idle + args.active + 1024)
        stats = work / "stats.json"
        agent = LiveAgent(ns, work, "--iface", "lo", "--port", "8080", "--record",
                          str(work / "rec.bin"), "--stats-json", str(stats))
        pid = agent.proc.pid
        time.sleep(1.0)
        before = status_kib(pid, "VmRSS")
        client = ns.popen(sys.executable, "-c", IDLE_CLIENT, str(args.idle),
                          stdout=subprocess.PIPE)
        assert client.stdout is not None
        if client.stdout.readline().strip() != b"open":
            raise RuntimeError("idle client failed")
        time.sleep(2.0)
        with_idle = status_kib(pid, "VmRSS")
        ns.run("wrk", "-t2", f"-c{args.active}", f"-d{args.seconds}s", "http://127.0.0.1:8080/",
               timeout=args.seconds + 120)
        time.sleep(1.0)
        after_load = status_kib(pid, "VmRSS")
        peak = status_kib(pid, "VmHWM")
        client.kill()
        agent.stop(settle=0)
        s = load(stats)
    return {"rss_before_kib": before, "rss_with_idle_kib": with_idle,
            "rss_after_active_kib": after_load, "peak_rss_kib": peak,
            "per_idle_flow_bytes": (with_idle - before) * 1024 / args.idle,
            "flows_opened": metric(s, "mirror_agent_reassembly_flows_opened_total"),
            "gap_bytes": metric(s, "mirror_agent_reassembly_gap_bytes_total")}


FLOOD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from agent.model import ACK, PSH, SYN, Segment
from agent.reassembly import Reassembler, ReassemblyConfig
kind, n = sys.argv[1], int(sys.argv[2])
cfg = ReassemblyConfig(max_total_buffer=64 << 20, max_flow_buffer=1 << 20)
r = Reassembler(cfg)
out = []
server = bytes([10, 0, 0, 1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak_pending = 0
if kind == "ooo":
    payload = bytes(1399)  # + a byte below: a fresh 1,400-byte object per segment, as live
    # Every flow opens with a SYN, loses its first 1,400 bytes, then sends 100 segments
    # past the hole: 2,000 flows x 140 KB = 280 MB against a 64 MiB cap.
    for f in range(n):
        client = bytes([10, 1, f >> 8 & 255, f & 255])
        r.feed(Segment(client, 40000, server, 8080, 999, 0, SYN, b"", 1.0, 512), out)
    for rnd in range(100):
        for f in range(n):
            client = bytes([10, 1, f >> 8 & 255, f & 255])
            seq = 1000 + 1400 * (rnd + 1)
            r.feed(Segment(client, 40000, server, 8080, seq, 1, ACK | PSH, payload + bytes([rnd]),
                           1.0 + rnd * 0.001, 512), out)
        peak_pending = max(peak_pending, r.buffered_bytes)
        out.clear()
else:
    for i in range(n):
        client = bytes([10, 2, i >> 16 & 255, i >> 8 & 255])
        r.feed(Segment(client, 1024 + (i & 255), server, 8080, i, 0, SYN, b"", 1.0, 512), out)
        out.clear()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
st = r.stats
print(json.dumps({{"peak_rss_kib": peak, "rss_growth_kib": peak - base,
                  "peak_buffered_bytes": peak_pending, "cap_bytes": cfg.max_total_buffer,
                  "limit_skips": st.limit_skips, "gap_bytes": st.gap_bytes,
                  "flows_tracked_at_end": r.flow_count, "max_flows": cfg.max_flows,
                  "evicted": st.flows_closed.get("evicted", 0),
                  "segments": st.segments}}))
"""


def flood(kind: str, n: int) -> dict[str, float]:
    code = FLOOD.format(root=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", code, kind, str(n)], capture_output=True,
                         text=True, check=True, timeout=1800)
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=1_000)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--ooo-flows", type=int, default=2_000)
    parser.add_argument("--syns", type=int, default=1_000_000)
    parser.add_argument("--skip-live", action="store_true")
    args = parser.parse_args()
    result: dict[str, dict[str, float]] = {}
    if not args.skip_live:
        if os.geteuid() != 0:
            sys.stderr.write("scale_memory: the live part needs root (--skip-live skips it)\n")
            return 2
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        result["live"] = live(args)
        print("live:", json.dumps(result["live"]), flush=True)
    result["ooo_flood"] = flood("ooo", args.ooo_flows)
    print("out-of-order flood:", json.dumps(result["ooo_flood"]), flush=True)
    result["syn_flood"] = flood("syn", args.syns)
    print("SYN flood:", json.dumps(result["syn_flood"]), flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "scale_memory.json").write_text(json.dumps({"args": vars(args), **result},
                                                      indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
