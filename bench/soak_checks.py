"""The soak's arithmetic: trends of the agent's resources, counts from access logs and
recordings, the books of the forward and record sinks, and the pass/fail checks.

Nothing here starts a process except :func:`inspect_recordings`, which runs
``mirror-agent inspect`` on each recording file, as a user would.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.metrics import split_key, total

__all__ = ["Check", "Limits", "books_checks", "client_counts", "control_checks", "count_log",
           "inspect_recordings", "leak_checks", "machine", "shadow_checks", "sink_books",
           "slope_per_min", "traffic_checks", "trend"]

Sample = Mapping[str, float]


@dataclass(frozen=True)
class Check:
    """One pass/fail line of the verdict."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        """The check as JSON."""
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class Limits:
    """What counts as growth: RSS slope over the second half, after ``warmup`` s (MiB/min),
    and how many fds and threads the end of the run (and the quiet after it) may hold beyond
    the midpoint."""

    rss_mib_per_min: float = 1.0
    fds: int = 4
    threads: int = 1
    warmup: float = 90.0


# ---------------------------------------------------------------- trends


def slope_per_min(ts: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ``ys`` over ``ts`` (seconds), per minute; 0 for < 2 points."""
    if len(ts) < 2:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var


def _window(samples: Sequence[Sample], length: float, lo: float, hi: float) -> list[Sample]:
    """The samples taken between fractions ``lo`` and ``hi`` of the load's ``length``."""
    return [s for s in samples if lo * length <= s["t"] <= hi * length]


def trend(samples: Sequence[Sample], length: float, field: str,
          warmup: float = 90.0) -> dict[str, float]:
    """``field`` at the start, around the middle (40-60 % of the load: median and max), at
    the end (the last 20 %: median and max), its least-squares slope per minute over the
    second half but not before ``warmup`` s (nor after 3/4 of the load), its min and max."""
    loaded = _window(samples, length, 0.0, 1.0)
    mid = _window(samples, length, 0.4, 0.6) or loaded[len(loaded) // 2:][:1]
    end = _window(samples, length, 0.8, 1.0) or loaded[-1:]
    late = [s for s in loaded if s["t"] >= max(0.5 * length, min(warmup, 0.75 * length))]
    vals = [s[field] for s in loaded]
    return {"start": loaded[0][field], "mid": statistics.median(s[field] for s in mid),
            "mid_max": max(s[field] for s in mid),
            "end": statistics.median(s[field] for s in end),
            "end_max": max(s[field] for s in end),
            "min": min(vals), "max": max(vals),
            "slope_per_min": round(slope_per_min([s["t"] for s in late],
                                                 [s[field] for s in late]), 4),
            "slope_from_s": late[0]["t"] if late else 0.0}


FIELDS = ("rss_mib", "anon_mib", "fds", "fds_net", "fds_other", "threads")


def leak_checks(samples: Sequence[Sample], length: float, idle: Sample, quiet: Sample,
                limits: Limits) -> tuple[dict[str, dict[str, float]], list[Check]]:
    """Trends of RSS, fds and threads, and the checks on them. ``fds_net`` is the fds less
    the forward connections in flight (each holds one socket; sampled a moment apart, so
    noisy: medians), ``fds_other`` the fds that are not sockets (rings, maps, files: exact)."""
    trends = {f: trend(samples, length, f, limits.warmup) for f in FIELDS}
    rss, fds, other, thr = (trends[f] for f in ("rss_mib", "fds_net", "fds_other", "threads"))
    return trends, [
        Check("rss slope", rss["slope_per_min"] <= limits.rss_mib_per_min,
              f"{rss['slope_per_min']:+.3f} MiB/min from {rss['slope_from_s']:g} s on "
              f"(limit {limits.rss_mib_per_min}; anonymous "
              f"{trends['anon_mib']['slope_per_min']:+.3f}); median mid {rss['mid']:.1f} "
              f"-> end {rss['end']:.1f} MiB"),
        Check("non-socket fds end vs mid", other["end_max"] <= other["mid_max"] + 1,
              f"max mid {other['mid_max']:g}, max end {other['end_max']:g}, idle "
              f"{idle['fds_other']:g}, quiet {quiet['fds_other']:g} (tolerance 1: a rotation)"),
        Check("fds end vs mid", fds["end"] <= fds["mid"] + limits.fds,
              f"fds less forward in flight: median mid {fds['mid']:g}, end {fds['end']:g} "
              f"(tolerance {limits.fds}); slope {fds['slope_per_min']:+.3f}/min"),
        Check("fds after the load", quiet["fds_net"] <= idle["fds_net"] + limits.fds,
              f"before load {idle['fds']:g}, quiet after {quiet['fds']:g} (forward in flight "
              f"{quiet['fwd_in_flight']:g}; tolerance {limits.fds})"),
        Check("threads end vs mid", thr["end_max"] <= thr["mid_max"] + limits.threads,
              f"max mid {thr['mid_max']:g}, max end {thr['end_max']:g} "
              f"(tolerance {limits.threads})"),
        Check("threads after the load", quiet["threads"] <= thr["mid_max"] + limits.threads,
              f"before load {idle['threads']:g}, max mid {thr['mid_max']:g}, quiet after "
              f"{quiet['threads']:g}")]


# ---------------------------------------------------------------- counts


def count_log(path: Path, markers: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Per class: access-log lines whose request path starts with its marker (``all``) and
    of them answered 200 (``ok``). A line is ``METHOD PATH PROTO STATUS LENGTH``."""
    counts = {name: {"all": 0, "ok": 0} for name in markers}
    if not path.exists():
        return counts
    with path.open("rb") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            target = parts[1].decode(errors="replace")
            for name, marker in markers.items():
                if target.startswith(marker):
                    counts[name]["all"] += 1
                    counts[name]["ok"] += parts[3] == b"200"
                    break
    return counts


def inspect_recordings(files: Sequence[Path], markers: Mapping[str, str]) -> dict[str, Any]:
    """Every recording file read back by ``mirror-agent inspect --format jsonl``: records per
    file, inspect's exit status and warnings, and how many recorded client bytes carry each
    class's marker (a request line each)."""
    per_file: list[dict[str, Any]] = []
    found: Counter[str] = Counter()
    needles = {name: m.encode() for name, m in markers.items()}
    for path in files:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "inspect", str(path),
                                 "--format", "jsonl"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None
        records = 0
        for line in proc.stdout:
            records += 1
            rec = json.loads(line)
            if rec.get("direction") == "to_observed":
                data = base64.b64decode(rec["data"])
                for name, needle in needles.items():
                    found[name] += data.count(b" " + needle)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        per_file.append({"file": path.name, "bytes": path.stat().st_size, "records": records,
                         "exit": proc.wait(), "warnings": err.strip().splitlines()[:5]})
    return {"files": per_file, "records": sum(f["records"] for f in per_file),
            "requests": {name: found[name] for name in markers},
            "bad_files": [f["file"] for f in per_file if f["exit"] != 0 or f["warnings"]]}


def by_reason(stats: Mapping[str, float], name: str) -> dict[str, float]:
    """The non-zero samples of ``name`` by their ``reason`` label."""
    out: dict[str, float] = {}
    for k, v in stats.items():
        n, labels = split_key(k)
        if n == name and v:
            out[labels.get("reason", "")] = v
    return out


def sink_books(stats: Mapping[str, float], sink: str) -> dict[str, Any]:
    """A sink's connection books from ``--stats-json`` (``sink``: forward or record):
    connections, completed, dropped (and by reason), in flight, the unaccounted rest."""
    pre = f"mirror_agent_{sink}_connections"
    conns, done = total(stats, pre + "_total"), total(stats, pre + "_completed_total")
    dropped = by_reason(stats, pre + "_dropped_total")
    in_flight = total(stats, pre + "_in_flight")
    return {"connections": conns, "completed": done, "dropped": sum(dropped.values()),
            "dropped_by_reason": dropped, "in_flight": in_flight,
            "unaccounted": conns - done - sum(dropped.values()) - in_flight}


# ---------------------------------------------------------------- verdicts


def traffic_checks(clients: Mapping[str, Mapping[str, float]], service: Mapping[str, int],
                   recorded: Mapping[str, int]) -> list[Check]:
    """The service got what the clients sent; every request of the always-observed port and
    of the pcap jobs is in the recording, exactly; the flipped port's at most."""
    checks = []
    for cls in ("keepalive", "churn"):
        sent, ok, svc = clients[cls]["sent"], clients[cls]["ok"], service[cls]
        checks += [
            Check(f"{cls}: service got what the clients sent", ok <= svc <= sent,
                  f"client ok {ok:,.0f} <= service {svc:,} <= client sent {sent:,.0f}"),
            Check(f"{cls}: every request recorded", recorded[cls] == svc,
                  f"recording {recorded[cls]:,} of service {svc:,}")]
    p2, want = "churn_port2", int(clients["pcap"]["sent"])
    return [*checks,
            Check(f"{p2}: recorded at most what the service got (the port flips)",
                  recorded[p2] <= service[p2] <= clients[p2]["sent"],
                  f"sent {clients[p2]['sent']:,.0f}, service {service[p2]:,}, recording "
                  f"{recorded[p2]:,}"),
            Check("pcap jobs: every request recorded",
                  recorded["pcap"] == want and service["pcap"] == 0,
                  f"expected {want:,}, recording {recorded['pcap']:,} (service "
                  f"{service['pcap']})")]


def shadow_checks(clients: Mapping[str, Mapping[str, float]], service: Mapping[str, int],
                  shadow: Mapping[str, int], recorded: Mapping[str, int],
                  fwd: Mapping[str, Any], context: str = "") -> list[Check]:
    """Every request captured is at the shadow, and each one missing is a counted drop.

    One request per connection except keep-alive, so the requests missing at the shadow
    (plus one if any keep-alive request is) are a lower bound of the dropped connections:
    fewer drops than that means a silent loss. The flipped port's expected count is what was
    recorded (captured whole while observed). ``context`` goes with a drop (what the
    machine was doing)."""
    expect = {"keepalive": service["keepalive"], "churn": service["churn"],
              "churn_port2": recorded["churn_port2"], "pcap": int(clients["pcap"]["sent"])}
    missing = {k: v - shadow[k] for k, v in expect.items()}
    lower = sum(v for k, v in missing.items() if k != "keepalive") + (
        missing["keepalive"] > 0)
    return [
        Check("every captured request at the shadow", not any(missing.values()),
              f"missing {missing}"),
        Check("missing requests are counted drops (nothing silent)", fwd["dropped"] >= lower,
              f"at least {lower:,} connection(s) behind the missing requests; forward "
              f"dropped {fwd['dropped']:,.0f} {fwd['dropped_by_reason'] or ''}"),
        Check("no connection dropped at this load", fwd["dropped"] == 0,
              f"dropped {fwd['dropped']:,.0f} {fwd['dropped_by_reason'] or ''}"
              + (f" ({context})" if fwd["dropped"] and context else ""))]


def books_checks(stats: Mapping[str, float], inspected: Mapping[str, Any]) -> list[Check]:
    """The forward and record books at exit, and the recording files against them."""
    checks = []
    for sink in ("forward", "record"):
        b = sink_books(stats, sink)
        checks.append(Check(
            f"{sink} books balance", b["unaccounted"] == 0 and b["in_flight"] == 0,
            f"connections {b['connections']:,.0f} = completed {b['completed']:,.0f} + "
            f"dropped {b['dropped']:,.0f} + in flight {b['in_flight']:,.0f} "
            f"(unaccounted {b['unaccounted']:,.0f})"))
    records = total(stats, "mirror_agent_record_records_total")
    lost = by_reason(stats, "mirror_agent_record_records_lost_total")
    rec_dropped = sink_books(stats, "record")["dropped"]
    errors = total(stats, "mirror_agent_record_errors_total")
    files = len(inspected["files"])
    rotated = total(stats, "mirror_agent_record_files_rotated_total")
    deleted = total(stats, "mirror_agent_record_files_deleted_total")
    return [*checks,
            Check("records written = records in the files",
                  records == inspected["records"] and not inspected["bad_files"],
                  f"metric {records:,.0f}, inspect {inspected['records']:,} in {files} "
                  f"files; damaged: {inspected['bad_files'] or 'none'}"),
            Check("no record lost", not lost and not errors and not rec_dropped,
                  f"lost {lost or 0}, errors {errors:g}, connections dropped {rec_dropped:g}"),
            Check("rotation: files = rotations + 1", rotated + 1 == files and not deleted,
                  f"{files} files, rotated {rotated:g}, deleted {deleted:g}")]


def client_counts(clients: Mapping[str, Any], pcap_sent: int) -> dict[str, dict[str, float]]:
    """Per traffic class: requests the clients sent, got a 200 for, and failed
    (``pcap_sent``: the requests in the pcap jobs that were done)."""
    ka = clients["keepalive"]
    out = {"keepalive": {"sent": ka.get("sent", 0), "ok": ka.get("ok", 0),
                         "failed": ka.get("failed", 0)}}
    for name in ("churn", "churn_port2"):
        c = clients[name]
        out[name] = {"sent": c.get("attempted", 0), "ok": c.get("ok", 0),
                     "failed": c.get("failed", 0)}
    out["pcap"] = {"sent": pcap_sent, "ok": pcap_sent, "failed": 0}
    return out


def control_checks(calls: Counter[str], jobs: Counter[str], pending: int,
                   stats: Mapping[str, float], prom: Mapping[str, Any], exit_code: int,
                   clients: Mapping[str, Mapping[str, float]]) -> list[Check]:
    """The agent's exit, the control calls (``calls``: ``WHAT_STATUS`` → count), the pcap
    jobs (``jobs``: final state → count, ``pending`` unfinished), the scrapes, the clients."""
    bad = {k: v for k, v in calls.items() if not k.endswith(("_200", "_202"))}
    done = jobs["done"]
    posted = calls["pcap_post_202"]
    fails = {k: v["failed"] for k, v in clients.items()}
    sent = sum(v["sent"] for v in clients.values()) or 1
    return [
        Check("agent exit 0", exit_code == 0, f"exit {exit_code}"),
        Check("control calls", not bad,
              f"PUT /ports {calls['ports_200']}, GET /metrics {calls['metrics_200']}, "
              f"/healthz {calls['healthz_200']} answered; other answers: {bad or 'none'}"),
        Check("pcap jobs done", done == posted > 0 and not pending
              and total(stats, "mirror_agent_source_pcap_jobs_done_total") == done,
              f"posted {posted}, done {done}, other {dict(jobs - Counter(done=done))}"
              f", pending {pending}"),
        Check("prometheus scrapes", bool(prom["scrapes"]) and prom["scrapes"] == prom[
            "scrapes_up"], f"{prom['scrapes_up']} of {prom['scrapes']} up, slowest "
            f"{prom['scrape_seconds_max']} s"),
        Check("clients mostly ok", sum(fails.values()) <= 0.01 * sent,
              f"failed {fails} of {sent:,.0f} sent")]


def machine(samples: Sequence[Sample]) -> dict[str, float]:
    """The agent's CPU (cores) over the load and the machine's load average meanwhile."""
    first, last = samples[0], samples[-1]
    span = last["t"] - first["t"] or 1.0
    loads = [x["loadavg"] for x in samples]
    return {"agent_cpu_per_s": round((last["cpu_s"] - first["cpu_s"]) / span, 3),
            "loadavg_median": statistics.median(loads), "loadavg_max": max(loads),
            "cpus": os.cpu_count() or 0}
