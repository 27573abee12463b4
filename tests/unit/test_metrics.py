"""The one metrics registry (agent/metrics.py): names, declarations, labels, the text format,
and the views (summary, --stats-json) rendered from it."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics
from agent.cli.summary import degradation, format_summary
from agent.decode import DecodeStats
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.sources.afpacket import AfPacketSource
from agent.sources.channel import ChannelSource
from agent.sources.ebpf import follow
from agent.sources.ebpf.layout import COUNTERS
from agent.sources.ebpf.source import EbpfSource
from agent.sources.files.pcapfile import PcapFileSource
from tests.unit.shadow import Shadow

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
NAME = re.compile(r"^mirror_agent_(budget|handoff|kernel|ring|drain|source|decode|reassembly|"
                  r"mirror|forward|record|flowpcap|memory)_[a-z0-9]+(_[a-z0-9]+)*$")


@pytest.fixture(scope="module")
def replayed() -> TrafficMirror:
    """demo.pcap replayed offline, forwarded to a loopback shadow and recorded."""
    shadow = Shadow()
    try:
        m = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=shadow.addr,
                                       writer=io.BytesIO(), record_in_background=True))
        m.run(PcapFileSource([DEMO]))
    finally:
        shadow.close()
    return m


def _ebpf_stats() -> dict[str, int]:
    """EbpfSource.stats() over stand-ins for its rings and program (no BPF needed)."""
    decoder = SimpleNamespace(events=1, coalesced=1, lost_samples=1, filtered=1, discarded=1,
                              malformed=1, no_slot=1)
    stub: Any = SimpleNamespace(
        _closed=False, _decoder=decoder, _geometry=SimpleNamespace(capacity=1),
        _ring=SimpleNamespace(peak_bytes=1),
        _drain=SimpleNamespace(gap_max=0.5, pauses=1, peak_bytes=1),
        _prog=SimpleNamespace(counters=lambda: {name: 1 for name, _ in COUNTERS}),
        _counter_error=False, _discarded=1,
        _follower=SimpleNamespace(stats=lambda: dict.fromkeys(follow.STATS, 1)))
    return EbpfSource.stats(stub)


def _afpacket_stats() -> dict[str, int]:
    decoder = SimpleNamespace(stats=DecodeStats())
    decoder.stats.skip("not_tcp")
    stub: Any = SimpleNamespace(_closed=True, _frames=1, _kernel_seen=1, _kernel_drops=1,
                                _truncated=1, _outgoing_lo=1, _other_iface=1, _decoder=decoder,
                                _decap=object(), _filtered=1)
    return AfPacketSource.stats(stub)


def test_every_key_a_stage_produces_is_declared(replayed: TrafficMirror) -> None:
    stages = replayed.stage_stats()
    assert set(stages) == {"source", "reassembly", "mirror", "forward", "record", "budget",
                           "handoff"}
    # Offline: the record writer writes in line and the forward hand-over is the one boundary.
    assert stages["handoff"]["items:forward"] > 0
    assert stages["forward"]["connections"] > 0 and stages["record"]["records"] > 0
    channel = ChannelSource()
    channel.put(b"\x00" * 10)  # a frame too short: skipped_truncated
    channel.end()
    list(channel.batches())
    sources = {"ebpf": _ebpf_stats(), "afpacket": _afpacket_stats(), "channel": channel.stats()}
    assert metrics.undeclared(stages) == []
    for name, st in sources.items():
        assert metrics.undeclared({"source": st}) == [], name


def test_an_undeclared_key_is_reported_and_still_rendered() -> None:
    stats = {"forward": {"connections": 1, "new_thing": 2}}
    assert metrics.undeclared(stats) == ["forward:new_thing"]
    assert metrics.undeclared({"forward": {"connections_dropped_bogus": 1}}) == [
        "forward:connections_dropped_bogus"]
    snap = metrics.snapshot(metrics.new_registry(lambda: stats))
    assert snap['mirror_agent_undeclared_stat{key="forward:new_thing"}'] == 2


def test_names_follow_the_pattern() -> None:
    for fam in metrics.FAMILIES:
        assert NAME.match(fam.name), fam.name
        assert fam.name.endswith("_total") == (fam.kind == "counter"), fam.name
        assert fam.help[:1].isupper(), fam.name
        assert "bytes" not in fam.name or fam.name.endswith(("_bytes", "_bytes_total")), fam.name
        if fam.label:
            assert fam.label in ("reason", "hook", "buffer", "handoff", "level"), fam.name
            assert fam.values or fam.open, fam.name
            assert not any(v in fam.name for v in fam.values), fam.name
    names = [f.name for f in metrics.FAMILIES]
    assert len(names) == len(set(names))


def test_kernel_metrics_come_from_the_header() -> None:
    skipped = metrics.family("mirror_agent_kernel_packets_skipped_total")
    assert set(skipped.values) == {n for n, h in COUNTERS if h.startswith("packets skipped")}
    assert "not_our_port" in skipped.values and "should be 0" in skipped.help
    for name, help_ in COUNTERS:
        hit = metrics.lookup("source", f"kernel_{name}")
        assert hit is not None, name
        assert help_.split(";")[0].split(": ", 1)[-1] in hit[0].help, name
    lost = metrics.family("mirror_agent_kernel_lost_bytes_total")
    assert lost.help.endswith("should be 0")


def test_reasons_are_labels(replayed: TrafficMirror) -> None:
    snap = replayed.stats()
    assert snap['mirror_agent_reassembly_flows_closed_total{reason="fin"}'] == 7
    assert snap['mirror_agent_forward_connections_dropped_total{reason="connect_failed"}'] == 0
    assert snap['mirror_agent_kernel_packets_skipped_total{reason="not_our_port"}'] == 0
    assert snap['mirror_agent_mirror_hook_dropped_bytes_total{hook="record"}'] > 0
    assert metrics.split_key('a_total{reason="x\\"y"}') == ("a_total", {"reason": 'x"y'})
    assert metrics.key("a_total", reason='x"y') == 'a_total{reason="x\\"y"}'


def test_declared_metrics_are_present_at_zero() -> None:
    snap = metrics.snapshot(metrics.new_registry(dict))
    for fam in metrics.FAMILIES:
        if not fam.label:
            assert snap[fam.name] == 0, fam.name
        for v in fam.values:
            assert snap[metrics.key(fam.name, **{fam.label: v})] == 0, fam.name
    assert not any(k.startswith("mirror_agent_undeclared") for k in snap)


def test_the_text_format_parses(replayed: TrafficMirror) -> None:
    text = metrics.render(replayed.metrics).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    declared = {f.name.removesuffix("_total"): f for f in metrics.FAMILIES}
    assert set(parsed) == set(declared)
    for name, fam in parsed.items():
        assert fam.type == declared[name].kind
        assert fam.documentation == declared[name].help
    frames = parsed["mirror_agent_source_frames"].samples
    assert [(s.name, s.value) for s in frames] == [("mirror_agent_source_frames_total", 474)]
    snap = replayed.stats()
    samples = {metrics.key(s.name, **s.labels): s.value for f in parsed.values()
               for s in f.samples}
    assert samples == snap


def test_scale_turns_milliseconds_into_seconds() -> None:
    snap = metrics.snapshot(metrics.new_registry(lambda: {"source": {"drain_gap_max_ms": 250}}))
    assert snap["mirror_agent_drain_gap_max_seconds"] == 0.25


def test_summary_is_rendered_from_the_registry(replayed: TrafficMirror) -> None:
    text = format_summary(replayed.stats())
    lines = {ln.split()[0]: ln for ln in text.splitlines()[1:]}
    assert text.startswith("mirror-agent summary:\n")
    assert list(lines) == ["source", "decode", "reassembly", "mirror", "forward", "record"]
    assert "frames=474" in lines["source"] and "frames_decoded=474" in lines["decode"]
    assert "flows_closed{fin}=7" in lines["reassembly"].split()
    assert "hook_dropped_bytes{record}=" in lines["mirror"]
    assert "connections=7" in lines["forward"].split()
    assert "records=" in lines["record"] and "_total" not in text
    assert degradation(replayed.stats()) == []
    # the kernel's line appears once it has something to say
    snap = {"mirror_agent_kernel_lost_bytes_total": 9, "mirror_agent_drain_gap_max_seconds": 0.25}
    lines = {ln.split()[0]: ln for ln in format_summary(snap).splitlines()[1:]}
    assert lines["kernel"].split()[1:] == ["lost_bytes=9"]
    assert lines["drain"].split()[1:] == ["gap_max_seconds=0.25"]


def test_degradation_reads_the_registry() -> None:
    stats = {"source": {"cut_short_files": 1},
             "forward": {"connections_dropped": 3, "connections_dropped_connect_failed": 2,
                         "connections_dropped_stalled": 1},
             "record": {"record_errors": 1, "record_dropped_records": 4}}
    snap = metrics.snapshot(metrics.new_registry(lambda: stats))
    assert degradation(snap) == [
        "1 capture file(s) cut short", "1 recording(s) failed",
        "recording dropped 4 record(s): the disk could not keep up",
        "forward sink dropped 3 shadow connection(s) (connect_failed=2, stalled=1)"]
