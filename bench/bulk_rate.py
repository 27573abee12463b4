"""Lossless rate, bulk: iperf3 at fixed rates into the observed port, tcpdump -w vs the agent.

In one private namespace over loopback, an iperf3 server listens on 5201. For each rate
(``--rates``, Gbit/s; 0 = unlimited) and round, each capture runs in turn (alternating which
goes first) while ``iperf3 -c 127.0.0.1 -b RATE -t SECONDS`` sends:

- ``tcpdump``: ``tcpdump -i lo -s 0 -w FILE 'tcp port 5201'`` (default options). Its loss is
  what the capture misses: ``mirror-agent offline`` reassembles the file and counts the gap
  bytes, and tcpdump's own "dropped by kernel" is reported too.
- ``agent-perf``, ``agent-ringbuf`` (``--transports``): ``mirror-agent run --iface lo --port
  5201 --record FILE --both-directions --transport T`` (TC, native record). Its loss is the
  gap bytes it reports (every byte missing from its reassembled streams, whether the kernel
  could not submit it or it went missing otherwise) plus records its writer had to drop.

Both write to ``--dir`` (default /dev/shm, so the disk is not what is measured). Reported per
rate: the achieved rate, bytes lost by each (median of rounds, and the worst round) and the
highest rate each holds with zero loss in every round. Writes bench/out/bulk_rate.json.

usage: python bench/bulk_rate.py [--rates 1,2,4,8,0] [--rounds 3] [--seconds 3]
       [--transports perf,ringbuf] [--agent-args '...']
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.cli.outputs import EXIT_DEGRADED
from bench.stats import load, metric
from lab.netns import AGENT, LiveAgent, NetNS, Tcpdump, wait_port

OUT = Path(__file__).resolve().parent / "out"
PORT = 5201


def iperf(ns: NetNS, rate_gbit: float, seconds: int) -> tuple[int, float]:
    """(bytes sent, achieved Gbit/s) of one iperf3 run."""
    res = ns.run("iperf3", "-c", "127.0.0.1", "-p", str(PORT), "-t", str(seconds), "-b",
                 f"{rate_gbit}G" if rate_gbit else "0", "-J", timeout=seconds + 60)
    end = json.loads(res.stdout)["end"]["sum_sent"]
    return int(end["bytes"]), float(end["bits_per_second"]) / 1e9


def run_tcpdump(ns: NetNS, work: Path, rate: float, seconds: int) -> dict[str, float]:
    pcap = work / "t.pcap"
    cap = Tcpdump(ns, "lo", pcap, f"tcp port {PORT}", options=())
    time.sleep(0.3)
    sent, gbit = iperf(ns, rate, seconds)
    dropped = re.search(r"(\d+) packets? dropped by kernel", cap.stop())
    stats = work / "t.json"
    subprocess.run([*AGENT[:-1], "offline", str(pcap), "--port", str(PORT),
                    "--both-directions", "--stats-json", str(stats), "--overwrite"],
                   check=True, capture_output=True, timeout=600)
    s = load(stats)
    pcap.unlink()
    return {"sent_bytes": sent, "gbit": gbit,
            "lost_bytes": metric(s, "mirror_agent_reassembly_gap_bytes_total"),
            "kernel_dropped_packets": int(dropped.group(1)) if dropped else -1}


def run_agent(ns: NetNS, work: Path, rate: float, seconds: int,
              extra: list[str]) -> dict[str, float]:
    stats, rec = work / "a.json", work / "rec.bin"
    agent = LiveAgent(ns, work, "--iface", "lo", "--port", str(PORT), "--record", str(rec),
                      "--both-directions", "--stats-json", str(stats), "--overwrite", *extra)
    time.sleep(0.3)
    sent, gbit = iperf(ns, rate, seconds)
    time.sleep(0.5)  # the last events drain
    agent.signal(signal.SIGTERM)
    # 3: degraded (the recording dropped records): the loss this bench measures.
    if agent.proc.wait(60) not in (0, EXIT_DEGRADED):
        raise RuntimeError(f"agent exited {agent.proc.returncode}: {agent.err.read_text()}")
    s = load(stats)
    rec.unlink()
    # Every byte missing from the reassembled streams is a gap, whatever lost it (a full
    # ring, a copy that failed): kernel_lost_bytes is the part the kernel counted itself.
    # Records the writer had to drop are lost too (and marked as gaps in the file).
    dropped = metric(s, "mirror_agent_record_lost_bytes_total", reason="queue_full")
    lost = metric(s, "mirror_agent_reassembly_gap_bytes_total") + dropped
    return {"sent_bytes": sent, "gbit": gbit, "lost_bytes": lost,
            "record_dropped_bytes": dropped,
            "kernel_lost_bytes": metric(s, "mirror_agent_kernel_lost_bytes_total"),
            "perf_lost_samples": metric(s, "mirror_agent_ring_lost_samples_total"),
            "ring_peak_fill": metric(s, "mirror_agent_ring_peak_bytes") / max(
                metric(s, "mirror_agent_ring_capacity_bytes"), 1),
            "drain_gap_max_ms": metric(s, "mirror_agent_drain_gap_max_seconds") * 1000,
            "drain_pauses": metric(s, "mirror_agent_drain_pauses_total"),
            "backlog_peak_mb": metric(s, "mirror_agent_handoff_peak_queued_bytes",
                                      handoff="ring_drain") / 1e6,
            "recorded_bytes": metric(s, "mirror_agent_record_written_bytes_total")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="1,2,4,8,0",
                        help="Gbit/s, comma-separated; 0 = unlimited")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm", help="where captures are written")
    parser.add_argument("--transports", default="perf,ringbuf",
                        help="the agent's transports to run, comma-separated")
    parser.add_argument("--agent-args", default="", help="extra mirror-agent run options")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.stderr.write("bulk_rate: needs root (network namespaces, eBPF)\n")
        return 2
    rates = [float(r) for r in args.rates.split(",")]
    extra = shlex.split(args.agent_args)
    tools = ["tcpdump", *(f"agent-{t}" for t in args.transports.split(","))]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="mirror-bulk-", dir=args.dir) as tmp, \
            NetNS("mirbulk") as ns:
        work = Path(tmp)
        ns.popen("iperf3", "-s", "-p", str(PORT), stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
        wait_port(ns, PORT)
        for rate in rates:
            label = f"{rate:g}" if rate else "unlimited"
            per = results.setdefault(label, {tool: [] for tool in tools})
            for rnd in range(args.rounds):
                order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]  # who goes first
                for tool in order:
                    r = (run_tcpdump(ns, work, rate, args.seconds) if tool == "tcpdump"
                         else run_agent(ns, work, rate, args.seconds,
                                        ["--transport", tool.removeprefix("agent-"), *extra]))
                    per[tool].append(r)
                    print(f"rate {label:>9s} round {rnd + 1} {tool:13s} " + " ".join(
                        f"{k}={v:.4g}" for k, v in r.items()), flush=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for label, per in results.items():
        summary[label] = {}
        for tool, rs in per.items():
            summary[label][tool] = {
                "gbit": statistics.median(r["gbit"] for r in rs),
                "lost_bytes_median": statistics.median(r["lost_bytes"] for r in rs),
                "lost_bytes_max": max(r["lost_bytes"] for r in rs),
                "lost_fraction_max": max(r["lost_bytes"] / max(r["sent_bytes"], 1) for r in rs),
            }
    print("\nper rate (Gbit/s asked): achieved Gbit/s, bytes lost median / worst")
    for label, per_tool in summary.items():
        cells = [f"{t} {v['gbit']:.2f} Gbit/s lost {v['lost_bytes_median']:.0f}/"
                 f"{v['lost_bytes_max']:.0f} ({v['lost_fraction_max']:.2%})"
                 for t, v in per_tool.items()]
        print(f"  {label:>9s}: " + "; ".join(cells))
    for tool in tools:
        held = [label for label, per_tool in summary.items()
                if per_tool[tool]["lost_bytes_max"] == 0]
        print(f"zero loss in every round, {tool}: {', '.join(held) or 'none'}")
    OUT.mkdir(exist_ok=True)
    (OUT / "bulk_rate.json").write_text(json.dumps(
        {"args": vars(args), "runs": results, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
