"""Connection churn (issue 18): does every captured connection reach the shadow, or is it
counted, at the rate of new connections the service itself takes?

One private network namespace over loopback: nginx as the service on 127.0.0.1:8090 and
nginx as the shadow on 127.0.0.1:18090 (each with its own access log, one worker), and
``lab/churn_client.py`` (4 processes, one new connection per request,
``Connection: close``, each request a unique ``GET /churn/<tag>/<worker>/<seq>``).

1. The service's own maximum new-connection rate, agent off: the client closed loop
   (``--max-concurrency`` connections per worker) for ``--max-duration`` seconds.
2. Per rate, agent off (``--baseline-duration`` s): the client's p99 latency, the baseline.
3. Per mode and rate, a fresh ``mirror-agent run --iface lo --port 8090 --target
   127.0.0.1:18090 --stats-json FILE`` (mode ``request`` adds ``--forward-mode request``; an
   agent that rejects it with status 2 makes the mode "unavailable"): ``--duration`` s of
   load, ``--quiet`` s of nothing, SIGTERM. Before each step the agent's source ports
   (61000+) are let out of TIME_WAIT (up to ``--port-wait``, 65 s) so one step's ports do
   not cost the next. ``--tw-reuse`` sets ``net.ipv4.tcp_tw_reuse`` in the namespace (2,
   the default, reuses TIME_WAIT ports to loopback only); note that a connect from a port
   bound beforehand (as the agent's are) takes over a TIME_WAIT tuple with timestamps
   whatever it says: measured, 0 changed nothing at 400-3,000/s.

Per step: the client's requests sent/ok and p99 (vs the baseline), the requests in the
shadow's access log, the agent's forward connections / completed / dropped by reason /
in flight and the unaccounted rest (connections - completed - dropped - in_flight), its exit
status and CPU (seconds per second, of the load and of the quiet after it; per thread
name over both), ``ss`` in the namespace halfway
through the load and just before SIGTERM (ESTABLISHED and TIME-WAIT sockets on the agent's
source ports, ``ss -s``), and the agent's warnings/errors by message. The summary: per mode,
the highest rate with >= 99.9 % of the client's ok requests at the shadow, as a ratio of the
service's maximum. Writes bench/out/churn.json (the step directories with the agent logs stay
under ``--workdir``, default a new /tmp/mirror-churn-*).

The metric names are read from ``--stats-json``: ``mirror_agent_forward_connections_dropped_total``
and ``mirror_agent_forward_connections_in_flight`` where the agent has them, else the older
``mirror_agent_forward_flows_dropped_total`` (and ``..._connections_unconfirmed_total``,
reported beside, not counted as dropped).

usage: python bench/churn.py [--rates 500,1000,...] [--duration 60] [--modes
       connection,request] [--quiet 5] [--max-duration 10] [--baseline-duration 10]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.metrics import split_key
from bench.stats import load
from lab.netns import LAB, LiveAgent, NetNS, start_nginx

OUT = Path(__file__).resolve().parent / "out"
SERVICE, SHADOW = 8090, 18090
#: The agent's default --forward-source-ports start.
SOURCE_PORTS = 61000
MODES = {"connection": [], "request": ["--forward-mode", "request"]}
DEFAULT_RATES = (500, 1000, 1600, 3000, 6000, 12000, 24000)
TARGET = 0.999
_TICK = os.sysconf("SC_CLK_TCK")
_FWD = "mirror_agent_forward_"


# ---------------------------------------------------------------- helpers


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread name (threads of one name added up)."""
    out: collections.defaultdict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            out[name] += (int(fields[11]) + int(fields[12])) / _TICK
    return dict(out)


def churn(ns: NetNS, rate: float, duration: float, tag: str, *, workers: int,
          concurrency: int = 16) -> dict[str, Any]:
    r = ns.run(sys.executable, str(LAB / "churn_client.py"), "127.0.0.1", str(SERVICE),
               "--rate", str(rate), "--duration", str(duration), "--workers", str(workers),
               "--concurrency", str(concurrency), "--tag", tag, timeout=duration + 90)
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def log_count(path: Path, needle: str, start: int = 0) -> tuple[int, int]:
    """(lines containing ``needle`` after byte ``start``, of them with status 200)."""
    if not path.exists():
        return 0, 0
    n = ok = 0
    with path.open("rb") as f:
        f.seek(start)
        word = needle.encode()
        for line in f:
            if word in line:
                n += 1
                ok += b" HTTP/1.1 200 " in line
    return n, ok


def ss_count(ns: NetNS, state: str) -> int:
    out = ns.run("ss", "-tanH", "state", state, f"( sport >= :{SOURCE_PORTS} )",
                 check=False).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def ss_observe(ns: NetNS) -> dict[str, Any]:
    return {"estab_agent_ports": ss_count(ns, "established"),
            "time_wait_agent_ports": ss_count(ns, "time-wait"),
            "other_agent_ports": ss_count(ns, "connected") - ss_count(ns, "established"),
            "ss_s": ns.run("ss", "-s", check=False).stdout.strip()}


def wait_ports_free(ns: NetNS, limit: float = 65.0) -> tuple[float, int]:
    """Wait until no socket holds one of the agent's source ports; (seconds, left)."""
    t0 = time.monotonic()
    left = ss_count(ns, "all")
    while left and time.monotonic() - t0 < limit:
        time.sleep(1.0)
        left = ss_count(ns, "all")
    return round(time.monotonic() - t0, 1), left


def by_reason(stats: dict[str, float], name: str) -> dict[str, float]:
    out = {}
    for k, v in stats.items():
        n, labels = split_key(k)
        if n == name and v:
            out[labels.get("reason", "")] = v
    return out


def accounting(stats: dict[str, float]) -> dict[str, Any]:
    """The forward sink's books from ``--stats-json``, whichever metric names it has."""
    new_dropped = _FWD + "connections_dropped_total"
    has_new = any(split_key(k)[0] == new_dropped for k in stats)
    dropped_name = new_dropped if has_new else _FWD + "flows_dropped_total"
    dropped = by_reason(stats, dropped_name)
    in_flight = stats.get(_FWD + "connections_in_flight")
    conns = stats.get(_FWD + "connections_total", 0)
    completed = stats.get(_FWD + "connections_completed_total", 0)
    out: dict[str, Any] = {
        "connections": conns, "completed": completed, "dropped": sum(dropped.values()),
        "dropped_by_reason": dropped, "dropped_metric": dropped_name,
        "in_flight": in_flight,
        "unaccounted": conns - completed - sum(dropped.values()) - (in_flight or 0)}
    for extra, key in (("unconfirmed", "connections_unconfirmed_total"),
                       ("forwarded_bytes", "forwarded_bytes_total"),
                       ("dropped_bytes", "dropped_bytes_total"),
                       ("gap_resets", "gap_resets_total")):
        if _FWD + key in stats:
            out[extra] = stats[_FWD + key]
    for extra, key in (("kernel_lost_bytes", "mirror_agent_kernel_lost_bytes_total"),
                       ("ring_lost_samples", "mirror_agent_ring_lost_samples_total"),
                       ("gap_bytes", "mirror_agent_reassembly_gap_bytes_total")):
        if key in stats:
            out[extra] = stats[key]
    out["flows_evicted"] = {k: v for k, v in stats.items()
                            if "evict" in k and v and k.startswith("mirror_agent_reassembly")}
    return out


def log_problems(err: Path) -> dict[str, int]:
    """The agent's warning/error log lines, counted by event text."""
    found: collections.Counter[str] = collections.Counter()
    if not err.exists():
        return {}
    for line in err.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            if "Traceback" in line or "Error" in line:
                found[line.strip()[:160]] += 1
            continue
        if isinstance(rec, dict) and rec.get("level") in ("warning", "error", "critical"):
            text = str(rec.get("event", ""))
            detail = rec.get("error") or rec.get("reason") or ""
            found[f"{rec['level']}: {text}{' (' + str(detail)[:80] + ')' if detail else ''}"] += 1
    return dict(found.most_common(12))


# ---------------------------------------------------------------- one step


class Step:
    def __init__(self, ns: NetNS, work: Path, mode: str, rate: int,
                 args: argparse.Namespace) -> None:
        self.ns, self.mode, self.rate, self.args = ns, mode, rate, args
        self.dir = work / f"{mode}-{rate}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag = f"{mode}-{rate}-{int(time.time())}"

    def run(self, shadow_log: Path, baseline: dict[str, Any] | None) -> dict[str, Any]:
        ns, args = self.ns, self.args
        waited, left = wait_ports_free(ns, args.port_wait) if args.port_wait else (0.0, -1)
        res: dict[str, Any] = {"mode": self.mode, "rate": self.rate,
                               "ports_wait_s": waited, "ports_busy_at_start": left}
        stats_file = self.dir / "stats.json"
        here = Path.cwd()
        try:
            if args.agent_tree:  # python -m agent.cli.commands finds the package in its cwd first
                os.chdir(args.agent_tree)
            agent = LiveAgent(ns, self.dir, "--iface", "lo", "--port", str(SERVICE),
                              "--target", f"127.0.0.1:{SHADOW}", "--stats-json",
                              str(stats_file), "--overwrite", *MODES[self.mode],
                              *args.agent_args.split())
        except RuntimeError as e:  # exited (or never got live: then killed)
            proc = ns.procs[-1]
            if proc.poll() is None:
                proc.kill()
            code = proc.wait(10)
            res.update(unavailable=code == 2, exit=code, error=str(e)[-600:])
            return res
        finally:
            os.chdir(here)
        pid = agent.proc.pid
        start = shadow_log.stat().st_size if shadow_log.exists() else 0
        cpu0, threads0 = cpu_seconds(pid), thread_cpu(pid)
        mid: dict[str, Any] = {}
        timer = threading.Timer(args.duration / 2, lambda: mid.update(ss_observe(ns)))
        timer.start()
        t0 = time.monotonic()
        client = churn(ns, self.rate, args.duration, self.tag, workers=args.workers)
        load_s = time.monotonic() - t0
        timer.join()
        cpu_load = cpu_seconds(pid) - cpu0
        time.sleep(args.quiet)
        before_stop = ss_observe(ns)
        cpu_all = cpu_seconds(pid) - cpu0
        span = time.monotonic() - t0
        threads = {k: round((v - threads0.get(k, 0.0)) / span, 3)
                   for k, v in thread_cpu(pid).items()}
        agent.signal(signal.SIGTERM)
        try:
            code = agent.proc.wait(120)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            code = agent.proc.wait(10)
        at_shadow, at_shadow_200 = log_count(shadow_log, f"/churn/{self.tag}/", start)
        ok = client["ok"]
        res.update(
            sent=client["attempted"], ok=ok, failed=client["failed"],
            failed_by_reason=client["failed_by_reason"],
            achieved_rate=client["achieved_rate"], at_shadow=at_shadow,
            at_shadow_200=at_shadow_200, at_shadow_ratio=at_shadow / ok if ok else 0.0,
            p50_ms=client["p50_ms"], p99_ms=client["p99_ms"],
            p99_ms_no_agent=baseline["p99_ms"] if baseline else None,
            exit=code, cpu_per_s=round(cpu_load / load_s, 3),
            cpu_per_s_quiet=round((cpu_all - cpu_load) / max(span - load_s, 1e-3), 3),
            cpu_s_total=round(cpu_all, 2), threads_cpu_per_s=threads,
            ss_mid=mid, ss_before_stop=before_stop, log=log_problems(agent.err),
            workdir=str(self.dir))
        if stats_file.exists():
            res.update(accounting(load(stats_file)))
        else:
            res["stats_missing"] = True
        return res


# ---------------------------------------------------------------- the table


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if v.is_integer() or abs(v) >= 100 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("mode", "rate/s", "sent", "ok", "at shadow", "%", "conns", "completed",
            "dropped (reasons)", "in flight", "unacct", "unconf", "exit", "cpu", "p99 ms",
            "p99 no agent", "estab mid/stop")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "sent" not in r:
            lines.append(f"{r['mode']} | {r['rate']} | unavailable (exit {r.get('exit')})")
            continue
        reasons = ", ".join(f"{k}={fmt(v)}" for k, v in r.get("dropped_by_reason", {}).items())
        estab = f"{r['ss_mid'].get('estab_agent_ports', '-')}/" \
                f"{r['ss_before_stop']['estab_agent_ports']}"
        lines.append(" | ".join(fmt(x) for x in (
            r["mode"], r["rate"], r["sent"], r["ok"], r["at_shadow"],
            f"{100 * r['at_shadow_ratio']:.2f}", r.get("connections"), r.get("completed"),
            f"{fmt(r.get('dropped'))} ({reasons})" if reasons else fmt(r.get("dropped")),
            r.get("in_flight"), r.get("unaccounted"), r.get("unconfirmed"), r["exit"],
            f"{r['cpu_per_s']:.2f}", r["p99_ms"], r["p99_ms_no_agent"], estab)))
    return "\n".join(lines)


def best(rows: list[dict[str, Any]], mode: str, service_max: float) -> dict[str, Any]:
    good = [r["rate"] for r in rows
            if r["mode"] == mode and "sent" in r and r["at_shadow_ratio"] >= TARGET]
    if not any(r["mode"] == mode and "sent" in r for r in rows):
        return {"available": False}
    top = max(good, default=0)
    return {"available": True, "highest_rate_at_99_9": top,
            "ratio_of_service_max": round(top / service_max, 3) if service_max else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", help="new connections/s per step, comma-separated (default: "
                    f"{','.join(map(str, DEFAULT_RATES))} below the service's max, then it)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per step")
    ap.add_argument("--modes", default="connection,request")
    ap.add_argument("--quiet", type=float, default=5.0,
                    help="seconds between the end of the load and SIGTERM")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-duration", type=float, default=10.0)
    ap.add_argument("--max-concurrency", default="4,16",
                    help="connections in flight per worker while measuring the maximum "
                    "(comma-separated: each is tried, the best counts)")
    ap.add_argument("--baseline-duration", type=float, default=10.0)
    ap.add_argument("--agent-args", default="", help="extra mirror-agent run options")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path, default=OUT / "churn.json")
    ap.add_argument("--port-wait", type=float, default=65.0,
                    help="before each step, wait up to this many seconds for the agent's "
                    "source ports to leave TIME_WAIT (0: back to back)")
    ap.add_argument("--tw-reuse", choices=("0", "1", "2"),
                    help="net.ipv4.tcp_tw_reuse in the namespace (default: the kernel's, "
                    "2: loopback only)")
    ap.add_argument("--agent-tree", type=Path,
                    help="run the agent from this source tree (e.g. `git archive HEAD` "
                    "unpacked) instead of this one, to compare before and after a change")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.stderr.write("churn: needs root (network namespaces, eBPF)\n")
        return 2
    modes = [m for m in args.modes.split(",") if m]
    if unknown := [m for m in modes if m not in MODES]:
        sys.stderr.write(f"churn: unknown mode(s) {', '.join(unknown)}\n")
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mirror-churn-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with NetNS("mirchurn") as ns:
        ns.run("sysctl", "-q", "-w", "net.core.somaxconn=65535")
        ns.run("sysctl", "-q", "-w", "net.ipv4.tcp_max_syn_backlog=65535")
        if args.tw_reuse is not None:
            ns.run("sysctl", "-q", "-w", f"net.ipv4.tcp_tw_reuse={args.tw_reuse}")
        service_log, shadow_log = work / "service.access.log", work / "shadow.access.log"
        start_nginx(ns, SERVICE, work / "service", max_conns=16384, access_log=service_log)
        start_nginx(ns, SHADOW, work / "shadow", max_conns=16384, access_log=shadow_log)
        churn(ns, 0, 2, "warmup", workers=args.workers)
        tries = [churn(ns, 0, args.max_duration, f"max-{c}", workers=args.workers,
                       concurrency=int(c)) | {"concurrency": int(c)}
                 for c in args.max_concurrency.split(",") if c]
        top = max(tries, key=lambda t: float(t["ok_rate"]))
        service_max = float(top["ok_rate"])
        tried = ", ".join(f"{t['concurrency']}: {t['ok_rate']:,.0f}/s" for t in tries)
        print(f"service max (agent off, closed loop, {args.workers}x{top['concurrency']}): "
              f"{service_max:,.0f} new connections/s, p99 {top['p99_ms']} ms (tried {tried})",
              flush=True)
        if args.rates:
            rates = [int(x) for x in args.rates.split(",") if x]
        else:
            rates = [r for r in DEFAULT_RATES if r < 0.95 * service_max]
            rates.append(int(service_max))
        baselines: dict[int, dict[str, Any]] = {}
        for rate in rates:
            baselines[rate] = churn(ns, rate, args.baseline_duration, f"base-{rate}",
                                    workers=args.workers)
            b = baselines[rate]
            print(f"baseline {rate}/s: ok {b['ok']}/{b['attempted']} achieved "
                  f"{b['achieved_rate']}/s p99 {b['p99_ms']} ms", flush=True)
        for mode in modes:
            for rate in rates:
                row = Step(ns, work, mode, rate, args).run(shadow_log, baselines[rate])
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items()
                                  if k not in ("ss_mid", "ss_before_stop")}), flush=True)
                if row.get("unavailable"):
                    print(f"mode {mode}: unavailable (the agent exited 2)", flush=True)
                    break
    summary = {m: best(rows, m, service_max) for m in modes}
    print(f"\nservice max: {service_max:,.0f} new connections/s\n")
    print(table(rows))
    print("\nhighest rate with >= 99.9 % at the shadow:")
    for m, s in summary.items():
        print(f"  {m}: " + (f"{s['highest_rate_at_99_9']:,}/s = "
                            f"{s['ratio_of_service_max']} of the service max"
                            if s["available"] else "unavailable"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "service_max": service_max,
         "service_max_runs": tries, "baselines": baselines, "steps": rows,
         "summary": summary, "workdir": str(work)}, indent=2) + "\n")
    print(f"\nwrote {args.out}; agent logs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
