"""Ground truth: what tshark's ``follow,tcp,raw`` reassembles, vs what mirror-agent recorded."""

from __future__ import annotations

import base64
import json
import subprocess
from collections import defaultdict
from pathlib import Path

#: (from "ip:port", to "ip:port") → the bytes of that direction, all connections concatenated.
Streams = dict[tuple[str, str], bytes]


def _node(text: str) -> str:
    addr = text.split(":", 1)[1].strip()
    host, _, port = addr.rpartition(":")
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return addr


def tshark_streams(pcap: Path, port: int) -> Streams:
    """Every TCP stream of ``pcap``, per direction, as tshark follows it."""
    ids = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", f"tcp.port=={port}", "-T", "fields", "-e", "tcp.stream"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    streams = sorted({int(i) for i in ids})
    out: dict[tuple[str, str], bytearray] = defaultdict(bytearray)
    for start in range(0, len(streams), 200):
        args = ["tshark", "-r", str(pcap), "-q"]
        for s in streams[start : start + 200]:
            args += ["-z", f"follow,tcp,raw,{s}"]
        text = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        node0 = node1 = ""
        for line in text.splitlines():
            if line.startswith("Node 0:"):
                node0 = _node(line)
            elif line.startswith("Node 1:"):
                node1 = _node(line)
            elif line.startswith("\t") and node1:
                out[(node1, node0)] += bytes.fromhex(line.strip())
            elif line and node1 and all(c in "0123456789abcdef" for c in line):
                out[(node0, node1)] += bytes.fromhex(line)
            elif line.startswith("===="):
                node0 = node1 = ""
    return {k: bytes(v) for k, v in out.items() if v}


def jsonl_streams(path: Path) -> tuple[Streams, int]:
    """(streams, total gap bytes) of a JSON-lines recording."""
    out: dict[tuple[str, str], bytearray] = defaultdict(bytearray)
    gaps = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert set(rec) - {"tunnel"} == {"flow", "from", "to", "direction", "seen_at", "data",
                                         "gap_bytes"}
        out[(rec["from"], rec["to"])] += base64.b64decode(rec["data"])
        gaps += rec["gap_bytes"]
    return {k: bytes(v) for k, v in out.items() if v}, gaps


def assert_same_streams(ours: Streams, truth: Streams) -> None:
    """Byte-for-byte, per connection and direction, with a readable failure."""
    missing = sorted(set(truth) - set(ours))
    extra = sorted(set(ours) - set(truth))
    assert not missing, f"directions tshark saw that we did not record: {missing[:5]}"
    assert not extra, f"directions we recorded that tshark did not see: {extra[:5]}"
    for key, data in truth.items():
        mine = ours[key]
        if mine != data:
            at = next((i for i, (a, b) in enumerate(zip(mine, data, strict=False)) if a != b),
                      min(len(mine), len(data)))
            raise AssertionError(f"{key}: {len(mine)} bytes recorded vs {len(data)} by tshark, "
                                 f"first difference at byte {at}")
