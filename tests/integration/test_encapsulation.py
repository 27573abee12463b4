"""Encapsulated and fragmented TCP (captures made by ``encap_corpus`` with scapy) through
``mirror-agent offline``: byte for byte what tshark follows, each flow with its tunnel
identity; tenants with the same inner addresses kept apart; fragments reassembled whatever
their order; what cannot be reassembled counted, and a gap, never a silent hole."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw

from agent.decode import LINKTYPE_ETHERNET
from tests.integration import encap_corpus as corpus
from tests.integration.truth import assert_same_streams, tshark_streams

AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
#: (tunnel, from, to) → that direction's bytes.
TunnelStreams = dict[tuple[str, str, str], bytes]


def offline(pcap: Path, out: Path, *extra: str) -> dict[str, int]:
    """Run ``mirror-agent offline`` on ``pcap`` recording JSON lines to ``out``; its stats."""
    stats = out.with_suffix(".stats.json")
    res = subprocess.run([*AGENT, "offline", str(pcap), "--port", str(corpus.PORT), "--record",
                          str(out), "--record-format", "jsonl", "--both-directions",
                          "--stats-json", str(stats), *extra],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    data: dict[str, int] = json.loads(stats.read_text())
    return data


def tunnel_streams(path: Path) -> tuple[TunnelStreams, int]:
    """(streams by tunnel and direction, total gap bytes) of a JSON-lines recording."""
    out: dict[tuple[str, str, str], bytearray] = defaultdict(bytearray)
    gaps = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[(rec.get("tunnel", ""), rec["from"], rec["to"])] += base64.b64decode(rec["data"])
        gaps += rec["gap_bytes"]
    return {k: bytes(v) for k, v in out.items() if v}, gaps


def plain(streams: TunnelStreams, tunnel: str | None = None) -> dict[tuple[str, str], bytes]:
    """Streams by direction only (of one tunnel, or of all when there is one)."""
    got = {(f, t): d for (tun, f, t), d in streams.items() if tunnel in (None, tun)}
    if tunnel is None:
        assert len(got) == len(streams), "two tunnels with the same addresses"
    return got


def sent(packets: list[tuple[Packet, bool]]) -> dict[bool, bytes]:
    """What each direction of an unfragmented conversation carries."""
    out = {True: b"", False: b""}
    for p, up in packets:
        if Raw in p:
            out[up] += p[Raw].load
    return out


def write(tmp_path: Path, name: str, linktype: int, frames: list[bytes],
          step: float = 0.001) -> Path:
    pcap = tmp_path / f"{name}.pcap"
    corpus.write_pcap(pcap, linktype, frames, step)
    return pcap


@pytest.mark.parametrize("name", sorted(corpus.CASES))
def test_each_encapsulation_and_link_type_matches_tshark(tmp_path: Path, name: str) -> None:
    linktype, frames = corpus.frames(name)
    pcap = write(tmp_path, name, linktype, frames)
    stats = offline(pcap, tmp_path / "out.jsonl")
    ours, gaps = tunnel_streams(tmp_path / "out.jsonl")
    truth = tshark_streams(pcap, corpus.PORT)
    assert len(truth) == 2 and gaps == 0
    assert {k[0] for k in ours} == {corpus.CASES[name][3]}
    assert_same_streams(plain(ours), truth)
    assert stats["mirror_agent_decode_frames_decoded_total"] == len(frames)


def _tenants(tmp_path: Path, wraps: list[corpus.Wrap]) -> Path:
    """The same inner conversation (same addresses, ports, sequence numbers) in each of
    ``wraps``, with different payloads, frames interleaved."""
    convs = [corpus.conversation(seed=i) for i in range(len(wraps))]
    for i, conv in enumerate(convs):  # same 4-tuple and ISNs, different bytes
        base = corpus.conversation(seed=0)
        for (p, _), (b, _) in zip(conv, base, strict=True):
            p[TCP].seq, p[TCP].ack = b[TCP].seq, b[TCP].ack
            if Raw in p:
                p[Raw].load = bytes([i + 1]) * len(b[Raw].load)
    frames = [w(p, up) for pkts in zip(*convs, strict=True)
              for w, (p, up) in zip(wraps, pkts, strict=True)]
    return write(tmp_path, "tenants", LINKTYPE_ETHERNET, frames)


def _split(pcap: Path, display_filter: str, out: Path) -> Path:
    subprocess.run(["tshark", "-r", str(pcap), "-Y", display_filter, "-w", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.mark.parametrize(("wraps", "tunnels", "field"), [
    ([corpus.vxlan(1), corpus.vxlan(2)], ["vxlan:1", "vxlan:2"], "vxlan.vni"),
    ([corpus.gre_ip(100), corpus.gre_ip(200)], ["gre:100", "gre:200"], "gre.key"),
    ([corpus.erspan(2, 1), corpus.erspan(3, 2)], ["erspan:1", "erspan:2"],
     "erspan.spanid"),
])
def test_overlapping_tenants_are_two_flows(tmp_path: Path, wraps: list[corpus.Wrap],
                                           tunnels: list[str], field: str) -> None:
    """Same inner 4-tuple in two tunnels: two flows, each what tshark follows in a capture
    of that tunnel alone."""
    pcap = _tenants(tmp_path, wraps)
    offline(pcap, tmp_path / "out.jsonl")
    ours, gaps = tunnel_streams(tmp_path / "out.jsonl")
    assert gaps == 0 and sorted({k[0] for k in ours}) == tunnels
    for i, tunnel in enumerate(tunnels):
        ident = tunnel.split(":")[1]
        one = _split(pcap, f"{field} == {ident}", tmp_path / f"t{i}.pcap")
        truth = tshark_streams(one, corpus.PORT)
        assert_same_streams(plain(ours, tunnel), truth)
        assert all(set(d) == {i + 1} for d in truth.values())
    flows = {json.loads(line)["flow"] for line in (tmp_path / "out.jsonl").read_text().split()}
    assert len(flows) == 2


def test_nested_tunnels_and_the_depth_bound(tmp_path: Path) -> None:
    """GRE inside VXLAN (VLANs around and inside): decoded with both identities; nested past
    the layer bound: skipped and counted, never a crash."""
    vx, gre = corpus.vxlan(9, (10, 20)), corpus.gre_ip(5)
    conv = corpus.conversation()

    def nested(p: Packet, up: bool) -> bytes:
        inner = Ether(gre(p, up))[IP]  # GRE over IP, without its Ethernet
        return vx(inner, up)

    pcap = write(tmp_path, "nested", LINKTYPE_ETHERNET, [nested(p, up) for p, up in conv])
    offline(pcap, tmp_path / "out.jsonl")
    ours, gaps = tunnel_streams(tmp_path / "out.jsonl")
    assert {k[0] for k in ours} == {"vxlan:9/gre:5"} and gaps == 0
    assert_same_streams(plain(ours), tshark_streams(pcap, corpus.PORT))
    assert plain(ours)[("192.0.2.1:40000", "198.51.100.2:8080")] == sent(conv)[True]
    # VXLAN in VXLAN in VXLAN: 4 layers each (IP, UDP, VXLAN, Ethernet); 3 deep fit in the
    # 16 layers, 4 deep do not.
    for n, decoded in ((3, len(conv)), (4, 0)):
        deep = [_vxlan_times(p, up, n) for p, up in conv]
        stats = offline(write(tmp_path, f"deep{n}", LINKTYPE_ETHERNET, deep),
                        tmp_path / f"deep{n}.jsonl")
        assert stats["mirror_agent_decode_frames_decoded_total"] == decoded
        assert stats['mirror_agent_decode_frames_skipped_total{reason="too_deep"}'] == (
            len(conv) - decoded)


def _vxlan_times(p: Packet, up: bool, n: int) -> bytes:
    """``p`` in ``n`` VXLAN tunnels, one inside the other (4 layers each)."""
    for i in range(n):
        p = corpus.outer_ip(up) / UDP(sport=50000, dport=4789) / VXLAN(vni=i) / corpus.eth(p)
    return bytes(corpus.eth(p))


@pytest.mark.parametrize("order", ["in", "reverse", "shuffle"])
@pytest.mark.parametrize("v6", [False, True])
def test_fragments_in_any_order_match_tshark(tmp_path: Path, order: str, v6: bool) -> None:
    conv = corpus.fragmented(v6, seed=3, order=order)
    frames = [bytes(corpus.eth(p)) for p, _up in conv]
    pcap = write(tmp_path, "frags", LINKTYPE_ETHERNET, frames)
    stats = offline(pcap, tmp_path / "out.jsonl")
    ours, gaps = tunnel_streams(tmp_path / "out.jsonl")
    truth = tshark_streams(pcap, corpus.PORT)
    assert gaps == 0 and len(truth) == 2
    assert_same_streams(plain(ours), truth)
    assert stats["mirror_agent_decode_datagrams_reassembled_total"] == 4
    assert stats["mirror_agent_decode_fragment_held_bytes"] == 0


def test_fragments_inside_and_outside_a_tunnel(tmp_path: Path) -> None:
    """Inner fragments inside VXLAN; and a VXLAN whose outer IP datagrams are fragmented."""
    conv = corpus.fragmented(False, seed=4, order="shuffle")
    wrap = corpus.vxlan(77)
    inner = [wrap(p, up) for p, up in conv]
    outer: list[bytes] = []
    for p, up in corpus.conversation(seed=5, sizes=(3000, 2000)):
        tunnel = Ether(wrap(p, up))[IP]
        tunnel.id = len(outer) + 1
        frags = corpus.ip_fragments(tunnel, 512, tunnel.id) if Raw in p else [tunnel]
        outer += [bytes(corpus.eth(f)) for f in reversed(frags)]
    for name, frames in (("inner", inner), ("outer", outer)):
        pcap = write(tmp_path, name, LINKTYPE_ETHERNET, frames)
        offline(pcap, tmp_path / f"{name}.jsonl")
        ours, gaps = tunnel_streams(tmp_path / f"{name}.jsonl")
        assert {k[0] for k in ours} == {"vxlan:77"} and gaps == 0
        assert_same_streams(plain(ours), tshark_streams(pcap, corpus.PORT))


def test_overlapping_fragments_first_copy_wins(tmp_path: Path) -> None:
    same = corpus.fragmented(False, seed=6, order="in", extra=corpus.overlapping(False))
    pcap = write(tmp_path, "same", LINKTYPE_ETHERNET,
                 [bytes(corpus.eth(p)) for p, _ in same])
    stats = offline(pcap, tmp_path / "same.jsonl")
    ours, gaps = tunnel_streams(tmp_path / "same.jsonl")
    assert gaps == 0
    assert_same_streams(plain(ours), tshark_streams(pcap, corpus.PORT))
    assert stats["mirror_agent_decode_fragment_overlap_bytes_total"] > 0
    assert stats["mirror_agent_decode_fragment_conflict_bytes_total"] == 0
    # Conflicting copies after the originals: the originals' bytes, the conflict counted.
    diff = corpus.fragmented(False, seed=6, order="in", extra=corpus.overlapping(True))
    pcap = write(tmp_path, "diff", LINKTYPE_ETHERNET,
                 [bytes(corpus.eth(p)) for p, _ in diff])
    stats = offline(pcap, tmp_path / "diff.jsonl")
    mine, gaps = tunnel_streams(tmp_path / "diff.jsonl")
    assert gaps == 0 and mine == ours
    assert stats["mirror_agent_decode_fragment_conflict_bytes_total"] > 0


def test_a_missing_fragment_is_a_gap_of_exactly_its_bytes(tmp_path: Path) -> None:
    conv = corpus.fragmented(False, seed=7, order="in", extra=corpus.dropping(3))
    pcap = write(tmp_path, "hole", LINKTYPE_ETHERNET,
                 [bytes(corpus.eth(p)) for p, _ in conv])
    stats = offline(pcap, tmp_path / "out.jsonl")
    ours, gaps = tunnel_streams(tmp_path / "out.jsonl")
    whole = sent(corpus.conversation(seed=7, sizes=(4000, 5000, 4100, 4500)))
    got = plain(ours)
    up = got[("192.0.2.1:40000", "198.51.100.2:8080")]
    down = got[("198.51.100.2:8080", "192.0.2.1:40000")]
    # Each datagram keeps its bytes up to the missing fragment (400 bytes at 1200, the TCP
    # header's 20 included): the rest of it is the gap (before the next chunk, or at the
    # connection's end: its FlowEnd's trailing gap, not in JSON lines).
    missing = len(whole[True]) + len(whole[False]) - len(up) - len(down)
    assert up == whole[True][:1180] + whole[True][4000 : 4000 + 1180]
    assert down == whole[False][:1180] + whole[False][5000 : 5000 + 1180]
    assert stats['mirror_agent_decode_datagrams_incomplete_total{reason="end_of_input"}'] == 4
    assert stats["mirror_agent_reassembly_gap_bytes_total"] == missing
    assert gaps == (4000 - 1180) + (5000 - 1180)  # the first datagrams' holes, mid-stream


def test_a_missing_first_fragment_is_counted_and_a_timeout_gives_up(tmp_path: Path) -> None:
    conv = corpus.fragmented(False, seed=8, order="in", extra=corpus.dropping(0))
    frames = [bytes(corpus.eth(p)) for p, _ in conv]
    # A minute later, one more frame (VLAN-tagged: not the fast path) of another connection.
    later = Ether() / Dot1Q(vlan=3) / IP(src="192.0.2.9", dst="198.51.100.9") / TCP()
    times = [1_700_000_000 + i * 0.001 for i in range(len(frames))] + [1_700_000_100.0]
    pcap = tmp_path / "nofirst.pcap"
    corpus.write_pcap(pcap, LINKTYPE_ETHERNET, [*frames, bytes(later)], times=times)
    stats = offline(pcap, tmp_path / "out.jsonl")
    ours, gaps = tunnel_streams(tmp_path / "out.jsonl")
    assert stats['mirror_agent_decode_datagrams_incomplete_total{reason="timeout"}'] == 4
    assert stats['mirror_agent_decode_datagrams_incomplete_total{reason="end_of_input"}'] == 0
    discarded = stats[
        'mirror_agent_decode_fragment_discarded_bytes_total{reason="no_first_fragment"}']
    assert discarded == 4000 + 5000 + 4100 + 4500 + 4 * 20 - 4 * 400
    # The bytes no flow can be named for: a gap at each data segment's place.
    assert not ours and gaps == 0  # nothing delivered, the gaps trail (no chunk after them)
    assert stats["mirror_agent_reassembly_gap_bytes_total"] == 4000 + 5000 + 4100 + 4500


def test_truncated_and_malformed_outer_headers_are_counted(tmp_path: Path) -> None:
    """Every frame of every case cut at every length, and with bytes flipped: the agent
    never fails, and every frame is decoded, skipped with a reason, or held."""
    frames: dict[int, list[bytes]] = defaultdict(list)
    for name in corpus.CASES:
        linktype, fr = corpus.frames(name)
        f = fr[3]
        frames[linktype] += [f[:n] for n in range(0, len(f), 3)]
        frames[linktype] += [f[:i] + bytes([f[i] ^ 0xA5]) + f[i + 1 :] for i in range(60)
                             if i < len(f)]
    for linktype, fr in frames.items():
        pcap = write(tmp_path, f"bad{linktype}", linktype, fr)
        stats = offline(pcap, tmp_path / f"bad{linktype}.jsonl")
        assert stats["mirror_agent_source_frames_total"] == len(fr)
        skipped = sum(v for k, v in stats.items()
                      if k.startswith("mirror_agent_decode_frames_skipped_total"))
        assert skipped > 0


def test_the_filter_applies_to_the_outer_frame(tmp_path: Path) -> None:
    """``--filter`` sees the outer headers: 'udp port 4789' keeps the VXLAN tenant only."""
    pcap = _tenants(tmp_path, [corpus.vxlan(1), corpus.gre_ip(2)])
    offline(pcap, tmp_path / "out.jsonl", "--filter", "udp port 4789")
    ours, gaps = tunnel_streams(tmp_path / "out.jsonl")
    assert {k[0] for k in ours} == {"vxlan:1"} and gaps == 0
    offline(pcap, tmp_path / "gre.jsonl", "--filter", "proto gre")
    ours, _ = tunnel_streams(tmp_path / "gre.jsonl")
    assert {k[0] for k in ours} == {"gre:2"}
