"""Pods come and go: a followed ``--iface`` spec attaches to veths as they appear, forgets
them as they vanish, leaks nothing, and captures each connection once however many captured
interfaces it crosses. The real agent (``mirror-agent run``) runs in a node namespace,
recording both directions as JSON lines; ``GET /status`` says what it is attached to and
what it holds. Pods are namespaces with a veth into the node (``lab.pods``).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from lab.control import ask, wait_for
from lab.netns import LiveAgent, NetNS, start_python_server
from lab.pods import UPLINK_CLIENT, UPLINK_NODE, Node, Pod

PORT = 8080
CONTROL = "127.0.0.1:19464"
RETRANSMITTED = "mirror_agent_reassembly_retransmitted_bytes_total"


class Agent:
    """``mirror-agent run --iface SPEC`` in ``ns``; returns once it is ready (attached)."""

    def __init__(self, ns: NetNS, workdir: Path, spec: str, tc_mode: str = "auto",
                 engine: str = "tc") -> None:
        self.ns = ns
        self.record = workdir / "cap.jsonl"
        self.stats_path = workdir / "stats.json"
        self.live = LiveAgent(
            ns, workdir, "--iface", spec, "--port", str(PORT), "--engine", engine,
            *(["--tc-attach", tc_mode] if engine == "tc" else []),
            "--record", str(self.record), "--record-format", "jsonl", "--both-directions",
            "--stats-json", str(self.stats_path), "--listen", CONTROL, wait=False)
        wait_for(f"http://{CONTROL}/readyz", 200, ns=ns)

    def status(self) -> dict[str, object]:
        code, body = ask(f"http://{CONTROL}/status", ns=self.ns)
        assert code == 200 and isinstance(body, dict), (code, body)
        return body

    def attached(self) -> list[str]:
        return self.status()["interfaces"]  # type: ignore[return-value]

    def flows(self) -> dict[str, tuple[set[str], str]]:
        """Flow id → (its two IP addresses, its recorded bytes in order, both directions,
        as latin-1 text)."""
        lines = self.record.read_text().splitlines() if self.record.exists() else []
        out: dict[str, tuple[set[str], str]] = {}
        for line in lines:
            if line.endswith("}"):
                rec = json.loads(line)
                ips = {rec["from"].rsplit(":", 1)[0], rec["to"].rsplit(":", 1)[0]}
                _, text = out.get(rec["flow"], (ips, ""))
                out[rec["flow"]] = ips, text + base64.b64decode(rec["data"]).decode("latin-1")
        return out

    def payload(self) -> str:
        return "".join(text for _, text in self.flows().values())

    def wait_for(self, needles: list[str], timeout: float = 5.0) -> dict[str, int]:
        """How often each needle was recorded, once all were (or the time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.payload()
            counts = {n: text.count(n) for n in needles}
            if all(counts.values()) or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    def usage(self) -> tuple[int, int, int]:
        """(open fds, of which BPF links, RSS in KiB) of the agent process."""
        pid = self.live.proc.pid  # ip netns exec execs the agent: this is its PID
        fds = os.listdir(f"/proc/{pid}/fd")
        links = 0
        for fd in fds:
            try:
                links += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf_link"
            except OSError:
                continue
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
        return len(fds), links, rss

    def stop(self) -> dict[str, float]:
        """SIGTERM; the final metrics (``--stats-json``). Raises unless it exits 0."""
        self.live.stop(settle=0.3)
        stats: dict[str, float] = json.loads(self.stats_path.read_text())
        return stats


def _wait_attached(agent: Agent, name: str, present: bool, timeout: float) -> float:
    """Seconds until ``name`` is (or is no longer) attached; fails after ``timeout``."""
    start = time.monotonic()
    while (name in agent.attached()) != present:
        assert time.monotonic() - start < timeout, (name, present, agent.status())
        time.sleep(0.01)
    return time.monotonic() - start


def _get(ns: NetNS, host: str, path: str) -> None:
    ns.run("curl", "-sf", "--max-time", "5", "-o", "/dev/null", f"http://{host}:{PORT}{path}")


def _stat(stats: dict[str, float], name: str) -> float:
    return stats[f"mirror_agent_{name}"]


@pytest.mark.parametrize(("mode", "rounds"), [("tcx", 20), ("clsact", 4), ("xdp", 4)])
def test_pods_come_and_go_without_leaks(tmp_path: Path, mode: str, rounds: int) -> None:
    """``veth*`` in a node: each new pod's veth is attached within a second, its requests
    are captured (once), its deletion forgets it; after ``rounds`` pods nothing has grown.

    XDP sees only what leaves the pod (the veth's ingress): the responses, not requests."""
    engine, tc_mode = ("xdp", "auto") if mode == "xdp" else ("tc", mode)
    with Node() as node:
        agent = Agent(node.ns, tmp_path, "veth*", tc_mode, engine)
        status = agent.status()
        assert status["interfaces"] == status["attachments"] == [], status
        usage: list[tuple[int, int, int]] = []
        for n in range(rounds):
            pod = Pod(node.ns, f"10.60.0.{2 + n % 3}")
            try:
                waited = _wait_attached(agent, pod.veth, True, 1.0)
                start_python_server(pod.ns, PORT, host=pod.ip)
                paths = [f"/pod{n}/req{i}" for i in range(3)]
                for p in paths:
                    _get(node.ns, pod.ip, p)
                form = "ok GET {} 0" if engine == "xdp" else "GET {} HTTP/1.1"
                counts = agent.wait_for([form.format(p) for p in paths])
                assert all(c == 1 for c in counts.values()), (n, counts, waited)
            finally:
                pod.delete()
            _wait_attached(agent, pod.veth, False, 1.0)
            if n in (1, rounds - 1):  # after a warm-up round, and at the end
                time.sleep(0.2)
                usage.append(agent.usage())
        tracked = agent.status()["tracked"]
        stats = agent.stop()
    (fds0, links0, rss0), (fds1, links1, rss1) = usage
    print(f"{mode}: fds {fds0}->{fds1}, bpf links {links0}->{links1}, "
          f"RSS {rss0}->{rss1} KiB, tracked {tracked}")
    assert fds1 == fds0 and links0 == links1 == 0
    assert rss1 - rss0 < 4096, (rss0, rss1)
    # lo is all that is left, with its 127.0.0.1, ::1 and the pods' gateway address
    assert tracked == {"links": 1, "sides": 0, "local_addrs": 3, "attached": 0}
    assert _stat(stats, "source_interface_attaches_total") == rounds
    assert _stat(stats, "source_interface_detaches_total") == rounds
    assert _stat(stats, "source_interface_attach_failures_total") == 0
    assert _stat(stats, "source_link_errors_total") == 0
    assert _stat(stats, "source_interfaces_attached") == 0
    assert stats[RETRANSMITTED] == 0  # no packet was captured twice


def _one_of_each(node: Node, pod: Pod, tag: str) -> list[str]:
    """Requests over every path a connection may take through the node; the request lines
    and response bodies to look for."""
    assert node.client is not None
    routes = {"client->pod": (node.client, pod.ip), "client->node": (node.client, UPLINK_NODE),
              "node->pod": (node.ns, pod.ip), "pod->node": (pod.ns, UPLINK_NODE)}
    needles = []
    for name, (ns, host) in routes.items():
        for i in range(2):
            path = f"/{tag}/{name}/{i}"
            _get(ns, host, path)
            needles += [f"GET {path} HTTP/1.1", f"ok GET {path} 0"]
    return needles


@pytest.mark.parametrize("spec", ["any", "veth*,va*", "fixed"])
def test_one_capture_per_connection(tmp_path: Path, spec: str) -> None:
    """Client → uplink → node → pod veth → pod, with a service in the pod and one on the
    node. With a followed spec (``any``, patterns) every request and every response is
    captured exactly once, whichever interfaces it crosses; fixed names keep every packet,
    so the routed connections are captured twice (what the rule prevents). The reassembler
    keeps the first copy of a byte: the second shows as retransmitted bytes."""
    with Node(uplink=True) as node:
        assert node.client is not None
        start_python_server(node.ns, PORT, host="0.0.0.0")
        pod = Pod(node.ns, "10.60.0.9")
        try:
            start_python_server(pod.ns, PORT, host=pod.ip)
            what = f"{pod.veth},{node.uplink}" if spec == "fixed" else spec
            agent = Agent(node.ns, tmp_path, what)
            attachments = agent.status()["attachments"]
            assert isinstance(attachments, list)
            sides = {i["name"]: i["side"] for i in attachments}
            needles = _one_of_each(node, pod, spec.replace("*", "").replace(",", "-"))
            agent.wait_for(needles)
            time.sleep(0.5)  # anything captured twice has arrived too
            stats = agent.stop()
            counts = {n: agent.payload().count(n) for n in needles}
            routed = sum(len(text) for ips, text in agent.flows().values()
                         if ips == {UPLINK_CLIENT, pod.ip})
        finally:
            pod.delete()
    assert all(c == 1 for c in counts.values()), counts  # the reassembler's first copy
    if spec == "fixed":
        assert set(sides.values()) == {"all"}
        assert routed > 0 and stats[RETRANSMITTED] == routed, (routed, stats[RETRANSMITTED])
    else:
        assert sides == {pod.veth: "pod", node.uplink: "host"}
        assert stats[RETRANSMITTED] == 0
