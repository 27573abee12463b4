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
from agent.cli.configure import (
    check_live_filter,
    compile_filter,
    log_budget,
    memory_budget,
    mirror_config,
)
from agent.cli.inspect import inspect_recording
from agent.cli.layers import parse_options, toml_lines
from agent.cli.logsetup import configure_logging
from agent.cli.options import Options, PipelineOptions
from agent.cli.outputs import OutputError, stdout_closed
from agent.cli.parser import UsageError
from agent.cli.run import run_pipeline
from agent.decode import DecodeConfig
from agent.hooks import (
    HookError,
)
from agent.mirror.budget import Budget
from agent.mirror.config import parse_target
from agent.sinks.nats.url import redact_url
from agent.sinks.record import RecordError
from agent.sources import PacketSource, SourceError
from agent.sources.files.pcapfile import PcapFileSource
from agent.sources.filter import FrameMatcher, SegmentMatcher

if TYPE_CHECKING:
    from agent.cli.control import Control
    from agent.sources.ebpf.decap import Decap
    from agent.sources.ebpf.links import IfaceSpec

__all__ = ["main"]


log = structlog.get_logger("agent.cli.commands")
T = TypeVar("T")

def _offline(opts: Options) -> int:
    matcher = compile_filter(opts.pipe.filter, FrameMatcher)
    config = mirror_config(opts)
    try:  # every file's header, before any output is made or any file read
        source = PcapFileSource(list(opts.files), matcher,
                                DecodeConfig(defrag_bytes=config.budget.defrag))
    except SourceError as e:
        raise UsageError(str(e)) from None

    def make_source() -> PacketSource:
        log_budget(config.budget)
        return source

    return run_pipeline(opts, config, make_source, interrupted_status=130)


def _run(opts: Options) -> int:
    from agent.sources.ebpf.attach import resolve_ifaces
    from agent.sources.ebpf.source import check_environment

    p, c = opts.pipe, opts.live
    check_live_filter(opts)
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
    matcher = compile_filter(opts.pipe.filter, FrameMatcher)
    if matcher is not None:
        raise UsageError("serve does not take --filter yet: filter the capture files first")
    config = mirror_config(opts)
    control = _control(opts)

    def no_source() -> None:
        log_budget(config.budget)
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
    seg_filter = compile_filter(p.filter, SegmentMatcher) if c.engine != "afpacket" else None
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
        log_budget(mem)
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
