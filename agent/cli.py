"""The ``mirror-agent`` command line: options, and the ``offline`` and ``run`` commands
(running the pipeline: :mod:`agent.cli_run`; ``inspect``: :mod:`agent.cli_inspect`).

Exit status: 0 success; 1 runtime failure (the summary, then the cause on one line); 2 bad
usage (a bad value names its flag), unreadable input (every capture file's header is checked
before anything runs), a target that does not resolve, or an unusable output path (one path
for both outputs, an output that is an input), always as one line on stderr; 3
finished but degraded, with a "degraded" line after the summary naming the sink or source
and why: a capture file was cut short (``source_cut_short_files``), a recording failed (a
write error closed it, the rest counted as ``record_failed_*``) or could not keep up
(``record_dropped_*``), or the forward sink dropped flows (``forward_flows_dropped``, by
reason: a dead or slow shadow); for ``inspect``, a damaged recording; 130 when an offline
replay was interrupted (data flushed; a second signal stops the wait for the shadow); 141
when the reader of stdout (``--record -``, ``inspect``) went away, quietly, like a filter
killed by SIGPIPE. A broken pipe on any other output (a FIFO whose reader left) is a failed
recording: exit 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO, TypeVar

import structlog

from agent import budget
from agent import cli_args as a
from agent.budget import UNREAD_CGROUP, Budget
from agent.capture import PacketSource, SourceError
from agent.capture.pcapfile import PcapFileSource
from agent.cli_inspect import inspect_recording
from agent.cli_parser import UsageError, build_parser
from agent.cli_run import run_pipeline
from agent.config import ForwardConfig, MirrorConfig, parse_target
from agent.filter import BpfFilter, FilterError, FrameMatcher, SegmentMatcher
from agent.hooks import (
    Hook,
    HookError,
    HookLoadError,
    KeepAll,
    OnlyToObserved,
    SampleFlows,
    load_hook,
)
from agent.http_hooks import InjectHeader, RedactHeaders
from agent.logsetup import configure_logging
from agent.outputs import OutputError, stdout_closed
from agent.reassembly import ReassemblyConfig
from agent.sinks.record import RecordError

__all__ = ["UsageError", "build_parser", "main", "memory_budget", "mirror_config"]

log = structlog.get_logger("agent.cli")
T = TypeVar("T")

def _hooks(args: argparse.Namespace) -> tuple[list[Hook], list[Hook]]:
    """(forward hooks, record hooks) from the options, in the order they run."""
    forward: list[Hook] = []
    record: list[Hook] = []
    if args.sample is not None:
        sampler = SampleFlows(args.sample)
        forward.append(sampler)
        record.append(sampler)
    forward.append(OnlyToObserved())
    record.append(KeepAll() if args.both_directions else OnlyToObserved())
    try:
        user = [load_hook(spec) for spec in args.hook]
    except HookLoadError as e:
        raise UsageError(str(e)) from None
    forward += user
    record += user
    if args.inject_header:
        forward.append(InjectHeader(*args.inject_header))
    if args.redact_headers:
        record.append(RedactHeaders(args.redact_headers))
    return forward, record


def memory_budget(args: argparse.Namespace) -> Budget:
    """The memory budget of ``--memory-limit`` (or the cgroup's or default limit) with the
    explicit sizes; UsageError (exit 2) saying what does not fit. Derived once per run."""
    cached = getattr(args, "_budget", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    if args.command == "offline":
        transport = "none"
    elif args.engine == "afpacket":
        transport = "afpacket"
    else:
        transport = args.transport
    try:
        found = budget.for_host(args.memory_limit, transport,
                                buffer_mib=getattr(args, "buffer_mib", None),
                                max_flows=args.max_flows, max_buffer=args.max_buffer,
                                max_flow_buffer=args.max_flow_buffer)
    except budget.BudgetError as e:
        raise UsageError(str(e)) from None
    args._budget = found
    return found


def _log_budget(mem: Budget) -> None:
    """The one start-up line with every budget (once the run is sure to start)."""
    log.info("memory budget", **mem.log_fields())
    if mem.origin == UNREAD_CGROUP:
        log.warning("this process is in a memory cgroup whose limit it cannot read (the "
                    "cgroup filesystem is not mounted in its mount namespace): the budget "
                    "assumes the default; pass --memory-limit")


def mirror_config(args: argparse.Namespace, writer: BinaryIO | None) -> MirrorConfig:
    """The MirrorConfig the shared pipeline options describe (raises UsageError). The target
    must resolve, and its source ports be ones this process may bind."""
    if args.target:
        try:
            a.resolve_target(args.target)
        except ValueError as e:
            raise UsageError(str(e)) from None
        why = a.privileged_source_ports(args.forward_source_ports)
        if why:
            raise UsageError(why)
    mem = memory_budget(args)
    try:
        reassembly = ReassemblyConfig(
            idle_timeout=args.idle_timeout, hole_timeout=args.hole_timeout,
            max_flows=mem.max_flows,
            max_flow_buffer=mem.reassembly_flow, max_total_buffer=mem.reassembly_total,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    forward, record = _hooks(args)
    ports = args.port
    lo, hi = args.forward_source_ports
    hidden = [p for p in ports if lo <= p <= hi] if args.command == "run" else []
    if hidden:
        raise UsageError(f"--port {hidden[0]} is inside --forward-source-ports {lo}-{hi}, "
                         "whose packets capture skips; choose another source port range")
    return MirrorConfig(
        observed_port=ports[0], extra_ports=frozenset(ports[1:]), target_addr=args.target or "",
        writer=writer, forward_hook=forward, record_hook=record,
        record_format=args.record_format, reassembly=reassembly,
        track_responses=needs_responses(args), record_in_background=args.command == "run",
        forward=ForwardConfig(source_ports=args.forward_source_ports,
                              max_flow_buffer=mem.forward_flow,
                              max_total_buffer=mem.forward_total),
        budget=mem,
    )


def needs_responses(args: argparse.Namespace) -> bool:
    """Does anything consume service→client bytes? Only a both-directions recording and user
    hooks (which may look at them); the built-in hooks see requests only."""
    return bool(args.both_directions or args.hook)


def _compile_filter(expr: str | None, make: Callable[[str], T]) -> T | None:
    """``--filter``: compiled by ``make``, or a UsageError (exit 2) with libpcap's message."""
    if not expr:
        return None
    try:
        return make(expr)
    except FilterError as e:
        raise UsageError(str(e)) from None


def _check_live_filter(args: argparse.Namespace) -> None:
    """UsageError if ``--filter`` cannot work on the engine: a link-layer term on tc/xdp
    (they match IP/TCP only), or, for afpacket, no packet left once combined with the
    agent's own capture expression (said about the user's expression)."""
    if not args.filter:
        return
    if args.engine != "afpacket":
        why = a.ip_only_filter(args.filter)
        if why:
            raise UsageError(why)
        return
    from agent.capture.afpacket import capture_expression

    _compile_filter(args.filter, SegmentMatcher)
    full = capture_expression(args.port, args.filter, args.forward_source_ports)
    try:
        BpfFilter(full)
    except FilterError as e:
        raise UsageError(a.filter_message(args.filter, full, e)) from None


def _offline(args: argparse.Namespace) -> int:
    matcher = _compile_filter(args.filter, FrameMatcher)
    config = mirror_config(args, None)
    try:  # every file's header, before any output is made or any file read
        source = PcapFileSource(args.files, matcher)
    except SourceError as e:
        raise UsageError(str(e)) from None

    def make_source() -> PacketSource:
        _log_budget(config.budget)
        return source

    return run_pipeline(args, config, make_source, interrupted_status=130)


def _run(args: argparse.Namespace) -> int:
    from agent.capture.attach import resolve_ifaces
    from agent.capture.ebpf import check_environment

    _check_live_filter(args)
    # A given --buffer-mib is checked against the host first (its range, then the budget);
    # a derived one comes from the budget and is checked as "the default".
    given = args.buffer_mib is not None
    mem = None if given else memory_budget(args)
    mib = args.buffer_mib if mem is None else mem.buffer_mib
    if args.engine != "afpacket":  # names CAP_IPC_LOCK with the others if it is missing too
        a.preflight_ebpf(mib, args.transport, not given)
    check_environment(ebpf=args.engine != "afpacket", buffer_mib=mib,
                      transport=args.transport, default=not given)
    mem = memory_budget(args)
    ifaces = resolve_ifaces(args.iface)
    _warn_if_target_captured(args, ifaces)
    overlap = a.ephemeral_overlap(args.forward_source_ports)
    if overlap:
        log.warning(overlap)
    if args.engine == "afpacket":

        def make_source() -> PacketSource:
            from agent.capture.afpacket import AfPacketSource

            src: PacketSource = AfPacketSource(ifaces, args.port, args.filter,
                                               rcvbuf_mib=mem.buffer_mib * 8,
                                               own_ports=args.forward_source_ports)
            _log_budget(mem)
            log.info("capture live", ifaces=ifaces, ports=args.port, engine=args.engine,
                     target=args.target or None, record=args.record)
            return src
    else:
        seg_filter = _compile_filter(args.filter, SegmentMatcher)

        def make_source() -> PacketSource:
            from agent.capture.ebpf import EbpfSource

            src = EbpfSource(
                ifaces, args.port, args.engine, mem.buffer_mib,
                segment_filter=seg_filter, transport=args.transport,
                requests_only=not needs_responses(args), decoder=args.decoder,
                own_ports=args.forward_source_ports, tc_mode=args.tc_attach,
                backlog_bytes=mem.drain_backlog)
            _log_budget(mem)
            log.info("capture live", ifaces=ifaces, ports=args.port, engine=args.engine,
                     transport=args.transport, decoder=src.decoder, buffer_mib=src.buffer_mib,
                     target=args.target or None, record=args.record)
            return src

    return run_pipeline(args, mirror_config(args, None), make_source, interrupted_status=0)


def _warn_if_target_captured(args: argparse.Namespace, ifaces: list[str]) -> None:
    """Say so when the shadow is on an observed port behind a captured interface: its traffic
    is then seen too, and only the reserved source ports keep the mirror from feeding itself."""
    from agent.capture.attach import captured_route

    if not args.target:
        return
    host, port = parse_target(args.target)
    iface = captured_route(host, ifaces) if port in args.port else None
    if iface is not None:
        lo, hi = args.forward_source_ports
        log.warning("the target is on a captured interface and an observed port; its "
                    "connections are not mirrored again because the agent connects from "
                    f"source ports {lo}-{hi} (--forward-source-ports), which capture skips",
                    target=args.target, iface=iface)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        fmt = None if args.log_format == "auto" else args.log_format == "json"
        configure_logging(args.log_level, fmt)
        if args.command == "offline":
            return _offline(args)
        if args.command == "run":
            return _run(args)
        return inspect_recording(args.path, args.format)
    except BrokenPipeError:  # only ever stdout's: any other output's is contained
        return stdout_closed()
    except (UsageError, SourceError, OutputError, RecordError) as e:
        sys.stderr.write(f"mirror-agent: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except HookError as e:  # its message names the hook and what it did
        sys.stderr.write(f"mirror-agent: failed: {e}\n")
        return 1
    except Exception as e:
        sys.stderr.write(f"mirror-agent: failed: {type(e).__name__}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
