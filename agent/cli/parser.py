"""The command line's parser: every option of ``offline``, ``run``, ``serve``, ``config``,
``probe``, ``replay`` and ``inspect``, with the help text and examples; the schema of the
config file and the environment too (:mod:`agent.cli.layers`). Values are checked as they are
parsed (:mod:`agent.cli.args`); a bad one is :class:`UsageError` (exit 2, one line naming the
flag)."""

from __future__ import annotations

import argparse
import sys
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn

from agent.cli import args as a
from agent.cli.outputs import EXIT_HELP
from agent.cli.select import AppendWhole, add_selection_options
from agent.mirror.config import FORWARD_MODES, FORWARD_POOL_SIZE, FORWARD_SOURCE_PORTS
from agent.reassembly import HOLE_TIMEOUT
from agent.sinks.record import COMPRESSIONS, FORMATS
from agent.sources import MAX_PORTS

__all__ = ["UsageError", "build_parser"]


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
  # HTTP/1.x service with short connections: each request on 16 keep-alive connections
  mirror-agent run --iface eth0 --port 8080 --target 10.0.0.5:8080 --forward-mode request \\
      --forward-pool 16
""" + EXIT_HELP


SERVE_EXAMPLES = """\
examples:
  # take capture paths by HTTP and forward their client->service bytes to a shadow
  mirror-agent serve --listen 127.0.0.1:9464 --pcap-dir /srv/captures --port 8080 \\
      --target 127.0.0.1:18080
  curl -X POST -d '{"path": "/srv/captures/a.pcap"}' http://127.0.0.1:9464/pcap
""" + EXIT_HELP

CONFIG_EXAMPLES = """\
examples:
  # what a run with this file and environment would use, and where each value comes from
  MIRROR_AGENT_TARGET=10.0.0.5:8080 mirror-agent config --config /etc/mirror-agent.toml
"""

INSPECT_EXAMPLES = """\
examples:
  # every record, one line each; or as JSON lines for jq (gzip/zstd files are read too)
  mirror-agent inspect rec.bin
  mirror-agent inspect rec.1.bin.gz --format jsonl | jq .from
"""

PROBE_EXAMPLES = """\
examples:
  # liveness probe of an agent whose config file has listen and listen-token-file
  mirror-agent probe --config /etc/mirror-agent/config.toml /healthz
  mirror-agent probe --listen 127.0.0.1:9464 /readyz
"""


REPLAY_EXAMPLES = """\
examples:
  # replay a recording against a release candidate at the recorded pace
  mirror-agent replay rec.bin --target rc.internal:8080
  # as fast as possible over 200 connections, rotated files in order, a JSON report
  mirror-agent replay rec.bin rec.1.bin --target 127.0.0.1:8080 --speed max \\
      --connections 200 --report-json report.json
  # twice the recorded pace, idle gaps cut to 1 s, looping for ten minutes
  mirror-agent replay rec.jsonl --target 127.0.0.1:8080 --speed 2 --max-wait 1 --loop \\
      --duration 600
  # a capture of port 80; compare the candidate with today's build, Diffy-style
  mirror-agent replay cap.pcap --port 80 --target rc:80 --baseline prod-copy:80 \\
      --ignore-headers=Date,X-Request-Id,X-Trace
exit status: 0 done (differences in the responses are the report, not a failure); 2 bad
usage or a source that cannot be read at all; 1 failed; 3 degraded: a source was damaged
(the report names the file and position; the rest replayed) or connections to the target
failed (counted by reason); 130 interrupted (the report is printed).
"""


def _speed(text: str) -> float:
    """``--speed``: ``max`` or a positive factor on the recorded pacing."""
    if text.strip().lower() == "max":
        return float("inf")
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'max'") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} must be a factor above 0 (2: twice as "
                                         "fast), or 'max'")
    return value


def _snaplen(text: str) -> int:
    """``--flow-pcap-snaplen``: 0 (whole packets) or MIN_SNAPLEN..MAX_SNAPLEN bytes."""
    from agent.sinks.flow_pcap import MAX_SNAPLEN, MIN_SNAPLEN

    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value and not MIN_SNAPLEN <= value <= MAX_SNAPLEN:
        raise argparse.ArgumentTypeError(f"{value} is not 0 (whole packets) or "
                                         f"{MIN_SNAPLEN}-{MAX_SNAPLEN} (the IP and TCP "
                                         "headers need 40-60)")
    return value


def _source_ports(text: str) -> tuple[int, int] | None:
    """``--source-ports``: ``LO-HI`` or ``any``."""
    return None if text.strip().lower() == "any" else a.port_range(text)


def _ignore_headers(text: str) -> list[str]:
    """``--ignore-headers=NAMES``: header names, comma-separated; empty ignores none."""
    from agent.hooks.http import check_header_name

    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        try:
            check_header_name(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


DESCRIPTION = "mirror-agent: passive TCP traffic mirror."

#: Options that may be given more than once (``append``, :class:`AppendWhole`): a config
#: file or environment value is a list (or comma-separated) for them.
REPEATABLE: weakref.WeakSet[argparse.Action] = weakref.WeakSet()


class UsageError(Exception):
    """Bad flag, file or config: exit 2 with this one line."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that keeps what it was given: ``declared`` (every option and
    positional, as :meth:`add_argument` returned them) and ``commands`` (the subcommands'
    parsers, by name), so :mod:`agent.cli.layers` reads these, not argparse's private state.
    A usage error raises :class:`UsageError` (exit 2, one line) instead of exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.declared: list[argparse.Action] = []
        self.commands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.declared.append(action)
        if kwargs.get("action") in ("append", AppendWhole):
            REPEATABLE.add(action)
        return action

    def command(self, sub: Any, name: str, **kwargs: Any) -> Parser:
        """``sub.add_parser(name, ...)`` (``sub``: what :meth:`add_subparsers` returned),
        kept in :attr:`commands`."""
        made = sub.add_parser(name, **kwargs)
        assert isinstance(made, Parser)
        self.commands[name] = made
        return made

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
    _add_config_option(p)
    p.add_argument("--port", type=a.ports, metavar="PORT[,PORT...]",
                   help="observed service port(s); decides each chunk's direction (run: "
                        f"at most {MAX_PORTS})")
    p.add_argument("--target", type=a.target, metavar="HOST:PORT",
                   help="shadow to forward client->service bytes to (one connection per "
                        "captured connection, or per request: --forward-mode)")
    p.add_argument("--forward-source-addrs", type=a.source_addrs, metavar="ADDR[,ADDR...]",
                   help="local addresses shadow connections are made from, in turn (default: "
                        "the kernel's choice); each adds --forward-source-ports' worth of "
                        "(address, port) pairs, so more connections a second fit the 60 s "
                        "TIME_WAIT of those the agent closes first")
    p.add_argument("--forward-source-ports", type=a.port_range, default=FORWARD_SOURCE_PORTS,
                   metavar="LO-HI",
                   help="local ports shadow connections are made from; capture skips every "
                        "packet with a port in this range, so the agent never mirrors its own "
                        "(or another agent's) forwarded traffic (default: "
                        f"{FORWARD_SOURCE_PORTS[0]}-{FORWARD_SOURCE_PORTS[1]}, above Linux's "
                        "ephemeral ports)")
    p.add_argument("--forward-mode", choices=FORWARD_MODES, default="connection",
                   help="connection (default): one shadow connection per captured "
                        "connection, any protocol; request: HTTP/1.x only, each request sent "
                        "on a pool of keep-alive connections (--forward-pool) and its response "
                        "read, so connection churn costs the shadow nothing; 'Connection: "
                        "close' is taken out of requests, CONNECT/Upgrade and non-HTTP "
                        "connections are dropped and counted (e.g. --forward-mode request "
                        "--forward-pool 16)")
    p.add_argument("--forward-pool", type=a.at_least_one, default=FORWARD_POOL_SIZE,
                   metavar="N", help="--forward-mode request: keep-alive connections to the "
                                     f"shadow at most (default: {FORWARD_POOL_SIZE})")
    p.add_argument("--record", type=a.output_path, metavar="PATH",
                   help="write a recording here ('-' = stdout; nats://HOST:PORT/SUBJECT: "
                        "publish it to a NATS JetStream stream; tls://... for TLS, "
                        "nats://TOKEN@... or nats://USER:PASSWORD@... to log in)")
    _add_nats_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="truncate an existing --record/--stats-json file (default: keep it "
                        "and write NAME.1.EXT, NAME.2.EXT, ... instead, with a warning)")
    p.add_argument("--record-format", choices=FORMATS, default="native",
                   help="recording format (default: native); pcapng: the connections as "
                        "synthesised packets (a handshake each, MSS-sized segments, gaps "
                        "left as gaps) for Wireshark and tshark")
    p.add_argument("--record-rotate", type=a.rotation, metavar="SIZE|DURATION|SIZE,DURATION",
                   help="start a new recording file past SIZE (256MiB) and/or at the end of "
                        "each DURATION of the clock (90s, 15m, 1h, 1d); a record is never "
                        "split, every file is readable alone; files are named by the --record "
                        "path (strftime patterns such as %%Y%%m%%d-%%H expanded), then "
                        "STEM.1.SUFFIX, STEM.2.SUFFIX, ... never an existing file")
    p.add_argument("--record-max-total", type=a.size, metavar="SIZE",
                   help="with --record-rotate: delete this run's oldest recording files to "
                        "keep them all within SIZE")
    p.add_argument("--record-compress", choices=COMPRESSIONS,
                   help="compress the recording (adds .gz or .zst to the name; inspect reads "
                        "it as is): gzip (level 1) or zstd")
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
    add_selection_options(p)  # --allow-*/--deny-*, --rate-limit, --rewrite-*, ...
    p.add_argument("--idle-timeout", type=a.positive_seconds, default=600.0, metavar="SECONDS",
                   help="flush connections idle this long (default: 600)")
    p.add_argument("--hole-timeout", type=a.seconds, default=HOLE_TIMEOUT, metavar="SECONDS",
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
    _add_flow_pcap_options(p)


def _add_flow_pcap_options(p: argparse.ArgumentParser) -> None:
    """Per-flow pcap files (agent/sinks/flow_pcap.py) and IP anonymisation
    (agent/hooks/anonymize.py). Not --pcap-dir: that one is the directory POST /pcap may read
    from."""
    p.add_argument("--flow-pcap-dir", type=a.input_path, metavar="DIR",
                   help="save each connection's packets to a pcap file of its own in DIR "
                        "(an existing directory), named TIME_CLIENTIP_CPORT_SERVERIP_SPORT"
                        ".pcap, closed at the connection's end; packets are rebuilt from the "
                        "captured segments (no IP/TCP options)")
    p.add_argument("--flow-pcap-snaplen", type=_snaplen, default=0, metavar="BYTES",
                   help="keep at most BYTES of each packet in --flow-pcap-dir files (60: "
                        "headers only; default: 0, whole packets)")
    p.add_argument("--flow-pcap-gzip", action="store_true",
                   help="gzip the --flow-pcap-dir files (.pcap.gz)")
    p.add_argument("--anonymize", choices=["none", "netblock"], default="none",
                   help="netblock: keep only the /24 of IPv4 and the /64 of IPv6 addresses "
                        "(the rest zeroed) in recordings, --flow-pcap-dir files and their "
                        "names; forwarding is unaffected (default: none)")


def _add_nats_options(p: argparse.ArgumentParser) -> None:
    """TLS and credentials of ``--record nats://`` (agent/sinks/nats/auth.py)."""
    p.add_argument("--nats-ca", type=a.input_path, metavar="FILE",
                   help="--record nats://: use TLS, the server's certificate verified against "
                        "the CA certificate(s) in FILE (PEM; tls:// alone: the system's CAs)")
    p.add_argument("--nats-cert", type=a.input_path, metavar="FILE",
                   help="--record nats://: TLS client certificate (PEM), with --nats-key")
    p.add_argument("--nats-key", type=a.input_path, metavar="FILE",
                   help="--record nats://: the private key of --nats-cert (PEM)")
    p.add_argument("--nats-token-file", type=a.input_path, metavar="FILE",
                   help="--record nats://: log in with the token in FILE (re-read at every "
                        "reconnect)")
    p.add_argument("--nats-creds", type=a.input_path, metavar="FILE",
                   help="--record nats://: log in with a NATS .creds file (user JWT and "
                        "nkey seed; needs the nkeys package)")


def _add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=a.input_path, metavar="FILE",
                   help="TOML file of options: every long flag is a key without -- "
                        "(port = [8080], memory-limit = \"512MiB\"); MIRROR_AGENT_<KEY> "
                        "variables override it, flags override both")


def _add_capture_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--iface", type=a.ifaces, metavar="IFACE|PATTERN|any[,...]",
                     help="interfaces to capture on: names, fnmatch patterns ('veth*') and "
                          "'any' (every non-loopback one that is up); with a pattern or 'any' "
                          "the agent follows interfaces as they come and go (tc, xdp); "
                          "required")
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
                          "compiled when the package is installed), python, or auto "
                          "(default: native if installed, else python with a warning)")
    run.add_argument("--buffer-mib", type=int, default=None, metavar="MIB",
                     help="kernel buffer per CPU (default: 16 MiB, less with more than 8 "
                          "CPUs so all stay near 128 MiB, at least 4; the ring buffer gets "
                          "this times the CPU count; afpacket: the socket's receive buffer, "
                          "x8, default 64 MiB; a small --memory-limit lowers the default). It "
                          "is drained every 20 ms, or sooner once a quarter full")
    from agent.sources.ebpf.decap import decap_arg

    run.add_argument("--decap", type=decap_arg, metavar="TUNNEL[,...]",
                     help="also capture the TCP inside these tunnels, one level deep: "
                          "vxlan[:PORT] (default 4789), geneve[:PORT] (6081), gre, erspan, "
                          "ipip; the observed ports apply to the inner TCP and each flow keeps "
                          "its tunnel's identity (VNI, GRE key, ERSPAN session). tc/xdp: in "
                          "the kernel; afpacket: the filter passes the tunnels' packets and "
                          "the ports are checked in user space")


def _add_listen_options(p: argparse.ArgumentParser, asking: bool = False) -> None:
    """``--listen`` and its token file: the server's (``asking``: the agent ``probe`` asks)."""
    p.add_argument("--listen", type=a.listen_address, metavar="HOST:PORT",
                   help="the running agent's --listen: asked on loopback when it is a "
                        "wildcard (0.0.0.0, ::)" if asking else
                        "serve the control API here: GET /metrics /healthz /readyz /status "
                        "/ports, PUT /ports, POST /pcap (loopback unless a token file is "
                        "given)")
    p.add_argument("--listen-token-file", type=a.input_path, metavar="FILE",
                   help="the running agent's token file: its one word is sent as "
                        "'Authorization: Bearer TOKEN'" if asking else
                        "every control request must carry 'Authorization: Bearer TOKEN', "
                        "TOKEN the file's one word (read at start); required for a "
                        "non-loopback --listen")


def _add_control_options(p: argparse.ArgumentParser) -> None:
    _add_listen_options(p)
    p.add_argument("--pcap-dir", type=a.input_path, metavar="DIR",
                   help="POST /pcap replays capture files from this directory (and below) "
                        "only")


def _add_replay(rep: argparse.ArgumentParser) -> None:
    from agent.replay.diff import DEFAULT_IGNORED

    rep.add_argument("sources", nargs="+", type=a.input_path, metavar="SOURCE",
                     help="native or JSON-lines recordings, gzip/zstd compressed or not "
                          "(rotated files in order), pcap/pcapng captures (with --port), or "
                          "nats://HOST:PORT/SUBJECT or tls://... (a NATS recording); - is "
                          "standard input (a pipe, a FIFO or <(...) works too)")
    _add_config_option(rep)
    rep.add_argument("--target", type=a.target, metavar="HOST:PORT",
                     help="where to replay to (the candidate); required")
    rep.add_argument("--baseline", type=a.target, metavar="HOST:PORT",
                     help="also replay to this build of today, and report only differences "
                          "between target and baseline that the baseline does not show "
                          "against production too (noise)")
    rep.add_argument("--port", type=a.ports, metavar="PORT[,PORT...]",
                     help="the service port(s) of capture files: tells requests from "
                          "responses")
    rep.add_argument("--connections", type=a.at_least_one, default=64, metavar="N",
                     help="recorded connections replayed at once (default: 64)")
    rep.add_argument("--speed", type=_speed, default=1.0, metavar="FACTOR|max",
                     help="recorded pacing times FACTOR (2: twice as fast), or max: no "
                          "waiting (default: 1)")
    rep.add_argument("--max-wait", type=a.positive_seconds, metavar="SECONDS",
                     help="cut every idle gap of the recording to at most this long")
    rep.add_argument("--loop", action="store_true",
                     help="start over when every connection has started; stop with "
                          "--duration or a signal")
    rep.add_argument("--duration", type=a.positive_seconds, metavar="SECONDS",
                     help="stop after this long (running connections are closed)")
    rep.add_argument("--timeout", type=a.positive_seconds, default=10.0, metavar="SECONDS",
                     help="connect timeout, and how long the target may stay silent while "
                          "answers are due (default: 10)")
    rep.add_argument("--pipeline", action="store_true",
                     help="send each connection's requests without waiting for the answers "
                          "(HTTP pipelining); default: wait where the recorded client waited")
    rep.add_argument("--ignore-headers", type=_ignore_headers, metavar="NAMES",
                     help="response headers the diff ignores, comma-separated, replacing "
                          f"the default ({','.join(DEFAULT_IGNORED)}); empty: none")
    rep.add_argument("--report-json", type=a.output_path, metavar="PATH",
                     help="also write the report as JSON ('-' = stdout)")
    rep.add_argument("--overwrite", action="store_true",
                     help="truncate an existing --report-json file (default: write "
                          "NAME.1.EXT, ... instead)")
    rep.add_argument("--source-ports", type=_source_ports, default=FORWARD_SOURCE_PORTS,
                     metavar="LO-HI|any",
                     help="local ports to connect from; capture skips them, so a mirror "
                          "agent on this host does not mirror the replay (default: "
                          f"{FORWARD_SOURCE_PORTS[0]}-{FORWARD_SOURCE_PORTS[1]}; any: the "
                          "kernel's choice, for many short connections)")


def build_parser() -> Parser:
    parser = Parser(prog="mirror-agent", description=DESCRIPTION, epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                        help="auto: JSON lines unless stderr is a terminal")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    raw = argparse.RawDescriptionHelpFormatter

    off = parser.command(sub, "offline",
                         help="replay pcap/pcapng files through the pipeline",
                         epilog=EXAMPLES, formatter_class=raw)
    off.add_argument("files", nargs="+", type=a.input_path, metavar="FILE",
                     help="pcap/pcapng captures, read in order; - is standard input (a pipe, "
                          "a FIFO or <(...) works too)")
    _add_pipeline_options(off)

    run = parser.command(sub, "run",
                         help="capture live with eBPF (TC or XDP) and mirror",
                         epilog=RUN_EXAMPLES, formatter_class=raw)
    _add_capture_options(run)
    _add_pipeline_options(run)
    _add_control_options(run)

    serve = parser.command(sub, "serve", help="no capture: replay the capture files "
                           "POST /pcap "
                           "names through the pipeline (no privileges needed)",
                           epilog=SERVE_EXAMPLES, formatter_class=raw)
    _add_pipeline_options(serve)
    _add_control_options(serve)

    conf = parser.command(sub, "config", help="print the effective configuration of "
                          "'run' (flags "
                          "over MIRROR_AGENT_* over --config FILE over defaults) as TOML",
                          epilog=CONFIG_EXAMPLES, formatter_class=raw)
    _add_capture_options(conf)
    _add_pipeline_options(conf)
    _add_control_options(conf)

    probe = parser.command(sub, "probe", help="ask a running agent's control API "
                           "(for liveness "
                           "and readiness probes): exit 0 on 200, else 1",
                           epilog=PROBE_EXAMPLES, formatter_class=raw)
    probe.add_argument("path", metavar="PATH", type=a.url_path,
                       help="what to ask: /healthz, /readyz, /status, ...")
    _add_config_option(probe)
    _add_listen_options(probe, asking=True)

    _add_replay(parser.command(
        sub, "replay", help="replay recordings or captures to a target: one connection per "
        "recorded connection, recorded pacing, response status, latency and diff",
        epilog=REPLAY_EXAMPLES, formatter_class=raw))

    ins = parser.command(sub, "inspect", help="print a native recording",
                         epilog=INSPECT_EXAMPLES,
                         formatter_class=raw)
    ins.add_argument("path", type=a.input_path)
    ins.add_argument("--format", choices=["text", "jsonl"], default="text")
    return parser
