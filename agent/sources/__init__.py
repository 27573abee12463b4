"""Packet sources: each yields batches of :class:`~agent.model.Segment` for the mirror.

A source may yield an empty batch when it has nothing new; the mirror uses that moment to let
time pass (idle sweeps) and to check for cancellation. ``close`` is idempotent.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Protocol, runtime_checkable

from agent.mirror.heartbeat import Heartbeat
from agent.model import Segment

__all__ = ["MAX_PORTS", "HasAttachments", "HasHeartbeats", "LiveSource", "PacketSource",
           "PortLimitError", "PortSteerable", "SourceError", "check_port_count"]

#: The most ports a live capture observes at once (``--port``, ``PUT /ports``), one bound
#: for every engine so a port list that works on one works on all. It is the AF_PACKET
#: engine's: libpcap turns N ports into ~4N classic BPF instructions up to ~128 ports and
#: ~8N past that (its jumps outgrow 8 bits), and the kernel takes at most 4,096 (BPF_MAXINSNS)
#: per socket filter: 256 ports take ~1,600 (measured), which leaves room for ``--filter``
#: and ``--decap``; 512 would leave under 500. The eBPF engines' map (``ports`` in
#: ``bpf/mirror.bpf.c``) is a hash sized to this: a packet costs at most two lookups (its two
#: ports) whatever the count, and 256 preallocated entries take a few KiB of kernel memory.
MAX_PORTS = 256


class SourceError(Exception):
    """A source cannot be opened or read (bad file, missing interface, ...)."""


class PortLimitError(ValueError):
    """More observed ports than a live capture takes (:data:`MAX_PORTS`)."""


def check_port_count(ports: Collection[int]) -> None:
    """PortLimitError if ``ports`` (distinct) are more than :data:`MAX_PORTS`; the message
    names the limit, for the caller to prefix with where the ports came from."""
    if len(ports) > MAX_PORTS:
        raise PortLimitError(f"{len(ports)} ports, but a live capture observes at most "
                             f"{MAX_PORTS}")


@runtime_checkable
class PacketSource(Protocol):
    """What :meth:`agent.mirror.driver.TrafficMirror.run` consumes."""

    def batches(self) -> Iterator[list[Segment]]:
        """Segments in capture order, in batches; ends when the source is exhausted."""
        ...

    def close(self) -> None:
        """Release the source; safe to call more than once."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters: frames read, skipped by reason, losses, ..."""
        ...


@runtime_checkable
class LiveSource(PacketSource, Protocol):
    """A source the kernel feeds as time passes (eBPF, AF_PACKET): the mirror lets
    wall-clock time pass for it (idle sweeps, hole timeouts) even while segments arrive, and
    on cancellation takes what it still holds with :meth:`drain` before flushing."""

    def drain(self) -> list[Segment]:
        """Everything still buffered (rings, held-back segments), in order; stops the
        source's own reading."""
        ...


@runtime_checkable
class PortSteerable(Protocol):
    """A live capture whose observed ports change while it runs (``PUT /ports``): the kernel
    filter is updated in place, nothing reloads, and nothing is lost on the ports that stay."""

    @property
    def ifaces(self) -> list[str]:
        """The names of the interfaces captured now."""
        ...

    @property
    def ports(self) -> list[int]:
        """The observed ports, sorted."""
        ...

    def set_ports(self, ports: list[int]) -> None:
        """Observe exactly ``ports`` (non-empty, at most :data:`MAX_PORTS`) from now on, or
        raise ValueError (PortLimitError: too many) with the previous ports still observed:
        a change is all or nothing, and :attr:`ports` is always what the kernel filters."""
        ...


@runtime_checkable
class HasHeartbeats(Protocol):
    """A source with threads of its own (the eBPF ring drain) that ``/healthz`` watches."""

    def heartbeats(self) -> list[Heartbeat]:
        """Its threads' heartbeats (each started and stopped with its thread)."""
        ...


@runtime_checkable
class HasAttachments(Protocol):
    """A live capture that says where it is attached (for ``GET /status``)."""

    def attachments(self) -> list[dict[str, str | int]]:
        """One ``{"name", "ifindex", "how", "side"}`` per interface captured now, by name:
        ``how`` is ``tcx``, ``clsact``, ``xdp-native``, ``xdp-generic`` or ``afpacket``;
        ``side`` is ``host``, ``pod`` or ``all`` (every packet)."""
        ...

    def tracked(self) -> dict[str, int]:
        """What it holds to follow interfaces (by kind → count; empty if it does not
        follow): flat while interfaces come and go, or something leaks."""
        ...
