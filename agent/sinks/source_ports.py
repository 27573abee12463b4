"""Shadow connections from reserved local ports, which the capture programs skip.

Every connection the agent makes to a shadow is bound to a port of a reserved range
(:data:`agent.config.FORWARD_SOURCE_PORTS`), so capturing its own forwarded traffic is decided
by the port alone, in the kernel. Ports are handed out in rotation (each range has one cursor
per process, starting at a random port), so a port comes back as late as possible; one whose
connection to the same target is still open or in TIME_WAIT is skipped.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import random
import socket
from collections.abc import Iterator
from typing import Any

from agent.config import FORWARD_SOURCE_PORTS

__all__ = ["NoSourcePort", "bind_source_port", "connect_from_ports"]

#: bind/connect errors that mean "this port is taken, try the next one".
_PORT_BUSY = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})

_cursors: dict[tuple[int, int], Iterator[int]] = {}


class NoSourcePort(OSError):
    """Every port of the reserved range is in use (for this target)."""

    def __init__(self, ports: tuple[int, int]) -> None:
        super().__init__(errno.EADDRNOTAVAIL,
                         f"every source port {ports[0]}-{ports[1]} is in use")


def _rotation(ports: tuple[int, int]) -> Iterator[int]:
    """Each port of ``ports`` once, continuing the range's rotation (``next`` on a count is
    atomic, so threads may share it)."""
    lo, hi = ports
    n = hi - lo + 1
    cursor = _cursors.get(ports)
    if cursor is None:
        cursor = _cursors.setdefault(ports, itertools.count(random.randrange(n)))
    for _ in range(n):
        yield lo + next(cursor) % n


def _bind(sock: socket.socket, port: int) -> None:
    # SO_REUSEADDR: a port may serve several targets at once, and be reused while its last
    # connection to another target is in TIME_WAIT; the connect then checks the 4-tuple.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", port))


def bind_source_port(sock: socket.socket,
                     ports: tuple[int, int] = FORWARD_SOURCE_PORTS) -> int:
    """Bind the unbound ``sock`` to a port of ``ports``; return the port.

    For a custom ``dial`` (``MirrorConfig.dial``), which picks its own source port: call it
    before ``connect``. If that connect fails with EADDRNOTAVAIL (the port's connection to
    the same target is still open or in TIME_WAIT), take a new socket and call it again.
    Raises :class:`NoSourcePort` if no port of the range can be bound.
    """
    for port in _rotation(ports):
        try:
            _bind(sock, port)
        except OSError as e:
            if e.errno not in _PORT_BUSY:
                raise
            continue
        return port
    raise NoSourcePort(ports)


async def connect_from_ports(host: str, port: int,
                             ports: tuple[int, int] = FORWARD_SOURCE_PORTS) -> socket.socket:
    """A non-blocking socket connected to ``host:port`` from a port of ``ports``.

    Tries each address ``host`` resolves to, in order; raises the last error, or
    :class:`NoSourcePort` as soon as every port of the range is in use.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error = OSError(errno.EHOSTUNREACH, f"{host} has no address")
    for family, _type, proto, _name, addr in infos:
        try:
            return await _connect(loop, family, proto, addr, ports)
        except NoSourcePort:
            raise
        except OSError as e:
            error = e
    raise error


async def _connect(loop: asyncio.AbstractEventLoop, family: int, proto: int, addr: Any,
                   ports: tuple[int, int]) -> socket.socket:
    for source_port in _rotation(ports):
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setblocking(False)
            _bind(sock, source_port)
            await loop.sock_connect(sock, addr)
        except BaseException as e:  # a cancelled connect must not leak its socket either
            sock.close()
            if isinstance(e, OSError) and e.errno in _PORT_BUSY:
                continue
            raise
        return sock
    raise NoSourcePort(ports)
