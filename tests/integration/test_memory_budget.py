"""`mirror-agent run --memory-limit`: the budgets derived from it are the ones in use, logged
once at start and shown as gauges in --stats-json; and the memory guard holds the process's
resident memory under the limit when something the budget does not know of (here a user
hook keeping copies) grows: new connections are refused, intake pauses, all counted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.metrics import key, total
from agent.mirror import budget
from agent.sources.ring.perfbuf import online_cpus, possible_cpus
from lab.netns import (
    LAB,
    LiveAgent,
    NetNS,
    run_clients,
    start_nginx,
    start_python_server,
)

MIB = 1 << 20


def test_small_memory_limit_derives_the_budgets(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    with NetNS() as ns:
        start_python_server(ns, 8080)
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "8080", "--memory-limit",
                          "256MiB", "--record", str(tmp_path / "rec.bin"), "--both-directions",
                          "--stats-json", str(stats), "--stats-interval", "0")
        assert run_clients(ns, "127.0.0.1", 8080, 4, 20) == 80
        log = agent.stop()
    want = budget.derive(256 * MIB, cpus=len(online_cpus()), possible_cpus=possible_cpus())
    lines = [json.loads(ln) for ln in log.splitlines()
             if ln.startswith("{") and '"memory budget"' in ln]
    assert len(lines) == 1, log
    line = lines[0]
    assert line["origin"] == "--memory-limit" and line["limit_mib"] == 256.0
    for name in budget.BUFFERS:
        assert line[f"{name}_mib"] == round(getattr(want, name) / MIB, 1), name
    snap = json.loads(stats.read_text())
    for name in budget.BUFFERS:
        assert snap[key("mirror_agent_budget_bytes", buffer=name)] == getattr(want, name), name
    assert snap["mirror_agent_budget_max_flows"] == want.max_flows
    assert snap["mirror_agent_budget_bytes{buffer=\"limit\"}"] == 256 * MIB
    assert want.buffer_mib == 16 and want.drain_backlog < 64 * MIB  # smaller than 1 GiB's
    assert snap["mirror_agent_reassembly_gap_bytes_total"] == 0


#: A user hook that keeps a copy of every chunk it sees, the newest KEEP bytes: memory that no
#: budget counts, growing as fast as the traffic.
HOARD = """
from collections import deque

KEEP = {keep}
held: deque = deque()
size = 0


def hoard(chunk):
    global size
    held.append(bytearray(chunk.data))
    size += len(chunk.data)
    while size > KEEP:
        size -= len(held.popleft())
    return chunk.data, True
"""


def _vm_hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM), bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_guard_sheds_new_connections_and_keeps_rss_under_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 192 * MIB
    (tmp_path / "hoard_hook.py").write_text(HOARD.format(keep=160 * MIB))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    stats = tmp_path / "stats.json"
    with NetNS() as ns:
        start_nginx(ns, 8080, tmp_path / "nginx")
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "8080", "--memory-limit",
                          str(limit), "--hook", "hoard_hook:hoard", "--record",
                          str(tmp_path / "rec.bin"), "--stats-json", str(stats),
                          "--stats-interval", "0")
        churn = ns.popen(sys.executable, str(LAB / "churn_client.py"), "127.0.0.1", "8080",
                         "--rate", "2000", "--duration", "8", "--body-bytes", "65536",
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = 0
        while churn.poll() is None:
            peak = max(peak, _vm_hwm(agent.proc.pid))
            time.sleep(0.05)
        agent.signal(signal.SIGTERM)
        while agent.proc.poll() is None:  # the shutdown counts too
            peak = max(peak, _vm_hwm(agent.proc.pid))
            time.sleep(0.05)
    log = agent.err.read_text()
    assert agent.proc.returncode == 3, log  # degraded: connections were not mirrored
    assert "not mirrored near the memory limit" in log
    snap = json.loads(stats.read_text())
    high = snap[key("mirror_agent_memory_pressure_episodes_total", level="high")]
    assert high >= 1 and snap["mirror_agent_memory_shed_seconds_total"] > 1, snap
    refused = snap[key("mirror_agent_reassembly_flows_refused_total", reason="memory")]
    assert refused > 100 and total(snap, "mirror_agent_reassembly_refused_bytes_total") > 0
    assert snap["mirror_agent_drain_pauses_total"] >= 1  # intake paused
    assert 0 < snap["mirror_agent_memory_rss_peak_bytes"] <= limit
    assert 0 < peak <= limit, f"peak RSS {peak / MIB:.1f} MiB over {limit / MIB:.0f} MiB"
    assert '"memory near the limit' in log
