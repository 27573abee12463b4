"""IP anonymisation (agent/hooks/anonymize.py, ``--anonymize netblock``): the function, and an
offline run where no full address leaves the process: not in the recording, the per-flow
pcap files, their names, the logs or --stats-json."""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.hooks.anonymize import anonymizer, netblock
from agent.model import Segment
from agent.sinks.flow_pcap import LINKTYPE_RAW, ip_packets
from tests.unit.flow_pcap_util import conversation, read_pcap


def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


@pytest.mark.parametrize(("given", "kept"), [
    ("192.0.2.77", "192.0.2.0"),
    ("10.1.2.255", "10.1.2.0"),
    ("2001:db8:1:2:aa:bb:cc:dd", "2001:db8:1:2::"),
    ("2001:db8::1", "2001:db8::"),
    ("::ffff:198.51.100.9", "::ffff:198.51.100.0"),  # mapped: the IPv4 /24, not a /64
    ("::1", "::"),
])
def test_netblock_keeps_the_network(given: str, kept: str) -> None:
    out = netblock(_ip(given))
    assert out == _ip(kept) and len(out) == len(_ip(given))


def test_the_methods() -> None:
    assert anonymizer("none") is None
    assert anonymizer("netblock") is netblock
    assert netblock(b"\x01\x02") == bytes(2)  # never the address, whatever it is
    with pytest.raises(ValueError, match="unknown anonymisation"):
        anonymizer("hash")


HOSTS = {  # client → server; every full address here must vanish
    "192.0.2.77": "198.51.100.9",
    "2001:db8:1:2:aa:bb:cc:dd": "2001:db8:9:9::1",
    "::ffff:203.0.113.5": "::ffff:203.0.113.200",
}


def _write_capture(path: Path) -> None:
    """A raw-IP pcap of one connection per pair of HOSTS (the saver's own packets)."""
    segs: list[Segment] = []
    for i, (client, server) in enumerate(HOSTS.items()):
        segs += conversation(40000 + i, b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n",
                             client_ip=_ip(client), server_ip=_ip(server),
                             ts=1_700_000_000.0 + i)
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW)]
    for seg in segs:
        for pkt, wire in ip_packets(seg):
            us = round(seg.ts * 1e6)
            out.append(struct.pack("<IIII", us // 10**6, us % 10**6, len(pkt), wire) + pkt)
    path.write_bytes(b"".join(out))


def _leaks(text: str | bytes) -> list[str]:
    found = []
    for host in [*HOSTS, *HOSTS.values()]:
        packed = _ip(host)
        forms = {host, host.replace(":", "-"), str(ipaddress.ip_address(packed)),
                 str(ipaddress.ip_address(packed)).replace(":", "-")}
        if isinstance(text, bytes):
            mapped = ipaddress.ip_address(packed)
            v4 = mapped.ipv4_mapped if isinstance(mapped, ipaddress.IPv6Address) else None
            needles = (packed, v4.packed) if v4 is not None else (packed,)
            found += [host for needle in needles if needle in text]
        else:
            found += [host for form in forms if form in text]
    return found


def test_an_anonymised_offline_run_leaks_no_address(tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    cap, pcaps = tmp_path / "in.pcap", tmp_path / "flows"
    _write_capture(cap)
    assert sorted(set(_leaks(cap.read_bytes()))) == sorted([*HOSTS, *HOSTS.values()])
    pcaps.mkdir()
    rec, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    status = main(["--log-level", "debug", "--log-format", "json", "offline", str(cap),
                   "--port", "8080", "--anonymize", "netblock", "--both-directions",
                   "--record", str(rec), "--record-format", "jsonl",
                   "--flow-pcap-dir", str(pcaps), "--stats-json", str(stats),
                   "--stats-interval", "0.1"])
    out, err = capfd.readouterr()
    assert status == 0, err
    records = [json.loads(line) for line in rec.read_text().splitlines()]
    shown = {r[k] for r in records if "from" in r for k in ("from", "to")}
    assert shown == {"192.0.2.0:40000", "198.51.100.0:8080", "[2001:db8:1:2::]:40001",
                     "[2001:db8:9:9::]:8080", "[::ffff:203.0.113.0]:40002",
                     "[::ffff:203.0.113.0]:8080"}
    files = sorted(p.name for p in pcaps.iterdir())
    assert len(files) == 3 and "_192.0.2.0_40000_198.51.100.0_8080.pcap" in files[0]
    for name in files:
        packets = read_pcap(pcaps / name)[2]
        assert len(packets) > 5
        assert _leaks(b"".join(data[:40] for _, _, data in packets)) == [], name
    for what, text in (("recording", rec.read_text()), ("names", " ".join(files)),
                       ("stderr", err), ("stdout", out), ("stats", stats.read_text())):
        assert _leaks(text) == [], what
    assert '"memory budget"' in err or "memory budget" in err  # the logs were captured
