"""Nothing silent, for recordings: every flow handed to the record sink ends completed (every
record of it, its end included, in the file) or dropped with one reason (queue_full, memory,
write_failed, shutdown), in flight until then, and ``connections == completed + dropped +
in_flight`` in every look at the stats from another thread and at the end. A flow counted
completed is exactly a flow whose records all read back from the file, whole and gap-free."""

from __future__ import annotations

import errno
import io
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent import metrics
from agent.cli.summary import degradation
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.nats.publisher import REASONS as NATS_REASONS
from agent.sinks.record import (
    FILE_REASONS,
    BackgroundWriter,
    FlowLedger,
    JsonLinesWriter,
    NativeReader,
    NativeWriter,
    make_writer,
)
from agent.sources.channel import ChannelSource
from tests.unit.segments import Conversation

CONNECTIONS = "mirror_agent_record_connections_total"
COMPLETED = "mirror_agent_record_connections_completed_total"
IN_FLIGHT = "mirror_agent_record_connections_in_flight"
DROPPED = "mirror_agent_record_connections_dropped_total"


class FlakyFile(io.RawIOBase):
    """A file-like (no file descriptor: one ``write`` per piece) that keeps what it was
    given, fails with ENOSPC once ``fail_after`` bytes are in it (nothing of the failing
    piece is kept), and is slow now and then, so a tiny queue in front of it fills."""

    def __init__(self, fail_after: int | None, seed: int) -> None:
        self.data = bytearray()
        self.fail_after = fail_after
        self._rng = random.Random(seed)

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        if self._rng.random() < 0.05:
            time.sleep(0.001)
        if self.fail_after is not None and len(self.data) + len(b) > self.fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data += b
        return len(b)

    def close(self) -> None:  # the recording closes a failed file: keep what it holds
        pass


def check_equation(s: dict[str, int], reasons: tuple[str, ...]) -> None:
    """One look at a sink's stats: the equation, every term sane."""
    dropped = sum(s[f"connections_dropped_{r}"] for r in reasons)
    assert s["connections_dropped"] == dropped
    assert s["connections"] == s["connections_completed"] + dropped + s[
        "connections_in_flight"]
    assert min(s["connections_completed"], dropped, s["connections_in_flight"]) >= 0


class Reader(threading.Thread):
    """Reads ``stats`` over and over from its own thread until stopped: every look must
    satisfy the equation, counters never go down, and no more connections than flows
    handed so far (``handed``, read after the look) are ever counted."""

    def __init__(self, stats: Callable[[], dict[str, int]], handed: Callable[[], int],
                 reasons: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        self._stats, self._handed, self._reasons = stats, handed, reasons
        self.stop = threading.Event()
        self.looks = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        last: dict[str, int] = {}
        rng = random.Random(0)
        try:
            while not self.stop.is_set():
                s = self._stats()
                check_equation(s, self._reasons)
                assert s["connections"] <= self._handed()
                for k in ("connections", "connections_completed", "connections_dropped"):
                    assert s[k] >= last.get(k, 0), k
                last = s
                self.looks += 1
                time.sleep(rng.random() * 0.0005)
        except BaseException as e:
            self.error = e


def whole_flows(raw: bytes, sent: dict[int, list[bytes]], ended: set[int]) -> set[int]:
    """Flows whose every chunk reads back, in order, gap-free, and whose end does too."""
    got: dict[int, list[bytes]] = {}
    gaps: set[int] = set()
    ends: set[int] = set()
    for r in NativeReader(io.BytesIO(raw)):
        if r.gap_bytes:
            gaps.add(r.flow_id)
        if r.kind == "end":
            ends.add(r.flow_id)
        else:
            got.setdefault(r.flow_id, []).append(r.data)
    return {f for f in ended if f in ends and f not in gaps and got.get(f, []) == sent[f]}


def chunk(flow: int, data: bytes) -> TrafficChunk:
    return TrafficChunk(data, f"192.0.2.1:{1024 + flow}", "198.51.100.1:80",
                        Direction.TO_OBSERVED, 1.0, flow)


@pytest.mark.parametrize("background", [True, False])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_recorded_flow_ends_completed_or_dropped_with_one_reason(
        background: bool, data: st.DataObject) -> None:
    fail_after = data.draw(st.none() | st.integers(0, 6000), label="fail_after")
    f = FlakyFile(fail_after, data.draw(st.integers(0, 2**16), label="seed"))
    inner = NativeWriter(f)  # type: ignore[arg-type]  # a binary file-like
    w: BackgroundWriter | NativeWriter = inner
    if background:
        w = BackgroundWriter(inner, max_bytes=data.draw(st.integers(0, 400) | st.just(1 << 20),
                                                           label="queue"))
    sent: dict[int, list[bytes]] = {}  # flow → the data of its chunks handed over
    ended: set[int] = set()
    open_flows: list[int] = []
    reader = Reader(w.stats, lambda: len(sent), FILE_REASONS)
    reader.start()
    try:
        for step in range(data.draw(st.integers(1, 120), label="steps")):
            op = data.draw(st.sampled_from(
                ["new", "write", "write", "write", "end", "shed", "flush", "look"]))
            if op == "new" or (op in ("write", "end") and not open_flows):
                flow = len(sent) + 1
                sent[flow] = []
                open_flows.append(flow)
                op = "write"
            else:
                flow = data.draw(st.sampled_from(open_flows)) if open_flows else 0
            if op == "write":
                payload = bytes([flow % 251]) * data.draw(st.integers(1, 200)) + \
                    step.to_bytes(2, "big")
                w.write(chunk(flow, payload), payload)
                sent[flow].append(payload)
            elif op == "end":
                open_flows.remove(flow)
                w.flow_end(FlowEnd(flow, "fin"))
                ended.add(flow)
            elif op == "shed" and isinstance(w, BackgroundWriter):
                w.shed = not w.shed
            elif op == "flush":
                w.flush()
            elif op == "look":
                check_equation(w.stats(), FILE_REASONS)
        w.close()
    finally:
        reader.stop.set()
        reader.join()
    assert reader.error is None, reader.error
    s = w.stats()
    check_equation(s, FILE_REASONS)
    for r in FILE_REASONS:  # what the examples covered (--hypothesis-show-statistics)
        if s[f"connections_dropped_{r}"]:
            event(f"dropped: {r}")
    event(f"looks from another thread: {'>10' if reader.looks > 10 else reader.looks}")
    assert s["connections_in_flight"] == 0
    assert s["connections"] == s["connections_completed"] + s["connections_dropped"] == len(
        sent)
    # completed: exactly the flows that read back whole; the rest were dropped
    assert s["connections_completed"] == len(whole_flows(bytes(f.data), sent, ended))
    # flows never ended are dropped (shutdown, unless a record of theirs was lost first)
    assert s["connections_dropped_shutdown"] <= len(sent) - len(ended)
    assert s["connections_dropped"] >= len(sent) - len(ended)
    # each reason is backed by the loss it stands for, and any drop degrades the run
    assert not s["connections_dropped_queue_full"] or s.get("record_dropped_records")
    assert not s["connections_dropped_memory"] or s.get("record_shed_records")
    assert not s["connections_dropped_write_failed"] or s.get("record_errors")
    snap = metrics.snapshot(metrics.new_registry(lambda: {"record": s}))
    assert snap[CONNECTIONS] == len(sent) and snap[IN_FLIGHT] == 0
    assert bool(degradation(snap)) == bool(s["connections_dropped"])


def test_flows_complete_only_once_written_and_an_unended_flow_is_dropped_at_close(
        tmp_path: Path) -> None:
    out = (tmp_path / "r.bin").open("wb")  # a file descriptor: records wait for a writev
    w = NativeWriter(out)
    w.write(chunk(1, b"a"), b"a")
    w.flow_end(FlowEnd(1, "fin"))
    w.write(chunk(2, b"b"), b"b")
    s = w.stats()  # buffered: not in the file yet
    assert (s["connections"], s["connections_completed"], s["connections_in_flight"]) == (
        2, 0, 2)
    w.flush()
    s = w.stats()
    assert (s["connections_completed"], s["connections_in_flight"]) == (1, 1)
    w.close()  # flow 2 never ended
    out.close()
    s = w.stats()
    assert (s["connections_completed"], s["connections_dropped_shutdown"],
            s["connections_in_flight"]) == (1, 1, 0)


def test_json_lines_and_pcapng_settle_ends_they_do_not_write() -> None:
    for w in (JsonLinesWriter(io.BytesIO()), make_writer(io.BytesIO(), "pcapng")):
        w.write(chunk(1, b"GET / HTTP/1.1\r\n\r\n"), b"GET / HTTP/1.1\r\n\r\n")
        w.flow_end(FlowEnd(1, "fin"))
        w.flow_end(FlowEnd(2, "rst"))  # a flow with nothing to show: completed too
        w.close()
        s = w.stats()
        assert (s["connections"], s["connections_completed"], s["connections_dropped"]) == (
            2, 2, 0), type(w).__name__


def test_a_ledger_settle_after_shutdown_is_ignored_and_a_late_record_is_a_new_flow() -> None:
    ledger = FlowLedger()
    ledger.hand(1)
    assert ledger.shutdown() == 1
    ledger.done(1, end=True)  # settled after the close: counted already
    ledger.hand(1)
    ledger.done(1, end=True)
    s = ledger.stats()
    assert (s["connections"], s["connections_completed"], s["connections_dropped_shutdown"],
            s["connections_in_flight"]) == (2, 1, 1, 0)


def test_every_drop_reason_is_a_declared_label() -> None:
    assert set(FILE_REASONS) | set(NATS_REASONS) == set(metrics.RECORD_DROP_REASONS)
    stats = {"record": {**FlowLedger(FILE_REASONS).stats(), **FlowLedger(NATS_REASONS).stats()}}
    assert metrics.undeclared(stats) == []


@pytest.mark.parametrize("background", [False, True])
def test_a_mirror_run_counts_its_recorded_connections(background: bool) -> None:
    src = ChannelSource()
    for i in range(5):
        c = Conversation(client=(bytes([192, 0, 2, 1]), 40000 + i))
        body = b"GET /%d HTTP/1.1\r\n\r\n" % i
        for seg in [*c.handshake(), c.seg(True, 0, body), *c.fins(len(body), 0)]:
            src.put(seg)
    src.end()
    mirror = TrafficMirror(MirrorConfig(observed_port=8080, writer=io.BytesIO(),
                                        record_in_background=background))
    mirror.run(src)
    snap = mirror.stats()
    assert snap[CONNECTIONS] == snap[COMPLETED] == 5
    assert snap[IN_FLIGHT] == 0 and metrics.total(snap, DROPPED) == 0
    assert degradation(snap) == []
