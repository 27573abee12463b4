"""MirrorConfig: everything a :class:`~agent.mirror.driver.TrafficMirror` needs, with defaults."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from agent.hooks import Hook
from agent.mirror import budget as _budget
from agent.mirror.budget import Budget
from agent.model import TrafficChunk
from agent.reassembly import ReassemblyConfig

if TYPE_CHECKING:
    from agent.sinks.flow_pcap import FlowPcapConfig
    from agent.sinks.nats.url import NatsTarget
    from agent.sinks.record import RecordFiles

__all__ = [
    "FORWARD_MODES",
    "FORWARD_POOL_SIZE",
    "FORWARD_SOURCE_PORTS",
    "Dial",
    "ForwardConfig",
    "MirrorConfig",
    "WriteFunc",
    "check_port_range",
    "parse_port_range",
    "parse_target",
]

#: Local ports of the agent's own shadow connections. The capture programs drop every packet
#: whose source or destination port is in this range, so the agent never captures its own
#: forwarded traffic (nor another agent's, on this host or another). It lies above Linux's
#: default ephemeral range (``net.ipv4.ip_local_port_range`` 32768-60999), so ordinary clients
#: never get such a port and the service's own traffic is never hidden by it.
FORWARD_SOURCE_PORTS: tuple[int, int] = (61000, 65535)

#: How the forward sink sends (:attr:`ForwardConfig.mode`).
FORWARD_MODES = ("connection", "request")
#: Keep-alive connections to the shadow at most, in request mode (:attr:`ForwardConfig.
#: pool_size`).
FORWARD_POOL_SIZE = 32

#: A connect factory: ``dial("host:port") -> connected socket`` (blocking; run off-thread).
Dial = Callable[[str], socket.socket]


_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def parse_target(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError with a clear message
    (the host is checked for its form only, not resolved)."""
    if not addr:
        raise ValueError("target is empty: give HOST:PORT (e.g. 127.0.0.1:8080)")
    if "://" in addr:
        raise ValueError(f"target {addr!r}: give HOST:PORT without a scheme "
                         "(e.g. 127.0.0.1:8080)")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port or addr.endswith("]"):
        raise ValueError(f"target {addr!r} is not HOST:PORT")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"target {addr!r}: port {port!r} is not a number")
    if not 0 < int(port) < 65536:
        raise ValueError(f"target {addr!r}: port {int(port)} is out of range 1-65535")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"target {addr!r}: unbalanced bracket (IPv6: [::1]:8080)")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"target {addr!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"target {addr!r}: an IPv6 address goes in brackets ([::1]:8080)")
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"target {addr!r}: {host!r} is not a host name or address")
    return host, int(port)


def check_port_range(lo: int, hi: int) -> tuple[int, int]:
    """``(lo, hi)`` if it is a valid inclusive port range, else ValueError saying why."""
    if not (0 < lo < 65536 and 0 < hi < 65536):
        raise ValueError(f"port range {lo}-{hi}: ports must be 1-65535")
    if lo > hi:
        raise ValueError(f"port range {lo}-{hi}: the first port is above the last")
    return lo, hi


def parse_port_range(text: str) -> tuple[int, int]:
    """``"61000-65535"`` → ``(61000, 65535)`` (``"62000"`` is one port); ValueError if bad."""
    lo, sep, hi = text.strip().partition("-")
    if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
        raise ValueError(f"port range {text!r} is not LO-HI (for example 61000-65535)")
    return check_port_range(int(lo), int(hi) if sep else int(lo))


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    connect_timeout: float = 5.0
    max_flow_buffer: int = 8 << 20
    max_total_buffer: int = 256 << 20
    close_timeout: float = 5.0
    """Seconds :meth:`ForwardSink.close` waits for queued bytes to reach the target."""
    source_ports: tuple[int, int] = FORWARD_SOURCE_PORTS
    """Local ports (inclusive) the default dial binds shadow connections to; see
    :data:`FORWARD_SOURCE_PORTS`."""
    source_addrs: tuple[str, ...] = ()
    """Local addresses (IP literals of this host, one family) the default dial binds shadow
    connections to, in turn; each multiplies the (address, port) pairs a TIME_WAIT holds.
    Empty: the kernel picks the address."""
    end_grace: float = 2.0
    """Seconds a finished shadow connection waits, once the target acknowledged its bytes and
    FIN, for the target to answer or close; one that does neither is counted
    ``connections_unconfirmed``."""
    log_interval: float = 10.0
    """At most one warning per failure reason this often (each outage is logged once)."""
    stall_timeout: float = 10.0
    """Seconds a shadow connection may go without the target acknowledging a byte while some
    are outstanding; then the flow is dropped as ``stalled``."""
    end_timeout: float = 60.0
    """Seconds at most from the client's end (or from the connect, if later) until all of a
    flow's bytes are acknowledged; a target that takes them slower is cut off: ``stalled``."""
    overload_lag: float = 1.0
    """Seconds a new flow may wait for a dial slot (:data:`agent.sinks.forward.MAX_DIALING`
    under way at once); one that waited longer is dropped (``overload``), so the connections
    under way still complete instead of every connection timing out in a backlog."""
    mode: str = "connection"
    """``connection``: one shadow connection per captured connection, any protocol
    (:mod:`agent.sinks.forward`); ``request``: each HTTP/1.x request on a pool of keep-alive
    connections (:mod:`agent.sinks.request_forward`)."""
    pool_size: int = FORWARD_POOL_SIZE
    """Request mode: keep-alive connections to the shadow at most."""
    response_timeout: float = 10.0
    """Request mode: seconds a request may wait for a pooled connection, and then for the
    shadow to take or answer anything, before it is dropped (``overload``, ``stalled``)."""

    def __post_init__(self) -> None:
        check_port_range(*self.source_ports)
        for name in ("connect_timeout", "close_timeout", "end_grace", "stall_timeout",
                     "end_timeout", "overload_lag", "response_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"forward {name} must not be negative")
        if self.mode not in FORWARD_MODES:
            raise ValueError(f"forward mode {self.mode!r} is not one of "
                             f"{', '.join(FORWARD_MODES)}")
        if self.pool_size < 1:
            raise ValueError("forward pool_size must be at least 1")



#: A custom record writer: called with the chunk and the bytes the record hooks produced.
WriteFunc = Callable[[TrafficChunk, bytes], None]


def _default_reassembly() -> ReassemblyConfig:
    """The reassembly limits of the default memory budget (:func:`agent.mirror.budget.default`)."""
    b = _budget.default()
    return ReassemblyConfig(max_flows=b.max_flows, max_flow_buffer=b.reassembly_flow,
                            max_total_buffer=b.reassembly_total)


def _default_forward() -> ForwardConfig:
    """The forward limits of the default memory budget (:func:`agent.mirror.budget.default`)."""
    b = _budget.default()
    return ForwardConfig(max_flow_buffer=b.forward_flow, max_total_buffer=b.forward_total)


@dataclass
class MirrorConfig:
    """Configuration of one mirror.

    * ``observed_port``: the service port; it decides each chunk's direction. ``0`` makes
      every direction unknown, so the default hooks drop everything (a warning is logged).
      ``extra_ports`` adds more observed ports.
    * ``target_addr``: ``host:port`` of the shadow; empty means record only (forward hooks
      are then not called).
    * ``writer``: a binary file-like object recordings go to, in ``record_format``, or the
      :class:`~agent.sinks.record.RecordFiles` of a rotated or compressed recording, or a
      :class:`~agent.sinks.nats.NatsTarget` (native records published to a JetStream
      stream, ``record_format`` aside); ``write_func`` wins over it. With neither, nothing
      is written but record hooks run.
    * ``forward_hook`` / ``record_hook``: one hook or a list run in order; ``None`` picks the
      default (only client→service chunks).
    * ``dial``: connect factory for the shadow (default: TCP connect from a port of
      ``forward.source_ports``, 5 s timeout). A custom dial picks its own source port: bind
      with :func:`agent.sinks.forward.bind_source_port` before connecting, or the capture may
      see the agent's own forwarded traffic.
    * ``track_responses``: ``False`` skips service→client bytes (neither reassembled nor
      handed to hooks; the connection's SYN/FIN/RST still count). Set it only when no hook
      or sink needs responses: it halves the work, and live sources skip that payload
      in the kernel.
    * ``budget``: the memory budget (:mod:`agent.mirror.budget`) the record writer's queue comes
      from and that the metrics show; ``reassembly`` and ``forward`` default to its limits,
      the same the command line derives when given no ``--memory-limit``.
    """

    observed_port: int = 0
    target_addr: str = ""
    writer: BinaryIO | RecordFiles | NatsTarget | None = None
    write_func: WriteFunc | None = None
    forward_hook: Hook | Sequence[Hook] | None = None
    record_hook: Hook | Sequence[Hook] | None = None
    dial: Dial | None = None
    extra_ports: frozenset[int] = frozenset()
    record_format: str = "native"
    reassembly: ReassemblyConfig = field(default_factory=_default_reassembly)
    forward: ForwardConfig = field(default_factory=_default_forward)
    budget: Budget = field(default_factory=_budget.default)
    anonymize: Callable[[bytes], bytes] | None = None
    """Rewrites every observed address before it leaves the process (chunks, so records and
    hooks; flow pcap files): :mod:`agent.hooks.anonymize`. None: addresses as captured."""
    flow_pcap: FlowPcapConfig | None = None
    """Save each connection's packets to a pcap file of its own
    (:mod:`agent.sinks.flow_pcap`); None: no such files."""
    track_responses: bool = True
    record_in_background: bool = False
    """Write ``writer`` on a thread of its own (bounded; excess dropped and counted), so a
    live capture loop never waits for the disk. ``run`` sets it."""

    @property
    def ports(self) -> frozenset[int]:
        """Every observed port (``observed_port`` and ``extra_ports``), without 0."""
        return frozenset(p for p in {self.observed_port, *self.extra_ports} if p)
