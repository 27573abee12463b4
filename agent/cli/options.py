"""The validated options of one command: what the command line, the ``MIRROR_AGENT_*``
environment and the ``--config`` file said, merged and checked once
(:func:`agent.cli.layers.parse_options`), then handed to the stages.

Nothing past the command line sees an ``argparse.Namespace``: the stages get these frozen
objects (or the library configs made from them: :class:`~agent.mirror.config.MirrorConfig`). The
defaults here are the library's (:data:`~agent.reassembly.HOLE_TIMEOUT`,
:data:`~agent.mirror.config.FORWARD_SOURCE_PORTS`), so the CLI and the library agree.

Checks that need only the values live here (:class:`OptionError`, exit 2); checks that need
the host (a target that resolves, capabilities, interfaces) happen at start in
:mod:`agent.cli.commands`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cli.select import SelectOptions
from agent.mirror.config import FORWARD_POOL_SIZE, FORWARD_SOURCE_PORTS
from agent.reassembly import HOLE_TIMEOUT
from agent.replay.runner import Plan
from agent.sinks.nats.auth import FLAGS as NATS_FLAGS
from agent.sinks.nats.auth import NatsAuth
from agent.sinks.nats.url import is_nats_url, parse_nats_url, redact_url
from agent.sinks.record import RecordPolicy, check_compression, parse_rotation
from agent.sources import PortLimitError, check_port_count

__all__ = [
    "CaptureOptions",
    "ControlOptions",
    "OptionError",
    "Options",
    "PipelineOptions",
    "ReplayOptions",
]


class OptionError(ValueError):
    """An option's value, alone or with another, cannot work: exit 2 with this one line."""


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """What ``offline``, ``run`` and ``serve`` share: ports, sinks, hooks, limits."""

    ports: tuple[int, ...]
    target: str | None = None
    forward_source_ports: tuple[int, int] = FORWARD_SOURCE_PORTS
    forward_source_addrs: tuple[str, ...] = ()
    """``--forward-source-addrs``: local addresses shadow connections are bound to."""
    forward_mode: str = "connection"
    """``--forward-mode``: ``connection`` or ``request`` (:attr:`ForwardConfig.mode`)."""
    forward_pool: int = FORWARD_POOL_SIZE
    """``--forward-pool``: keep-alive connections to the shadow at most (request mode)."""
    record: str | None = None
    overwrite: bool = False
    record_format: str = "native"
    record_rotate: str | None = None
    """``--record-rotate``: SIZE, DURATION or SIZE,DURATION (checked text)."""
    record_max_total: int | None = None
    record_compress: str | None = None
    nats_ca: str | None = None
    """``--nats-ca`` and the other ``--nats-*`` files: TLS and the credential of ``--record
    nats://`` (:mod:`agent.sinks.nats.auth`); checked on disk at start."""
    nats_cert: str | None = None
    nats_key: str | None = None
    nats_token_file: str | None = None
    nats_creds: str | None = None
    both_directions: bool = False
    filter: str | None = None
    hooks: tuple[str, ...] = ()
    inject_header: tuple[str, str] | None = None
    redact_headers: tuple[str, ...] = ()
    sample: float | None = None
    select: SelectOptions = field(default_factory=SelectOptions)
    """``--allow-*``, ``--deny-*``, ``--sample-by-header``, ``--rate-limit``, ``--rewrite-*``."""
    idle_timeout: float = 600.0
    hole_timeout: float = HOLE_TIMEOUT
    memory_limit: int | None = None
    max_flows: int | None = None
    max_flow_buffer: int | None = None
    max_buffer: int | None = None
    stats_json: str | None = None
    stats_interval: float = 60.0
    flow_pcap_dir: str | None = None
    """``--flow-pcap-dir``: a pcap file per connection here (:mod:`agent.sinks.flow_pcap`)."""
    flow_pcap_snaplen: int = 0
    flow_pcap_gzip: bool = False
    anonymize: str = "none"
    """``--anonymize``: ``none`` or ``netblock`` (:mod:`agent.hooks.anonymize`)."""

    def __post_init__(self) -> None:
        if not self.ports:
            raise OptionError("no observed port: give --port (or 'port' in the config file, "
                              "or MIRROR_AGENT_PORT)")
        self._check_record_files()
        if self.flow_pcap_dir is None:
            for flag, given in (("--flow-pcap-snaplen", self.flow_pcap_snaplen),
                                ("--flow-pcap-gzip", self.flow_pcap_gzip)):
                if given:
                    raise OptionError(f"{flag} needs --flow-pcap-dir")

    @property
    def flow_pcap(self) -> str:
        """The budget's view of the per-flow pcap files: "" none, "pcap" or "gzip"."""
        if self.flow_pcap_dir is None:
            return ""
        return "gzip" if self.flow_pcap_gzip else "pcap"

    def _check_record_files(self) -> None:
        """The recording's rotation, total size and compression make sense together."""
        given = [f"--record-{k}" for k, v in (("rotate", self.record_rotate),
                                               ("max-total", self.record_max_total),
                                               ("compress", self.record_compress)) if v]
        if given and self.record is None:
            raise OptionError(f"{given[0]} needs --record")
        if self.record is not None and is_nats_url(self.record):
            self._check_nats_record(given)
        else:
            nats = [f for f, v in zip(NATS_FLAGS.values(), self._nats_files, strict=True) if v]
            if nats:
                raise OptionError(f"{nats[0]} needs --record nats://HOST:PORT/SUBJECT "
                                  "(or tls://...)")
        if self.record_compress is not None:
            try:
                check_compression(self.record_compress)
            except ValueError as e:
                raise OptionError(str(e)) from None
        if self.record_rotate is not None and self.record == "-":
            raise OptionError("--record-rotate needs a file path: --record - is stdout")
        try:
            rot = parse_rotation(self.record_rotate) if self.record_rotate else None
        except ValueError as e:
            raise OptionError(f"--record-rotate: {e}") from None
        if self.record_max_total is not None:
            if rot is None:
                raise OptionError("--record-max-total needs --record-rotate (it deletes the "
                                  "oldest rotated files)")
            if rot.max_bytes is not None and self.record_max_total < rot.max_bytes:
                raise OptionError(f"--record-max-total {self.record_max_total} is less than "
                                  f"the --record-rotate size {rot.max_bytes}")

    def _check_nats_record(self, given: list[str]) -> None:
        """``--record nats://...``: a well-formed URL that goes with the ``--nats-*``
        flags, native records, no file options."""
        try:
            target = parse_nats_url(str(self.record))
        except ValueError as e:
            raise OptionError(f"--record {e}") from None
        try:
            target.with_flags(self.nats_auth)
        except ValueError as e:
            raise OptionError(str(e)) from None
        if given:
            raise OptionError(f"{given[0]} needs a file: --record {redact_url(self.record or '')} "
                              "publishes to a NATS stream")
        if self.record_format != "native":
            raise OptionError(f"--record-format {self.record_format}: a NATS recording is "
                              "native records (one per message)")

    @property
    def _nats_files(self) -> tuple[str | None, ...]:
        """The ``--nats-*`` files in :data:`agent.sinks.nats.auth.FLAGS`' order."""
        return (self.nats_ca, self.nats_cert, self.nats_key, self.nats_token_file,
                self.nats_creds)

    @property
    def nats_auth(self) -> NatsAuth | None:
        """The ``--nats-*`` files (TLS, a credential) for ``--record nats://``; None if no
        such flag was given."""
        if not any(self._nats_files):
            return None
        return NatsAuth(ca_file=self.nats_ca, cert_file=self.nats_cert,
                        key_file=self.nats_key, token_file=self.nats_token_file,
                        creds_file=self.nats_creds)

    @property
    def record_files(self) -> RecordPolicy | None:
        """How the recording is split, trimmed and compressed; None: one plain file."""
        if self.record_rotate is None and self.record_compress is None:
            return None
        rotation = parse_rotation(self.record_rotate) if self.record_rotate else None
        return RecordPolicy(rotation, self.record_max_total, self.record_compress)

    @property
    def needs_responses(self) -> bool:
        """Does anything consume service→client bytes? Only a both-directions recording and
        user hooks (which may look at them); the built-in hooks see requests only."""
        return self.both_directions or bool(self.hooks)


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """Live capture (``run``): where and how."""

    iface: str
    engine: str = "tc"
    tc_attach: str = "auto"
    transport: str = "perf"
    decoder: str = "auto"
    buffer_mib: int | None = None
    decap: str | None = None
    """``--decap``: the tunnels looked inside (:class:`agent.sources.ebpf.decap.Decap`'s text)."""

    @property
    def budget_transport(self) -> str:
        """The transport the memory budget sizes: afpacket's socket buffer or the eBPF ring."""
        return "afpacket" if self.engine == "afpacket" else self.transport


@dataclass(frozen=True, slots=True)
class ControlOptions:
    """The control server (``--listen``) and its ``/pcap`` ingest."""

    listen: str | None = None
    listen_token_file: Path | None = None
    pcap_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """``replay``: what to replay (``sources``), how (``plan``: the target, pace and
    connections, as :class:`~agent.replay.runner.Plan` runs them), and what to compare and
    report."""

    sources: tuple[Path, ...]
    plan: Plan
    ports: tuple[int, ...] = ()
    """The service's ports, for capture files (they tell requests from responses)."""
    ignore_headers: tuple[str, ...] = ()
    report_json: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            raise OptionError("replay needs at least one SOURCE")
        if self.plan.baseline is not None and self.plan.baseline == self.plan.target:
            raise OptionError("--baseline is the same address as --target: give the build "
                              "of today as --baseline and the candidate as --target")


@dataclass(frozen=True, slots=True)
class Options:
    """Everything one command was told, checked. ``origins`` says where each key's value came
    from (``flag``, ``env MIRROR_AGENT_X``, ``config FILE``); a key not in it is a default."""

    command: str
    log_level: str = "info"
    log_format: str = "auto"
    config_file: Path | None = None
    pipeline: PipelineOptions | None = None
    capture: CaptureOptions | None = None
    control: ControlOptions = field(default_factory=ControlOptions)
    replay: ReplayOptions | None = None
    files: tuple[Path, ...] = ()
    """``offline``: the capture files."""
    path: str = ""
    """``inspect``: the recording; ``probe``: the URL path to ask."""
    format: str = "text"
    """``inspect``: text or jsonl."""
    values: dict[str, Any] = field(default_factory=dict)
    """Every key's effective value, by key (the flag's name without ``--``)."""
    origins: dict[str, str] = field(default_factory=dict)
    stray_env: tuple[str, ...] = ()
    """``MIRROR_AGENT_*`` variables that name no option (ignored; the command warns)."""

    def __post_init__(self) -> None:
        if self.capture is not None and self.pipeline is not None:
            try:  # the kernel filter's size (agent.sources.MAX_PORTS), before anything starts
                check_port_count(self.pipeline.ports)
            except PortLimitError as e:
                raise OptionError(f"--port names {e}") from None

    @property
    def pipe(self) -> PipelineOptions:
        """The pipeline options (``offline``, ``run``, ``serve``); a programming error if
        the command has none."""
        if self.pipeline is None:
            raise TypeError(f"{self.command!r} has no pipeline options")
        return self.pipeline

    @property
    def live(self) -> CaptureOptions:
        """The capture options (``run``)."""
        if self.capture is None:
            raise TypeError(f"{self.command!r} has no capture options")
        return self.capture

    def effective(self) -> dict[str, tuple[Any, str]]:
        """Each key → (value, origin), ``default`` for a key nobody set: what ``mirror-agent
        config`` prints and ``/status`` shows."""
        return {k: (v, self.origins.get(k, "default")) for k, v in sorted(self.values.items())}
