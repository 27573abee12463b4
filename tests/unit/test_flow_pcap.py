"""Per-flow pcap files (agent/sinks/flow_pcap.py, ``--flow-pcap-dir``): one file per
connection that tshark follows to the connection's bytes, snaplen, gzip, the open-file
bound, names that never overwrite, and faults that stay local."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from pathlib import Path

import pytest

from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.model import ACK, RST, SYN, Segment
from agent.sinks.flow_pcap import LINKTYPE_RAW, FlowPcapConfig, flow_name, ip_packets
from agent.sources.files.pcapfile import PcapFileSource
from tests.unit.flow_pcap_util import (
    ListSource,
    conversation,
    follow,
    needs_tshark,
    read_pcap,
)

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
V6_CLIENT = ipaddress.IPv6Address("2001:db8:1:2:aa:bb:cc:dd").packed


def _mirror(directory: Path, **kw: object) -> TrafficMirror:
    return TrafficMirror(MirrorConfig(observed_port=8080,
                                      flow_pcap=FlowPcapConfig(directory, **kw)))  # type: ignore[arg-type]


def _files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


@needs_tshark
@pytest.mark.parametrize("gz", [False, True])
def test_one_file_per_connection_that_tshark_follows(tmp_path: Path, gz: bool) -> None:
    m = _mirror(tmp_path, gzip=gz)
    m.run(PcapFileSource([DEMO]))
    files = _files(tmp_path)
    assert len(files) == 7  # demo.pcap: seven connections to 8080
    stats = m.stage_stats()["flowpcap"]
    assert stats["files"] == stats["files_completed"] == 7 and stats["open_files"] == 0
    for f in files[:3]:
        assert f.name.endswith(".pcap.gz" if gz else ".pcap")
        cport = re.fullmatch(r"\d{8}T\d{6}\.\d{6}_127\.0\.0\.1_(\d+)_127\.0\.0\.1_8080\.pcap"
                             r"(\.gz)?", f.name)
        assert cport is not None, f.name
        original = follow(DEMO, f"127.0.0.1:{cport.group(1)},127.0.0.1:8080")
        assert original[0] and original[1]
        assert follow(f) == original  # both directions, every byte
        _, linktype, packets = read_pcap(f)
        assert linktype == LINKTYPE_RAW and all(cap == orig for cap, orig, _ in packets)


@needs_tshark
def test_snaplen_keeps_the_headers_only(tmp_path: Path) -> None:
    m = _mirror(tmp_path, snaplen=60)
    m.run(PcapFileSource([DEMO]))
    cut = 0
    for f in _files(tmp_path):
        snaplen, _, packets = read_pcap(f)
        assert snaplen == 60
        assert all(cap <= 60 and len(data) == cap <= orig for cap, orig, data in packets)
        cut += sum(cap < orig for cap, orig, _ in packets)
        subprocess.run(["tshark", "-r", str(f)], check=True, capture_output=True)
    assert cut == m.stage_stats()["flowpcap"]["packets_truncated"] > 0


@needs_tshark
@pytest.mark.parametrize("gz", [False, True])
def test_open_files_stay_bounded_and_reopened_files_are_complete(tmp_path: Path,
                                                                   gz: bool) -> None:
    flows = [conversation(40000 + i, b"Q%03d" % i * 50, b"A%03d" % i * 80) for i in range(40)]
    batches = [[f[k] for f in flows if k < len(f)] for k in range(max(map(len, flows)))]
    seen: list[int] = []

    def count_fds() -> None:
        here = []
        for p in os.listdir("/proc/self/fd"):
            try:  # the writer thread may close a file between the listing and the look
                target = os.readlink(f"/proc/self/fd/{p}")
            except FileNotFoundError:
                continue
            if target.startswith(str(tmp_path)):
                here.append(p)
        seen.append(len(here))
        assert m._saver is not None and m._saver.open_files <= 3

    m = _mirror(tmp_path, gzip=gz, max_open=3)
    m.run(ListSource(batches, count_fds))
    assert seen and max(seen) <= 3
    stats = m.stage_stats()["flowpcap"]
    assert stats["files_reopened"] > 0 and stats["files_evicted"] > 0
    assert stats["open_files_peak"] == 3 and stats["files_completed"] == 40
    files = _files(tmp_path)
    assert len(files) == 40
    for f, segs in zip(files, flows, strict=True):  # names sort by time: the flows' order
        assert len(read_pcap(f)[2]) == len(segs)
    for i in (0, 39):
        assert follow(files[i]) == (b"Q%03d" % i * 50, b"A%03d" % i * 80)


def test_names_tell_time_client_server_and_tunnel() -> None:
    v4 = (bytes([192, 0, 2, 1]), 40000), (bytes([192, 0, 2, 2]), 8080)
    assert flow_name(1.5, *v4) == "19700101T000001.500000_192.0.2.1_40000_192.0.2.2_8080.pcap"
    v6 = (V6_CLIENT, 1), (ipaddress.IPv6Address("::ffff:198.51.100.9").packed, 2)
    assert flow_name(0, *v6, tunnel="vxlan:42/gre:7", gz=True) == (
        "19700101T000000.000000_2001-db8-1-2-aa-bb-cc-dd_1_--ffff-198.51.100.9_2_"
        "vxlan-42-gre-7.pcap.gz")


def test_the_client_comes_first_whoever_sent_first(tmp_path: Path) -> None:
    segs = conversation(40000, b"req", b"resp")
    m = _mirror(tmp_path)
    m.run(ListSource([segs[4:]]))  # picked up mid-stream: the server's data first
    [f] = _files(tmp_path)
    assert "_192.0.2.1_40000_192.0.2.2_8080.pcap" in f.name


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    segs = conversation(40000, b"req", b"resp")
    name = flow_name(segs[0].ts, (segs[0].src_ip, 40000), (segs[0].dst_ip, 8080))
    (tmp_path / name).write_bytes(b"keep me")
    _mirror(tmp_path).run(ListSource([segs]))
    assert (tmp_path / name).read_bytes() == b"keep me"
    numbered = tmp_path / name.replace(".pcap", ".1.pcap")
    assert len(read_pcap(numbered)[2]) == len(segs)


def test_a_reused_tuple_in_one_batch_makes_two_files(tmp_path: Path) -> None:
    first = conversation(40000, b"one", b"1")
    second = conversation(40000, b"two", b"2", ts=first[-1].ts + 1)
    second = [Segment(s.src_ip, s.src_port, s.dst_ip, s.dst_port, s.seq + 777, s.ack,
                      s.flags, s.payload, s.ts) for s in second]  # another ISN
    m = _mirror(tmp_path)
    m.run(ListSource([first + second]))
    files = _files(tmp_path)
    assert len(files) == 2
    assert [len(read_pcap(f)[2]) for f in files] == [len(first), len(second)]


def test_a_failing_directory_costs_its_flows_only(tmp_path: Path) -> None:
    segs = conversation(40000, b"req", b"resp")
    m = TrafficMirror(MirrorConfig(observed_port=8080, write_func=lambda c, d: None,
                                   flow_pcap=FlowPcapConfig(tmp_path / "gone")))
    m.run(ListSource([segs[:4], segs[4:]]))
    stats = m.stage_stats()["flowpcap"]
    assert stats["files_failed"] == 1 and stats["packets_lost"] == len(segs)
    assert m.stats()["mirror_agent_record_records_total"] > 0  # the rest went on


def test_packets_carry_the_segment() -> None:
    seg = Segment(V6_CLIENT, 40000, V6_CLIENT[:15] + b"\x09", 8080, 123, 456, ACK, b"x" * 70000,
                  1.0, window=321, lost=5)
    pieces = ip_packets(seg)
    assert len(pieces) == 2  # a GSO-sized payload: two packets
    assert [len(p) for p, _ in pieces] == [60 + 65495, 60 + 70000 - 65495]
    assert pieces[1][1] == len(pieces[1][0]) + 5  # the bytes not copied count as original
    syn = ip_packets(Segment(bytes(4), 1, bytes([1, 2, 3, 4]), 2, 9, 0, SYN, b"", 0.0))
    assert syn[0][0][33] == SYN and syn[0][0][12:16] == bytes(4)
    rst = ip_packets(Segment(bytes(4), 1, bytes(4), 2, 9, 0, RST, b"", 0.0),
                     lambda ip: b"\xff" * len(ip))
    assert rst[0][0][12:20] == b"\xff" * 8


@pytest.mark.parametrize(("args", "says"), [
    (["--flow-pcap-snaplen", "60"], "--flow-pcap-snaplen needs --flow-pcap-dir"),
    (["--flow-pcap-gzip"], "--flow-pcap-gzip needs --flow-pcap-dir"),
    (["--flow-pcap-dir", "DIR", "--flow-pcap-snaplen", "20"], "is not 0 (whole packets)"),
    (["--flow-pcap-dir", "DIR/missing"], "not an existing directory"),
    (["--anonymize", "hash"], "invalid choice"),
])
def test_bad_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          args: list[str], says: str) -> None:
    from agent.cli.commands import main

    args = [a.replace("DIR", str(tmp_path)) for a in args]
    assert main(["offline", str(DEMO), "--port", "8080", *args]) == 2
    assert says in capsys.readouterr().err


def test_the_budget_holds_the_files(tmp_path: Path) -> None:
    from agent.cli.configure import mirror_config
    from agent.cli.layers import parse_options
    from agent.mirror.budget import MIB, derive

    plain = derive(896 * MIB, cpus=2, flow_pcap="pcap")
    gz = derive(896 * MIB, cpus=2, flow_pcap="gzip")
    none = derive(896 * MIB, cpus=2)
    assert (none.flow_pcap, none.flow_pcap_files) == (0, 0)
    assert plain.flow_pcap_files == gz.flow_pcap_files == 64
    assert plain.flow_pcap == 64 * 128 * 1024 + plain.max_flows * 400
    assert none.record_queue > plain.record_queue > gz.record_queue  # taken from the pool
    assert derive(128 * MIB, cpus=1, transport="none", flow_pcap="gzip").flow_pcap_files == 9
    opts = parse_options(["offline", str(DEMO), "--port", "8080", "--memory-limit", "128MiB",
                          "--flow-pcap-dir", str(tmp_path), "--flow-pcap-gzip"])
    cfg = mirror_config(opts).flow_pcap
    assert cfg is not None and (cfg.max_open, cfg.gzip, cfg.snaplen) == (9, True, 0)
