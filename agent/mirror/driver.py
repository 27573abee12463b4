"""TrafficMirror: source → :class:`~agent.mirror.step.MirrorStep` → forward and record sinks.

The step (reassembler, hooks, per-flow bookkeeping) decides; this driver does: it runs the
loop (batches, the clock, the periodic stats line, cancellation), creates the sinks, and
executes the step's commands against them, in order.

Single-threaded by design: the step, the hooks and a ``write_func`` all run on the thread
that calls :meth:`TrafficMirror.run`, so a ``write_func`` never runs concurrently. Only I/O
runs elsewhere, behind bounded hand-overs: the forward sink's sockets, and (for live sources)
writing a recording to its file, so the capture loop never waits for the disk.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from agent import metrics
from agent.hooks import hook_stats
from agent.mirror.config import MirrorConfig, WriteFunc
from agent.mirror.handoff import HasHandoffs
from agent.mirror.lograte import RateLimitedLog
from agent.mirror.memory_guard import GuardThread, MemoryGuard, PipelineActions, Thresholds
from agent.mirror.step import (
    Commands,
    EndForward,
    FlowCut,
    Forward,
    MirrorStep,
    Packets,
    PacketsEnd,
    Record,
    RecordFlowEnd,
    coalesce,
)
from agent.model import FlowEnd, Segment, TrafficChunk
from agent.reassembly import Reassembler
from agent.sinks.nats import NatsRecorder, NatsTarget
from agent.sinks.record import BackgroundWriter, FileWriter, RecordWriter, make_writer
from agent.sources import LiveSource, PacketSource

if TYPE_CHECKING:
    from agent.sinks.flow_pcap import FlowPcapSaver
    from agent.sinks.forward import ForwardSink
    from agent.sinks.request_forward import RequestForwardSink

__all__ = ["Cancelled", "TrafficMirror", "coalesce"]

log = structlog.get_logger("agent.mirror.driver")

#: Seconds between two ``advance`` calls while a live source keeps data coming.
_ADVANCE_EVERY = 0.1


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


class _Every:
    """A timer: :meth:`due` is True once ``interval`` seconds passed since it last was
    (first at ``first``); never if ``interval`` is not positive."""

    __slots__ = ("_interval", "_next")

    def __init__(self, interval: float, first: float) -> None:
        self._interval = interval
        self._next = first if interval > 0 else math.inf

    def due(self, now: float, force: bool = False) -> bool:
        if now < self._next and not force:
            return False
        self._next = now + self._interval
        return True


class TrafficMirror:
    """Mirrors the connections of the observed port(s) found in a packet source."""

    def __init__(self, config: MirrorConfig) -> None:
        self.config = config
        #: The sans-I/O step: reassembler, hooks, per-flow state; makes the commands.
        self.step = MirrorStep(config)
        if not self.step.ports:
            log.warning("observed_port is 0: every direction is unknown and all traffic is "
                        "dropped by the default hooks; set the service port")
        self._writer: RecordWriter | _FuncWriter | BackgroundWriter | NatsRecorder | None = None
        if config.write_func is not None:
            self._writer = _FuncWriter(config.write_func)
        elif isinstance(config.writer, NatsTarget):  # --record nats://: a thread of its own
            self._writer = NatsRecorder(config.writer, config.budget.record_queue,
                                        live=config.record_in_background)
        elif config.writer is not None:
            self._writer = make_writer(config.writer, config.record_format)
            if config.record_in_background:
                self._writer = BackgroundWriter(self._writer, config.budget.record_queue)
        # Made by run() (asyncio loads only if used), by config.forward.mode.
        self._forward: ForwardSink | RequestForwardSink | None = None
        self._saver = self._flow_pcap()
        self._source: PacketSource | None = None
        self._limit_log = RateLimitedLog(log)  # one line per reason per 10 s, not per flow
        self._guard_limit: int | None = None
        #: The memory guard of the latest run (see :meth:`guard_memory`), or None.
        self.guard: GuardThread | None = None
        #: The one registry of this mirror's metrics, collected from the stages on demand.
        self.metrics = metrics.new_registry(self.stage_stats)

    def _flow_pcap(self) -> FlowPcapSaver | None:
        """The per-flow pcap saver ``config.flow_pcap`` asks for (the step taps for it)."""
        if self.config.flow_pcap is None:
            return None
        from agent.sinks.flow_pcap import FlowPcapSaver

        return FlowPcapSaver(self.config.flow_pcap, lambda: self.step.ports,
                             self.config.anonymize)

    @property
    def reassembler(self) -> Reassembler:
        return self.step.reassembler

    @property
    def ports(self) -> frozenset[int]:
        """The observed ports (see :meth:`set_ports`)."""
        return self.step.ports

    @property
    def counters(self) -> Counter[str]:
        """The ``mirror`` stage's counters (the step's)."""
        return self.step.counters

    def guard_memory(self, limit: int | None = None) -> None:
        """Have :meth:`run` hold this process's resident memory under ``limit`` (default:
        the budget's) with a memory guard (:mod:`agent.mirror.memory_guard`): near it, new
        connections are refused, the native ring drains pause and queued data is dropped,
        each counted (``memory``)."""
        self._guard_limit = limit or self.config.budget.limit

    def _start_guard(self) -> None:
        if self._guard_limit is None:
            return
        actions = PipelineActions(self.reassembler.refusals, self._writer,
                                  lambda: self._forward)
        self.guard = GuardThread(MemoryGuard(Thresholds.of(self._guard_limit)), actions)
        self.guard.start()

    def set_ports(self, ports: frozenset[int]) -> None:
        """Observe ``ports`` from now on (any thread: one reference is replaced). Connections
        already open keep the direction they were given."""
        self.step.set_ports(ports)

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
        self._open_forward()
        error: BaseException | None = None
        try:
            self._start_guard()
            self._loop(source, cancel, stats_interval)
            self._step((), flush=True)
        except (Cancelled, KeyboardInterrupt) as e:
            error = e
            self._step(source.drain() if isinstance(source, LiveSource) else (), flush=True)
            raise
        except BaseException as e:
            error = e
            raise
        finally:
            self._finish(source, error)

    def _open_forward(self) -> None:
        """The forward sink of ``config.forward.mode``: one shadow connection per captured
        connection, or each HTTP/1.x request on a pool of keep-alive connections."""
        if self.config.target_addr and self._forward is None:
            if self.config.forward.mode == "request":
                from agent.sinks.request_forward import RequestForwardSink

                self._forward = RequestForwardSink(self.config.target_addr, self.config.dial,
                                                   self.config.forward)
                return
            from agent.sinks.forward import ForwardSink

            self._forward = ForwardSink(self.config.target_addr, self.config.dial,
                                        self.config.forward)

    def _loop(self, source: PacketSource, cancel: threading.Event | None,
              stats_interval: float) -> None:
        """Step through every batch until the source ends; a live source's wall-clock time
        passes too (idle flows, timed-out holes), even under load."""
        live = isinstance(source, LiveSource)
        report = _Every(stats_interval, time.monotonic() + stats_interval)
        ticks = _Every(_ADVANCE_EVERY, 0.0)
        for batch in source.batches():
            if cancel is not None and cancel.is_set():
                raise Cancelled("mirror cancelled")
            if report.due(time.monotonic()):
                log.info("stats", **self.stats())
            advance_to = None
            if live and ticks.due(now := time.time(), force=not batch):
                advance_to = now
            self._step(batch, advance_to)
            if self._forward is not None:
                self._forward.commit()

    def _step(self, batch: Sequence[Segment], now: float | None = None,
              flush: bool = False) -> None:
        """Feed ``batch``, let time pass to ``now`` (if given), end every flow (if ``flush``),
        and execute the commands that made: those made before a hook raised too."""
        cmds: Commands = []
        step = self.step
        try:
            if batch:
                step.feed(batch, cmds)
            if now is not None:
                step.advance(now, cmds)
            if flush:
                step.flush(cmds)
        finally:
            self._execute(cmds)

    def _execute(self, cmds: Commands) -> None:
        """Execute the step's commands in order (their contracts: :mod:`agent.mirror.step`)."""
        fwd = self._forward
        writer = self._writer
        for cmd in cmds:
            if type(cmd) is Record:  # the common cases first
                assert writer is not None
                writer.write(cmd.chunk, cmd.data)
            elif type(cmd) is Forward:
                assert fwd is not None
                fwd.send(cmd.flow_id, cmd.data, cmd.gap)
            elif type(cmd) is EndForward:
                assert fwd is not None
                fwd.end(cmd.flow_id, cmd.after_service)
            elif type(cmd) is RecordFlowEnd:
                assert writer is not None
                writer.flow_end(cmd.end)
            elif type(cmd) is Packets:
                assert self._saver is not None
                self._saver.packets(cmd.segments, cmd.flow_ids)
            elif type(cmd) is PacketsEnd:
                assert self._saver is not None
                self._saver.flow_end(cmd.flow_id)
            elif type(cmd) is FlowCut:
                self._limit_log.info("flow ended by a limit", cmd.end.reason,
                                     flow_id=cmd.end.flow_id, reason=cmd.end.reason)

    def _finish(self, source: PacketSource, error: BaseException | None) -> None:
        """Close the source and the sinks; raise the first error if none is in flight."""
        errors: list[BaseException] = []
        if self.guard is not None:
            self.guard.stop()  # intake resumes: the source's last bytes are drained
        for close in (source.close, self._close_forward, self._flush_writer,
                      self._close_saver):
            try:
                close()
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

    def _close_saver(self) -> None:
        if self._saver is not None:
            self._saver.close()

    def _flush_writer(self) -> None:
        """Flush the recording. A background writer or NATS recorder is closed too (its
        thread stopped and joined; the next run starts it again), so nothing touches the file
        after ``run`` and the summary counts every record (and every connection still in
        flight as dropped, ``shutdown``)."""
        if isinstance(self._writer, BackgroundWriter | NatsRecorder | FileWriter):
            self._writer.close()
        elif self._writer is not None:
            self._writer.flush()

    # ---------------------------------------------------------------- stats

    def stage_stats(self) -> dict[str, dict[str, int]]:
        """Every stage's own counters, flat, by stage: what :attr:`metrics` collects."""
        out: dict[str, dict[str, int]] = {}
        if self._source is not None:
            out["source"] = dict(self._source.stats())
        out["reassembly"] = self.reassembler.stats.as_dict()
        out["budget"] = self.config.budget.as_dict()
        if self.guard is not None:
            out["memory"] = self.guard.stats()
        out["handoff"] = {f"{key}:{h.name}": value
                          for stage in (self._source, self._writer, self._forward, self._saver)
                          if isinstance(stage, HasHandoffs) for h in stage.handoffs()
                          for key, value in (("queued_bytes", h.queued_bytes),
                                             ("peak_queued_bytes", h.peak_queued_bytes),
                                             ("items", h.items))}
        out["mirror"] = {**self.counters,  # and the counters of hooks that keep some
                         **hook_stats(self.config.forward_hook, self.config.record_hook)}
        if self._forward is not None:
            out["forward"] = dict(self._forward.stats)
        if self._writer is not None:  # what the writer wrote, dropped and failed to write
            out["record"] = dict(self._writer.stats())
        if self._saver is not None:
            out["flowpcap"] = self._saver.stats()
        return out

    def stats(self) -> dict[str, float]:
        """Every metric of :attr:`metrics` now, Prometheus-style names with labels
        (:func:`agent.metrics.snapshot`): the summary, ``--stats-json`` and the "stats" log."""
        return metrics.snapshot(self.metrics)
