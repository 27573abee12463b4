"""The mirror's sans-I/O step: segments in, commands out.

:class:`MirrorStep` owns the reassembler, the forward and record hook pipelines and each
flow's bookkeeping. It has no threads, sockets, files, logs or clock (time comes from the
segments or :meth:`MirrorStep.advance`): what it decides comes out as the commands below, in
the order a driver (:class:`agent.mirror.driver.TrafficMirror`) must execute them against the
forward sink and the record writer.

The rules it keeps:

* every chunk goes through the record hooks, and (when forwarding) the forward hooks on a copy
  of it, so a forward hook never changes what the record hooks see;
* a chunk of a connection on no observed port (direction ``unknown``) never becomes a command,
  whatever the hooks: what a hook passed on is counted (``<path>_unobserved_bytes``);
* once the client finished (its :class:`~agent.model.DirectionEnd`), the shadow connection
  ends; bytes for it after that are counted (``mirror_forward_late_bytes``), never sent;
* at a flow's end, flow-aware hooks give back what they hold (their tails go out like chunks),
  and a flow with records gets its end record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.hooks import DEFAULT_FORWARD_HOOK, DEFAULT_RECORD_HOOK, Hook, HookPipeline
from agent.mirror.config import MirrorConfig
from agent.model import Direction, DirectionEnd, EndReason, FlowEnd, Segment, TrafficChunk
from agent.reassembly import Output, Reassembler

__all__ = ["Command", "Commands", "EndForward", "FlowCut", "FlowState", "Forward", "MirrorStep",
           "Packets", "PacketsEnd", "Record", "RecordFlowEnd", "coalesce"]

_UNKNOWN = Direction.UNKNOWN
_TO_OBSERVED = Direction.TO_OBSERVED


# ---------------------------------------------------------------- commands


@dataclass(slots=True)
class Forward:
    """Send ``data`` on the shadow connection of ``flow_id`` (its first bytes open one).
    ``gap`` bytes are missing right before ``data``: the shadow connection restarts, since
    the target would otherwise see a corrupted stream. ``data`` is never empty."""

    flow_id: int
    data: bytes
    gap: int = 0


@dataclass(slots=True)
class EndForward:
    """End the shadow connection of ``flow_id`` once its bytes are written: its client
    finished, or the flow ended. Only for a flow with a :class:`Forward`, once; no
    :class:`Forward` of this flow follows. ``after_service``: the service had finished its
    side first (so the shadow may be left to close first too)."""

    flow_id: int
    after_service: bool = False


@dataclass(slots=True)
class Record:
    """Write one record: ``data`` (what the record hooks made of the chunk, never empty) with
    ``chunk``'s flow, addresses, direction, time and gap."""

    chunk: TrafficChunk
    data: bytes


@dataclass(slots=True)
class RecordFlowEnd:
    """Write the end of a flow that has records (written or dropped by the writer). No
    :class:`Record` of this flow follows."""

    end: FlowEnd


@dataclass(slots=True)
class FlowCut:
    """A limit ended the flow early (``end.reason`` is ``evicted`` or ``lifetime``): tell the
    operator. Nothing else to do; its other commands came before."""

    end: FlowEnd


@dataclass(slots=True)
class Packets:
    """The packet tap (``config.flow_pcap``): save a batch's segments, ``flow_ids[i]`` the
    flow ``segments[i]`` went into (0: none). Comes before the batch's other commands."""

    segments: Sequence[Segment]
    flow_ids: list[int]


@dataclass(slots=True)
class PacketsEnd:
    """The packet tap: the flow is over (after its last :class:`Packets`)."""

    flow_id: int


Command = Forward | EndForward | Record | RecordFlowEnd | FlowCut | Packets | PacketsEnd
Commands = list[Command]
_CUT_BY_LIMIT = frozenset({EndReason.EVICTED, EndReason.LIFETIME})


class FlowState:
    """What the mirror step keeps for one open flow (made when the flow first needs any of
    it, dropped at its :class:`~agent.model.FlowEnd`)."""

    __slots__ = ("client_done", "last", "owed_gap", "recorded", "service_done", "shadowed")

    def __init__(self) -> None:
        #: Flow-aware hooks only: the latest chunk per sender (their template for a tail).
        self.last: dict[str, TrafficChunk] = {}
        #: The client finished before the flow ended: the address it sent from.
        self.client_done: str | None = None
        #: Gap bytes of chunks the forward hooks passed nothing of: the flow's next Forward
        #: carries them, so the shadow connection restarts instead of joining two halves.
        self.owed_gap = 0
        self.shadowed = False  # a Forward went out and no EndForward yet
        self.service_done = False  # the service finished its side while shadowed
        self.recorded = False  # a Record went out


def _pipeline(hook: Hook | Sequence[Hook] | None, default: Hook) -> HookPipeline:
    if hook is None:
        return HookPipeline([default])
    if isinstance(hook, Sequence):
        return HookPipeline(hook)
    return HookPipeline([hook])


# ---------------------------------------------------------------- the step


class MirrorStep:
    """Turns segments into commands (see the module docstring for the rules).

    Forwarding is on when ``config.target_addr`` is set, recording when ``config.writer`` or
    ``config.write_func`` is; the record hooks run either way. Each method appends its
    commands to ``out`` (a new list if None) and returns it: when a hook raises, the commands
    made before it are in ``out``, for the driver to execute before the error goes up.
    Single-threaded, except :meth:`set_ports`.
    """

    def __init__(self, config: MirrorConfig) -> None:
        #: The observed ports: a new connection's direction is decided by them when it opens.
        self.ports: frozenset[int] = config.ports
        self.forwarding = bool(config.target_addr)
        self.recording = config.writer is not None or config.write_func is not None
        self.tapping = config.flow_pcap is not None  # Packets and PacketsEnd wanted
        untracked = frozenset() if config.track_responses else {Direction.FROM_OBSERVED}
        self.reassembler = Reassembler(config.reassembly, self._classify, config.anonymize,
                                       frozenset(untracked))
        self._fhook = _pipeline(config.forward_hook, DEFAULT_FORWARD_HOOK)
        self._rhook = _pipeline(config.record_hook, DEFAULT_RECORD_HOOK)
        self._aware = self._fhook.flow_aware or self._rhook.flow_aware
        self._flows: dict[int, FlowState] = {}  # open flows that needed any state
        #: ``chunks``, ``<path>_hook_dropped_bytes``, ``<path>_unobserved_bytes``,
        #: ``mirror_forward_late_bytes``: the ``mirror`` stage's stats.
        self.counters: Counter[str] = Counter()

    def set_ports(self, ports: Iterable[int]) -> None:
        """Observe ``ports`` from now on (any thread: one reference is replaced). Connections
        already open keep the direction they were given."""
        self.ports = frozenset(ports)

    def _classify(self, src_port: int, dst_port: int) -> Direction:
        ports = self.ports
        if dst_port in ports:
            return Direction.TO_OBSERVED
        if src_port in ports:
            return Direction.FROM_OBSERVED
        return Direction.UNKNOWN

    # ---------------------------------------------------------------- input

    def feed(self, segments: Sequence[Segment], out: Commands | None = None) -> Commands:
        """The commands a batch of segments (in capture order) makes."""
        out = [] if out is None else out
        items: Output = []
        if self.tapping:
            ids: list[int] = []
            self.reassembler.feed_tapped(segments, items, ids)
            out.append(Packets(segments, ids))
        else:
            self.reassembler.feed_batch(segments, items)  # chunks merged: see coalesce()
        self._dispatch(items, out)
        return out

    def advance(self, now: float, out: Commands | None = None) -> Commands:
        """The commands time passing to ``now`` makes (timed-out holes, idle flows)."""
        out = [] if out is None else out
        items: Output = []
        self.reassembler.advance(now, items)
        self._dispatch(items, out)
        return out

    def flush(self, out: Commands | None = None) -> Commands:
        """The commands ending every flow makes (end of input or shutdown)."""
        out = [] if out is None else out
        items: Output = []
        self.reassembler.flush(items)
        self._dispatch(items, out)
        return out

    # ---------------------------------------------------------------- per chunk

    def _state(self, flow_id: int) -> FlowState:
        state = self._flows.get(flow_id)
        if state is None:
            state = self._flows[flow_id] = FlowState()
        return state

    def _dispatch(self, items: Output, out: Commands) -> None:
        fhook = self._fhook if self.forwarding else None
        rhook = self._rhook
        recording = self.recording
        aware = self._aware
        flows = self._flows
        counters = self.counters
        chunks = 0
        try:
            for item in items:
                if type(item) is not TrafficChunk:
                    if isinstance(item, FlowEnd):
                        self._end_flow(item, out)
                    elif isinstance(item, DirectionEnd):
                        self._end_direction(item, out)
                    continue
                assert isinstance(item, TrafficChunk)
                chunk = item
                chunks += 1
                state = flows.get(chunk.flow_id) or self._state(chunk.flow_id)
                if aware:
                    state.last[chunk.from_addr] = chunk
                if chunk.direction is _UNKNOWN:
                    self._unobserved(chunk)
                    continue
                if fhook is not None:
                    data, keep = fhook.handle(chunk.with_data(chunk.data))  # its own copy
                    if not keep:
                        counters["forward_hook_dropped_bytes"] += len(chunk.data)
                    if keep and data:
                        self._forward(chunk.flow_id, state, data, chunk.gap_bytes, out)
                    elif chunk.gap_bytes:  # owed to the flow's next Forward
                        state.owed_gap += chunk.gap_bytes
                data, keep = rhook.handle(chunk)
                if not keep:
                    counters["record_hook_dropped_bytes"] += len(chunk.data)
                elif data and recording:
                    out.append(Record(chunk, data))
                    state.recorded = True
        finally:
            counters["chunks"] += chunks

    def _unobserved(self, chunk: TrafficChunk) -> None:
        """A chunk of no observed port: the hooks run as on any chunk, but what they pass
        on goes nowhere, counted."""
        n = len(chunk.data)
        counters = self.counters
        if self.forwarding:
            data, keep = self._fhook.handle(chunk.with_data(chunk.data))
            if not keep:
                counters["forward_hook_dropped_bytes"] += n
            elif data:
                counters["forward_unobserved_bytes"] += n
        data, keep = self._rhook.handle(chunk)
        if not keep:
            counters["record_hook_dropped_bytes"] += n
        elif data and self.recording:
            counters["record_unobserved_bytes"] += n

    def _forward(self, flow_id: int, state: FlowState, data: bytes, gap: int,
                 out: Commands) -> None:
        """Forward ``data``, unless the flow's client already finished (then count it)."""
        if state.client_done is not None:
            self.counters["mirror_forward_late_bytes"] += len(data)
        else:
            if state.owed_gap:
                gap += state.owed_gap
                state.owed_gap = 0
            out.append(Forward(flow_id, data, gap))
            state.shadowed = True

    @staticmethod
    def _end_shadow(flow_id: int, state: FlowState, out: Commands) -> None:
        if state.shadowed:
            state.shadowed = False
            out.append(EndForward(flow_id, state.service_done))

    # ---------------------------------------------------------------- ends

    def _end_direction(self, end: DirectionEnd, out: Commands) -> None:
        """The client finished (FIN reached, every byte before it delivered): end the shadow
        connection now. The service's FIN may never be seen (XDP captures ingress only)."""
        if not self.forwarding:
            return
        if end.direction is not _TO_OBSERVED:
            if end.direction is Direction.FROM_OBSERVED:
                state = self._flows.get(end.flow_id)
                if state is not None and state.shadowed:
                    state.service_done = True
            return
        state = self._state(end.flow_id)
        last = state.last.get(end.from_addr) if self._aware else None
        if last is not None:
            tail = self._fhook.flow_end(last)
            if tail:
                self._forward(end.flow_id, state, tail, 0, out)
        self._end_shadow(end.flow_id, state, out)
        state.client_done = end.from_addr

    def _end_flow(self, end: FlowEnd, out: Commands) -> None:
        """The flow is over: the hooks' tails, the end of its shadow connection (unless its
        client's end already ended it), its end record, a limit's notice."""
        flow_id = end.flow_id
        state = self._flows.pop(flow_id, None)
        if state is not None:
            for chunk in state.last.values():
                self._tails(chunk, state, out)
            self._end_shadow(flow_id, state, out)
        if self.tapping:
            out.append(PacketsEnd(flow_id))
        if state is not None and state.recorded:
            out.append(RecordFlowEnd(end))
        if end.reason in _CUT_BY_LIMIT:
            out.append(FlowCut(end))

    def _tails(self, chunk: TrafficChunk, state: FlowState, out: Commands) -> None:
        """What the hooks still hold for ``chunk``'s direction, sent and recorded like its
        chunks were (a direction whose client already finished: counted as late)."""
        unobserved = chunk.direction is _UNKNOWN
        counters = self.counters
        if self.forwarding and chunk.from_addr != state.client_done:
            tail = self._fhook.flow_end(chunk)
            if tail and unobserved:
                counters["forward_unobserved_bytes"] += len(tail)
            elif tail:
                self._forward(chunk.flow_id, state, tail, 0, out)
        tail = self._rhook.flow_end(chunk)
        if tail and self.recording:
            if unobserved:
                counters["record_unobserved_bytes"] += len(tail)
            else:
                out.append(Record(chunk.with_data(tail), tail))
                state.recorded = True


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
