"""What a replay did, counted as it runs (:class:`Tally`), and the report made of it: a
progress line for a terminal, the final text report and its JSON form. No I/O here: the
caller prints.

Latencies go into a histogram of logarithmic buckets (about 2% wide), so memory stays
bounded however long a replay loops; percentiles are read from it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Latency", "Source", "Tally", "format_report", "progress_line", "report_json"]

_BUCKETS_PER_E = 50  # buckets per factor e: ~2% resolution
_FLOOR = 1e-6  # seconds: the first bucket


class Latency:
    """A latency histogram (seconds in, percentiles out)."""

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        if seconds > self.max:
            self.max = seconds
        self.buckets[int(math.log(max(seconds, _FLOOR) / _FLOOR) * _BUCKETS_PER_E)] += 1

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0-100) in seconds; 0 if nothing was added."""
        if not self.count:
            return 0.0
        if p >= 100:
            return self.max
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return min(self.max, _FLOOR * math.exp((bucket + 0.5) / _BUCKETS_PER_E))
        return self.max


@dataclass
class Source:
    """What was read: records, connections, requests, and problems (with positions)."""

    names: list[str] = field(default_factory=list)
    connections: int = 0
    requests: int = 0
    client_bytes: int = 0
    unusable_records: int = 0
    cut_connections: int = 0
    problems: list[str] = field(default_factory=list)
    spilled_bytes: int = 0
    """Bytes of records set aside on disk while the look-ahead was full
    (:mod:`agent.replay.spill`)."""


@dataclass
class Tally:
    """Counters of one target's side of a replay (the candidate's, or the baseline's)."""

    target: str
    requests_sent: int = 0
    bytes_sent: int = 0
    responses: int = 0
    status: Counter[int] = field(default_factory=Counter)
    latency: Latency = field(default_factory=Latency)
    connections_ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    """Connections that failed, by reason (refused, reset, closed, timeout, ...)."""
    unanswered: int = 0
    """Requests sent on a connection that failed, with no response."""
    stopped: int = 0
    """Connections still running when the replay stopped (``--duration``, a signal)."""
    unanswered_at_stop: int = 0
    """Requests sent on those connections, not answered when the stop closed them. Every
    request sent is answered, unanswered or unanswered at stop."""

    @property
    def connections_failed(self) -> int:
        return sum(self.failed.values())

    def response(self, status: int, seconds: float) -> None:
        self.responses += 1
        self.status[status] += 1
        self.latency.add(seconds)

    def as_json(self) -> dict[str, Any]:
        lat = self.latency
        return {
            "target": self.target,
            "requests_sent": self.requests_sent,
            "bytes_sent": self.bytes_sent,
            "responses": self.responses,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "latency_ms": {name: round(lat.percentile(p) * 1000, 3)
                           for name, p in (("p50", 50), ("p90", 90), ("p99", 99))}
                          | {"max": round(lat.max * 1000, 3)},
            "connections": {"ok": self.connections_ok, "failed": dict(self.failed),
                            "stopped": self.stopped},
            "unanswered_requests": self.unanswered,
            "unanswered_at_stop": self.unanswered_at_stop,
        }


def progress_line(t: Tally, elapsed: float, eta: float | None) -> str:
    """One line for a terminal: requests, rate, errors, ETA."""
    rate = t.requests_sent / elapsed if elapsed > 0 else 0.0
    left = "-" if eta is None else _clock(eta)
    return (f"requests {t.requests_sent:,}  responses {t.responses:,}  {rate:,.0f}/s  "
            f"errors {t.connections_failed:,}  ETA {left}")


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def report_json(source: Source, target: Tally, baseline: Tally | None, elapsed: float,
                diff: dict[str, Any] | None, interrupted: bool) -> dict[str, Any]:
    """The whole report as one JSON object (``--report-json``)."""
    return {
        "duration_seconds": round(elapsed, 3),
        "rate_per_second": round(target.requests_sent / elapsed, 1) if elapsed > 0 else 0.0,
        "interrupted": interrupted,
        "source": {"files": source.names, "connections": source.connections,
                   "requests": source.requests, "client_bytes": source.client_bytes,
                   "unusable_records": source.unusable_records,
                   "cut_connections": source.cut_connections, "problems": source.problems,
                   "spilled_bytes": source.spilled_bytes},
        "target": target.as_json(),
        "baseline": baseline.as_json() if baseline is not None else None,
        "diff": diff,
    }


def format_report(rep: dict[str, Any]) -> str:
    """The text form of :func:`report_json`'s object."""
    src, tgt = rep["source"], rep["target"]
    lines = [f"replay: {tgt['requests_sent']:,} requests on {src['connections']:,} recorded "
             f"connection(s) in {rep['duration_seconds']:.2f} s "
             f"({rep['rate_per_second']:,.0f} requests/s)"
             + (", interrupted" if rep["interrupted"] else "")]
    for side in ("target", "baseline"):
        t = rep[side]
        if t is not None:
            lines += _side(side, t)
    if src["cut_connections"]:
        lines.append(f"  {src['cut_connections']} connection(s) replayed only up to a gap in "
                     "the recording")
    lines += [f"  source problem: {p}" for p in src["problems"]]
    if rep["diff"] is not None:
        lines += _diff_lines(rep["diff"])
    return "\n".join(lines) + "\n"


def _side(name: str, t: dict[str, Any]) -> list[str]:
    status = "  ".join(f"{k}: {v:,}" for k, v in t["status"].items()) or "none"
    lat = t["latency_ms"]
    conns = t["connections"]
    failed = ", ".join(f"{k} {v}" for k, v in sorted(conns["failed"].items()))
    line = (f"  connections: {conns['ok']:,} ok, {sum(conns['failed'].values()):,} failed"
            + (f" ({failed})" if failed else ""))
    if conns["stopped"]:
        line += f", {conns['stopped']:,} stopped unfinished"
    out = [f"{name} {t['target']}: {t['responses']:,} responses; status {status}",
           f"  latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
           f"max {lat['max']}", line]
    if t["unanswered_requests"]:
        out.append(f"  {t['unanswered_requests']:,} request(s) sent on failed connections got "
                   "no response")
    if t["unanswered_at_stop"]:
        out.append(f"  {t['unanswered_at_stop']:,} request(s) sent had no response yet when "
                   "the stop closed their connections")
    return out


def _diff_lines(d: dict[str, Any]) -> list[str]:
    out = [f"diff vs {d['reference']}: {d['compared']:,} responses compared: "
           f"{d['different_status']:,} different status, {d['different_body']:,} different "
           f"body, {d['different_headers']:,} different headers"]
    if d["not_compared"]:
        out.append(f"  {d['not_compared']:,} request(s) not compared (a response missing)")
    if d["paths"]:
        out.append("  paths with differences (method path: differing/compared, status "
                   "changes, fields):")
    for p in d["paths"]:
        changes = ", ".join(f"{k} x{v}" for k, v in p["status_changes"].items())
        fields = ", ".join(p["fields"])
        out.append(f"    {p['path']}: {p['different']}/{p['compared']}"
                   + (f"  status {changes}" if changes else "")
                   + (f"  [{fields}]" if fields else ""))
    if d["noise"]:
        noise = ", ".join(f"{k} x{v}" for k, v in d["noise"].items())
        out.append(f"  not counted (baseline differs from production too): {noise}")
    return out
