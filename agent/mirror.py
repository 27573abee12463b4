"""TrafficMirror: source → reassembler → hooks → forward and record sinks.

Single-threaded by design: the reassembler, the hooks and a ``write_func`` all run on the
thread that calls :meth:`TrafficMirror.run`, so a ``write_func`` never runs concurrently. Only
I/O runs elsewhere, behind bounded hand-overs: the forward sink's sockets, and (for live
sources) writing a recording to its file, so the capture loop never waits for the disk.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from agent import metrics
from agent.capture import LiveSource, PacketSource
from agent.config import MirrorConfig, WriteFunc
from agent.handoff import HasHandoffs
from agent.hooks import DEFAULT_FORWARD_HOOK, DEFAULT_RECORD_HOOK, Hook, HookPipeline
from agent.lograte import RateLimitedLog
from agent.model import Direction, DirectionEnd, FlowEnd, TrafficChunk
from agent.reassembly import Output, Reassembler
from agent.sinks.record import BackgroundWriter, RecordWriter, make_writer

if TYPE_CHECKING:
    from agent.sinks.forward import ForwardSink

__all__ = ["Cancelled", "TrafficMirror", "coalesce"]

log = structlog.get_logger("agent.mirror")


class Cancelled(Exception):
    """``run`` was cancelled (its ``cancel`` event was set); buffered data was flushed first."""


class _FuncWriter:
    """Adapts a ``write_func`` to the record writer interface; counts the calls that returned."""

    def __init__(self, fn: WriteFunc) -> None:
        self._fn = fn
        self.records = self.recorded_bytes = 0

    def write(self, chunk: TrafficChunk, data: bytes) -> None:
        self._fn(chunk, data)
        self.records += 1
        self.recorded_bytes += len(data)

    def stats(self) -> dict[str, int]:
        return {"records": self.records, "recorded_bytes": self.recorded_bytes}

    def flow_end(self, end: FlowEnd) -> None:
        pass

    def flush(self) -> None:
        pass


def _pipeline(hook: Hook | Sequence[Hook] | None, default: Hook) -> HookPipeline:
    if hook is None:
        return HookPipeline([default])
    if isinstance(hook, Sequence):
        return HookPipeline(hook)
    return HookPipeline([hook])


def coalesce(items: Output) -> Output:
    """Merge consecutive chunks of one flow and direction (no gap between them) into one.

    A chunk merges only into its flow's latest item, so the interleaving of the two
    directions of a connection, and every flow's own order, are kept. The reassembler's
    :meth:`~agent.reassembly.Reassembler.feed_batch` merges this way as it goes (no second
    pass over the chunks); this is its definition, checked against it in the tests.
    """
    result: Output = []
    latest: dict[int, int] = {}  # flow id → index in result of its latest item
    parts: dict[int, list[bytes]] = {}  # index → data pieces of a merged chunk
    for item in items:
        if type(item) is not TrafficChunk:  # a flow or direction end: nothing merges across
            latest.pop(item.flow_id, None)
            result.append(item)
            continue
        assert isinstance(item, TrafficChunk)
        idx = latest.get(item.flow_id)
        if idx is not None and not item.gap_bytes:
            prev = result[idx]
            assert isinstance(prev, TrafficChunk)
            if prev.from_addr == item.from_addr:
                p = parts.get(idx)
                if p is None:
                    p = parts[idx] = [prev.data]
                p.append(item.data)
                prev.seen_at = item.seen_at
                continue
        latest[item.flow_id] = len(result)
        result.append(item)
    for idx, p in parts.items():
        chunk = result[idx]
        assert isinstance(chunk, TrafficChunk)
        chunk.data = b"".join(p)
    return result


class TrafficMirror:
    """Mirrors the connections of the observed port(s) found in a packet source."""

    def __init__(self, config: MirrorConfig) -> None:
        self.config = config
        #: The observed ports: a new connection's direction is decided by them when it opens
        #: (:meth:`set_ports` replaces the set; connections already open keep theirs).
        self.ports: frozenset[int] = config.ports
        if not self.ports:
            log.warning("observed_port is 0: every direction is unknown and all traffic is "
                        "dropped by the default hooks; set the service port")

        def classify(src_port: int, dst_port: int) -> Direction:
            ports = self.ports
            if dst_port in ports:
                return Direction.TO_OBSERVED
            if src_port in ports:
                return Direction.FROM_OBSERVED
            return Direction.UNKNOWN

        untracked = frozenset() if config.track_responses else {Direction.FROM_OBSERVED}
        self.reassembler = Reassembler(config.reassembly, classify, config.anonymize,
                                       frozenset(untracked))
        self._fhook = _pipeline(config.forward_hook, DEFAULT_FORWARD_HOOK)
        self._rhook = _pipeline(config.record_hook, DEFAULT_RECORD_HOOK)
        self._writer: RecordWriter | _FuncWriter | BackgroundWriter | None = None
        if config.write_func is not None:
            self._writer = _FuncWriter(config.write_func)
        elif config.writer is not None:
            self._writer = make_writer(config.writer, config.record_format)
            if config.record_in_background:
                self._writer = BackgroundWriter(self._writer, config.budget.record_queue)
        self._forward: ForwardSink | None = None  # made by run(): asyncio loads only if used
        self._aware = self._fhook.flow_aware or self._rhook.flow_aware
        self._last: dict[int, dict[str, TrafficChunk]] = {}
        # Flows whose client finished before the flow ended → the address it sent from.
        self._forward_done: dict[int, str] = {}
        self.counters: Counter[str] = Counter()
        self._source: PacketSource | None = None
        self._limit_log = RateLimitedLog(log)  # one line per reason per 10 s, not per flow
        #: The one registry of this mirror's metrics, collected from the stages on demand.
        self.metrics = metrics.new_registry(self.stage_stats)

    def set_ports(self, ports: frozenset[int]) -> None:
        """Observe ``ports`` from now on (any thread: one reference is replaced). Connections
        already open keep the direction they were given."""
        self.ports = frozenset(ports)

    # ---------------------------------------------------------------- running

    def run(self, source: PacketSource | None, cancel: threading.Event | None = None,
            stats_interval: float = 0.0) -> None:
        """Mirror everything ``source`` yields until it ends (or ``cancel`` is set).

        With ``stats_interval`` > 0, every metric is logged ("stats", names as in
        :meth:`stats`) that often, so a long-running agent shows its progress and losses
        without stopping.

        The source is always closed. On cancellation (``cancel`` set, or KeyboardInterrupt)
        buffered data is flushed through hooks and sinks first, then :class:`Cancelled` (or the
        interrupt) propagates. Raises the first error from a hook, a write or closing the
        source.
        """
        if source is None:
            raise ValueError("packet source is None")
        self._source = source
        if self.config.target_addr and self._forward is None:
            from agent.sinks.forward import ForwardSink

            self._forward = ForwardSink(self.config.target_addr, self.config.dial,
                                        self.config.forward)
        live = isinstance(source, LiveSource)
        reasm = self.reassembler
        error: BaseException | None = None
        next_advance = 0.0
        next_report = time.monotonic() + stats_interval if stats_interval > 0 else float("inf")
        try:
            for batch in source.batches():
                if cancel is not None and cancel.is_set():
                    raise Cancelled("mirror cancelled")
                if time.monotonic() >= next_report:
                    log.info("stats", **self.stats())
                    next_report = time.monotonic() + stats_interval
                out: Output = []
                if batch:
                    reasm.feed_batch(batch, out)  # chunks merged: see coalesce()
                if live:
                    # Wall-clock time passes even under load: idle flows, timed-out holes.
                    now = time.time()
                    if not batch or now >= next_advance:
                        reasm.advance(now, out)
                        next_advance = now + 0.1
                if out:
                    self._dispatch(out)
                if self._forward is not None:
                    self._forward.commit()
            self._flush()
        except (Cancelled, KeyboardInterrupt) as e:
            error = e
            self._drain(source)
            self._flush()
            raise
        except BaseException as e:
            error = e
            raise
        finally:
            self._finish(source, error)

    def _drain(self, source: PacketSource) -> None:
        """Take what a live source still holds."""
        if not isinstance(source, LiveSource):
            return
        out: Output = []
        self.reassembler.feed_batch(source.drain(), out)
        self._dispatch(out)

    def _flush(self) -> None:
        out: Output = []
        self.reassembler.flush(out)
        self._dispatch(out)

    def _finish(self, source: PacketSource, error: BaseException | None) -> None:
        """Close the source and the sinks; raise the first error if none is in flight."""
        errors: list[BaseException] = []
        for step in (source.close, self._close_forward, self._flush_writer):
            try:
                step()
            except Exception as e:
                errors.append(e)
        if errors and error is None:
            raise errors[0]

    def stop_waiting(self) -> None:
        """Stop waiting for the shadow at the end of :meth:`run` (callable from a signal
        handler); what it had not taken is dropped and counted. No-op without a target."""
        if self._forward is not None:
            self._forward.stop_waiting()

    def _close_forward(self) -> None:
        if self._forward is not None:
            self._forward.close()

    def _flush_writer(self) -> None:
        """Flush the recording. A background writer is closed too (its thread stopped and
        joined; the next run starts it again), so nothing touches the file after ``run``."""
        if isinstance(self._writer, BackgroundWriter):
            self._writer.close()
        elif self._writer is not None:
            self._writer.flush()

    # ---------------------------------------------------------------- per chunk

    def _dispatch(self, items: Output) -> None:
        fwd = self._forward
        fhook = self._fhook
        rhook = self._rhook
        writer = self._writer
        aware = self._aware
        chunks = 0
        try:
            for item in items:
                if type(item) is not TrafficChunk:
                    if isinstance(item, FlowEnd):
                        self._end_flow(item)
                    elif isinstance(item, DirectionEnd):
                        self._end_direction(item)
                    continue
                assert isinstance(item, TrafficChunk)
                chunk = item
                chunks += 1
                if aware:
                    self._last.setdefault(chunk.flow_id, {})[chunk.from_addr] = chunk
                if fwd is not None:
                    copy = chunk.with_data(chunk.data)  # a hook may change its chunk in place
                    data, keep = fhook.handle(copy)
                    if not keep:
                        self.counters["forward_hook_dropped_bytes"] += len(chunk.data)
                    elif data:
                        self._send_forward(chunk.flow_id, data, chunk.gap_bytes)
                data, keep = rhook.handle(chunk)
                if not keep:
                    self.counters["record_hook_dropped_bytes"] += len(chunk.data)
                elif data and writer is not None:
                    writer.write(chunk, data)
        finally:
            self.counters["chunks"] += chunks

    def _send_forward(self, flow_id: int, data: bytes, gap: int = 0) -> None:
        """Forward ``data``, unless the flow's client already finished (then count it)."""
        if flow_id in self._forward_done:
            self.counters["mirror_forward_late_bytes"] += len(data)
        elif self._forward is not None and data:
            self._forward.send(flow_id, data, gap)

    def _end_direction(self, end: DirectionEnd) -> None:
        """The client finished (FIN reached, every byte before it delivered): end the shadow
        connection now. The service's FIN may never be seen (XDP captures ingress only)."""
        if self._forward is None or end.direction is not Direction.TO_OBSERVED:
            return
        last = self._last.get(end.flow_id, {}).get(end.from_addr) if self._aware else None
        if last is not None:
            self._send_forward(end.flow_id, self._fhook.flow_end(last))
        self._forward.end(end.flow_id)
        self._forward_done[end.flow_id] = end.from_addr

    def _end_flow(self, end: FlowEnd) -> None:
        last = self._last.pop(end.flow_id, None) if self._aware else None
        finished = self._forward_done.get(end.flow_id)
        for chunk in (last or {}).values():
            if self._forward is not None and chunk.from_addr != finished:
                self._send_forward(chunk.flow_id, self._fhook.flow_end(chunk))
            tail = self._rhook.flow_end(chunk)
            if tail and self._writer is not None:
                self._writer.write(chunk.with_data(tail), tail)
        if self._forward is not None:
            self._forward_done.pop(end.flow_id, None)
            self._forward.end(end.flow_id)
        if self._writer is not None:
            self._writer.flow_end(end)
        if end.reason in ("evicted", "lifetime"):
            self._limit_log.info("flow ended by a limit", end.reason, flow_id=end.flow_id,
                                 reason=end.reason)

    # ---------------------------------------------------------------- stats

    def stage_stats(self) -> dict[str, dict[str, int]]:
        """Every stage's own counters, flat, by stage: what :attr:`metrics` collects."""
        out: dict[str, dict[str, int]] = {}
        if self._source is not None:
            out["source"] = dict(self._source.stats())
        out["reassembly"] = self.reassembler.stats.as_dict()
        out["budget"] = self.config.budget.as_dict()
        out["handoff"] = {f"{key}:{h.name}": value
                          for stage in (self._source, self._writer, self._forward)
                          if isinstance(stage, HasHandoffs) for h in stage.handoffs()
                          for key, value in (("queued_bytes", h.queued_bytes),
                                             ("peak_queued_bytes", h.peak_queued_bytes),
                                             ("items", h.items))}
        out["mirror"] = dict(self.counters)
        if self._forward is not None:
            out["forward"] = dict(self._forward.stats)
        if self._writer is not None:  # what the writer wrote, dropped and failed to write
            out["record"] = dict(self._writer.stats())
        return out

    def stats(self) -> dict[str, float]:
        """Every metric of :attr:`metrics` now, Prometheus-style names with labels
        (:func:`agent.metrics.snapshot`): the summary, ``--stats-json`` and the "stats" log."""
        return metrics.snapshot(self.metrics)
