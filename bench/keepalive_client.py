"""Paced keep-alive HTTP/1.1 load for the soak: ``--connections`` persistent connections
share ``--rate`` requests a second for ``--duration`` seconds, then each finishes its request
in progress and closes.

Request ``k`` on connection ``c`` is ``GET /ka/<tag>/<c>/<k>`` (every ``--body-every``-th a
``POST`` with ``--body-bytes`` of body), so a server's access log can be matched exactly. A
connection that fails is counted by reason and opened again (``reconnects``). A schedule that
falls more than a second behind skips ahead instead of bursting (``skipped_slots``).

Prints one JSON line: connections, sent (requests written whole), ok (200 read whole),
failed, failed_by_reason, reconnects, skipped_slots, elapsed, achieved_rate.

usage: python bench/keepalive_client.py HOST PORT [--connections 16] [--rate 800]
       [--duration 60] [--tag T] [--body-every 4] [--body-bytes 2048]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["main"]


@dataclass
class Tally:
    """What one connection did (each thread owns one; summed at the end)."""

    sent: int = 0
    ok: int = 0
    reconnects: int = 0
    skipped: int = 0
    failed: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Plan:
    """One connection's share of the load."""

    host: str
    port: int
    conn: int
    interval: float
    start: float
    end: float
    tag: str
    body_every: int
    body: bytes


def _one(conn: http.client.HTTPConnection, plan: Plan, seq: int, tally: Tally) -> None:
    """Send request ``seq`` and read its answer; raises on a connection failure."""
    path = f"/ka/{plan.tag}/{plan.conn}/{seq}"
    with_body = plan.body_every > 0 and seq % plan.body_every == plan.body_every - 1
    if with_body:
        conn.request("POST", path, body=plan.body,
                     headers={"Content-Type": "application/octet-stream"})
    else:
        conn.request("GET", path)
    tally.sent += 1
    resp = conn.getresponse()
    resp.read()
    if resp.status == 200:
        tally.ok += 1
    else:
        tally.failed[f"status_{resp.status}"] += 1


def worker(plan: Plan, tally: Tally) -> None:
    """Run one connection's schedule until ``plan.end``."""
    conn = http.client.HTTPConnection(plan.host, plan.port, timeout=10)
    due = plan.start
    seq = 0
    while True:
        now = time.monotonic()
        if now >= plan.end:
            break
        if due > now:
            time.sleep(due - now)
        elif now - due > 1.0:  # far behind: skip ahead rather than burst
            tally.skipped += int((now - due) / plan.interval)
            due = now
        due += plan.interval
        try:
            _one(conn, plan, seq, tally)
        except (OSError, http.client.HTTPException) as e:
            tally.failed[type(e).__name__] += 1
            conn.close()
            conn = http.client.HTTPConnection(plan.host, plan.port, timeout=10)
            tally.reconnects += 1
        seq += 1
    conn.close()


def run(host: str, port: int, connections: int, rate: float, duration: float, tag: str,
        body_every: int, body_bytes: int) -> dict[str, object]:
    """Run the load; the summary of the module doc."""
    body = bytes(i % 251 for i in range(body_bytes))
    t0 = time.monotonic()
    interval = connections / rate
    tallies = [Tally() for _ in range(connections)]
    threads = [threading.Thread(target=worker, args=(
        Plan(host, port, c, interval, t0 + c * interval / connections, t0 + duration, tag,
             body_every, body), tallies[c])) for c in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    failed: Counter[str] = Counter()
    for tally in tallies:
        failed.update(tally.failed)
    sent = sum(tally.sent for tally in tallies)
    return {"connections": connections, "sent": sent, "ok": sum(x.ok for x in tallies),
            "failed": sum(failed.values()), "failed_by_reason": dict(failed),
            "reconnects": sum(x.reconnects for x in tallies),
            "skipped_slots": sum(x.skipped for x in tallies), "elapsed": round(elapsed, 3),
            "achieved_rate": round(sent / elapsed, 1) if elapsed else 0.0}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=float, default=800.0, help="requests a second, in all")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--tag", default="t")
    ap.add_argument("--body-every", type=int, default=4, help="0: no bodies")
    ap.add_argument("--body-bytes", type=int, default=2048)
    a = ap.parse_args(argv)
    if a.connections < 1 or a.rate <= 0 or a.duration <= 0:
        ap.error("--connections, --rate and --duration must be positive")
    out = run(a.host, a.port, a.connections, a.rate, a.duration, a.tag, a.body_every,
              a.body_bytes)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
