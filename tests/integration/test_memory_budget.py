"""`mirror-agent run --memory-limit`: the budgets derived from it are the ones in use, logged
once at start and shown as gauges in --stats-json."""

from __future__ import annotations

import json
from pathlib import Path

from agent import budget
from agent.capture.perfbuf import online_cpus, possible_cpus
from agent.lab.netns import LiveAgent, NetNS, run_clients, start_python_server
from agent.metrics import key

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
