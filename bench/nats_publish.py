"""Recording to NATS JetStream vs recording to a native file, same capture, same run.

Two measurements, each repeated ``--rounds`` times (median reported):

- pipeline: ``mirror-agent offline CAPTURE --port 8080 --record X`` with X a native file, or
  ``nats://127.0.0.1:PORT/SUBJECT`` (a fresh subject, so a fresh stream, each round), on the
  capture of bench/offline_replay.py (200 connections, 100k data segments of 100 bytes).
  Wall time, and records/s and MB/s of what the run recorded (``--stats-json``: records
  acknowledged by JetStream for NATS; every run must drop nothing).
- sink only: one thread writing N records of a given size straight to the writer
  (:class:`agent.sinks.nats.NatsRecorder`, offline policy, then closed: everything
  acknowledged; :class:`agent.sinks.record.NativeWriter` to a file, then flushed).

The broker: Debian's ``nats-server -js`` on 127.0.0.1 with a temporary store, stopped by PID
at the end. Writes bench/out/nats_publish.json.

usage: python bench/nats_publish.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.model import Direction, TrafficChunk
from agent.sinks.nats import NatsRecorder, NatsTarget
from agent.sinks.record import NativeWriter
from bench.offline_replay import make_capture
from bench.stats import load, metric
from tests.unit.nats_server import NatsServer

OUT = Path(__file__).resolve().parent / "out"
SIZES = ((100, 200_000), (1024, 100_000), (16384, 10_000))


def pipeline(pcap: Path, record: str, stats: Path) -> dict[str, float]:
    """One offline run recording to ``record``: seconds, records, bytes (nothing dropped)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "agent.cli", "offline", str(pcap), "--port", "8080",
                    "--record", record, "--stats-json", str(stats), "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    s = load(stats)
    dropped = sum(v for k, v in s.items() if "dropped" in k and k.startswith(
        "mirror_agent_record_") and "bytes" not in k)
    assert dropped == 0, f"{record}: {dropped} records dropped"
    return {"seconds": seconds, "records": metric(s, "mirror_agent_record_records_total"),
            "bytes": metric(s, "mirror_agent_record_written_bytes_total")}


def sink_only(kind: str, size: int, n: int, work: Path, server: str, rnd: int) -> float:
    """Seconds to write ``n`` records of ``size`` bytes and have them all stored."""
    data = bytes(size)
    chunks = [TrafficChunk(data, f"192.0.2.1:{40000 + i % 200}", "198.51.100.1:8080",
                           Direction.TO_OBSERVED, 1.7e9 + i, i % 200, 0) for i in range(1000)]
    t0 = time.perf_counter()
    if kind == "nats":
        host, port = server.removeprefix("nats://").split(":")
        rec = NatsRecorder(NatsTarget(host, int(port), f"bench.sink.{size}.{rnd}"),
                           budget=256 << 20, live=False)
        for i in range(n):
            rec.write(chunks[i % 1000], data)
        rec.close()
        assert rec.stats()["records"] == n, rec.stats()
    else:
        with (work / f"sink-{size}-{rnd}.bin").open("wb") as f:
            w = NativeWriter(f)
            for i in range(n):
                w.write(chunks[i % 1000], data)
            w.flush()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-nats-"))
    pcap = work / "replay.pcap"
    make_capture(pcap)
    broker = NatsServer(work / "store").start()
    results: dict[str, object] = {"nats_server": broker.url}
    try:
        runs: dict[str, list[dict[str, float]]] = {"file": [], "nats": []}
        for rnd in range(args.rounds):
            runs["file"].append(pipeline(pcap, str(work / f"rec{rnd}.bin"), work / "s.json"))
            runs["nats"].append(pipeline(pcap, f"{broker.url}/bench.pipeline.{rnd}",
                                         work / "s.json"))
        results["pipeline"] = {k: _summary(v) for k, v in runs.items()}
        sink: dict[str, object] = {}
        for size, n in SIZES:
            for kind in ("file", "nats"):
                secs = [sink_only(kind, size, n, work, broker.url, r)
                        for r in range(args.rounds)]
                med = statistics.median(secs)
                sink[f"{kind} {size} B"] = {"records": n, "seconds": med,
                                            "records_per_s": n / med,
                                            "mb_per_s": n * size / med / 1e6}
        results["sink_only"] = sink
    finally:
        broker.stop()
    _print(results)
    (OUT / "nats_publish.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    secs = statistics.median(r["seconds"] for r in runs)
    rec, size = runs[0]["records"], runs[0]["bytes"]
    return {"seconds": secs, "records": rec, "bytes": size, "records_per_s": rec / secs,
            "mb_per_s": size / secs / 1e6}


def _print(results: dict[str, object]) -> None:
    print(f"{'pipeline (offline, same capture)':<34} {'median s':>9} {'records':>9} "
          f"{'records/s':>10} {'MB/s':>7}")
    for name, r in results["pipeline"].items():  # type: ignore[attr-defined]
        print(f"{name:<34} {r['seconds']:>9.2f} {r['records']:>9,.0f} "
              f"{r['records_per_s']:>10,.0f} {r['mb_per_s']:>7.1f}")
    print(f"\n{'sink only':<34} {'median s':>9} {'records':>9} {'records/s':>10} {'MB/s':>7}")
    for name, r in results["sink_only"].items():  # type: ignore[attr-defined]
        print(f"{name:<34} {r['seconds']:>9.2f} {r['records']:>9,} "
              f"{r['records_per_s']:>10,.0f} {r['mb_per_s']:>7.1f}")


if __name__ == "__main__":
    sys.exit(main())
