"""The agent as a guest on a production host, live with the real program:

- it never mirrors its own forwarded traffic, nor another agent's (no amplification);
- other programs on its TC hooks keep seeing every packet, and a program that ends the
  legacy clsact chain does not blind it; it never replaces an XDP program;
- two agents on one interface both capture everything, and each removes only its own;
- a SIGKILLed agent leaves nothing attached.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from agent.metrics import key
from lab.counter import CountingProgram, attached
from lab.netns import AGENT, LiveAgent, NetNS, run_clients, start_python_server
from tests.integration.truth import jsonl_streams

# Metrics (agent/metrics.py) this file reads from stats.
FORWARD_CONNECTIONS_COMPLETED = "mirror_agent_forward_connections_completed_total"
KERNEL_PACKETS_SKIPPED_OWN_FORWARD = key(
    "mirror_agent_kernel_packets_skipped_total", reason="own_forward")
KERNEL_SUBMITTED = "mirror_agent_kernel_submitted_total"
RING_RECORDS = "mirror_agent_ring_records_total"

ENGINES = ["tc", "xdp", "afpacket"]
TC_MODES = ["tcx", "clsact"]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _kernel(err: str, what: str) -> int:
    """A ``mirror_agent_kernel_*`` metric from the summary in the agent's log, as the kernel
    line shows it (``packets_skipped{own_forward}``); 0 if not there (it is 0)."""
    summary = err[err.index("mirror-agent summary"):]
    for line in summary.splitlines():
        words = line.split()
        if words and words[0] == "kernel":
            for word in words[1:]:
                if word.startswith(f"{what}="):
                    return int(word.split("=")[1])
    return 0


@pytest.mark.parametrize("engine", ENGINES)
def test_never_mirrors_itself(tmp_path: Path, engine: str) -> None:
    """The shadow is on the other end of the captured veth, on the observed port (the
    DaemonSet's ``--iface any`` with a shadow on 8080): it gets exactly the client's requests,
    not copies of the agent's own forwarded ones, and the recording holds only the client's
    connections."""
    rec = tmp_path / "rec.jsonl"
    with NetNS() as service, NetNS() as peer:
        service.veth_to(peer, "10.41.0.1/24", "10.41.0.2/24")
        start_python_server(service, 8080, host="10.41.0.1", log=tmp_path / "service.log")
        start_python_server(peer, 8080, host="10.41.0.2", log=tmp_path / "shadow.log")
        agent = LiveAgent(service, tmp_path, "--iface", service.veth, "--port", "8080",
                          "--engine", engine, "--target", "10.41.0.2:8080",
                          "--record", str(rec), "--record-format", "jsonl",
                          "--both-directions")
        assert run_clients(peer, "10.41.0.1", 8080, 3, 10, 500) == 30
        err = agent.stop(settle=1.5)
    assert len(_lines(tmp_path / "service.log")) == 30
    assert len(_lines(tmp_path / "shadow.log")) == 30, err
    assert "the target is on a captured interface" in err
    streams, _gaps = jsonl_streams(rec)
    clients = {src for src, dst in streams if dst == "10.41.0.1:8080"}
    assert len(clients) == 3 and all(not s.endswith(tuple(f":{p}" for p in range(61000, 65536)))
                                     for s in clients)
    assert all("10.41.0.2:8080" not in key for key in streams)  # no shadow connection
    if engine != "afpacket":
        # its own traffic was seen, and skipped
        assert _kernel(err, "packets_skipped{own_forward}") > 0


def test_two_nodes_forwarding_to_each_other(tmp_path: Path) -> None:
    """Node A's agent forwards to node B's service, B's agent to A's: each service gets each
    request once (B from A's agent), never an echo of an echo."""
    with NetNS() as a, NetNS() as b, NetNS() as client:
        a.veth_to(b, "10.42.0.1/24", "10.42.0.2/24")
        ba = b.veth
        a.veth_to(client, "10.42.1.1/24", "10.42.1.2/24")
        start_python_server(a, 8080, host="0.0.0.0", log=tmp_path / "a.log")
        start_python_server(b, 8080, host="0.0.0.0", log=tmp_path / "b.log")
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        agent_a = LiveAgent(a, tmp_path / "a", "--iface", "any", "--port", "8080",
                            "--target", "10.42.0.2:8080")
        agent_b = LiveAgent(b, tmp_path / "b", "--iface", ba, "--port", "8080",
                            "--target", "10.42.0.1:8080")
        assert run_clients(client, "10.42.1.1", 8080, 2, 10, 300) == 20
        err_a = agent_a.stop(settle=1.5)
        err_b = agent_b.stop(settle=0)
    assert len(_lines(tmp_path / "a.log")) == 20, err_a
    assert len(_lines(tmp_path / "b.log")) == 20, err_b
    assert _kernel(err_b, "packets_skipped{own_forward}") > 0


@pytest.mark.parametrize("mode", TC_MODES)
def test_other_tc_programs_keep_counting(tmp_path: Path, mode: str) -> None:
    """Counting programs on the same ingress hook, one that returns "next" and one that
    returns OK (ending the clsact chain, as most datapath programs do): each counts every
    request packet while the agent runs, the agent captures every request, and both are
    still attached after it stops."""
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "10.43.0.1/24", "10.43.0.2/24")
        dev = server.veth
        start_python_server(server, 8080, host="10.43.0.1")
        start_python_server(server, 18080, log=tmp_path / "shadow.log")
        # tcx: a TCX program appended before the agent starts, and a legacy filter that ends
        # the chain; clsact: a legacy filter the agent must go ahead of.
        counters = ([CountingProgram(server, dev, "tcx", -1),
                     CountingProgram(server, dev, "clsact:1", 0)] if mode == "tcx"
                    else [CountingProgram(server, dev, "clsact:10", 0)])

        def counted() -> list[int]:
            """What each counter counts of the same 20 requests (seeded: the same packets)."""
            before = [c.count() for c in counters]
            assert run_clients(client, "10.43.0.1", 8080, 2, 10, 200) == 20
            return [c.count() - b for c, b in zip(counters, before, strict=True)]

        alone = counted()
        agent = LiveAgent(server, tmp_path, "--iface", dev, "--port", "8080",
                          "--tc-attach", mode, "--target", "127.0.0.1:18080")
        beside_agent = counted()
        err = agent.stop()
        after_agent = counted()
        for c in counters:
            c.stop()  # raises if it was removed meanwhile
    assert alone[0] >= 20
    assert beside_agent == alone and after_agent == alone, err
    assert len(_lines(tmp_path / "shadow.log")) == 20, err


@pytest.mark.parametrize("mode", [*TC_MODES, "clsact-pidns"])
def test_two_agents_on_one_interface(tmp_path: Path, mode: str) -> None:
    """Two agents, the same port and another one: each mirrors everything it was asked for;
    the first stopping leaves the second capturing. ``clsact-pidns``: each in a PID namespace
    of its own, both PID 1 (two containers on the host network), and neither takes the
    other's filter for a dead agent's."""
    wrap = ("unshare", "-p", "-f", "--mount-proc") if mode.endswith("pidns") else ()
    mode = mode.removesuffix("-pidns")
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "10.44.0.1/24", "10.44.0.2/24")
        dev = server.veth
        for port in (8080, 8081):
            start_python_server(server, port, host="10.44.0.1")
        for name, port in (("s1", 18080), ("s2", 18081)):
            start_python_server(server, port, log=tmp_path / f"{name}.log")
            (tmp_path / name).mkdir()
        first = LiveAgent(server, tmp_path / "s1", "--iface", dev, "--port", "8080",
                          "--tc-attach", mode, "--target", "127.0.0.1:18080", wrap=wrap)
        second = LiveAgent(server, tmp_path / "s2", "--iface", dev, "--port", "8080,8081",
                           "--tc-attach", mode, "--target", "127.0.0.1:18081", wrap=wrap)
        assert run_clients(client, "10.44.0.1", 8080, 2, 5, 200) == 10
        assert run_clients(client, "10.44.0.1", 8081, 1, 5, 200) == 5
        first.stop()
        assert run_clients(client, "10.44.0.1", 8080, 1, 4, 200) == 4
        err = second.stop()
        left = attached(server, dev)
        filters = server.run("tc", "filter", "show", "dev", dev, "ingress").stdout
    assert "stale" not in err
    assert len(_lines(tmp_path / "s1.log")) == 10
    assert len(_lines(tmp_path / "s2.log")) == 19, err
    assert left == {"ingress": [], "egress": [], "xdp": 0}
    assert "mirror_agent" not in filters


@pytest.mark.parametrize("mode", TC_MODES)
def test_sigkill_leaves_nothing_stale(tmp_path: Path, mode: str) -> None:
    """TCX: the kernel releases a killed agent's links. clsact: the next agent removes the
    dead one's filters. Either way the restarted agent captures, and stops clean."""
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "10.45.0.1/24", "10.45.0.2/24")
        dev = server.veth
        start_python_server(server, 8080, host="10.45.0.1")
        start_python_server(server, 18080, log=tmp_path / "shadow.log")
        killed = LiveAgent(server, tmp_path, "--iface", dev, "--port", "8080",
                           "--tc-attach", mode)
        killed.signal(signal.SIGKILL)
        killed.proc.wait(10)
        after_kill = attached(server, dev)
        agent = LiveAgent(server, tmp_path, "--iface", dev, "--port", "8080",
                          "--tc-attach", mode, "--target", "127.0.0.1:18080")
        filters = server.run("tc", "filter", "show", "dev", dev, "ingress").stdout
        assert run_clients(client, "10.45.0.1", 8080, 2, 5) == 10
        err = agent.stop()
        left = attached(server, dev)
        qdiscs = server.run("tc", "qdisc", "show", "dev", dev).stdout
        final = server.run("tc", "filter", "show", "dev", dev, "ingress").stdout
    if mode == "tcx":
        assert after_kill == {"ingress": [], "egress": [], "xdp": 0}
        assert "clsact" not in qdiscs
    else:  # the dead agent's filter is removed; its clsact qdisc, empty, stays (docs/operations.md)
        assert filters.count("mirror_agent") == 1
        assert "removed a stale filter" in err
        assert "mirror_agent" not in final
    assert len(_lines(tmp_path / "shadow.log")) == 10, err
    assert left == {"ingress": [], "egress": [], "xdp": 0}


def test_xdp_program_of_someone_else_is_never_replaced(tmp_path: Path) -> None:
    """An interface with an XDP program: ``--engine xdp`` exits 2 naming it; it stays."""
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "10.46.0.1/24", "10.46.0.2/24")
        dev = server.veth
        theirs = CountingProgram(server, dev, "xdp", 0)
        before = attached(server, dev)["xdp"]
        res = server.run(*AGENT, "--iface", dev, "--port", "8080", "--engine", "xdp",
                         check=False)
        after = attached(server, dev)["xdp"]
        theirs.stop()
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "already has an XDP program (count_xdp" in lines[0]
    assert "--engine tc" in lines[0]
    assert before and after == before


def test_xdp_link_released_on_sigkill(tmp_path: Path) -> None:
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "10.47.0.1/24", "10.47.0.2/24")
        dev = server.veth
        agent = LiveAgent(server, tmp_path, "--iface", dev, "--port", "8080",
                          "--engine", "xdp")
        during = attached(server, dev)["xdp"]
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(10)
        after = attached(server, dev)["xdp"]
    assert during and not after


def test_kernel_counters_sum_every_cpu(tmp_path: Path) -> None:
    """Every record the program submitted (on whichever CPU) was decoded: the per-CPU
    counters are summed over all CPUs, and the own-forward counter reaches --stats-json."""
    stats = tmp_path / "stats.json"
    with NetNS() as ns:
        start_python_server(ns, 9000)
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000",
                          "--decoder", "python", "--stats-json", str(stats))
        assert run_clients(ns, "127.0.0.1", 9000, 8, 20, 300) == 160
        agent.stop(settle=0.5)
    data = json.loads(stats.read_text())
    assert KERNEL_PACKETS_SKIPPED_OWN_FORWARD in data
    assert data[KERNEL_SUBMITTED] == data[RING_RECORDS] > 160


def test_xdp_closes_the_shadow_once_the_client_is_done(tmp_path: Path) -> None:
    """XDP sees only ingress, never the service's FIN: the shadow connection still ends as
    soon as the client's request and FIN are through, not at the idle timeout (600 s)."""
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "10.48.0.1/24", "10.48.0.2/24")
        start_python_server(server, 8080, host="10.48.0.1")
        start_python_server(server, 18080, log=tmp_path / "shadow.log")
        agent = LiveAgent(server, tmp_path, "--iface", server.veth, "--port", "8080",
                          "--engine", "xdp", "--target", "127.0.0.1:18080",
                          "--stats-interval", "0.5")
        client.run("curl", "-sf", "-o", "/dev/null", "http://10.48.0.1:8080/once")
        deadline = time.monotonic() + 10
        completed = 0
        while not completed and time.monotonic() < deadline:
            time.sleep(0.5)
            lines = [json.loads(line) for line in agent.err.read_text().splitlines()
                     if '"event": "stats"' in line]
            completed = lines[-1].get(FORWARD_CONNECTIONS_COMPLETED, 0) if lines else 0
        agent.stop(settle=0)
    assert completed == 1
    assert _lines(tmp_path / "shadow.log")[0].startswith("GET /once ")
