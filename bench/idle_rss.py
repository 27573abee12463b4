"""Idle memory: what a running agent holds when nothing happens, beside tcpdump.

In a private namespace over loopback, each of these runs alone for ``--seconds`` with no
traffic, and its resident set (VmRSS, and the anonymous/file split) is read at the end:

- ``agent``: ``mirror-agent run --iface lo --port 8080 --target 127.0.0.1:18080`` with the
  default rings (16 MiB per CPU, perf) and the default (TCX) attach; the program is compiled
  in a short-lived child, so LLVM is not in this process;
- ``agent (ringbuf)``: the same with ``--transport ringbuf``;
- ``tcpdump``: ``tcpdump -i lo -w FILE tcp port 8080`` (default options).

Also reported: the agent's peak RSS during start-up (VmHWM), which the compile child does
not add to. Writes bench/out/idle_rss.json.

usage: python bench/idle_rss.py [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.netns import LiveAgent, NetNS, Tcpdump

OUT = Path(__file__).resolve().parent / "out"


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, KiB."""
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            out[name] = int(value.split()[0])
    return out


def measure_agent(work: Path, seconds: float, *extra: str) -> dict[str, int]:
    with NetNS() as ns:
        agent = LiveAgent(ns, work, "--iface", "lo", "--port", "8080",
                          "--target", "127.0.0.1:18080", *extra)
        time.sleep(seconds)
        result = status_kib(agent.proc.pid)
        agent.stop(settle=0)
    return result


def measure_tcpdump(work: Path, seconds: float) -> dict[str, int]:
    with NetNS() as ns:
        cap = Tcpdump(ns, "lo", work / "idle.pcap", "tcp port 8080", options=())
        time.sleep(seconds)
        result = status_kib(cap.proc.pid)
        cap.stop()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, int]]] = {"agent": [], "agent (ringbuf)": [], "tcpdump": []}
    with tempfile.TemporaryDirectory(prefix="idle-rss-") as tmp:
        work = Path(tmp)
        for _ in range(args.rounds):
            runs["agent"].append(measure_agent(work, args.seconds))
            runs["agent (ringbuf)"].append(
                measure_agent(work, args.seconds, "--transport", "ringbuf"))
            runs["tcpdump"].append(measure_tcpdump(work, args.seconds))
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for name, rs in runs.items()}
    tcpdump_rss = summary["tcpdump"]["VmRSS"]
    print(f"{'':18} {'RSS MiB':>8} {'anon':>6} {'file':>6} {'peak':>6} {'x tcpdump':>9}")
    for name, s in summary.items():
        print(f"{name:18} {s['VmRSS'] / 1024:8.1f} {s['RssAnon'] / 1024:6.1f} "
              f"{s['RssFile'] / 1024:6.1f} {s['VmHWM'] / 1024:6.1f} "
              f"{s['VmRSS'] / tcpdump_rss:9.1f}")
    OUT.mkdir(exist_ok=True)
    (OUT / "idle_rss.json").write_text(json.dumps({"runs": runs, "median": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
