"""Overload against the memory budget: 16 KB POSTs as fast as wrk sends them, both directions
recorded, forwarded to a shadow that never reads, with ``--memory-limit 512MiB``.

Private namespace over loopback: nginx on 8080 (reads and discards each body), a shadow on
9000 that accepts and never reads, ``mirror-agent run --iface lo --port 8080 --target
127.0.0.1:9000 --record FILE --both-directions --memory-limit LIMIT``, wrk for ``--seconds``.

Rounds:
- ``plain``: the agent alone; peak RSS (VmHWM) against the limit.
- ``cgroup``: the same inside a real cgroup v1 memory cgroup whose memory.limit_in_bytes is the
  limit (made under /sys/fs/cgroup/memory, removed afterwards): the agent must exit 0 (not
  OOM-killed), memory.failcnt and oom_kill are reported, the excess shows as gaps and drops.
- ``cgroup-default``: in that cgroup without --memory-limit (the agent derives 7/8 of it).

Writes bench/out/overload_memory.json.

usage: python bench/overload_memory.py [--limit 512MiB] [--seconds 15] [--rounds plain,cgroup]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.budget import parse_size
from agent.lab.netns import AGENT, LiveAgent, NetNS, start_nginx, wait_port
from agent.metrics import total
from bench.stats import load

OUT = Path(__file__).resolve().parent / "out"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MIB = 1 << 20

SHADOW = """
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000)); s.listen(4096)
held = []
while True:
    c, _ = s.accept(); held.append(c)   # never reads
"""

POST_LUA = """
wrk.method = "POST"
wrk.body = string.rep("x", 16384)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_round(name: str, limit: int, seconds: int, flag: bool, cgroup: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp, NetNS("overload") as ns:
        work = Path(tmp)
        start_nginx(ns, 8080, work / "nginx")
        ns.popen(sys.executable, "-c", SHADOW)
        wait_port(ns, 9000)
        (work / "post.lua").write_text(POST_LUA)
        stats = work / "stats.json"
        args = ["--iface", "lo", "--port", "8080", "--target", "127.0.0.1:9000",
                "--record", str(work / "rec.bin"), "--both-directions",
                "--stats-json", str(stats), "--stats-interval", "0"]
        if flag:
            args += ["--memory-limit", str(limit)]
        # The agent's process joins the cgroup before it starts (sh waits, then execs: same
        # pid). It enters the namespace with nsenter, not ``ip netns exec``, which mounts a
        # fresh sysfs and so hides /sys/fs/cgroup: the agent could not read its limit.
        err = work / "agent.err"
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns.name}", "sh", "-c",
                                 'sleep 0.3; exec "$@"', "sh", *AGENT, *args],
                                stderr=err.open("w"), stdout=subprocess.DEVNULL)
        ns.procs.append(proc)
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(proc.pid))
        deadline = time.monotonic() + 60
        while "capture live" not in err.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start: {err.read_text()}")
            time.sleep(0.1)
        agent = LiveAgent.__new__(LiveAgent)
        agent.proc, agent.err, agent._wrapped = proc, err, False
        pid = proc.pid
        peak_rss = 0
        wrk = ns.popen("wrk", "-t", "2", "-c", "64", "-d", f"{seconds}s", "-s",
                       str(work / "post.lua"), "http://127.0.0.1:8080/",
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        while wrk.poll() is None:
            if agent.proc.poll() is None:
                peak_rss = max(peak_rss, status_kib(pid, "VmRSS"))
            time.sleep(0.2)
        out = wrk.stdout.read().decode() if wrk.stdout else ""
        hwm = status_kib(pid, "VmHWM") if agent.proc.poll() is None else 0
        time.sleep(1)
        if agent.proc.poll() is None:
            agent.signal(15)
        try:
            rc = agent.proc.wait(60)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            rc = agent.proc.wait(10)
        reqs = next((ln.split()[1] for ln in out.splitlines()
                     if ln.startswith("Requests/sec")), "?")
        start = next((json.loads(ln) for ln in agent.err.read_text().splitlines()
                      if '"memory budget"' in ln), {})
        res: dict = {"round": name, "limit_mib": limit / MIB, "exit_status": rc,
                     "requests_per_s": reqs, "peak_rss_mib": round(max(peak_rss, hwm) / 1024, 1),
                     "budget": start}
        res["agent_log_tail"] = agent.err.read_text().splitlines()[-2:]
        if stats.exists() and stats.stat().st_size:
            s = load(stats)
            res["counts"] = {k: total(s, k) for k in (
                "mirror_agent_reassembly_gap_bytes_total",
                "mirror_agent_reassembly_delivered_bytes_total",
                "mirror_agent_record_lost_bytes_total",
                "mirror_agent_forward_connections_dropped_total",
                "mirror_agent_forward_dropped_bytes_total",
                "mirror_agent_drain_pauses_total",
                "mirror_agent_ring_lost_samples_total")}
        if cgroup is not None:
            res["cgroup"] = {
                "failcnt": int((cgroup / "memory.failcnt").read_text()),
                "max_usage_mib": int((cgroup / "memory.max_usage_in_bytes").read_text()) / MIB,
                "oom_control": dict(ln.split() for ln in  # oom_kill: the kernel's kills
                                    (cgroup / "memory.oom_control").read_text().splitlines()),
            }
        return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", default="512MiB")
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--rounds", default="plain,cgroup,cgroup-default")
    opts = ap.parse_args()
    limit = parse_size(opts.limit)
    results = []
    for name in opts.rounds.split(","):
        cgroup = None
        if name.startswith("cgroup"):
            cgroup = CGROUP_ROOT / f"mirror-bench-{uuid.uuid4().hex[:8]}"
            cgroup.mkdir()
            (cgroup / "memory.limit_in_bytes").write_text(str(limit))
        try:
            r = run_round(name, limit, opts.seconds, name != "cgroup-default", cgroup)
        finally:
            if cgroup is not None:
                for _ in range(50):
                    try:
                        cgroup.rmdir()
                        break
                    except OSError:
                        time.sleep(0.2)
        print(json.dumps(r), flush=True)
        results.append(r)
    OUT.mkdir(exist_ok=True)
    (OUT / "overload_memory.json").write_text(json.dumps(results, indent=1))
    # 3 is "degraded": the overload's excess was dropped and counted, as it should be.
    ok = all(r["exit_status"] in (0, 3) and r["peak_rss_mib"] <= r["limit_mib"]
             for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
