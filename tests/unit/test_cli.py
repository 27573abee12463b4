"""Exit statuses and messages of the command line (no privileges needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.sinks.record import NativeReader

# Metrics (agent/metrics.py) this file reads from stats.
REASSEMBLY_FLOWS_OPENED = "mirror_agent_reassembly_flows_opened_total"
REASSEMBLY_UNTRACKED_SEGMENTS = "mirror_agent_reassembly_untracked_segments_total"
RECORD_RECORDS = "mirror_agent_record_records_total"

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"


def err_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["offline", "--port", "70000", "x.pcap"], "out of range"),
    (["offline", "--port", "80", "/nonexistent.pcap"], "no such file"),
    (["offline", "--port", "80", str(DEMO), "--target", "nohostport"], "not HOST:PORT"),
    (["offline", "--port", "80", str(DEMO), "--filter", "tcp port banana"], "bad filter"),
    (["offline", "--port", "80", str(DEMO), "--hook", "nosuchmodule:x"], "cannot import"),
    (["offline", "--port", "80", str(DEMO), "--sample", "3"], "sample"),
    (["offline", "--port", "80", str(DEMO), "--record", "/nonexistent/dir/x"], "cannot write"),
    (["inspect", str(DEMO)], "bad magic"),
    (["bogus"], "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line(argv: list[str], needle: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert needle in err_line(capsys)


def test_not_a_capture_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture")
    assert main(["offline", "--port", "80", str(bad)]) == 2
    assert "not a pcap" in err_line(capsys)


def test_offline_demo_capture_records_and_inspects(tmp_path: Path) -> None:
    rec, stats = tmp_path / "r.bin", tmp_path / "s.json"
    res = subprocess.run([sys.executable, "-m", "agent.cli", "--log-format", "json", "offline",
                          str(DEMO), "--port", "8080", "--record", str(rec), "--stats-json",
                          str(stats)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "mirror-agent summary" in res.stderr
    s = json.loads(stats.read_text())
    assert s[REASSEMBLY_FLOWS_OPENED] == 7
    # Responses are not tracked, so each connection's back-to-back requests coalesce.
    assert s[RECORD_RECORDS] == 7 and s[REASSEMBLY_UNTRACKED_SEGMENTS] > 0
    with rec.open("rb") as f:
        chunks = [r for r in NativeReader(f) if r.kind == "chunk"]
    assert sum(r.data.count(b" HTTP/1.1\r\n") for r in chunks) == 61
    out = subprocess.run([sys.executable, "-m", "agent.cli", "inspect", str(rec), "--format",
                          "jsonl"], capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == 7


def test_truncated_recording_is_reported_not_fatal(tmp_path: Path) -> None:
    rec = tmp_path / "r.bin"
    subprocess.run([sys.executable, "-m", "agent.cli", "offline", str(DEMO), "--port", "8080",
                    "--record", str(rec)], check=True, capture_output=True)
    rec.write_bytes(rec.read_bytes()[:-10])
    res = subprocess.run([sys.executable, "-m", "agent.cli", "inspect", str(rec)],
                         capture_output=True, text=True)
    assert res.returncode == 3  # read, but damaged: degraded
    assert "truncated" in res.stderr


def test_help_has_examples() -> None:
    res = subprocess.run([sys.executable, "-m", "agent.cli", "offline", "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "examples:" in res.stdout
