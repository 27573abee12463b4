"""Soak (issue 19): everything at once for ``--duration`` seconds, then did anything leak and
is every request accounted for?

All in one private network namespace over loopback, deleted afterwards; every process is
started here and stopped by its PID:

- nginx as the service on 127.0.0.1:8090 and on :8091, nginx as the shadow on :18090, each
  with an access log;
- ``mirror-agent run --iface lo --port 8090 --target 127.0.0.1:18090`` recording to
  ``rec.bin`` rotated (``--record-rotate 4MiB,60s``) and gzip-compressed, control API on
  127.0.0.1:19464 with ``--pcap-dir``, ``--idle-timeout 30``, ``--stats-json``;
- keep-alive load on :8090 (``bench/keepalive_client.py``, 16 connections, ``--ka-rate``
  requests/s, every 4th a 2 KiB POST), connection churn on :8090
  (``lab/churn_client.py``, ``--churn-rate`` new connections/s) and a trickle of
  churn on :8091 (``--port2-rate``);
- Debian's Prometheus scraping ``/metrics`` every 2 s;
- ``PUT /ports`` flipping between [8090] and [8090, 8091] every ``--flip-every`` s, and
  ``POST /pcap`` of a fresh 20-connection capture file every ``--pcap-every`` s.

Every ``--sample-every`` s: the agent's RSS, open fds (/proc/PID/fd: all, and those that
are not sockets), threads, CPU, forward connections in flight, ``/healthz``, the load
average. After the load, a quiet spell (until nothing is in flight, at most ``--quiet`` s),
Prometheus's view of its scrapes, then SIGTERM; then the access logs, ``--stats-json`` and
every recording file (``mirror-agent inspect``) are read.

Fails (exit 1) when: RSS grows faster than ``--rss-slope`` MiB/min over the second half
(after ``--warmup``); non-socket fds, fds less forward connections in flight, or threads
are higher at the end than at the midpoint, or after the load than before it, beyond a
small tolerance; a request the service logged on :8090 (or a pcap job's) is not in the
recording or not at the shadow; a request is missing at the shadow without a counted drop
(silent loss), or any connection was dropped at all; the forward or record books
(``connections = completed + dropped + in_flight``) do not balance at exit or hold
something in flight; records written differ from the records in the files; a record or
capture byte was lost; a control call, scrape or pcap job failed; more than 1 % of client
requests failed; the agent does not exit 0. The :8091 requests are bounded only (the port
is observed half of the time). Writes bench/out/soak-YYYYmmdd-HHMMSS.json (every sample,
count and check) and prints a summary; the work directory is kept when it fails.

usage: python bench/soak.py [--duration 900] [--churn-rate 500] [--ka-rate 800] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.metrics import total
from bench.churn import log_problems
from bench.soak_checks import (
    Check,
    Limits,
    books_checks,
    client_counts,
    control_checks,
    count_log,
    inspect_recordings,
    leak_checks,
    machine,
    shadow_checks,
    sink_books,
    traffic_checks,
)
from bench.soak_pcap import write_job
from bench.soak_report import summary
from bench.stats import load
from lab.control import ask
from lab.netns import LAB, LiveAgent, NetNS, start_nginx, wait_port

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
SERVICE, SERVICE2, SHADOW, CONTROL, PROM = 8090, 8091, 18090, 19464, 19090
API = f"http://127.0.0.1:{CONTROL}"
PCAP_CONNS = 20
KA_CONNS = 16
_TICK = os.sysconf("SC_CLK_TCK")
#: Capture counters the summary shows (``mirror_agent_`` left out).
CAPTURE = ("kernel_lost_bytes_total", "ring_lost_samples_total", "drain_gap_max_seconds",
           "reassembly_flows_opened_total", "reassembly_gap_bytes_total",
           "reassembly_hole_timeouts_total", "reassembly_flows_closed_total",
           "memory_rss_peak_bytes")


def proc_status(pid: int) -> dict[str, float]:
    """The agent now: RSS and anonymous RSS (MiB), open fds (and of them not sockets),
    threads, CPU seconds so far; and the machine's 1-minute load average."""
    fd_dir = Path(f"/proc/{pid}/fd")
    links = []
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(fd))
    out: dict[str, float] = {"fds": float(len(links)),
                             "fds_other": float(sum(not x.startswith("socket:") for x in links))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            out["rss_mib" if name == "VmRSS" else "anon_mib"] = int(value.split()[0]) / 1024
        elif name == "Threads":
            out["threads"] = float(value)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(stat[11]) + int(stat[12])) / _TICK
    out["loadavg"] = float(Path("/proc/loadavg").read_text().split()[0])
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition → ``{name{labels}: value}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


class Soak:
    """One soak run in namespace ``ns``, files under ``work``."""

    def __init__(self, args: argparse.Namespace, ns: NetNS, work: Path) -> None:
        self.args, self.ns, self.work = args, ns, work
        tag = f"s{int(time.time())}"
        self.markers = {"keepalive": f"/ka/{tag}/", "churn": f"/churn/{tag}m/",
                        "churn_port2": f"/churn/{tag}p/", "pcap": f"/pcapjob/{tag}/"}
        self.tag = tag
        self.samples: list[dict[str, float]] = []
        self.calls: Counter[str] = Counter()
        self.jobs: dict[str, int] = {}  # pending: id -> job number
        self.job_states: Counter[str] = Counter()
        self.port2 = False
        self.agent: LiveAgent | None = None
        self.prom: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ start

    def start_servers(self) -> None:
        """The two services and the shadow, each nginx with an access log."""
        for sysctl in ("net.core.somaxconn=65535", "net.ipv4.tcp_max_syn_backlog=65535"):
            self.ns.run("sysctl", "-q", "-w", sysctl)
        for name, port in (("service", SERVICE), ("service2", SERVICE2), ("shadow", SHADOW)):
            start_nginx(self.ns, port, self.work / name, max_conns=16384,
                        access_log=self.work / f"{name}.access.log")

    def start_agent(self) -> LiveAgent:
        """The agent under test, once its capture is live."""
        (self.work / "rec").mkdir()
        (self.work / "pcaps").mkdir()
        self.agent = LiveAgent(
            self.ns, self.work, "--iface", "lo", "--port", str(SERVICE),
            "--target", f"127.0.0.1:{SHADOW}", "--record", str(self.work / "rec" / "rec.bin"),
            "--record-rotate", self.args.rotate, "--record-compress", "gzip",
            "--listen", f"127.0.0.1:{CONTROL}", "--pcap-dir", str(self.work / "pcaps"),
            "--idle-timeout", "30", "--stats-json", str(self.work / "stats.json"))
        return self.agent

    def start_prometheus(self) -> None:
        """Debian's Prometheus scraping the agent every 2 s; returns after its first scrape."""
        conf = self.work / "prometheus.yml"
        conf.write_text(f"""
global: {{scrape_interval: 2s, scrape_timeout: 2s}}
scrape_configs:
  - job_name: mirror-agent
    static_configs: [{{targets: ["127.0.0.1:{CONTROL}"]}}]
""")
        self.prom = self.ns.popen(
            shutil.which("prometheus") or "prometheus", f"--config.file={conf}",
            f"--storage.tsdb.path={self.work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{PROM}",
            stdout=subprocess.DEVNULL, stderr=(self.work / "prometheus.err").open("w"))
        wait_port(self.ns, PROM, timeout=30)
        deadline = time.monotonic() + 30
        while self.query('up{job="mirror-agent"}') != 1.0:
            if time.monotonic() > deadline:
                raise RuntimeError("Prometheus never scraped the agent")
            time.sleep(0.5)

    def start_loads(self) -> dict[str, subprocess.Popen[bytes]]:
        """Keep-alive load and churn on :8090, churn on :8091, for the duration."""
        a, dur = self.args, str(self.args.duration)
        py, churn = sys.executable, str(LAB / "churn_client.py")
        common: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
        return {
            "keepalive": self.ns.popen(
                py, str(BENCH / "keepalive_client.py"), "127.0.0.1", str(SERVICE),
                "--connections", str(KA_CONNS), "--rate", str(a.ka_rate), "--duration", dur,
                "--tag", self.tag, **common),
            "churn": self.ns.popen(py, churn, "127.0.0.1", str(SERVICE), "--rate",
                                   str(a.churn_rate), "--duration", dur, "--workers", "2",
                                   "--tag", self.tag + "m", **common),
            "churn_port2": self.ns.popen(py, churn, "127.0.0.1", str(SERVICE2), "--rate",
                                         str(a.port2_rate), "--duration", dur, "--workers",
                                         "1", "--tag", self.tag + "p", **common)}

    # ------------------------------------------------------------ while it runs

    def query(self, expr: str) -> float | None:
        """One instant PromQL query's first value (None: no result or no answer)."""
        url = f"http://127.0.0.1:{PROM}/api/v1/query?query=" + urllib.parse.quote(expr)
        out = self.ns.run("curl", "-s", "-m", "10", url, check=False).stdout
        try:
            result = json.loads(out)["data"]["result"]
        except (ValueError, KeyError):
            return None
        return float(result[0]["value"][1]) if result else None

    def sample(self, t: float) -> dict[str, float]:
        """The agent's resources now, its sinks' in-flight gauges and /healthz."""
        assert self.agent is not None
        s: dict[str, float] = {"t": round(t, 2), **proc_status(self.agent.proc.pid)}
        code, text = ask(API + "/metrics", ns=self.ns)
        m = parse_metrics(text) if code == 200 and isinstance(text, str) else {}
        s["fwd_in_flight"] = total(m, "mirror_agent_forward_connections_in_flight")
        s["rec_in_flight"] = total(m, "mirror_agent_record_connections_in_flight")
        s["handoff_queued_mib"] = total(m, "mirror_agent_handoff_queued_bytes") / (1 << 20)
        s["fds_net"] = s["fds"] - s["fwd_in_flight"]
        self.calls[f"metrics_{code}"] += 1
        code, _ = ask(API + "/healthz", ns=self.ns)
        s["healthz"] = code
        self.calls[f"healthz_{code}"] += 1
        return s

    def flip(self) -> None:
        """``PUT /ports``: add :8091, or take it away again; the answer must echo the list."""
        want = [SERVICE, SERVICE2] if not self.port2 else [SERVICE]
        code, body = ask(API + "/ports", "PUT", json.dumps({"ports": want}), ns=self.ns)
        ports = body.get("ports") if isinstance(body, dict) else None
        echoed = isinstance(ports, list) and sorted(ports) == want
        self.calls[f"ports_{code}{'' if echoed else '_wrong'}"] += 1
        if code == 200:
            self.port2 = not self.port2

    def post_job(self, n: int) -> None:
        """Write capture file ``n`` into the pcap directory and ``POST /pcap`` it."""
        name = f"job-{n}.pcap"
        write_job(self.work / "pcaps" / name, self.tag, n, PCAP_CONNS, SERVICE)
        code, body = ask(API + "/pcap", "POST", json.dumps({"path": name}), ns=self.ns)
        self.calls[f"pcap_post_{code}"] += 1
        if code == 202 and isinstance(body, dict):
            self.jobs[str(body["id"])] = n

    def poll_jobs(self) -> None:
        """Ask after each pending job; a finished one leaves the pending list."""
        for job_id in list(self.jobs):
            code, body = ask(f"{API}/pcap/{job_id}", ns=self.ns)
            state = body.get("state") if isinstance(body, dict) else f"http_{code}"
            if state in ("done", "failed") or code != 200:
                self.job_states[str(state)] += 1
                del self.jobs[job_id]

    def drive(self, t0: float, length: float) -> None:
        """Sample, flip and post jobs on their schedules until ``length`` s after ``t0``."""
        a = self.args
        due = {"sample": t0, "flip": t0 + a.flip_every, "pcap": t0 + a.pcap_every / 2}
        every = {"sample": a.sample_every, "flip": a.flip_every, "pcap": a.pcap_every}
        jobs = 0
        while (now := time.monotonic()) < t0 + length:
            for what in [w for w, at in due.items() if at <= now]:
                due[what] += every[what]
                if what == "sample":
                    self.samples.append(self.sample(now - t0))
                    self.poll_jobs()
                elif what == "flip":
                    self.flip()
                else:
                    self.post_job(jobs)
                    jobs += 1
            time.sleep(max(0.0, min(min(due.values()), t0 + length) - time.monotonic()))

    # ------------------------------------------------------------ after the load

    def finish_loads(self, loads: dict[str, subprocess.Popen[bytes]]) -> dict[str, Any]:
        """Each load's JSON summary, once it has finished (its in-flight requests too)."""
        out: dict[str, Any] = {}
        for name, proc in loads.items():
            stdout, _ = proc.communicate(timeout=180)
            lines = stdout.decode().strip().splitlines()
            out[name] = json.loads(lines[-1]) if lines else {"error": f"exit {proc.returncode}"}
        return out

    def quiet(self, t0: float) -> dict[str, float]:
        """Wait (at most ``--quiet`` s) until no forward connection is in flight and every
        pcap job has finished; the sample then."""
        deadline = time.monotonic() + self.args.quiet
        while True:
            self.poll_jobs()
            s = self.sample(time.monotonic() - t0)
            if (s["fwd_in_flight"] == 0 and not self.jobs) or time.monotonic() > deadline:
                return s
            time.sleep(1.0)

    def prometheus_view(self, seconds: float) -> dict[str, Any]:
        """What Prometheus saw over the run: scrapes, failed ones, the slowest; then stop it."""
        span = f"[{int(seconds) + 5}s]"
        sel = '{job="mirror-agent"}'
        view = {"scrapes": self.query(f"count_over_time(up{sel}{span})"),
                "scrapes_up": self.query(f"sum_over_time(up{sel}{span})"),
                "scrape_seconds_max": self.query(
                    f"max_over_time(scrape_duration_seconds{sel}{span})"),
                "samples_per_scrape": self.query(f"scrape_samples_scraped{sel}")}
        if self.prom is not None:
            self.prom.terminate()
            view["prometheus_exit"] = self.prom.wait(30)
        return view

    def stop_agent(self) -> int:
        """SIGTERM the agent; its exit status (killed after 120 s: -9)."""
        assert self.agent is not None
        self.agent.signal(signal.SIGTERM)
        try:
            return self.agent.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.agent.proc.kill()
            self.agent.proc.wait(10)
            return -9


# ---------------------------------------------------------------- the verdict


def recording_files(rec: Path) -> list[Path]:
    """The rotated files in the order written: rec.bin.gz, rec.1.bin.gz, rec.2.bin.gz ..."""
    def number(p: Path) -> int:
        """The N of NAME.N.SUFFIX, 0 for the first file."""
        part = p.name.split(".")[1]
        return int(part) if part.isdigit() else 0
    return sorted(rec.iterdir(), key=number)


def analyse(soak: Soak, idle: dict[str, float], quiet: dict[str, float],
            clients_raw: dict[str, Any], prom: dict[str, Any], exit_code: int) -> dict[str, Any]:
    """Read the logs, the recording and ``--stats-json``; every check."""
    work, markers = soak.work, soak.markers
    service = count_log(work / "service.access.log", markers)
    service2 = count_log(work / "service2.access.log", markers)
    svc = {k: service[k]["all"] + service2[k]["all"] for k in markers}
    shadow = {k: v["all"] for k, v in count_log(work / "shadow.access.log", markers).items()}
    inspected = inspect_recordings(recording_files(work / "rec"), markers)
    stats = load(work / "stats.json")
    clients = client_counts(clients_raw, soak.job_states["done"] * PCAP_CONNS)
    trends, checks = leak_checks(soak.samples, soak.args.duration, idle, quiet,
                                 Limits(soak.args.rss_slope, soak.args.fd_tolerance,
                                        soak.args.thread_tolerance, soak.args.warmup))
    checks += traffic_checks(clients, svc, inspected["requests"])
    m = machine(soak.samples)
    context = (f"machine load average up to {m['loadavg_max']:g} on {m['cpus']} CPUs, "
               f"longest ring drain gap {total(stats, 'mirror_agent_drain_gap_max_seconds'):g} "
               "s: a paused agent sheds the new connections it catches up on")
    checks += shadow_checks(clients, svc, shadow, inspected["requests"],
                            sink_books(stats, "forward"), context)
    checks += books_checks(stats, inspected)
    lost = {k: total(stats, "mirror_agent_" + k) for k in CAPTURE[:2]}
    checks.append(Check("no capture loss", not any(lost.values()), f"{lost}"))
    checks += control_checks(soak.calls, soak.job_states, len(soak.jobs), stats, prom,
                             exit_code, clients)
    return {"ok": all(c.ok for c in checks), "checks": [c.as_dict() for c in checks],
            "trends": trends, "idle": idle, "quiet": quiet, "clients": clients,
            "clients_raw": clients_raw, "service": svc, "shadow": shadow,
            "recorded": inspected["requests"], "recording": inspected,
            "forward": sink_books(stats, "forward"), "record": sink_books(stats, "record"),
            "capture": {k: total(stats, "mirror_agent_" + k) for k in CAPTURE},
            "prometheus": prom, "calls": dict(soak.calls), "jobs": dict(soak.job_states),
            "agent_exit": exit_code, "agent_log": log_problems(work / "agent.err"),
            "machine": m,
            "samples": soak.samples}


# ---------------------------------------------------------------- the run


def run_soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The whole run, from an empty namespace to the verdict."""
    started = time.monotonic()
    with NetNS("mirsoak") as ns:
        soak = Soak(args, ns, work)
        soak.start_servers()
        soak.start_agent()
        soak.start_prometheus()
        time.sleep(2)
        idle = soak.sample(-1.0)
        print(f"soak: agent pid {soak.agent.proc.pid if soak.agent else '?'} live, idle "
              f"RSS {idle['rss_mib']:.1f} MiB, {idle['fds']:g} fds, {idle['threads']:g} "
              f"threads; {args.duration:g} s of load from now", flush=True)
        loads = soak.start_loads()
        t0 = time.monotonic()
        soak.drive(t0, args.duration)
        clients = soak.finish_loads(loads)
        quiet = soak.quiet(t0)
        prom = soak.prometheus_view(time.monotonic() - started)
        exit_code = soak.stop_agent()
        print(f"soak: load done, agent exited {exit_code}; reading logs and the recording",
              flush=True)
        result = analyse(soak, idle, quiet, clients, prom, exit_code)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=900.0, help="seconds of load "
                    "(default 900: with start-up and the checks, about 17 minutes; 120 is a "
                    "quick look, its slopes cover only the last 30 s)")
    ap.add_argument("--churn-rate", type=float, default=500.0,
                    help="new connections/s on :8090")
    ap.add_argument("--ka-rate", type=float, default=800.0,
                    help="keep-alive requests/s on :8090 (16 connections)")
    ap.add_argument("--port2-rate", type=float, default=20.0,
                    help="new connections/s on the flipped port :8091")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--flip-every", type=float, default=3.0)
    ap.add_argument("--pcap-every", type=float, default=20.0)
    ap.add_argument("--rotate", default="4MiB,60s", help="--record-rotate of the agent")
    ap.add_argument("--quiet", type=float, default=75.0,
                    help="after the load, wait at most this long for nothing in flight")
    ap.add_argument("--rss-slope", type=float, default=1.0,
                    help="MiB/min at most, over the second half after --warmup")
    ap.add_argument("--warmup", type=float, default=90.0,
                    help="seconds of load before the RSS slope counts (measured: the heap "
                    "reaches its working size in about 80 s)")
    ap.add_argument("--fd-tolerance", type=int, default=4)
    ap.add_argument("--thread-tolerance", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", type=Path, help="default: bench/out/soak-YYYYmmdd-HHMMSS.json")
    a = ap.parse_args(argv)
    if a.duration < 30:
        ap.error("--duration must be at least 30 s")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 pass, 1 fail, 2 cannot run here."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("soak: needs root (network namespaces, eBPF)\n")
        return 2
    if missing := [t for t in ("nginx", "prometheus", "curl") if not shutil.which(t)]:
        sys.stderr.write(f"soak: missing {', '.join(missing)} (make setup installs them)\n")
        return 2
    work = Path(tempfile.mkdtemp(prefix="mirror-soak-"))
    try:
        result = run_soak(args, work)
    except BaseException:
        sys.stderr.write(f"soak: aborted; files kept in {work}\n")
        raise
    out = args.out or OUT / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    if result["ok"] and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"soak: work directory kept: {work}")
    print(f"soak: wrote {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
