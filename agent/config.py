"""MirrorConfig: everything a :class:`~agent.mirror.TrafficMirror` needs, with defaults."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from agent.hooks import Hook
from agent.model import TrafficChunk
from agent.reassembly import ReassemblyConfig

__all__ = ["Dial", "ForwardConfig", "MirrorConfig", "WriteFunc", "parse_target"]

#: A connect factory: ``dial("host:port") -> connected socket`` (blocking; run off-thread).
Dial = Callable[[str], socket.socket]


def parse_target(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError with a clear message."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {addr!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    connect_timeout: float = 5.0
    max_flow_buffer: int = 8 << 20
    max_total_buffer: int = 256 << 20
    close_timeout: float = 5.0
    """Seconds :meth:`ForwardSink.close` waits for queued bytes to reach the target."""



#: A custom record writer: called with the chunk and the bytes the record hooks produced.
WriteFunc = Callable[[TrafficChunk, bytes], None]


@dataclass
class MirrorConfig:
    """Configuration of one mirror.

    * ``observed_port``: the service port; it decides each chunk's direction. ``0`` makes
      every direction unknown, so the default hooks drop everything (a warning is logged).
      ``extra_ports`` adds more observed ports.
    * ``target_addr``: ``host:port`` of the shadow; empty means record only (forward hooks
      are then not called).
    * ``writer``: a binary file-like object recordings go to, in ``record_format``;
      ``write_func`` wins over it. With neither, nothing is written but record hooks run.
    * ``forward_hook`` / ``record_hook``: one hook or a list run in order; ``None`` picks the
      default (only client→service chunks).
    * ``dial``: connect factory for the shadow (default: TCP connect, 5 s timeout).
    * ``track_responses``: ``False`` skips service→client bytes (neither reassembled nor
      handed to hooks; the connection's SYN/FIN/RST still count). Set it only when no hook
      or sink needs responses: it halves the work, and live sources skip that payload
      in the kernel.
    """

    observed_port: int = 0
    target_addr: str = ""
    writer: BinaryIO | None = None
    write_func: WriteFunc | None = None
    forward_hook: Hook | Sequence[Hook] | None = None
    record_hook: Hook | Sequence[Hook] | None = None
    dial: Dial | None = None
    extra_ports: frozenset[int] = frozenset()
    record_format: str = "native"
    reassembly: ReassemblyConfig = field(default_factory=ReassemblyConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    anonymize: Callable[[bytes], bytes] | None = None
    track_responses: bool = True
    record_in_background: bool = False
    """Write ``writer`` on a thread of its own (bounded; excess dropped and counted), so a
    live capture loop never waits for the disk. ``run`` sets it."""

    @property
    def ports(self) -> frozenset[int]:
        """Every observed port (``observed_port`` and ``extra_ports``), without 0."""
        return frozenset(p for p in {self.observed_port, *self.extra_ports} if p)
