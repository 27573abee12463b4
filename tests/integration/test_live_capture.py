"""`mirror-agent run` with the real eBPF program (or AF_PACKET), real servers and clients.

The agent's both-directions recording must equal, per connection and direction, what tcpdump
captured in the same run reassembles to under tshark; the shadow must receive every request;
after SIGTERM nothing of the agent's is left attached.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lab.netns import (
    AGENT,
    LiveAgent,
    NetNS,
    Tcpdump,
    run_clients,
    start_python_server,
)
from tests.integration.truth import assert_same_streams, jsonl_streams, tshark_streams

#: (engine, transport[+decoder]) pairs every loopback/veth test runs with. Perf records go
#: through the native decoder unless the variant says python.
VARIANTS = [("tc", "perf"), ("tc", "perf+python"), ("tc", "ringbuf"), ("xdp", "perf"),
            ("afpacket", "-")]
IDS = ["tc-perf", "tc-perf-python", "tc-ringbuf", "xdp", "afpacket"]


def _engine_args(engine: str, transport: str) -> list[str]:
    args = ["--engine", engine]
    if transport == "-":
        return args
    transport, _, decoder = transport.partition("+")
    decoder = decoder or ("native" if transport == "perf" else "auto")
    return [*args, "--transport", transport, "--decoder", decoder]


def _shadow_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _attached(ns: NetNS, dev: str) -> str:
    """What is attached to ``dev``: qdiscs, ingress/egress filters, XDP."""
    return "\n".join([ns.run("tc", "qdisc", "show", "dev", dev).stdout,
                      ns.run("tc", "filter", "show", "dev", dev, "ingress", check=False).stdout,
                      ns.run("tc", "filter", "show", "dev", dev, "egress", check=False).stdout,
                      ns.run("ip", "link", "show", dev).stdout])


@pytest.mark.parametrize(("engine", "transport"), VARIANTS, ids=IDS)
def test_loopback_matches_tcpdump_and_shadow(tmp_path: Path, engine: str,
                                             transport: str) -> None:
    rec = tmp_path / "rec.jsonl"
    pcap = tmp_path / "truth.pcap"
    upload = tmp_path / "up.bin"
    upload.write_bytes(bytes(range(251)) * 12000)  # 3 MB: 64 KiB GSO packets on lo
    with NetNS() as ns:
        start_python_server(ns, 9000)
        start_python_server(ns, 19000, log=tmp_path / "shadow.log")
        cap = Tcpdump(ns, "lo", pcap, "tcp port 9000")
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000",
                          *_engine_args(engine, transport), "--target", "127.0.0.1:19000",
                          "--record", str(rec), "--record-format", "jsonl",
                          "--both-directions")
        assert run_clients(ns, "127.0.0.1", 9000, 8, 10, 3000) == 80
        ns.run("curl", "-sf", "-o", "/dev/null", "-H", "Expect:", "--data-binary",
               f"@{upload}", "http://127.0.0.1:9000/upload")
        err = agent.stop()
        assert "0 packets dropped by kernel" in cap.stop()
        left = _attached(ns, "lo")
    assert "clsact" not in left and "bpf" not in left and "xdp" not in left
    ours, gaps = jsonl_streams(rec)
    assert gaps == 0
    assert_same_streams(ours, tshark_streams(pcap, 9000))
    assert len(_shadow_lines(tmp_path / "shadow.log")) == 81, err
    assert "mirror-agent summary" in err
    if transport == "perf":
        assert '"decoder": "native"' in err  # the fast path ran, not the fallback


def _veth_run(tmp_path: Path, engine: str, transport: str) -> tuple[Path, Path, list[str]]:
    rec, pcap = tmp_path / "rec.jsonl", tmp_path / "truth.pcap"
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "2001:db8::1/64", "2001:db8::2/64")
        start_python_server(server, 8443, host="2001:db8::1")
        start_python_server(server, 18443, log=tmp_path / "shadow.log")
        cap = Tcpdump(server, server.veth, pcap, "tcp port 8443")
        agent = LiveAgent(server, tmp_path, "--iface", server.veth, "--port", "8443",
                          *_engine_args(engine, transport), "--target", "127.0.0.1:18443",
                          "--record", str(rec), "--record-format", "jsonl",
                          "--both-directions")
        assert run_clients(client, "2001:db8::1", 8443, 4, 6, 20000) == 24
        agent.stop()
        assert "0 packets dropped by kernel" in cap.stop()
        left = _attached(server, server.veth)
    assert "clsact" not in left and "bpf" not in left and "xdp" not in left
    return rec, pcap, _shadow_lines(tmp_path / "shadow.log")


@pytest.mark.parametrize(("engine", "transport"), VARIANTS, ids=IDS)
def test_ipv6_veth_between_namespaces(tmp_path: Path, engine: str, transport: str) -> None:
    rec, pcap, shadow = _veth_run(tmp_path, engine, transport)
    ours, gaps = jsonl_streams(rec)
    truth = tshark_streams(pcap, 8443)
    if engine == "xdp":  # ingress only: the request direction
        truth = {k: v for k, v in truth.items() if k[1] == "[2001:db8::1]:8443"}
        ours = {k: v for k, v in ours.items() if k in truth}
    assert gaps == 0
    assert all(k[0].startswith("[2001:db8::") for k in ours)
    assert_same_streams(ours, truth)
    assert len(shadow) == 24


@pytest.mark.parametrize("iface_spec", ["any", "list"])
def test_several_interfaces(tmp_path: Path, iface_spec: str) -> None:
    """Two clients on two veths; ``--iface any`` (or both names) sees both, not ``lo``."""
    with NetNS() as server, NetNS() as c1, NetNS() as c2:
        server.veth_to(c1, "10.31.1.1/24", "10.31.1.2/24")
        v1 = server.veth
        server.veth_to(c2, "10.31.2.1/24", "10.31.2.2/24")
        v2 = server.veth
        start_python_server(server, 8080, host="0.0.0.0")
        start_python_server(server, 18080, log=tmp_path / "shadow.log")
        spec = "any" if iface_spec == "any" else f"{v1},{v2}"
        agent = LiveAgent(server, tmp_path, "--iface", spec, "--port", "8080",
                          "--target", "127.0.0.1:18080")
        assert run_clients(c1, "10.31.1.1", 8080, 3, 5) == 15
        assert run_clients(c2, "10.31.2.1", 8080, 2, 5) == 10
        # Loopback traffic to the port is not on a captured interface.
        assert run_clients(server, "127.0.0.1", 8080, 1, 4) == 4
        err = agent.stop()
        left = _attached(server, v1) + _attached(server, v2)
    assert "clsact" not in left and "bpf" not in left
    assert len(_shadow_lines(tmp_path / "shadow.log")) == 25, err
    live = next(json.loads(line) for line in err.splitlines() if "capture live" in line)
    assert sorted(live["ifaces"]) == sorted([v1, v2])


def test_stale_filter_replaced_and_foreign_qdisc_kept(tmp_path: Path) -> None:
    """clsact filters (kernels without TCX): a crashed run's filter is replaced; the user's
    own clsact and filters stay. (With TCX a crash leaves nothing: test_guest.py.)"""
    with NetNS() as server, NetNS() as client:
        server.veth_to(client, "10.32.0.1/24", "10.32.0.2/24")
        dev = server.veth
        server.run("tc", "qdisc", "add", "dev", dev, "clsact")
        # The user's own classifier (classic BPF "return 0": matches nothing).
        server.run("tc", "filter", "add", "dev", dev, "ingress", "prio", "10", "handle", "7",
                   "bpf", "bytecode", "1,6 0 0 0,")
        start_python_server(server, 8080, host="10.32.0.1")
        start_python_server(server, 18080, log=tmp_path / "shadow.log")
        crashed = LiveAgent(server, tmp_path, "--iface", dev, "--port", "8080",
                            "--tc-attach", "clsact")
        crashed.proc.send_signal(signal.SIGKILL)
        crashed.proc.wait(10)
        stale = server.run("tc", "filter", "show", "dev", dev, "ingress").stdout
        assert "mirror_agent" in stale  # a crash cannot clean up

        agent = LiveAgent(server, tmp_path, "--iface", dev, "--port", "8080",
                          "--tc-attach", "clsact", "--target", "127.0.0.1:18080")
        ingress = server.run("tc", "filter", "show", "dev", dev, "ingress").stdout
        assert ingress.count("mirror_agent") == 1  # replaced, not added twice
        assert run_clients(client, "10.32.0.1", 8080, 2, 5) == 10
        err = agent.stop()
        left = _attached(server, dev)
    assert "mirror_agent" not in left
    assert "clsact" in left and "bytecode '1,6 0 0 0'" in left  # the user's, left alone
    assert len(_shadow_lines(tmp_path / "shadow.log")) == 10, err


@pytest.mark.parametrize(("engine", "transport"), VARIANTS, ids=IDS)
def test_lone_request_is_delivered_promptly(tmp_path: Path, engine: str,
                                            transport: str) -> None:
    """One small request on a quiet host reaches the shadow without waiting for more traffic.

    Wakeups are batched (every 64 events), so without the periodic drain this request would
    wait until the agent stops. The bound is loose on purpose; bench/ measures the latency.
    """
    shadow = tmp_path / "shadow.log"
    with NetNS() as ns:
        start_python_server(ns, 9000)
        start_python_server(ns, 19000, log=shadow)
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000",
                          *_engine_args(engine, transport), "--target", "127.0.0.1:19000")
        time.sleep(0.3)
        ns.run("curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:9000/lone")
        sent = time.monotonic()
        while not _shadow_lines(shadow) and time.monotonic() - sent < 5:
            time.sleep(0.005)
        waited = time.monotonic() - sent
        arrived = _shadow_lines(shadow)
        agent.stop(settle=0)
    assert arrived and arrived[0].startswith("GET /lone ")
    assert waited < 1.0, f"the lone request took {waited:.3f}s to reach the shadow"


def test_startup_failures_exit_2_with_one_line() -> None:
    """Not root, unknown interface, bad port: exit 2, one line saying what to do."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=-all", "--bounding-set=-all"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cases = [
        (nobody, ["--iface", "lo", "--port", "80"], "needs root or CAP_BPF"),
        (nobody, ["--iface", "lo", "--port", "80", "--engine", "afpacket"],
         "needs root or CAP_NET_RAW"),
        ([], ["--iface", "nosuch0", "--port", "80"], "interface 'nosuch0' not found"),
        ([], ["--iface", "lo", "--port", "70000"], "out of range 1-65535"),
        ([], ["--iface", "lo", "--port", "80", "--filter", "port port"], "bad filter"),
        ([], ["--iface", "lo", "--port", "80", "--engine", "afpacket", "--filter", "port port"],
         "bad filter"),
    ]
    for prefix, args, message in cases:
        res = subprocess.run([*prefix, *AGENT, *args], capture_output=True, text=True,
                             timeout=60, env=env, cwd="/")
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, res.stderr)
