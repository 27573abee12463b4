"""A live agent's rotated recordings: no byte lost at the boundaries against tcpdump's ground
truth (native + gzip, and pcapng followed by tshark), SIGTERM leaving every file complete, and
a disk that fills up in the middle of a rotation costing the recording only (exit 3)."""

from __future__ import annotations

import gzip
import io
import json
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from agent.metrics import key
from agent.sinks.record import NativeReader
from lab.netns import LiveAgent, NetNS, Tcpdump, run_clients, sh, start_python_server
from tests.integration.truth import Streams, assert_same_streams, tshark_streams

RECORD_ERRORS = "mirror_agent_record_errors_total"
RECORD_FILES_ROTATED = "mirror_agent_record_files_rotated_total"
RECORD_RECORDS = "mirror_agent_record_records_total"
RECORD_RECORDS_LOST_WRITE_FAILED = key(
    "mirror_agent_record_records_lost_total", reason="write_failed")
AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]


def in_order(tmp: Path, stem: str, suffix: str) -> list[Path]:
    """``stem + suffix``, then ``stem.1 + suffix``, ``stem.2 + suffix``, ... as written."""
    def n(p: Path) -> int:
        middle = p.name[len(stem):-len(suffix)].strip(".")
        return int(middle) if middle else 0
    return sorted((p for p in tmp.iterdir()
                   if p.name.startswith(stem) and p.name.endswith(suffix)), key=n)


def native_streams(files: list[Path]) -> Streams:
    out: dict[tuple[str, str], bytearray] = defaultdict(bytearray)
    for f in files:
        raw = f.read_bytes()
        reader = NativeReader(io.BytesIO(gzip.decompress(raw) if f.suffix == ".gz" else raw))
        for rec in reader:
            if rec.kind == "chunk":
                assert rec.gap_bytes == 0
                out[(rec.from_addr, rec.to_addr)] += rec.data
        assert reader.problems() == [], f.name
    return {k: bytes(v) for k, v in out.items() if v}


def live_recording(tmp: Path, *args: str) -> tuple[Path, dict[str, int]]:
    """Keep-alive HTTP clients against a server on lo, captured by tcpdump (the truth) and by
    the agent with ``args``, stopped by SIGTERM; (the capture, the agent's stats)."""
    pcap = tmp / "truth.pcap"
    with NetNS() as ns:
        start_python_server(ns, 9000)
        cap = Tcpdump(ns, "lo", pcap, "tcp port 9000")
        agent = LiveAgent(ns, tmp, "--iface", "lo", "--port", "9000", "--both-directions",
                          "--stats-json", str(tmp / "stats.json"), *args)
        assert run_clients(ns, "127.0.0.1", 9000, 8, 40, 4000) == 320
        assert "0 packets dropped by kernel" in cap.stop()
        agent.stop()  # SIGTERM; exit 0
    return pcap, json.loads((tmp / "stats.json").read_text())


def test_rotated_gzip_recording_loses_no_byte(tmp_path: Path) -> None:
    pcap, stats = live_recording(tmp_path, "--record", str(tmp_path / "rec.bin"),
                                 "--record-rotate", "64KiB", "--record-compress", "gzip")
    files = in_order(tmp_path, "rec", ".bin.gz")
    assert len(files) == stats[RECORD_FILES_ROTATED] + 1 > 3
    for f in files:  # SIGTERM flushed and closed the last one: every file is a whole .gz
        subprocess.run(["gzip", "-t", str(f)], check=True)
        res = subprocess.run([*AGENT, "inspect", str(f)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert_same_streams(native_streams(files), tshark_streams(pcap, 9000))


def test_rotated_pcapng_follows_like_the_capture(tmp_path: Path) -> None:
    pcap, stats = live_recording(tmp_path, "--record", str(tmp_path / "rec.pcapng"),
                                 "--record-format", "pcapng", "--record-rotate", "64KiB")
    files = in_order(tmp_path, "rec", ".pcapng")
    assert len(files) == stats[RECORD_FILES_ROTATED] + 1 > 3
    joined: dict[tuple[str, str], bytes] = defaultdict(bytes)
    for f in files:  # each file alone: tshark follows every connection in it
        for k, data in tshark_streams(f, 9000).items():
            joined[k] += data
    assert_same_streams(dict(joined), tshark_streams(pcap, 9000))


def test_disk_full_in_the_middle_of_rotation(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk))
    try:
        with NetNS() as ns:
            start_python_server(ns, 9000)
            agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000", "--record",
                              str(disk / "rec.bin"), "--record-rotate", "48KiB",
                              "--stats-json", str(tmp_path / "stats.json"))
            assert run_clients(ns, "127.0.0.1", 9000, 8, 40, 4000) == 320
            assert agent.proc.poll() is None, "the agent must keep running"
            agent.proc.send_signal(signal.SIGTERM)
            status = agent.proc.wait(60)
            err = agent.err.read_text()
            files = in_order(disk, "rec", ".bin")
            held = [list(NativeReader(io.BytesIO(f.read_bytes()))) for f in files]
    finally:
        subprocess.run(["umount", str(disk)], check=False)

    assert status == 3, err
    errors = [json.loads(ln) for ln in err.splitlines()
              if ln.startswith("{") and '"level": "error"' in ln]
    assert len(errors) == 1, errors
    assert errors[0]["file"] in {str(f) for f in files[1:]}  # a rotated file, named
    assert "No space left" in errors[0]["error"]
    assert err.splitlines()[-1].startswith("mirror-agent: degraded: 1 recording(s) failed")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats[RECORD_ERRORS] == 1 and stats[RECORD_RECORDS_LOST_WRITE_FAILED] > 0
    assert stats[RECORD_FILES_ROTATED] >= 2
    assert sum(len([r for r in recs if r.kind == "chunk"]) for recs in held) == \
        stats[RECORD_RECORDS]
