"""Offline replay throughput: mirror-agent vs scapy's TCPSession vs tcpflow, same file.

The capture: ~100k small data segments across 200 interleaved connections (plus handshakes
and FINs), made here with the agent's own packet synthesis, so the run is reproducible.
Each tool runs ``--rounds`` times; the median wall time of each is reported with segments/s,
MB/s and the ratio to mirror-agent. The agent's fixed cost (interpreter start, imports,
set-up and summary: the same command on a capture with no frames) is measured in the same
rounds and reported with the rate of the pipeline without it. Writes
bench/out/offline_replay.json.

usage: python bench/offline_replay.py [--rounds 3] [--skip-scapy]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.model import ACK, FIN, PSH, SYN
from agent.sources.filter import synthesize_frame

OUT = Path(__file__).resolve().parent / "out"
FLOWS = 200
SEGMENTS_PER_FLOW = 500
PAYLOAD = 100


@dataclass
class _Flow:
    """One synthetic connection: client address and port, initial sequence numbers, bytes sent."""

    c: bytes
    cp: int
    cseq: int
    sseq: int
    sent: int = 0


class _Result(TypedDict):
    seconds: float
    segments_per_s: float
    mb_per_s: float
    rounds: list[float]


def make_capture(path: Path, seed: int = 7) -> tuple[int, int]:
    """Write the benchmark pcap; returns (data segments, payload bytes)."""
    rng = random.Random(seed)
    server = bytes([198, 51, 100, 1])
    flows: list[_Flow] = []
    for i in range(FLOWS):
        client = bytes([192, 0, 2, 1 + i % 200])
        flows.append(_Flow(c=client, cp=20000 + i, cseq=rng.getrandbits(32),
                           sseq=rng.getrandbits(32)))
    frames: list[bytes] = []

    def pkt(f: _Flow, from_client: bool, flags: int, payload: bytes = b"") -> bytes:
        if from_client:
            seq = (f.cseq + 1 + f.sent) & 0xFFFFFFFF if not flags & SYN else f.cseq
            return synthesize_frame(f.c, server, f.cp, 8080, payload, seq, f.sseq + 1, flags)
        seq = f.sseq if flags & SYN else (f.sseq + 1) & 0xFFFFFFFF
        return synthesize_frame(server, f.c, 8080, f.cp, payload, seq, f.cseq + 1, flags)

    for f in flows:
        frames += [pkt(f, True, SYN), pkt(f, False, SYN | ACK), pkt(f, True, ACK)]
    active = list(range(FLOWS))
    data_segments = 0
    while active:
        i = rng.choice(active)
        f = flows[i]
        payload = rng.randbytes(PAYLOAD)
        frames.append(pkt(f, True, ACK | PSH, payload))
        f.sent += PAYLOAD
        data_segments += 1
        if f.sent // PAYLOAD >= SEGMENTS_PER_FLOW:
            frames += [pkt(f, True, FIN | ACK), pkt(f, False, FIN | ACK)]
            active.remove(i)
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        t = 1_700_000_000.0
        for n, fr in enumerate(frames):
            ts = t + n * 1e-5
            out.write(struct.pack("<IIII", int(ts), int((ts % 1) * 1e6), len(fr), len(fr)))
            out.write(fr)
    return data_segments, data_segments * PAYLOAD


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


SCAPY = """
import sys
from scapy.all import PcapReader, TCPSession, sniff
n = 0
def count(p):
    global n
    n += 1
sniff(offline=sys.argv[1], session=TCPSession, prn=count, store=False)
"""


def _report(results: dict[str, _Result], fixed: float, frames: int) -> None:
    base = results["mirror-agent (native record, both directions)"]["seconds"]
    print(f"\n{'tool':<48} {'median s':>9} {'segments/s':>11} {'MB/s':>7} {'time vs agent':>14}")
    for name, r in results.items():
        print(f"{name:<48} {r['seconds']:>9.2f} {r['segments_per_s']:>11,.0f} "
              f"{r['mb_per_s']:>7.1f} {r['seconds'] / base:>13.2f}x")
    print(f"\nmirror-agent fixed cost (start, imports, set-up, summary): {fixed:.3f} s; "
          f"without it, native record {frames / (base - fixed):,.0f} segments/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-scapy", action="store_true", help="scapy takes ~1 min a round")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    pcap = work / "replay.pcap"
    segments, payload = make_capture(pcap)
    total_frames = segments + FLOWS * 5
    print(f"capture: {total_frames} frames, {segments} data segments, {FLOWS} flows, "
          f"{pcap.stat().st_size / 1e6:.1f} MB")
    empty = work / "empty.pcap"
    empty.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
    tools: dict[str, list[str]] = {
        "mirror-agent, no frames (fixed cost)": [
            sys.executable, "-m", "agent.cli", "offline", str(empty), "--port", "8080",
            "--record", str(work / "empty.bin"), "--both-directions", "--overwrite"],
        "mirror-agent (native record, both directions)": [
            sys.executable, "-m", "agent.cli", "offline", str(pcap), "--port", "8080",
            "--record", str(work / "rec.bin"), "--both-directions", "--overwrite"],
        "mirror-agent (jsonl record)": [
            sys.executable, "-m", "agent.cli", "offline", str(pcap), "--port", "8080",
            "--record", str(work / "rec.jsonl"), "--record-format", "jsonl", "--overwrite"],
    }
    if shutil.which("tcpflow"):
        (work / "tcpflow").mkdir()
        tools["tcpflow"] = ["tcpflow", "-r", str(pcap), "-o", str(work / "tcpflow")]
    if not args.skip_scapy:
        tools["scapy TCPSession"] = [sys.executable, "-c", SCAPY, str(pcap)]
    times: dict[str, list[float]] = {name: [] for name in tools}
    for _ in range(args.rounds):  # round by round, so every tool sees the same load
        for name, cmd in tools.items():
            times[name].append(timed(cmd))
    results: dict[str, _Result] = {}
    for name, rounds in times.items():
        med = statistics.median(rounds)
        results[name] = _Result(seconds=med, segments_per_s=total_frames / med,
                                mb_per_s=payload / med / 1e6, rounds=rounds)
    fixed = results.pop("mirror-agent, no frames (fixed cost)")["seconds"]
    _report(results, fixed, total_frames)
    (OUT / "offline_replay.json").write_text(json.dumps(
        {"frames": total_frames, "segments": segments, "flows": FLOWS, "results": results,
         "agent_fixed_seconds": fixed},
        indent=2))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
