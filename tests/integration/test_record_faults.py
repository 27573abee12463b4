"""A live agent whose recording disk fills up: the recording is closed with one error line,
forwarding and capture go on, the file is intact up to the fault, and the exit status says
the run was degraded."""

from __future__ import annotations

import io
import json
import signal
import subprocess
from pathlib import Path

from agent.metrics import key
from agent.sinks.record import NativeReader
from lab.netns import LiveAgent, NetNS, run_clients, sh, start_python_server

# Metrics (agent/metrics.py) this file reads from stats.
RECORD_ERRORS = "mirror_agent_record_errors_total"
RECORD_RECORDS = "mirror_agent_record_records_total"
RECORD_RECORDS_LOST_WRITE_FAILED = key(
    "mirror_agent_record_records_lost_total", reason="write_failed")
RECORD_WRITTEN_BYTES = "mirror_agent_record_written_bytes_total"

CLIENTS, REQUESTS, MAX_BODY = 8, 40, 4000  # ~640 KB of requests: far more than the disk


def test_full_disk_under_the_recording(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk))
    try:
        rec = disk / "rec.bin"
        with NetNS() as ns:
            start_python_server(ns, 9000)
            start_python_server(ns, 19000, log=tmp_path / "shadow.log")
            agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000", "--target",
                              "127.0.0.1:19000", "--record", str(rec), "--stats-json",
                              str(tmp_path / "stats.json"))
            sent = run_clients(ns, "127.0.0.1", 9000, CLIENTS, REQUESTS, MAX_BODY)
            assert sent == CLIENTS * REQUESTS
            assert agent.proc.poll() is None, "the agent must keep running"
            # It still mirrors after the fault: a last batch of requests reaches the shadow.
            sent += run_clients(ns, "127.0.0.1", 9000, 2, 5)
            agent.proc.send_signal(signal.SIGTERM)
            status = agent.proc.wait(60)
            err = agent.err.read_text()
            recording = rec.read_bytes()
    finally:
        subprocess.run(["umount", str(disk)], check=False)

    assert status == 3, err
    lines = err.splitlines()
    errors = [json.loads(ln) for ln in lines if ln.startswith("{") and '"level": "error"' in ln]
    assert len(errors) == 1, errors
    assert errors[0]["file"] == str(rec) and "No space left" in errors[0]["error"]
    assert "mirror-agent summary:" in err
    assert lines[-1].startswith("mirror-agent: degraded: 1 recording(s) failed")

    shadow = (tmp_path / "shadow.log").read_text().splitlines()
    assert len(shadow) == sent  # forwarding went on: every request reached the shadow

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats[RECORD_ERRORS] == 1 and stats[RECORD_RECORDS_LOST_WRITE_FAILED] > 0
    reader = NativeReader(io.BytesIO(recording))
    chunks = [r for r in reader if r.kind == "chunk"]
    assert reader.skipped == 0 and not reader.corrupt  # intact up to the fault
    assert reader.truncated_bytes < 256 << 10  # at most a truncated tail
    assert len(chunks) == stats[RECORD_RECORDS] > 0
    assert sum(len(r.data) for r in chunks) == stats[RECORD_WRITTEN_BYTES]
