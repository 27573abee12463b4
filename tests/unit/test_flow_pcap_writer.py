"""Per-flow pcap files are written on a thread of their own (agent/sinks/flow_pcap_files.py):
a disk that does not answer never holds the capture thread; when the bounded queue is full
whole flows are dropped and counted; closing (end of input, SIGTERM) writes everything queued.

The "disk" here is the file object itself: ``os.fdopen`` is wrapped so that every write waits
at a gate the test opens; no timing is asserted, only what happens while the gate is shut.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.summary import degradation
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import Cancelled, TrafficMirror
from agent.sinks.flow_pcap import FlowPcapConfig, FlowPcapSaver
from tests.unit.flow_pcap_util import ListSource, conversation, read_pcap

PORTS = frozenset({8080})
DROPPED = 'mirror_agent_flowpcap_packets_dropped_total{{reason="{}"}}'
#: Seconds a stuck write waits at most (so a broken test ends instead of hanging), and a
#: capture thread may take to do a few hundred calls that never touch the disk.
GATE_TIMEOUT = 30.0
CAPTURE_TIMEOUT = 10.0


class StuckDisk:
    """Files whose every write waits until :attr:`gate` is set (``entered``: one has begun)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.writes = 0

    def fdopen(self, fd: int, mode: str = "r", buffering: int = -1,
               **_: Any) -> io.RawIOBase | io.BufferedWriter:
        assert "w" in mode
        raw = _GatedFile(fd, self)
        return raw if buffering == 0 else io.BufferedWriter(raw, max(buffering, 1))


class _GatedFile(io.FileIO):
    def __init__(self, fd: int, disk: StuckDisk) -> None:
        super().__init__(fd, "wb")
        self._disk = disk

    def write(self, b: Any) -> int:
        self._disk.entered.set()
        self._disk.gate.wait(GATE_TIMEOUT)
        self._disk.writes += 1
        return super().write(b)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[StuckDisk]:
    d = StuckDisk()
    monkeypatch.setattr(os, "fdopen", d.fdopen)
    yield d
    d.gate.set()  # never leave a writer thread stuck behind


def flows(n: int, size: int = 200) -> list[list[Any]]:
    """``n`` whole connections (handshake, request, response, FINs), one client port each."""
    return [conversation(40000 + i, b"Q" * size, b"A" * size, ts=1_700_000_000.0 + i)
            for i in range(n)]


def feed(saver: FlowPcapSaver, conns: list[list[Any]]) -> Callable[[], None]:
    """What the capture thread does: each connection's packets (flow id i+1), then its end."""
    def run() -> None:
        for i, segs in enumerate(conns):
            saver.packets(segs, [i + 1] * len(segs))
            saver.flow_end(i + 1)
    return run


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("gz", [False, True])
def test_a_stuck_disk_never_holds_the_capture_thread(tmp_path: Path, disk: StuckDisk,
                                                     gz: bool) -> None:
    conns = flows(20)
    saver = FlowPcapSaver(FlowPcapConfig(tmp_path, gzip=gz, live=True), lambda: PORTS)
    capture = in_thread(feed(saver, conns))
    assert disk.entered.wait(CAPTURE_TIMEOUT), "nothing was ever written"
    capture.join(CAPTURE_TIMEOUT)  # a write is stuck now; the capture thread must go on
    assert not capture.is_alive(), "the capture thread waits for the disk"
    assert disk.writes == 0 and not disk.gate.is_set()
    disk.gate.set()
    saver.close()
    files = sorted(tmp_path.iterdir())
    assert [len(read_pcap(f)[2]) for f in files] == [len(s) for s in conns]
    stats = saver.stats()
    assert stats["files"] == stats["files_completed"] == 20 and stats["open_files"] == 0


def test_a_full_queue_drops_whole_flows_counted_and_the_run_is_not_degraded(
        tmp_path: Path, disk: StuckDisk) -> None:
    conns = flows(30, size=3000)
    batches = [s for c in conns for s in (c[:4], c[4:])]  # each flow in two batches
    config = FlowPcapConfig(tmp_path, queue_bytes=32 << 10, buffer_bytes=4096, live=True)
    m = TrafficMirror(MirrorConfig(observed_port=8080, flow_pcap=config))
    seen: list[int] = []

    def after() -> None:  # the disk answers again once the source has ended
        seen.append(1)
        if len(seen) == len(batches):
            disk.gate.set()

    m.run(ListSource(batches, after))
    stats = m.stats()
    queue_full = stats[DROPPED.format("queue_full")]
    later = stats[DROPPED.format("flow_dropped")]
    assert queue_full > 0 and later > 0  # pieces refused, and the rest of their flows
    saved = stats["mirror_agent_flowpcap_packets_total"]
    assert saved + queue_full + later == sum(map(len, conns))
    files = sorted(tmp_path.iterdir())
    whole = [f for f in files if len(read_pcap(f)[2]) == len(conns[0])]
    assert len(whole) == stats["mirror_agent_flowpcap_files_completed_total"] < len(conns)
    assert sum(len(read_pcap(f)[2]) for f in files) == saved  # each file: a flow's start
    assert degradation(stats) == []  # a lost flow pcap never makes the run exit 3


def test_a_batch_larger_than_the_queue_is_handed_over_in_pieces(tmp_path: Path,
                                                                 disk: StuckDisk) -> None:
    c = conversation(40000, b"Q" * 1400 * 2000, b"A", pieces=2000)  # 2.8 MB in one batch
    saver = FlowPcapSaver(FlowPcapConfig(tmp_path, queue_bytes=1 << 20, live=True),
                          lambda: PORTS)
    saver.packets(c, [1] * len(c))
    saver.flow_end(1)
    queued = saver.handoffs()[0]
    assert queued.items > 1 and 0 < queued.queued_bytes <= 1 << 20
    disk.gate.set()
    saver.close()
    stats = saver.stats()
    [f] = tmp_path.iterdir()
    saved = len(read_pcap(f)[2])
    assert (1 << 20) - 70_000 < stats["written_bytes"] <= 1 << 20  # the queue, filled
    assert saved == stats["packets"] < len(c)
    assert saved + stats["packets_dropped_queue_full"] + stats[
        "packets_dropped_flow_dropped"] == len(c)
    assert stats["files_completed"] == 0  # closed at its end, but not whole


def test_offline_the_capture_thread_waits_for_room_and_nothing_is_lost(
        tmp_path: Path, disk: StuckDisk) -> None:
    conns = flows(30, size=3000)
    config = FlowPcapConfig(tmp_path, queue_bytes=16 << 10, buffer_bytes=4096)  # not live
    saver = FlowPcapSaver(config, lambda: PORTS)
    capture = in_thread(feed(saver, conns))
    for _ in range(int(CAPTURE_TIMEOUT / 0.01)):  # until the capture thread waits for room
        if saver.handoffs()[0].pauses:
            break
        capture.join(0.01)
    assert saver.handoffs()[0].pauses == 1 and capture.is_alive()
    disk.gate.set()
    capture.join(CAPTURE_TIMEOUT)
    saver.close()
    stats = saver.stats()
    assert stats["packets_dropped_queue_full"] == stats["packets_dropped_flow_dropped"] == 0
    files = sorted(tmp_path.iterdir())
    assert [len(read_pcap(f)[2]) for f in files] == [len(c) for c in conns]
    assert stats["files_completed"] == 30


def test_sigterm_writes_every_packet_handed_over(tmp_path: Path, disk: StuckDisk) -> None:
    conns = flows(10)
    batches = [[c[k] for c in conns if k < len(c)] for k in range(4)]  # mid-connection
    cancel = threading.Event()
    config = FlowPcapConfig(tmp_path, live=True)
    m = TrafficMirror(MirrorConfig(observed_port=8080, flow_pcap=config))
    seen: list[int] = []

    def after() -> None:  # the signal handler's cancel, once two batches went by
        seen.append(1)
        if len(seen) == 2:
            cancel.set()
            disk.gate.set()

    with pytest.raises(Cancelled):
        m.run(ListSource(batches, after), cancel)
    files = sorted(tmp_path.iterdir())
    assert [len(read_pcap(f)[2]) for f in files] == [2] * 10  # both batches, whole records
    stats = m.stage_stats()["flowpcap"]
    assert stats["files_completed"] == 10 and stats["open_files"] == 0


def test_a_bug_on_the_writer_thread_reaches_the_capture_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.sinks import flow_pcap_files

    def broken(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(flow_pcap_files._Files, "apply", broken)
    saver = FlowPcapSaver(FlowPcapConfig(tmp_path), lambda: PORTS)
    [c] = flows(1)
    saver.packets(c, [1] * len(c))
    with pytest.raises(RuntimeError, match="a bug"):
        saver.close()
    saver.close()  # raised once; closing again does nothing more
