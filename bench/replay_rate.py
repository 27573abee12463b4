"""Replay rate: ``mirror-agent replay --speed max`` of small keep-alive HTTP requests into
nginx, in a private network namespace over loopback.

The recording (native format, made here) holds ``--conns`` keep-alive connections of
``--requests`` GET requests each (about 40 bytes), each answered before the next was sent,
as a browser or an HTTP client library does. Modes, alternated round by round:

- ``wait``: the default replay: each request waits for the previous response, as recorded;
- ``pipeline``: ``--pipeline``: each connection's requests written at once (HTTP pipelining);
- ``diff``: ``wait`` on a recording that holds the responses too (``--both-directions``), so
  every response is also compared with production's.

Reported per mode: the median requests/s of the replay phase (from ``--report-json``:
requests sent / replay seconds; reading the recording is not in it, its time is shown
apart), and that every request got a 200. nginx: one worker, a 17-byte body. Writes
bench/out/replay_rate.json.

usage: python bench/replay_rate.py [--rounds 3] [--conns 50] [--requests 2000]
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

from agent.model import Direction, TrafficChunk
from agent.sinks.record import NativeWriter
from lab.netns import NetNS, start_nginx

OUT = Path(__file__).resolve().parent / "out"
MODES = ("wait", "pipeline", "diff")
_BODY = b"hello from nginx\n"
_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
             b"Content-Type: text/plain\r\nContent-Length: 17\r\nConnection: keep-alive\r\n\r\n"
             + _BODY)


def make_recording(path: Path, conns: int, requests: int, responses: bool) -> int:
    """A native recording of ``conns`` x ``requests`` keep-alive GETs; the request count."""
    t = 1_700_000_000.0
    with path.open("wb") as f:
        w = NativeWriter(f)
        for c in range(conns):
            cli, srv = f"192.0.2.1:{20000 + c}", "192.0.2.2:8080"
            for i in range(requests):
                req = f"GET /item/{i % 100} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
                w.write(TrafficChunk(req, cli, srv, Direction.TO_OBSERVED, t, c + 1), req)
                t += 0.0005
                if responses:
                    w.write(TrafficChunk(_RESPONSE, srv, cli, Direction.FROM_OBSERVED, t,
                                         c + 1), _RESPONSE)
        w.flush()
    return conns * requests


def run_replay(ns: NetNS, rec: Path, report: Path, mode: str, conns: int) -> dict[str, float]:
    """One replay; its requests/s (replay phase), load seconds and whether all got 200."""
    args = [sys.executable, "-m", "agent.cli", "--log-format", "json", "replay", str(rec),
            "--target", "127.0.0.1:8080", "--speed", "max", "--connections", str(conns),
            "--report-json", str(report), "--overwrite"]
    if mode == "pipeline":
        args.append("--pipeline")
    began = time.monotonic()
    done = ns.run(*args, check=False, timeout=600)
    wall = time.monotonic() - began
    if done.returncode != 0:
        raise RuntimeError(f"replay exited {done.returncode}: {done.stderr[-2000:]}")
    rep = json.loads(report.read_text())
    tgt = rep["target"]
    return {"rate": rep["rate_per_second"], "replay_seconds": rep["duration_seconds"],
            "wall_seconds": round(wall, 3), "requests": tgt["requests_sent"],
            "ok": tgt["status"].get("200", 0) == tgt["requests_sent"] == tgt["responses"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp, NetNS("replaybench") as ns:
        work = Path(tmp)
        plain, both = work / "plain.bin", work / "both.bin"
        total = make_recording(plain, args.conns, args.requests, responses=False)
        make_recording(both, args.conns, args.requests, responses=True)
        start_nginx(ns, 8080, work / "nginx")
        for r in range(args.rounds):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for mode in order:
                rec = both if mode == "diff" else plain
                res = run_replay(ns, rec, work / "report.json", mode, args.conns)
                results[mode].append(res)
                print(f"round {r + 1} {mode:9} {res['rate']:>10,.0f} req/s  "
                      f"replay {res['replay_seconds']:.2f} s  wall {res['wall_seconds']:.2f} s"
                      f"  all 200: {res['ok']}", flush=True)
    summary = {m: {"median_rate": statistics.median(x["rate"] for x in rs),
                   "all_ok": all(x["ok"] for x in rs), "rounds": rs}
               for m, rs in results.items()}
    print(f"\n{total:,} requests on {args.conns} keep-alive connections, --speed max, "
          f"median of {args.rounds}:")
    print("| mode | median requests/s | every request answered 200 |\n|---|---:|---|")
    for m, s in summary.items():
        print(f"| {m} | {s['median_rate']:,.0f} | {s['all_ok']} |")
    (OUT / "replay_rate.json").write_text(json.dumps(
        {"conns": args.conns, "requests": total, "modes": summary}, indent=2))
    return 0 if all(s["all_ok"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
