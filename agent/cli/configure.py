"""The operator's options turned into the library's configurations, in one place:
:func:`mirror_config` (``Options`` → :class:`~agent.mirror.config.MirrorConfig`, with its
hooks, reassembly limits, forward settings, per-flow pcaps and memory budget),
:func:`memory_budget`, and the checks that need the host or a library (a target that
resolves, source ports this process may bind, a ``--filter`` libpcap compiles and the engine
can apply). Value checks that need only the values are :mod:`agent.cli.args`' (at parse
time); these raise :class:`~agent.cli.parser.UsageError` (exit 2, one line).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from agent.cli import args as a
from agent.cli.options import Options, PipelineOptions
from agent.cli.parser import UsageError
from agent.hooks import Hook, HookLoadError, KeepAll, OnlyToObserved, SampleFlows, load_hook
from agent.hooks.anonymize import anonymizer
from agent.hooks.http import InjectHeader, RedactHeaders
from agent.mirror import budget
from agent.mirror.budget import UNREAD_CGROUP, Budget
from agent.mirror.config import ForwardConfig, MirrorConfig
from agent.reassembly import ReassemblyConfig
from agent.sinks.flow_pcap import FlowPcapConfig
from agent.sources.filter import BpfFilter, FilterError, SegmentMatcher

__all__ = ["check_live_filter", "compile_filter", "hooks", "log_budget", "memory_budget",
           "mirror_config"]

log = structlog.get_logger("agent.cli.configure")
T = TypeVar("T")


def hooks(p: PipelineOptions) -> tuple[list[Hook], list[Hook]]:
    """(forward hooks, record hooks) from the options, in the order they run: connection
    sampling, the direction filter, request selection (each path its own hook), the user's
    hooks, then the forward path's rewrite and header injection and the record path's
    redaction. UsageError for a hook that does not load, or a rewrite with nothing to
    forward to."""
    forward: list[Hook] = []
    record: list[Hook] = []
    if p.sample is not None:
        sampler = SampleFlows(p.sample)
        forward.append(sampler)
        record.append(sampler)
    forward.append(OnlyToObserved())
    record.append(KeepAll() if p.both_directions else OnlyToObserved())
    select_forward, select_record = p.select.select_hooks()
    forward += select_forward
    record += select_record
    try:
        user = [load_hook(spec) for spec in p.hooks]
    except HookLoadError as e:
        raise UsageError(str(e)) from None
    forward += user
    record += user
    if p.select.rewrites and not p.target:
        raise UsageError("--rewrite-path/--rewrite-host need --target: they rewrite "
                         "forwarded requests only")
    forward += p.select.rewrite_hooks()
    if p.inject_header:
        forward.append(InjectHeader(*p.inject_header))
    if p.redact_headers:
        record.append(RedactHeaders(list(p.redact_headers)))
    return forward, record


def memory_budget(opts: Options) -> Budget:
    """The memory budget of ``--memory-limit`` (or the cgroup's or default limit) with the
    explicit sizes; UsageError (exit 2) saying what does not fit."""
    p = opts.pipe
    transport = "none" if opts.capture is None else opts.capture.budget_transport
    try:
        return budget.for_host(p.memory_limit, transport,
                               buffer_mib=opts.capture.buffer_mib if opts.capture else None,
                               max_flows=p.max_flows, max_buffer=p.max_buffer,
                               max_flow_buffer=p.max_flow_buffer, flow_pcap=p.flow_pcap)
    except budget.BudgetError as e:
        raise UsageError(str(e)) from None


def log_budget(mem: Budget) -> None:
    """The one start-up line with every budget (once the run is sure to start)."""
    log.info("memory budget", **mem.log_fields())
    if mem.origin == UNREAD_CGROUP:
        log.warning("this process is in a memory cgroup whose limit it cannot read (the "
                    "cgroup filesystem is not mounted in its mount namespace): the budget "
                    "assumes the default; pass --memory-limit")


def mirror_config(opts: Options, mem: Budget | None = None) -> MirrorConfig:
    """The MirrorConfig the pipeline options describe, within ``mem`` (default: derived
    here); UsageError if they cannot work. The target must resolve, and its source ports be
    ones this process may bind."""
    p = opts.pipe
    if p.target:
        try:
            a.resolve_target(p.target)
        except ValueError as e:
            raise UsageError(str(e)) from None
        why = (a.privileged_source_ports(p.forward_source_ports)
               or a.unbindable_source_addr(p.forward_source_addrs))
        if why:
            raise UsageError(why)
    mem = mem or memory_budget(opts)
    try:
        reassembly = ReassemblyConfig(
            idle_timeout=p.idle_timeout, hole_timeout=p.hole_timeout,
            max_flows=mem.max_flows,
            max_flow_buffer=mem.reassembly_flow, max_total_buffer=mem.reassembly_total,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    forward, record = hooks(p)
    live = opts.capture is not None or opts.command == "serve"  # runs until stopped
    lo, hi = p.forward_source_ports
    hidden = [port for port in p.ports if lo <= port <= hi] if opts.capture else []
    if hidden:
        raise UsageError(f"--port {hidden[0]} is inside --forward-source-ports {lo}-{hi}, "
                         "whose packets capture skips; choose another source port range")
    return MirrorConfig(
        observed_port=p.ports[0], extra_ports=frozenset(p.ports[1:]),
        target_addr=p.target or "", forward_hook=forward, record_hook=record,
        record_format=p.record_format, reassembly=reassembly,
        track_responses=p.needs_responses,
        # Live capture and serve run until stopped: their recording is written off the loop
        # and flushed at least every second; offline writes inline (it can wait for a disk).
        record_in_background=live,
        forward=ForwardConfig(source_ports=p.forward_source_ports,
                              source_addrs=p.forward_source_addrs,
                              max_flow_buffer=mem.forward_flow,
                              max_total_buffer=mem.forward_total,
                              mode=p.forward_mode, pool_size=p.forward_pool),
        budget=mem, anonymize=anonymizer(p.anonymize), flow_pcap=_flow_pcap(p, mem, live),
    )


def _flow_pcap(p: PipelineOptions, mem: Budget, live: bool) -> FlowPcapConfig | None:
    """``--flow-pcap-*`` within the budget's open files; UsageError for a bad directory.
    ``live``: a full writer queue drops flows (counted) instead of holding up capture."""
    if p.flow_pcap_dir is None:
        return None
    cfg = FlowPcapConfig(Path(p.flow_pcap_dir), p.flow_pcap_snaplen, p.flow_pcap_gzip,
                         max_open=max(1, mem.flow_pcap_files), live=live)
    try:
        cfg.check_directory()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg


def compile_filter(expr: str | None, make: Callable[[str], T]) -> T | None:
    """``--filter``: compiled by ``make``, or a UsageError (exit 2) with libpcap's message."""
    if not expr:
        return None
    try:
        return make(expr)
    except FilterError as e:
        raise UsageError(str(e)) from None


def check_live_filter(opts: Options) -> None:
    """UsageError if ``--filter`` cannot work on the engine: a link-layer term on tc/xdp
    (they match IP/TCP only), or, for afpacket, no packet left once combined with the
    agent's own capture expression (said about the user's expression)."""
    p, c = opts.pipe, opts.live
    if not p.filter:
        return
    if c.engine != "afpacket":
        why = a.ip_only_filter(p.filter)
        if why:
            raise UsageError(why)
        return
    from agent.sources.afpacket import capture_expression

    compile_filter(p.filter, SegmentMatcher)
    full = capture_expression(list(p.ports), p.filter, p.forward_source_ports)
    try:
        BpfFilter(full)
    except FilterError as e:
        raise UsageError(a.filter_message(p.filter, full, e)) from None
