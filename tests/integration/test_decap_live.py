"""``mirror-agent run --decap``: the TCP inside tunnels, live, for every engine.

(a) A real kernel VXLAN device between two namespaces (the only tunnel device this kernel
builds) carries curl traffic; the agent is on the underlay veth. (b) The collector case:
scapy captures of every encapsulation (``encap_corpus``) pushed into a veth with
``tcpreplay``, the agent on the other end. Both: what the agent records equals, per
connection and direction, what tshark follows in the same packets, each flow carries its
tunnel's identity, and the shadow receives every connection's client bytes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import UDP
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw

from agent.decode import LINKTYPE_ETHERNET
from lab.netns import LiveAgent, NetNS, Tcpdump, start_python_server, wait_port
from tests.integration import encap_corpus as corpus
from tests.integration.byte_shadow import received
from tests.integration.test_encapsulation import sent, tunnel_streams
from tests.integration.test_live_capture import IDS, VARIANTS, _attached, _engine_args
from tests.integration.truth import Streams, assert_same_streams, jsonl_streams, tshark_streams

pytestmark = pytest.mark.skipif(shutil.which("tcpreplay") is None,
                                reason="tcpreplay missing: make setup installs it")

SHADOW = Path(__file__).with_name("byte_shadow.py")
#: The corpus's tunnels the kernel opens (the collector case), each with its identity.
REPLAYED = ("vxlan", "vxlan_vlans", "vxlan_v6_inside", "geneve", "gre_key_seq_csum",
            "gre_plain_v6", "gre_teb", "erspan2", "erspan3", "ip4in4", "ip6in4", "ip4in6",
            "ip6in6")
ALL = "vxlan,vxlan:8472,geneve,gre,erspan,ipip"


def _start_shadow(ns: NetNS, out: Path) -> None:
    ns.popen(sys.executable, str(SHADOW), "127.0.0.1", "18080", str(out))
    wait_port(ns, 18080)


def _shadow_got(out: Path, want: int, timeout: float = 10) -> list[bytes]:
    """The shadow's connections (non-empty ones), once ``want`` of them closed."""
    deadline = time.monotonic() + timeout
    while True:
        got = [b for b in received(out) if b]
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _requests(truth: Streams, port: int) -> list[bytes]:
    """Each connection's client→service bytes (one key per connection: distinct ports)."""
    return sorted(v for (_f, t), v in truth.items() if t.endswith(f":{port}"))


def _stats(path: Path) -> dict[str, float]:
    data: dict[str, float] = json.loads(path.read_text())
    return data


# --------------------------------------------------------------- (a) a kernel VXLAN device


def _vxlan_pair(server: NetNS, client: NetNS) -> str:
    """An underlay veth (192.0.2.0/24) and a VXLAN device (VNI 42, 198.51.100.0/24) over it
    in each namespace; the server's underlay veth."""
    server.veth_to(client, "192.0.2.1/24", "192.0.2.2/24")
    for ns, me, peer, inner in ((server, "192.0.2.1", "192.0.2.2", "198.51.100.1/24"),
                                (client, "192.0.2.2", "192.0.2.1", "198.51.100.2/24")):
        ns.run("ip", "link", "add", "vx42", "type", "vxlan", "id", "42", "local", me,
               "remote", peer, "dstport", "4789", "dev", ns.veth)
        ns.run("ip", "addr", "add", inner, "dev", "vx42")
        ns.run("ip", "link", "set", "vx42", "up")
    return server.veth


def _curl(client: NetNS, upload: Path) -> None:
    base = "http://198.51.100.1:8080"
    client.run("curl", "-sf", "-o", "/dev/null", *(f"{base}/keepalive/{i}" for i in range(5)))
    client.run("curl", "-sf", "-o", "/dev/null", "-H", "Expect:", "--data-binary",
               f"@{upload}", f"{base}/upload")
    for i in range(3):
        client.run("curl", "-sf", "-o", "/dev/null", f"{base}/one/{i}")


@pytest.mark.parametrize(("engine", "transport"), VARIANTS, ids=IDS)
def test_kernel_vxlan_device_seen_from_the_underlay(tmp_path: Path, engine: str,
                                                   transport: str) -> None:
    rec, pcap, shadow = tmp_path / "rec.jsonl", tmp_path / "underlay.pcap", tmp_path / "sh"
    upload = tmp_path / "up.bin"
    upload.write_bytes(bytes(range(251)) * 1200)  # 300 KB: GSO packets through the tunnel
    with NetNS() as server, NetNS() as client:
        underlay = _vxlan_pair(server, client)
        start_python_server(server, 8080, host="198.51.100.1")
        _start_shadow(server, shadow)
        cap = Tcpdump(server, underlay, pcap, "udp port 4789")
        agent = LiveAgent(server, tmp_path, "--iface", underlay, "--port", "8080",
                          "--decap", "vxlan", *_engine_args(engine, transport),
                          "--target", "127.0.0.1:18080", "--record", str(rec),
                          "--record-format", "jsonl", "--both-directions",
                          "--stats-json", str(tmp_path / "stats.json"))
        _curl(client, upload)
        err = agent.stop()
        assert "0 packets dropped by kernel" in cap.stop()
        truth = tshark_streams(pcap, 8080)
        got = _shadow_got(shadow, len(_requests(truth, 8080)))
        left = _attached(server, underlay)
    assert "clsact" not in left and "bpf" not in left and "xdp" not in left
    assert len(truth) == 2 * 5  # five connections, both directions
    ours, gaps = jsonl_streams(rec)
    tunnels = {json.loads(line).get("tunnel") for line in rec.read_text().splitlines()}
    assert gaps == 0 and tunnels == {"vxlan:42"}, err
    if engine == "xdp":  # ingress only: the requests
        truth = {k: v for k, v in truth.items() if k[1] == "198.51.100.1:8080"}
    assert_same_streams(ours, truth)
    assert got == _requests(truth, 8080)
    stats = _stats(tmp_path / "stats.json")
    if engine != "afpacket":
        assert stats["mirror_agent_kernel_decap_total"] > 0
        assert stats['mirror_agent_kernel_packets_skipped_total{reason="bad_tunnel"}'] == 0


# --------------------------------------------------------------- (b) replayed captures


def _vxlan_on(port: int, vni: int) -> corpus.Wrap:
    """VXLAN on a port of its own (Linux's old default 8472, as flannel uses)."""
    def wrap(p: Packet, up: bool) -> bytes:
        return bytes(corpus.eth(corpus.outer_ip(up) / UDP(sport=53000, dport=port)
                                / VXLAN(vni=vni) / corpus.eth(p)))
    return wrap


def _marked(seed: int, sport: int, mark: int) -> list[tuple[Packet, bool]]:
    """A conversation whose payload bytes are all ``mark`` (same seed: same sequence
    numbers and sizes)."""
    conv = corpus.conversation(seed=seed, sport=sport)
    for p, _up in conv:
        if Raw in p:
            p[Raw].load = bytes([mark]) * len(p[Raw].load)
    return conv


def _write(path: Path, frames: list[bytes]) -> Path:
    corpus.write_pcap(path, LINKTYPE_ETHERNET, frames)
    return path


def _captures(tmp: Path) -> tuple[list[Path], dict[int, str], list[tuple[Packet, bool]]]:
    """The replayed files: every tunnel of REPLAYED (and plain TCP, and a port not observed
    inside VXLAN) in one; two VXLAN tenants with the same inner 4-tuple, interleaved; VXLAN
    on port 8472. Also the tunnel expected per client port, and the 8472 conversation."""
    frames: list[bytes] = []
    expect: dict[int, str] = {}
    for i, name in enumerate(REPLAYED):
        _lt, wrap, v6, tunnel = corpus.CASES[name]
        frames += [wrap(p, up) for p, up in corpus.conversation(v6, seed=i, sport=41000 + i)]
        expect[41000 + i] = tunnel
    frames += [bytes(corpus.eth(p)) for p, _up in corpus.conversation(seed=50, sport=42000)]
    expect[42000] = ""
    other = [(p, up) for p, up in corpus.conversation(seed=51, sport=42001)]
    for p, _up in other:  # port 8081 inside VXLAN: not observed
        p.sport, p.dport = (42001, 8081) if p.sport == 42001 else (8081, 42001)
    frames += [corpus.vxlan(42)(p, up) for p, up in other]
    tenants = [w(p, up) for a, b in zip(_marked(60, 45000, 1), _marked(60, 45000, 2),
                                        strict=True)
               for w, (p, up) in ((corpus.vxlan(1), a), (corpus.vxlan(2), b))]
    custom = corpus.conversation(seed=70, sport=46000)
    files = [_write(tmp / "corpus.pcap", frames), _write(tmp / "tenants.pcap", tenants),
             _write(tmp / "custom.pcap", [_vxlan_on(8472, 9)(p, up) for p, up in custom])]
    return files, expect, custom


def _split(pcap: Path, vni: int, out: Path) -> Path:
    """The frames of one VNI of ``pcap``, for tshark to follow that tenant alone."""
    subprocess.run(["tshark", "-r", str(pcap), "-Y", f"vxlan.vni == {vni}", "-w", str(out)],
                   check=True, capture_output=True)
    return out


def _replay(tmp: Path, files: list[Path], args: list[str]) -> tuple[str, list[bytes]]:
    """Push ``files`` into a veth; the agent (``args``) on its peer; (log, shadow's)."""
    shadow = tmp / "sh"
    with NetNS() as sender, NetNS() as collector:
        sender.veth_to(collector, "2001:db8:1::1/64", "2001:db8:1::2/64")
        _start_shadow(collector, shadow)
        agent = LiveAgent(collector, tmp, "--iface", collector.veth, "--port", "8080",
                          "--target", "127.0.0.1:18080", "--record", str(tmp / "rec.jsonl"),
                          "--record-format", "jsonl", "--both-directions",
                          "--stats-json", str(tmp / "stats.json"), *args)
        sender.run("tcpreplay", "-q", "-i", sender.veth, *map(str, files))
        err = agent.stop()
        got = _shadow_got(shadow, 17)
        left = _attached(collector, collector.veth)
    assert "clsact" not in left and "bpf" not in left and "xdp" not in left
    return err, got


@pytest.mark.parametrize(("engine", "transport"), VARIANTS, ids=IDS)
def test_replayed_encapsulations_reach_a_collector(tmp_path: Path, engine: str,
                                                   transport: str) -> None:
    files, expect, custom = _captures(tmp_path)
    err, shadow = _replay(tmp_path, files, ["--decap", ALL, *_engine_args(engine, transport)])
    ours, gaps = tunnel_streams(tmp_path / "rec.jsonl")
    assert gaps == 0, err
    # Every tunnel of the corpus, and plain TCP: what tshark follows, with its identity.
    truth = tshark_streams(files[0], corpus.PORT)
    assert len(truth) == 2 * len(expect)
    mine = [k for k in ours if int(_port(k[1], k[2])) in expect]
    assert all(tun == expect[int(_port(f, t))] for tun, f, t in mine), mine
    assert_same_streams({(f, t): ours[(tun, f, t)] for tun, f, t in mine}, truth)
    # Two tenants with the same addresses, ports and sequence numbers: two flows.
    for vni in (1, 2):
        one = tshark_streams(_split(files[1], vni, tmp_path / f"t{vni}.pcap"), corpus.PORT)
        assert {(f, t): d for (tun, f, t), d in ours.items() if tun == f"vxlan:{vni}"} == one
        assert all(set(d) == {vni} for d in one.values())
    # VXLAN on a port of its own (tshark knows only 4789): what scapy sent.
    want = sent(custom)
    assert ours[("vxlan:9", "192.0.2.1:46000", "198.51.100.2:8080")] == want[True]
    assert ours[("vxlan:9", "198.51.100.2:8080", "192.0.2.1:46000")] == want[False]
    assert not [k for k in ours if "8081" in k[1] + k[2]]
    # The shadow: every connection's client bytes.
    requests = [d for (_tun, _f, t), d in ours.items() if t.endswith(":8080")]
    assert len(requests) == len(expect) + 3 and shadow == sorted(requests)
    stats = _stats(tmp_path / "stats.json")
    if engine == "afpacket":
        assert stats["mirror_agent_source_filtered_packets_total"] > 0  # port 8081, ACKs
    else:
        assert stats['mirror_agent_kernel_packets_skipped_total{reason="bad_tunnel"}'] == 0
        assert stats['mirror_agent_kernel_packets_skipped_total{reason="not_our_port"}'] > 0
        assert stats["mirror_agent_kernel_decap_total"] > 0


def _port(src: str, dst: str) -> str:
    """The client's port of a direction (the one that is not the observed port)."""
    a, b = src.rsplit(":", 1)[1], dst.rsplit(":", 1)[1]
    return b if a == str(corpus.PORT) else a


def test_without_decap_tunnels_are_not_captured(tmp_path: Path) -> None:
    """The same captures without --decap: only the plain connection is recorded, and the
    tunnels' packets are counted as what they are on the wire (not TCP)."""
    files, _expect, _custom = _captures(tmp_path)
    _replay(tmp_path, files, [])
    ours, _gaps = tunnel_streams(tmp_path / "rec.jsonl")
    assert {_port(f, t) for _tun, f, t in ours} == {"42000"}
    stats = _stats(tmp_path / "stats.json")
    assert stats['mirror_agent_kernel_packets_skipped_total{reason="not_tcp"}'] > 0
    assert stats["mirror_agent_kernel_decap_total"] == 0
