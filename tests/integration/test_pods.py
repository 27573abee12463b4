"""Pods come and go: a followed ``--iface`` spec attaches to veths as they appear, forgets
them as they vanish, leaks nothing, and captures each connection once however many captured
interfaces it crosses. The eBPF source runs alone (``agent.lab.capture_runner``) in a node
namespace; pods are namespaces with a veth into it (``agent.lab.pods``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.lab.netns import NetNS, start_python_server
from agent.lab.pods import UPLINK_NODE, Node, Pod

PORT = 8080


class Runner:
    """``agent.lab.capture_runner`` in ``ns``; returns once it is attached."""

    def __init__(self, ns: NetNS, out: Path, spec: str, tc_mode: str = "auto",
                 engine: str = "tc") -> None:
        self.out = out
        self.err = out.with_name(out.name + ".err")
        self.proc = ns.popen(sys.executable, "-m", "agent.lab.capture_runner", spec, str(PORT),
                             str(out), tc_mode, engine, stderr=self.err.open("w"),
                             stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "capture live" not in self.err.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"capture did not start: {self.err.read_text()}")
            time.sleep(0.1)

    def status(self) -> dict[str, object]:
        path = self.out.with_name(self.out.name + ".status")
        return json.loads(path.read_text()) if path.exists() else {"ifaces": []}

    def attached(self) -> list[str]:
        return [str(i["name"]) for i in self.status()["ifaces"]]  # type: ignore[attr-defined]

    def payload(self) -> str:
        lines = self.out.read_text().splitlines() if self.out.exists() else []
        return "".join(json.loads(line)["data"] for line in lines if line.endswith("}"))

    def wait_for(self, needles: list[str], timeout: float = 5.0) -> dict[str, int]:
        """How often each needle was captured, once all were (or the time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.payload()
            counts = {n: text.count(n) for n in needles}
            if all(counts.values()) or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    def usage(self) -> tuple[int, int, int]:
        """(open fds, of which BPF links, RSS in KiB) of the capturing process."""
        fds = os.listdir(f"/proc/{self.proc.pid}/fd")
        links = 0
        for fd in fds:
            try:
                links += os.readlink(f"/proc/{self.proc.pid}/fd/{fd}") == "anon_inode:bpf_link"
            except OSError:
                continue
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
        return len(fds), links, rss

    def stop(self) -> dict[str, int]:
        """SIGTERM; the final stats. Raises unless it exits 0."""
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(30) != 0:
            raise RuntimeError(f"capture exited {self.proc.returncode}: {self.err.read_text()}")
        stats: dict[str, int] = json.loads(
            self.out.with_name(self.out.name + ".stats").read_text())
        return stats


def _wait_attached(runner: Runner, name: str, present: bool, timeout: float) -> float:
    """Seconds until ``name`` is (or is no longer) attached; fails after ``timeout``."""
    start = time.monotonic()
    while (name in runner.attached()) != present:
        assert time.monotonic() - start < timeout, (name, present, runner.status())
        time.sleep(0.01)
    return time.monotonic() - start


def _get(ns: NetNS, host: str, path: str) -> None:
    ns.run("curl", "-sf", "--max-time", "5", "-o", "/dev/null", f"http://{host}:{PORT}{path}")


@pytest.mark.parametrize(("mode", "rounds"), [("tcx", 20), ("clsact", 4), ("xdp", 4)])
def test_pods_come_and_go_without_leaks(tmp_path: Path, mode: str, rounds: int) -> None:
    """``veth*`` in a node: each new pod's veth is attached within a second, its requests
    are captured, its deletion forgets it; after ``rounds`` pods nothing has grown.

    XDP sees only what leaves the pod (the veth's ingress): the responses, not requests."""
    engine, tc_mode = ("xdp", "auto") if mode == "xdp" else ("tc", mode)
    with Node() as node:
        runner = Runner(node.ns, tmp_path / "cap.jsonl", "veth*", tc_mode, engine)
        assert runner.attached() == []
        usage: list[tuple[int, int, int]] = []
        for n in range(rounds):
            pod = Pod(node.ns, f"10.60.0.{2 + n % 3}")
            try:
                waited = _wait_attached(runner, pod.veth, True, 1.0)
                start_python_server(pod.ns, PORT, host=pod.ip)
                paths = [f"/pod{n}/req{i}" for i in range(3)]
                for p in paths:
                    _get(node.ns, pod.ip, p)
                form = "ok GET {} 0" if engine == "xdp" else "GET {} HTTP/1.1"
                counts = runner.wait_for([form.format(p) for p in paths])
                assert all(c == 1 for c in counts.values()), (n, counts, waited)
            finally:
                pod.delete()
            _wait_attached(runner, pod.veth, False, 1.0)
            if n in (1, rounds - 1):  # after a warm-up round, and at the end
                time.sleep(0.2)
                usage.append(runner.usage())
        tracked = runner.status()["tracked"]
        stats = runner.stop()
    (fds0, links0, rss0), (fds1, links1, rss1) = usage
    print(f"{mode}: fds {fds0}->{fds1}, bpf links {links0}->{links1}, "
          f"RSS {rss0}->{rss1} KiB, tracked {tracked}")
    assert fds1 == fds0 and links0 == links1 == 0
    assert rss1 - rss0 < 4096, (rss0, rss1)
    # lo is all that is left, with its 127.0.0.1, ::1 and the pods' gateway address
    assert tracked == {"links": 1, "sides": 0, "local_addrs": 3, "attached": 0}
    assert stats["iface_attaches"] == stats["iface_detaches"] == rounds
    assert stats["iface_attach_failures"] == stats["link_errors"] == 0
    assert stats["ifaces_attached"] == 0


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
    so the routed connections are captured twice (what the rule prevents)."""
    with Node(uplink=True) as node:
        assert node.client is not None
        start_python_server(node.ns, PORT, host="0.0.0.0")
        pod = Pod(node.ns, "10.60.0.9")
        try:
            start_python_server(pod.ns, PORT, host=pod.ip)
            what = f"{pod.veth},{node.uplink}" if spec == "fixed" else spec
            runner = Runner(node.ns, tmp_path / "cap.jsonl", what)
            sides = {i["name"]: i["side"] for i in runner.status()["ifaces"]}  # type: ignore
            needles = _one_of_each(node, pod, spec.replace("*", "").replace(",", "-"))
            runner.wait_for(needles)
            time.sleep(0.5)  # anything captured twice has arrived too
            counts = {n: runner.payload().count(n) for n in needles}
            runner.stop()
        finally:
            pod.delete()
    if spec == "fixed":
        assert set(sides.values()) == {"all"}
        twice = {n for n, c in counts.items() if c == 2}
        assert twice == {n for n in counts if "client->pod" in n}, counts
        assert all(c == 1 for n, c in counts.items() if n not in twice), counts
    else:
        assert sides == {pod.veth: "pod", node.uplink: "host"}
        assert all(c == 1 for c in counts.values()), counts
