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
from typing import BinaryIO, NoReturn, TypeVar

import structlog

from agent import __doc__ as _pkg_doc
from agent import budget
from agent import cli_args as a
from agent.budget import UNREAD_CGROUP, Budget
from agent.capture import PacketSource, SourceError
from agent.capture.pcapfile import PcapFileSource
from agent.cli_inspect import inspect_recording
from agent.cli_run import run_pipeline
from agent.config import FORWARD_SOURCE_PORTS, ForwardConfig, MirrorConfig, parse_target
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
from agent.outputs import EXIT_HELP, OutputError, stdout_closed
from agent.reassembly import ReassemblyConfig
from agent.sinks.record import FORMATS, RecordError

__all__ = ["UsageError", "build_parser", "main", "memory_budget", "mirror_config"]

log = structlog.get_logger("agent.cli")
T = TypeVar("T")

EXAMPLES = """\
examples:
  # replay a capture, forward client->service bytes of port 8080 to a shadow
  mirror-agent offline traffic.pcap --port 8080 --target 127.0.0.1:18080
  # record both directions as JSON lines, only from one client
  mirror-agent offline a.pcapng b.pcap --port 443 --record out.jsonl \\
      --record-format jsonl --both-directions --filter 'host 192.0.2.10'
  # inject a header into forwarded HTTP requests, redact credentials in the recording
  mirror-agent offline cap.pcap --port 80 --target shadow:80 --inject-header 'X-Mirror: 1' \\
      --record rec.bin --redact-headers=Authorization,Cookie,X-Api-Key
  # print a native recording
  mirror-agent inspect rec.bin
""" + EXIT_HELP


RUN_EXAMPLES = """\
examples:
  # mirror live traffic of port 8080 on eth0 to a shadow, recording requests
  mirror-agent run --iface eth0 --port 8080 --target 10.0.0.5:8080 --record /var/lib/m.bin
  # loopback service, both directions as JSON lines; stop with Ctrl-C or SIGTERM
  mirror-agent run --iface lo --port 9000 --record out.jsonl --record-format jsonl \\
      --both-directions
  # every non-loopback interface, XDP (ingress only), two ports
  mirror-agent run --iface any --port 8080,8081 --engine xdp --target 10.0.0.5:8080
  # a host without eBPF: raw socket with a kernel filter; or eBPF with the BPF ring buffer
  mirror-agent run --iface eth0 --port 8080 --engine afpacket --record m.bin
  mirror-agent run --iface eth0 --port 8080 --transport ringbuf --record m.bin
""" + EXIT_HELP


class UsageError(Exception):
    """Bad flag, file or config: exit 2 with this one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        try:
            argv = a.normalize_argv(sys.argv[1:] if args is None else args)
        except ValueError as e:
            self.error(str(e))
        return super().parse_known_args(argv, namespace)


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=a.ports, required=True, metavar="PORT[,PORT...]",
                   help="observed service port(s); decides each chunk's direction")
    p.add_argument("--target", type=a.target, metavar="HOST:PORT",
                   help="shadow to forward client->service bytes to (one connection per "
                        "captured connection)")
    p.add_argument("--forward-source-ports", type=a.port_range, default=FORWARD_SOURCE_PORTS,
                   metavar="LO-HI",
                   help="local ports shadow connections are made from; capture skips every "
                        "packet with a port in this range, so the agent never mirrors its own "
                        "(or another agent's) forwarded traffic (default: "
                        f"{FORWARD_SOURCE_PORTS[0]}-{FORWARD_SOURCE_PORTS[1]}, above Linux's "
                        "ephemeral ports)")
    p.add_argument("--record", type=a.output_path, metavar="PATH",
                   help="write a recording here ('-' = stdout)")
    p.add_argument("--overwrite", action="store_true",
                   help="truncate an existing --record/--stats-json file (default: keep it "
                        "and write NAME.1.EXT, NAME.2.EXT, ... instead, with a warning)")
    p.add_argument("--record-format", choices=FORMATS, default="native",
                   help="recording format (default: native)")
    p.add_argument("--both-directions", action="store_true",
                   help="record service->client bytes too (default: client->service only)")
    p.add_argument("--filter", metavar="EXPR", help="tcpdump expression packets must match")
    p.add_argument("--hook", action="append", default=[], metavar="MODULE:NAME",
                   help="extra hook for both paths (object, class or function); repeatable")
    p.add_argument("--inject-header", type=a.inject_header, metavar="'NAME: VALUE'",
                   help="add this header to every forwarded HTTP/1.x request (not one that "
                        "frames or routes it: Content-Length, Transfer-Encoding, Host, ...)")
    p.add_argument("--redact-headers", type=a.header_names, nargs="?", const=a.REDACT_DEFAULT,
                   metavar="=NAMES",
                   help="redact request headers in recordings: alone Authorization and "
                        "Cookie, or the names given as --redact-headers=NAME[,NAME...]")
    p.add_argument("--sample", type=a.fraction, metavar="FRACTION",
                   help="mirror only this fraction of connections (0..1)")
    p.add_argument("--idle-timeout", type=a.positive_seconds, default=600.0, metavar="SECONDS",
                   help="flush connections idle this long (default: 600)")
    p.add_argument("--hole-timeout", type=a.seconds, default=2.0, metavar="SECONDS",
                   help="skip a hole (as a gap) once later data waited this long; TCP fills "
                        "real ones sooner (default: 2; 0: only at the limits)")
    p.add_argument("--memory-limit", type=a.size, default=None, metavar="SIZE",
                   help="memory the agent stays under (e.g. 512MiB, 1GiB); every buffer is "
                        "derived from it and logged at start (\"memory budget\"). Default: "
                        "the memory cgroup's limit less 1/8, else 1 GiB (at most a quarter of "
                        "RAM)")
    p.add_argument("--max-flows", type=a.at_least_one, default=None,
                   help="connections tracked at once (default: 100000, fewer if "
                        "--memory-limit cannot hold them at ~1.6 KiB each)")
    p.add_argument("--max-flow-buffer", type=a.at_least_one, default=None, metavar="BYTES",
                   help="out-of-order bytes held per direction (default: 4 MiB, less with a "
                        "small --memory-limit)")
    p.add_argument("--max-buffer", type=a.at_least_one, default=None, metavar="BYTES",
                   help="out-of-order bytes held in total (default: a quarter of the buffers "
                        "--memory-limit allows)")
    p.add_argument("--stats-json", type=a.output_path, metavar="PATH",
                   help="also write the final stats as JSON ('-' = stdout)")
    p.add_argument("--stats-interval", type=a.stats_interval, default=60.0, metavar="SECONDS",
                   help="log every counter this often while running (default: 60; 0: never; "
                        "at least 0.1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mirror-agent", description=_pkg_doc, epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                        help="auto: JSON lines unless stderr is a terminal")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    off = sub.add_parser("offline", help="replay pcap/pcapng files through the pipeline",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    off.add_argument("files", nargs="+", type=a.input_path, metavar="FILE")
    _add_pipeline_options(off)

    run = sub.add_parser("run", help="capture live with eBPF (TC or XDP) and mirror",
                         epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--iface", required=True, type=a.ifaces, metavar="IFACE[,IFACE...]|any",
                     help="interfaces to capture on ('any': every non-loopback one that is up)")
    run.add_argument("--engine", choices=["tc", "xdp", "afpacket"], default="tc",
                     help="tc: eBPF on clsact ingress+egress (default); xdp: eBPF, ingress "
                          "only; afpacket: raw socket with a classic BPF filter, no eBPF needed")
    run.add_argument("--tc-attach", choices=["auto", "tcx", "clsact"], default="auto",
                     help="how --engine tc attaches: tcx (BPF links, kernel 6.6+: first on the "
                          "hook, every other program still runs, gone when the agent dies), "
                          "clsact (a cls_bpf filter of its own priority, for older kernels), or "
                          "auto (default: tcx where the kernel has it, else clsact)")
    run.add_argument("--transport", choices=["perf", "ringbuf"], default="perf",
                     help="eBPF to user space: per-CPU perf buffers (default) or one BPF ring "
                          "buffer (kernel 5.8+)")
    run.add_argument("--decoder", choices=["auto", "native", "python"], default="auto",
                     help="ring records to segments, for either --transport: native (C, "
                          "built with cc on first use; make setup builds it), python, or auto "
                          "(default: native if it can be built, else python with a warning)")
    run.add_argument("--buffer-mib", type=int, default=None, metavar="MIB",
                     help="kernel buffer per CPU (default: 16 MiB, less with more than 8 "
                          "CPUs so all stay near 128 MiB, at least 4; the ring buffer gets "
                          "this times the CPU count; afpacket: the socket's receive buffer, "
                          "x8, default 64 MiB; a small --memory-limit lowers the default). It "
                          "is drained every 20 ms, or sooner once a quarter full")
    _add_pipeline_options(run)

    ins = sub.add_parser("inspect", help="print a native recording")
    ins.add_argument("path", type=a.input_path)
    ins.add_argument("--format", choices=["text", "jsonl"], default="text")
    return parser


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
