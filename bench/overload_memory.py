"""Overload against the memory budget: 16 KB POSTs as fast as wrk sends them, both directions
recorded, forwarded to a shadow that never reads, with ``--memory-limit 512MiB``.

Private namespace over loopback: nginx on 8080 (reads and discards each body), a shadow on
9000 that accepts and never reads, ``mirror-agent run --iface lo --port 8080 --target
127.0.0.1:9000 --record FILE --both-directions --memory-limit LIMIT``, wrk for ``--seconds``.

Rounds (each repeated ``--runs`` times, interleaved):
- ``plain``: the agent alone; peak RSS (VmHWM, read until it exits) against the limit.
- ``cgroup``: the same inside a real cgroup v1 memory cgroup whose memory.limit_in_bytes is the
  limit (made under /sys/fs/cgroup/memory, removed afterwards): the agent must survive (exit 0
  or 3, no OOM kill in memory.oom_control); failcnt is reported.
- ``cgroup-default``: in that cgroup without --memory-limit (the agent derives 7/8 of it).

Per round: min/median/max of the peaks, how many were over the limit, how many survived.
Writes bench/out/overload_memory.json. Exit 1 unless every run survived within the limit.

usage: python bench/overload_memory.py [--limit 512MiB] [--seconds 15] [--runs 10]
       [--rounds plain,cgroup,cgroup-default]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.metrics import total
from agent.mirror.budget import parse_size
from bench.stats import load
from lab.netns import AGENT, NetNS, start_nginx, wait_port

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

#: What each run reports from the agent's --stats-json (summed over labels).
COUNTS = ("reassembly_gap_bytes_total", "reassembly_delivered_bytes_total",
          "reassembly_flows_refused_total", "record_lost_bytes_total",
          "forward_connections_dropped_total", "forward_dropped_bytes_total",
          "drain_pauses_total", "ring_lost_samples_total", "memory_rss_peak_bytes",
          "memory_pressure_episodes_total", "memory_shed_seconds_total", "memory_drops_total",
          "memory_trims_total", "memory_trimmed_bytes_total")


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (0 once the process is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def start_agent(ns: NetNS, args: list[str], err: Path,
                cgroup: Path | None) -> subprocess.Popen[bytes]:
    """The agent in ``ns`` (and ``cgroup``), once it logged "capture live".

    It joins the cgroup before it starts (sh waits, then execs: same pid), and enters the
    namespace with nsenter, not ``ip netns exec``, which mounts a fresh sysfs and so hides
    /sys/fs/cgroup: the agent could not read its limit."""
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
    return proc


def overload(ns: NetNS, work: Path, seconds: int, proc: subprocess.Popen[bytes]) -> tuple[str, int]:
    """wrk for ``seconds``, then SIGTERM; (wrk's output, the agent's peak RSS in KiB: VmHWM
    read until it exits, so the shutdown counts too)."""
    (work / "post.lua").write_text(POST_LUA)
    wrk = ns.popen("wrk", "-t", "2", "-c", "64", "-d", f"{seconds}s", "-s",
                   str(work / "post.lua"), "http://127.0.0.1:8080/",
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = 0
    term_at: float | None = None
    kill_at: float | None = None
    while proc.poll() is None:
        peak = max(peak, status_kib(proc.pid, "VmHWM"))
        now = time.monotonic()
        if term_at is None and wrk.poll() is not None:
            term_at = now + 1  # the last events drain first
        if term_at is not None and kill_at is None and now >= term_at:
            proc.send_signal(signal.SIGTERM)
            kill_at = now + 60
        if kill_at is not None and now >= kill_at:
            proc.kill()
        time.sleep(0.1)
    out = wrk.stdout.read().decode() if wrk.stdout else ""
    return out, peak


def run_round(name: str, limit: int, seconds: int, flag: bool,
              cgroup: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, NetNS("overload") as ns:
        work = Path(tmp)
        start_nginx(ns, 8080, work / "nginx")
        ns.popen(sys.executable, "-c", SHADOW)
        wait_port(ns, 9000)
        stats, err = work / "stats.json", work / "agent.err"
        args = ["--iface", "lo", "--port", "8080", "--target", "127.0.0.1:9000",
                "--record", str(work / "rec.bin"), "--both-directions",
                "--stats-json", str(stats), "--stats-interval", "0"]
        if flag:
            args += ["--memory-limit", str(limit)]
        proc = start_agent(ns, args, err, cgroup)
        out, peak = overload(ns, work, seconds, proc)
        log = err.read_text()
        reqs = next((ln.split()[1] for ln in out.splitlines()
                     if ln.startswith("Requests/sec")), "?")
        start: dict[str, Any] = next(
            (json.loads(ln) for ln in log.splitlines() if '"memory budget"' in ln), {})
        res: dict[str, Any] = {
            "round": name, "limit_mib": limit / MIB, "agent_limit_mib": start.get("limit_mib"),
            "exit_status": proc.returncode, "requests_per_s": reqs,
            "peak_rss_mib": round(peak / 1024, 1), "agent_log_tail": log.splitlines()[-2:]}
        if stats.exists() and stats.stat().st_size:
            s = load(stats)
            res["counts"] = {k: total(s, "mirror_agent_" + k) for k in COUNTS}
        if cgroup is not None:
            oom = dict(ln.split() for ln in (cgroup / "memory.oom_control").read_text()
                       .splitlines())
            res["cgroup"] = {
                "failcnt": int((cgroup / "memory.failcnt").read_text()),
                "max_usage_mib": int((cgroup / "memory.max_usage_in_bytes").read_text()) / MIB,
                "oom_kill": int(oom.get("oom_kill", 0))}
        res["survived"] = proc.returncode in (0, 3) and not res.get("cgroup", {}).get("oom_kill")
        return res


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A v1 memory cgroup limited to ``limit`` bytes, removed afterwards."""
    cgroup = CGROUP_ROOT / f"mirror-bench-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(limit))
        yield cgroup
    finally:
        for _ in range(50):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.2)


def one(name: str, limit: int, seconds: int) -> dict[str, Any]:
    if not name.startswith("cgroup"):
        return run_round(name, limit, seconds, True, None)
    with memory_cgroup(limit) as cgroup:
        return run_round(name, limit, seconds, name != "cgroup-default", cgroup)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: runs, min/median/max peak RSS, over the limit, survived."""
    out = []
    for name in dict.fromkeys(r["round"] for r in results):
        mine = [r for r in results if r["round"] == name]
        peaks = [r["peak_rss_mib"] for r in mine]
        out.append({"round": name, "runs": len(mine), "limit_mib": mine[0]["limit_mib"],
                    "peak_rss_mib": {"min": min(peaks),
                                     "median": round(statistics.median(peaks), 1),
                                     "max": max(peaks)},
                    "over_limit": sum(p > r["limit_mib"] for p, r in zip(peaks, mine,
                                                                          strict=True)),
                    "survived": sum(bool(r["survived"]) for r in mine)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", default="512MiB")
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=10, help="runs of each round (default 10)")
    ap.add_argument("--rounds", default="plain,cgroup,cgroup-default")
    opts = ap.parse_args()
    limit = parse_size(opts.limit)
    results = []
    for run in range(opts.runs):
        for name in opts.rounds.split(","):
            r = one(name, limit, opts.seconds)
            r["run"] = run + 1
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = summarize(results)
    for s in summary:
        p = s["peak_rss_mib"]
        print(f"{s['round']:<15} runs={s['runs']} limit={s['limit_mib']:g} MiB peak RSS "
              f"min/median/max={p['min']}/{p['median']}/{p['max']} MiB "
              f"over_limit={s['over_limit']} survived={s['survived']}/{s['runs']}", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "overload_memory.json").write_text(
        json.dumps({"summary": summary, "runs": results}, indent=1))
    ok = all(s["over_limit"] == 0 and s["survived"] == s["runs"] for s in summary)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
