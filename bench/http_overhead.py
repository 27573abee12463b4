"""Service overhead, HTTP: nginx under wrk with nothing capturing, tcpdump -w, mirror-agent.

Everything runs in one private network namespace over loopback: nginx (one worker, a 17-byte
body) on 127.0.0.1:8080, wrk (keep-alive, ``--connections``, ``--duration`` seconds), and per
configuration:

- ``none``: nothing capturing;
- ``tcpdump``: ``tcpdump -i lo -w FILE 'tcp port 8080'`` as people run it;
- ``agent``: ``mirror-agent run --iface lo --port 8080 --target SHADOW --record FILE``
  (TC, perf buffer, native record). The shadow is ``lab/count_shadow.py``, which only
  counts request lines, so the run measures the agent and not a second web server;
- ``agent_decap`` (not run unless named in ``--configs``): the same with ``--decap vxlan``
  on the same plain traffic, i.e. what looking for tunnels costs;
- ``agent_rotate`` (not run unless named): the same recording rotated and gzip'd
  (``--record-rotate 64MiB,1h --record-compress gzip``), against plain native recording.
  Each variant's ``vs_agent`` is its requests/s over ``agent``'s in the same run.

The configurations alternate round by round (rotated, so none always goes first). Reported
per configuration: median requests/s and its ratio to ``none``, the capturing process's CPU
seconds (per second of load) and RSS, tcpdump's kernel drops, and for the agent the fraction
of wrk's requests that reached the shadow. Writes bench/out/http_overhead.json.

usage: python bench/http_overhead.py [--rounds 5] [--duration 5] [--connections 20]
       [--agent-args '...extra mirror-agent run options...']
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stats import load, metric
from lab.netns import LAB, LiveAgent, NetNS, Tcpdump, start_nginx, wait_port

OUT = Path(__file__).resolve().parent / "out"
CONFIGS = ("none", "tcpdump", "agent")
#: Extra mirror-agent options per agent configuration.
AGENT_CONFIGS = {"agent": [], "agent_decap": ["--decap", "vxlan"],
                 "agent_rotate": ["--record-rotate", "64MiB,1h", "--record-compress", "gzip"]}
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_wrk(ns: NetNS, connections: int, duration: int) -> tuple[float, int]:
    """(requests/s, requests completed)."""
    out = ns.run("wrk", "-t2", f"-c{connections}", f"-d{duration}s",
                 "http://127.0.0.1:8080/", timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, total


def one_run(ns: NetNS, config: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    result: dict[str, float] = {}
    count_file = work / "shadow.count"
    cap: Tcpdump | None = None
    agent: LiveAgent | None = None
    if config == "tcpdump":
        cap = Tcpdump(ns, "lo", work / "t.pcap", "tcp port 8080", options=())
        pid = cap.proc.pid
    elif config in AGENT_CONFIGS:
        shadow = ns.popen(sys.executable, str(LAB / "count_shadow.py"), "127.0.0.1", "18080",
                          str(count_file))
        wait_port(ns, 18080)
        agent = LiveAgent(ns, work, "--iface", "lo", "--port", "8080", "--target",
                          "127.0.0.1:18080", "--record", str(work / "rec.bin"),
                          "--stats-json", str(work / "stats.json"), "--overwrite",
                          *AGENT_CONFIGS[config], *shlex.split(args.agent_args))
        pid = agent.proc.pid
    time.sleep(0.5)
    cpu0 = cpu_seconds(pid) if config != "none" else 0.0
    rps, total = run_wrk(ns, args.connections, args.duration)
    result.update(rps=rps, requests=total)
    if config != "none":
        result["cpu_per_s"] = (cpu_seconds(pid) - cpu0) / args.duration
        result["rss_mib"] = rss_kib(pid) / 1024
    if cap is not None:
        err_text = cap.stop()
        dropped = re.search(r"(\d+) packets? dropped by kernel", err_text)
        captured = re.search(r"(\d+) packets? captured", err_text)
        result["kernel_dropped"] = int(dropped.group(1)) if dropped else -1
        result["captured"] = int(captured.group(1)) if captured else -1
        cap.path.unlink()
    if agent is not None:
        agent.stop(settle=1.0)  # let it forward what it holds
        time.sleep(0.5)
        shadow.send_signal(signal.SIGTERM)
        shadow.wait(30)
        mirrored = int(count_file.read_text())
        result["shadow_requests"] = mirrored
        result["mirrored_fraction"] = mirrored / total if total else 0.0
        stats = load(work / "stats.json")
        result["kernel_lost_bytes"] = metric(stats, "mirror_agent_kernel_lost_bytes_total")
        result["gap_bytes"] = metric(stats, "mirror_agent_reassembly_gap_bytes_total")
        result["hole_timeouts"] = metric(stats, "mirror_agent_reassembly_hole_timeouts_total")
        result["retransmitted_bytes"] = metric(
            stats, "mirror_agent_reassembly_retransmitted_bytes_total")
        result["perf_lost_samples"] = metric(stats, "mirror_agent_ring_lost_samples_total")
        result["forward_dropped_bytes"] = metric(stats, "mirror_agent_forward_dropped_bytes_total")
    return result


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    base = statistics.median(r["rps"] for r in runs["none"])
    table: dict[str, dict[str, float]] = {}
    for config, rs in runs.items():
        keys = sorted({k for r in rs for k in r})
        med = {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys}
        med["ratio"] = med["rps"] / base
        if config in AGENT_CONFIGS:
            med["mirrored_fraction_min"] = min(r["mirrored_fraction"] for r in rs)
        table[config] = med
    for variant in AGENT_CONFIGS:
        if variant == "agent" or "agent" not in table or variant not in table:
            continue
        table[variant]["vs_agent"] = table[variant]["rps"] / table["agent"]["rps"]
        # Per round too (the two ran back to back): the median of those ratios.
        table[variant]["vs_agent_rounds"] = statistics.median(
            d["rps"] / a["rps"] for a, d in zip(runs["agent"], runs[variant], strict=True))
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--agent-args", default="", help="extra mirror-agent run options")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.stderr.write("http_overhead: needs root (network namespaces, eBPF)\n")
        return 2
    configs = args.configs.split(",")
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp, NetNS("mirbench") as ns:
        work = Path(tmp)
        start_nginx(ns, 8080, work / "nginx")
        run_wrk(ns, args.connections, 2)  # warm-up
        for rnd in range(args.rounds):
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
            for config in order:
                r = one_run(ns, config, work, args)
                runs[config].append(r)
                print(f"round {rnd + 1} {config:8s} " + " ".join(
                    f"{k}={v:.4g}" for k, v in r.items()), flush=True)
    table = summarize(runs)
    print("\nmedians:")
    for config, med in table.items():
        print(f"  {config:8s} " + " ".join(f"{k}={v:.4g}" for k, v in med.items()))
    OUT.mkdir(exist_ok=True)
    (OUT / "http_overhead.json").write_text(json.dumps(
        {"args": vars(args), "runs": runs, "medians": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
