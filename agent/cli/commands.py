"""The ``mirror-agent`` command line: options (:mod:`agent.cli.layers`: flags, environment
and ``--config`` file into one :class:`~agent.cli.options.Options`), and the ``offline``, ``run``
and ``config`` commands
(running the pipeline: :mod:`agent.cli.run`; ``inspect``: :mod:`agent.cli.inspect`;
``replay``: :mod:`agent.cli.replay`).

Exit status: 0 success; 1 runtime failure (the summary, then the cause on one line); 2 bad
usage (a bad value names its flag), unreadable input (every capture file's header is checked
before anything runs), a target that does not resolve, or an unusable output path (one path
for both outputs, an output that is an input), always as one line on stderr; 3
finished but degraded, with a "degraded" line after the summary naming the sink or source
and why: a capture file was cut short (``source_cut_short_files``), a recording failed (a
write error closed it, the rest counted as ``record_failed_*``) or could not keep up
(``record_dropped_*``), or the forward sink dropped shadow connections
(``forward_connections_dropped``, by reason: a dead, slow or silent shadow); for
``inspect``, a damaged recording; 130 when an offline
replay was interrupted (data flushed; a second signal stops the wait for the shadow); 141
when the reader of stdout (``--record -``, ``inspect``) went away, quietly, like a filter
killed by SIGPIPE. A broken pipe on any other output (a FIFO whose reader left) is a failed
recording: exit 3.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog

from agent.cli import args as a
from agent.cli.inspect import inspect_recording
from agent.cli.layers import parse_options, toml_lines
from agent.cli.logsetup import configure_logging
from agent.cli.options import Options, PipelineOptions
from agent.cli.outputs import OutputError, stdout_closed
from agent.cli.parser import UsageError, build_parser
from agent.cli.run import run_pipeline
from agent.decode import DecodeConfig
from agent.hooks import (
    Hook,
    HookError,
    HookLoadError,
    KeepAll,
    OnlyToObserved,
    SampleFlows,
    load_hook,
)
from agent.hooks.anonymize import anonymizer
from agent.hooks.http import InjectHeader, RedactHeaders
from agent.mirror import budget
from agent.mirror.budget import UNREAD_CGROUP, Budget
from agent.mirror.config import ForwardConfig, MirrorConfig, parse_target
from agent.reassembly import ReassemblyConfig
from agent.sinks.flow_pcap import FlowPcapConfig
from agent.sinks.nats.url import redact_url
from agent.sinks.record import RecordError
from agent.sources import PacketSource, SourceError
from agent.sources.files.pcapfile import PcapFileSource
from agent.sources.filter import BpfFilter, FilterError, FrameMatcher, SegmentMatcher

if TYPE_CHECKING:
    from agent.cli.control import Control
    from agent.sources.ebpf.decap import Decap
    from agent.sources.ebpf.links import IfaceSpec

__all__ = ["UsageError", "build_parser", "main", "memory_budget", "mirror_config",
           "parse_options"]

log = structlog.get_logger("agent.cli.commands")
T = TypeVar("T")

def _hooks(p: PipelineOptions) -> tuple[list[Hook], list[Hook]]:
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


def _log_budget(mem: Budget) -> None:
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
        why = a.privileged_source_ports(p.forward_source_ports)
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
    forward, record = _hooks(p)
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


def _compile_filter(expr: str | None, make: Callable[[str], T]) -> T | None:
    """``--filter``: compiled by ``make``, or a UsageError (exit 2) with libpcap's message."""
    if not expr:
        return None
    try:
        return make(expr)
    except FilterError as e:
        raise UsageError(str(e)) from None


def _check_live_filter(opts: Options) -> None:
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

    _compile_filter(p.filter, SegmentMatcher)
    full = capture_expression(list(p.ports), p.filter, p.forward_source_ports)
    try:
        BpfFilter(full)
    except FilterError as e:
        raise UsageError(a.filter_message(p.filter, full, e)) from None


def _offline(opts: Options) -> int:
    matcher = _compile_filter(opts.pipe.filter, FrameMatcher)
    config = mirror_config(opts)
    try:  # every file's header, before any output is made or any file read
        source = PcapFileSource(list(opts.files), matcher,
                                DecodeConfig(defrag_bytes=config.budget.defrag))
    except SourceError as e:
        raise UsageError(str(e)) from None

    def make_source() -> PacketSource:
        _log_budget(config.budget)
        return source

    return run_pipeline(opts, config, make_source, interrupted_status=130)


def _run(opts: Options) -> int:
    from agent.sources.ebpf.attach import resolve_ifaces
    from agent.sources.ebpf.source import check_environment

    p, c = opts.pipe, opts.live
    _check_live_filter(opts)
    # A given --buffer-mib is checked against the host first (its range, then the budget);
    # a derived one comes from the budget and is checked as "the default".
    given = c.buffer_mib is not None
    mib = c.buffer_mib if given else memory_budget(opts).buffer_mib
    if c.engine != "afpacket":  # names CAP_IPC_LOCK with the others if it is missing too
        a.preflight_ebpf(mib, c.transport, not given)
    check_environment(ebpf=c.engine != "afpacket", buffer_mib=mib,
                      transport=c.transport, default=not given)
    mem = memory_budget(opts)
    spec = _iface_spec(c.iface)
    # Fixed names must exist now (afpacket resolves 'any' now too); a followed spec (a
    # pattern or 'any' on tc/xdp) may match nothing yet.
    ifaces: IfaceSpec | list[str] = spec
    if c.engine == "afpacket" or not spec.follows:
        ifaces = resolve_ifaces(c.iface)
    _warn_if_target_captured(p, ifaces)
    overlap = a.ephemeral_overlap(p.forward_source_ports)
    if overlap:
        log.warning(overlap)
    make_source = _live_source(opts, mem, ifaces)
    config = mirror_config(opts, mem)
    control = _control(opts)
    return run_pipeline(opts, config, make_source, interrupted_status=0, control=control)


def _control(opts: Options) -> Control | None:
    """The control server ``--listen`` asks for (bound now: a bad address is exit 2)."""
    c = opts.control
    if c.listen is None:
        for flag, value in (("--pcap-dir", c.pcap_dir),
                            ("--listen-token-file", c.listen_token_file)):
            if value is not None:
                raise UsageError(f"{flag} needs --listen (the control API it belongs to)")
        return None
    from agent.cli.control import Control

    return Control(opts)


def _serve(opts: Options) -> int:
    """``serve``: the pipeline over the capture files ``POST /pcap`` names, until a signal."""
    if opts.control.listen is None:
        raise UsageError("serve needs --listen: the address POST /pcap is taken on")
    matcher = _compile_filter(opts.pipe.filter, FrameMatcher)
    if matcher is not None:
        raise UsageError("serve does not take --filter yet: filter the capture files first")
    config = mirror_config(opts)
    control = _control(opts)

    def no_source() -> None:
        _log_budget(config.budget)
        log.info("serving", listen=opts.control.listen, pcap_dir=str(opts.control.pcap_dir),
                 ports=list(opts.pipe.ports), target=opts.pipe.target or None,
                 record=redact_url(opts.pipe.record or "") or None)

    return run_pipeline(opts, config, no_source, interrupted_status=0, control=control)


def _iface_spec(text: str) -> IfaceSpec:
    from agent.sources.ebpf.links import IfaceSpec

    try:
        return IfaceSpec.parse(text)
    except SourceError as e:
        raise UsageError(str(e)) from None


def _live_source(opts: Options, mem: Budget,
                 ifaces: IfaceSpec | list[str]) -> Callable[[], PacketSource]:
    """What makes the capture source of ``run`` (called once the outputs are open)."""
    p, c = opts.pipe, opts.live
    seg_filter = _compile_filter(p.filter, SegmentMatcher) if c.engine != "afpacket" else None
    decap = _decap(c.decap)

    def make_source() -> PacketSource:
        src: PacketSource
        if c.engine == "afpacket":
            from agent.sources.afpacket import AfPacketSource

            assert isinstance(ifaces, list), "afpacket takes the names resolved at start"
            src = AfPacketSource(ifaces, list(p.ports), p.filter,
                                 rcvbuf_mib=mem.buffer_mib * 8,
                                 own_ports=p.forward_source_ports, decap=decap)
            more: dict[str, object] = {"ifaces": ifaces}
        else:
            from agent.sources.ebpf.source import EbpfSource

            src = ebpf = EbpfSource(
                ifaces, list(p.ports), c.engine, mem.buffer_mib,
                segment_filter=seg_filter, transport=c.transport,
                requests_only=not p.needs_responses, decoder=c.decoder,
                own_ports=p.forward_source_ports, tc_mode=c.tc_attach,
                backlog_bytes=mem.drain_backlog, decap=decap)
            more = {"transport": c.transport, "decoder": ebpf.decoder,
                    "buffer_mib": ebpf.buffer_mib, "follows": ebpf.spec.follows,
                    "ifaces": ebpf.ifaces}
        _log_budget(mem)
        log.info("capture live", iface=c.iface, ports=list(p.ports), engine=c.engine, **more,
                 decap=c.decap, target=p.target or None, record=redact_url(p.record or "") or None)
        return src

    return make_source


def _decap(text: str | None) -> Decap | None:
    """``--decap``'s tunnels (the text was checked when parsed)."""
    from agent.sources.ebpf.decap import Decap

    return Decap.parse(text) if text else None


def _warn_if_target_captured(p: PipelineOptions, ifaces: IfaceSpec | list[str]) -> None:
    """Say so when the shadow is on an observed port behind a captured interface: its traffic
    is then seen too, and only the reserved source ports keep the mirror from feeding itself."""
    from agent.sources.ebpf.attach import captured_route

    if not p.target:
        return
    host, port = parse_target(p.target)
    iface = captured_route(host, ifaces) if port in p.ports else None
    if iface is not None:
        lo, hi = p.forward_source_ports
        log.warning("the target is on a captured interface and an observed port; its "
                    "connections are not mirrored again because the agent connects from "
                    f"source ports {lo}-{hi} (--forward-source-ports), which capture skips",
                    target=p.target, iface=iface)


def _probe(opts: Options) -> int:
    from agent.cli.control import probe  # the control server's imports: not for offline

    return probe(opts)


def _replay(opts: Options) -> int:
    """``mirror-agent replay``: :mod:`agent.cli.replay`."""
    from agent.cli.replay import replay

    return replay(opts)


def _config(opts: Options) -> int:
    """``mirror-agent config``: the effective configuration, as TOML with each value's origin."""
    sys.stdout.write("\n".join(toml_lines(opts.effective().items())) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
        fmt = None if opts.log_format == "auto" else opts.log_format == "json"
        configure_logging(opts.log_level, fmt)
        if opts.stray_env:
            log.warning("ignoring environment variables that name no option (a typo?)",
                        variables=list(opts.stray_env))
        command = {"offline": _offline, "run": _run, "serve": _serve, "config": _config,
                   "probe": _probe, "replay": _replay}.get(opts.command)
        if command is not None:
            return command(opts)
        return inspect_recording(Path(opts.path), opts.format)
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
