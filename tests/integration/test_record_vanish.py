"""A live agent whose recording file is deleted, or whose recording directory is removed,
while it runs (issue 19, item 5): noticed within a second with one error line naming the file,
the file made again at its path (or, its directory gone, the recording failed), what was lost
counted, and the run degraded (exit 3)."""

from __future__ import annotations

import io
import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.metrics import key
from agent.sinks.record import NativeReader
from lab.netns import LiveAgent, NetNS, run_clients, start_python_server

# Metrics (agent/metrics.py) this file reads from stats.
FILES_VANISHED = "mirror_agent_record_files_vanished_total"
RECORD_ERRORS = "mirror_agent_record_errors_total"
RECORD_RECORDS = "mirror_agent_record_records_total"
RECORDS_LOST_VANISHED = key("mirror_agent_record_records_lost_total", reason="vanished")
RECORDS_LOST_WRITE_FAILED = key("mirror_agent_record_records_lost_total",
                                reason="write_failed")
RECORD_WRITTEN_BYTES = "mirror_agent_record_written_bytes_total"


def wait_for(what: str, ok: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``ok()``; AssertionError naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not ok():
        assert time.monotonic() - start < timeout, f"no {what} after {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - start


def errors(err: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in err.splitlines()
            if ln.startswith("{") and '"level": "error"' in ln]


def run_and_remove(tmp: Path, rec: Path, remove: Callable[[], None],
                   back: Callable[[], bool]) -> tuple[int, str, dict[str, Any], float]:
    """An agent recording to ``rec`` on lo; requests; ``remove()`` once the file has some;
    the seconds until ``back()`` says it was noticed; more requests; SIGTERM. (exit status,
    its stderr, its stats, seconds to notice)."""
    with NetNS() as ns:
        start_python_server(ns, 9000)
        agent = LiveAgent(ns, tmp, "--iface", "lo", "--port", "9000", "--record", str(rec),
                          "--stats-json", str(tmp / "stats.json"))
        assert run_clients(ns, "127.0.0.1", 9000, 2, 5) == 10
        wait_for("record written", lambda: rec.stat().st_size > 0, 5)
        remove()
        noticed = wait_for("notice", back, 3)
        assert agent.proc.poll() is None, "the agent must keep running"
        assert run_clients(ns, "127.0.0.1", 9000, 2, 5) == 10
        time.sleep(0.2)  # the last events drain
        agent.proc.send_signal(signal.SIGTERM)
        status = agent.proc.wait(60)
    return status, agent.err.read_text(), json.loads((tmp / "stats.json").read_text()), noticed


def test_a_deleted_recording_is_made_again_and_the_run_degraded(tmp_path: Path) -> None:
    rec = tmp_path / "rec.bin"
    status, err, stats, noticed = run_and_remove(
        tmp_path, rec, rec.unlink, lambda: rec.exists() or "vanished" in
        (tmp_path / "agent.err").read_text())
    assert status == 3, err
    assert noticed < 1.5, noticed  # within a second (plus the time to look and start)
    (error,) = errors(err)
    assert error["file"] == str(rec) and "vanished" in error["event"]
    assert error["lost_records"] == stats.get(RECORDS_LOST_VANISHED, 0)
    assert err.splitlines()[-1].startswith("mirror-agent: degraded:")
    assert "vanished" in err.splitlines()[-1]
    assert stats[FILES_VANISHED] == 1 and stats[RECORD_ERRORS] == 0
    reader = NativeReader(io.BytesIO(rec.read_bytes()))  # the new file: whole
    chunks = [r for r in reader if r.kind == "chunk"]
    assert reader.problems() == []
    assert chunks, "the requests after the deletion are in the new file"
    assert len(chunks) <= stats[RECORD_RECORDS]
    assert sum(len(r.data) for r in chunks) <= stats[RECORD_WRITTEN_BYTES]


def test_a_removed_recording_directory_fails_the_recording(tmp_path: Path) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    rec = folder / "rec.bin"
    status, err, stats, noticed = run_and_remove(
        tmp_path, rec, lambda: shutil.rmtree(folder),
        lambda: "vanished" in (tmp_path / "agent.err").read_text())
    assert status == 3, err
    assert noticed < 1.5, noticed
    vanished, failed = errors(err)
    assert vanished["file"] == failed["file"] == str(rec)
    assert "vanished" in vanished["event"] and failed["errno"] == "ENOENT"
    assert not folder.exists()
    assert stats[FILES_VANISHED] == 1 and stats[RECORD_ERRORS] == 1
    assert stats[RECORDS_LOST_WRITE_FAILED] > 0  # the requests after it
    last = err.splitlines()[-1]
    assert last.startswith("mirror-agent: degraded:") and "1 recording(s) failed" in last
