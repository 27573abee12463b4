"""``inspect`` counts what it reads as the summary of the run that wrote the recording
counts what it wrote (issue 19, finding 4): ``records`` are chunk records and
``written_bytes`` their payload, as the summary's ``record`` line and
``mirror_agent_record_records_total`` / ``..._written_bytes_total`` say; the flow-end
records, which the summary does not count, are ``flow_ends``. Before, inspect's "N records
read" counted the flow ends too (129 for the summary's 122 on the bundled capture)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
AGENT = [sys.executable, "-m", "agent.cli"]


def offline(tmp_path: Path, *extra: str) -> tuple[Path, dict[str, int], dict[str, float]]:
    """The bundled capture recorded; the summary's ``record`` line and the stats."""
    rec, stats = tmp_path / "rec.bin", tmp_path / "stats.json"
    res = subprocess.run([*AGENT, "offline", str(DEMO), "--port", "8080", "--record",
                          str(rec), "--stats-json", str(stats), *extra],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if ln.strip().startswith("record "))
    summary = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    return rec, summary, json.loads(stats.read_text())


def counts(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


@pytest.mark.parametrize("extra", [(), ("--both-directions",)])
def test_inspect_counts_what_the_summary_counts(tmp_path: Path, extra: tuple[str, ...]) -> None:
    rec, summary, stats = offline(tmp_path, *extra)
    res = subprocess.run([*AGENT, "inspect", str(rec)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    lines = res.stdout.splitlines()
    got = counts(lines[-1])
    assert got["records"] == summary["records"] == stats["mirror_agent_record_records_total"]
    assert got["written_bytes"] == summary["written_bytes"] == \
        stats["mirror_agent_record_written_bytes_total"]
    assert got["flow_ends"] == summary["connections"] == 7
    assert sum(ln.startswith("flow ") and " ended (" not in ln for ln in lines) == got["records"]
    assert sum(" ended (" in ln for ln in lines) == got["flow_ends"]
    jsonl = subprocess.run([*AGENT, "inspect", "--format", "jsonl", str(rec)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert len(jsonl.splitlines()) == summary["records"]  # one line per record, nothing else


def test_a_damaged_recording_says_what_was_read_in_the_same_terms(tmp_path: Path) -> None:
    rec, summary, _stats = offline(tmp_path)
    rec.write_bytes(rec.read_bytes()[:-10])  # the last record (a flow end) cut
    res = subprocess.run([*AGENT, "inspect", str(rec)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 3
    [warning] = res.stderr.splitlines()
    assert "truncated" in warning
    assert counts(warning.split("read:")[1]) == {"records": summary["records"],
                                                 "written_bytes": summary["written_bytes"],
                                                 "flow_ends": summary["connections"] - 1}
