"""Shadow connections from reserved local ports, which the capture programs skip.

Every connection the agent makes to a shadow is bound to a port of a reserved range
(:data:`agent.mirror.config.FORWARD_SOURCE_PORTS`), so capturing its own forwarded traffic is
decided by the port alone, in the kernel. The forward sink takes ports from a pool, the one
given back longest ago first, and gives each back when its connection ends, so a port comes
back as late as possible and taking one costs no scan; a custom ``dial`` binds with
:func:`bind_source_port`, which walks the range from a shared cursor instead.

A connect failing with EADDRNOTAVAIL means either that (this port's 4-tuple is taken) or that
the target address itself cannot be used from here (say ``::1`` with IPv6 off): a UDP connect
to it, which sends nothing, tells them apart, and an unusable address gives way to the next
one. When every port is taken for an address (its shadow connections in TIME_WAIT for a
minute), that address fails at once for :data:`EXHAUSTED_BACKOFF` seconds instead of being
scanned again for each new flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from agent.mirror.config import FORWARD_SOURCE_PORTS

__all__ = ["NoSourcePort", "bind_source_port", "connect_from_ports", "forward_capacity",
           "literal_infos", "release_source_port"]

#: Seconds a connect waits for one of this process's own connections to free a port.
PORT_WAIT = 1.0
#: Seconds an address whose every source port is taken fails at once (no scan).
EXHAUSTED_BACKOFF = 1.0
_YIELD_EVERY = 64  # ports tried between two yields to the event loop

_lock = threading.Lock()
_cursors: dict[tuple[int, int], int] = {}  # range → where the next walk starts (unbounded)
_exhausted: dict[tuple[object, ...], float] = {}  # (range, address) → end of its back-off
_clock = time.monotonic
#: Where walks and pools start: a generator of its own (the I/O threads never draw from the
#: global ``random`` state an embedding program may have seeded).
_RNG = random.Random()


class NoSourcePort(OSError):
    """Every port of the reserved range is in use (for this target)."""

    def __init__(self, ports: tuple[int, int]) -> None:
        super().__init__(errno.EADDRNOTAVAIL,
                         f"every source port {ports[0]}-{ports[1]} is in use")


class _Walk:
    """One caller's pass over every port of a range, from the range's shared cursor on.

    Thread-safe: each walk takes its own start (the next caller starts one further on) and
    sees the whole range whatever other walks do; :meth:`took` moves the cursor past the
    port a walk ended on, so the next walk starts after it.
    """

    def __init__(self, ports: tuple[int, int]) -> None:
        self._lo, hi = ports
        self._n = hi - self._lo + 1
        self._ports = ports
        with _lock:
            start = _cursors.get(ports)
            if start is None:
                start = _RNG.randrange(self._n)
            _cursors[ports] = start + 1
        self._start = start

    def __iter__(self) -> Iterator[int]:
        for i in range(self._n):
            yield self._lo + (self._start + i) % self._n

    def took(self, port: int) -> None:
        after = self._start + (port - self._lo - self._start) % self._n + 1
        with _lock:
            _cursors[self._ports] = max(_cursors[self._ports], after)


def _bind(sock: socket.socket, port: int, address: str = "") -> None:
    # SO_REUSEADDR: a port may serve several targets at once, and be reused while its last
    # connection to another target is in TIME_WAIT; the connect then checks the 4-tuple.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))


def bind_source_port(sock: socket.socket,
                     ports: tuple[int, int] = FORWARD_SOURCE_PORTS) -> int:
    """Bind the unbound ``sock`` to a port of ``ports``; return the port.

    For a custom ``dial`` (``MirrorConfig.dial``), which picks its own source port: call it
    before ``connect``. If that connect fails with EADDRNOTAVAIL (the port's connection to
    the same target is still open or in TIME_WAIT), take a new socket and call it again.
    Raises :class:`NoSourcePort` if no port of the range can be bound.
    """
    walk = _Walk(ports)
    for port in walk:
        try:
            _bind(sock, port)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        walk.took(port)
        return port
    raise NoSourcePort(ports)


#: A source (address, port) the pool handed out; address "" is the kernel's choice.
Slot = tuple[str, int]


async def connect_from_ports(host: str, port: int,
                             ports: tuple[int, int] = FORWARD_SOURCE_PORTS,
                             infos: list[tuple[Any, ...]] | None = None,
                             addresses: tuple[str, ...] = ()) -> tuple[socket.socket, Slot]:
    """A non-blocking socket connected to ``host:port`` from a port of ``ports`` (on one of
    ``addresses``, each local; none: the kernel picks the address), and the (address, port)
    it took, which stays taken until :func:`release_source_port` gives it back. Several
    addresses multiply the pairs: each holds its own TIME_WAIT.

    Tries each address ``host`` resolves to (or ``infos``, :func:`literal_infos` made once),
    in order. If none works, raises
    :class:`NoSourcePort` if every port was taken for one of them, else the last error.
    """
    loop = asyncio.get_running_loop()
    infos = (infos or literal_infos(host, port)
             or await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    error: OSError = OSError(errno.EHOSTUNREACH, f"{host} has no address")
    exhausted: NoSourcePort | None = None
    for family, _type, proto, _name, addr in infos:
        try:
            return await _connect(loop, family, proto, addr, ports, addresses)
        except NoSourcePort as e:
            exhausted = e
        except OSError as e:
            error = e
    raise exhausted or error


def literal_infos(host: str, port: int) -> list[tuple[Any, ...]] | None:
    """The address info of an IP literal, without a resolver thread (a connection's cost at
    thousands of connections a second); None for a name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (host, port))]
    if "%" in host:  # a scoped link-local address: the resolver knows its scope id
        return None
    return [(socket.AF_INET6, socket.SOCK_STREAM, 0, "", (host, port, 0, 0))]


class _Pool:
    """The (address, port) pairs of one range and address list that this process has not
    handed out, the one given back longest ago first: a pair comes back as late as possible
    (after its TIME_WAIT, where the agent closed first), and taking one costs no scan. The
    addresses alternate, so each carries an equal share. Pairs held by other processes are
    found by the connect and go to the back. Thread-safe."""

    def __init__(self, ports: tuple[int, int], addresses: tuple[str, ...]) -> None:
        lo, hi = ports
        n = hi - lo + 1
        start = _RNG.randrange(n)
        self._free: deque[Slot] = deque((a, lo + (start + i) % n) for i in range(n)
                                        for a in addresses or ("",))
        self.size = len(self._free)
        self._out: set[Slot] = set()
        self._lock = threading.Lock()

    def take(self) -> Slot | None:
        with self._lock:
            if not self._free:
                return None
            slot = self._free.popleft()
            self._out.add(slot)
            return slot

    def give_back(self, slot: Slot) -> None:
        with self._lock:
            if slot in self._out:
                self._out.discard(slot)
                self._free.append(slot)


_pools: dict[tuple[tuple[int, int], tuple[str, ...]], _Pool] = {}


def _pool(ports: tuple[int, int], addresses: tuple[str, ...] = ()) -> _Pool:
    with _lock:
        pool = _pools.get((ports, addresses))
        if pool is None:
            pool = _pools[ports, addresses] = _Pool(ports, addresses)
        return pool


def release_source_port(ports: tuple[int, int], slot: Slot,
                        addresses: tuple[str, ...] = ()) -> None:
    """Give back ``slot`` of ``ports`` and ``addresses``, taken by
    :func:`connect_from_ports`, once its connection is closed (idempotent)."""
    _pool(ports, addresses).give_back(slot)


async def _connect(loop: asyncio.AbstractEventLoop, family: int, proto: int, addr: Any,
                   ports: tuple[int, int], addresses: tuple[str, ...]
                   ) -> tuple[socket.socket, Slot]:
    """Connect to ``addr`` from a pair of ``ports`` and ``addresses`` whose 4-tuple is free:
    the pool's next one, skipping those the connect finds taken. :class:`NoSourcePort` at
    once if this process holds every pair."""
    key = (ports, addresses, family, addr)
    if _exhausted.get(key, 0.0) > _clock():
        raise NoSourcePort(ports)
    pool = _pool(ports, addresses)
    checked = False
    for i in range(pool.size):
        if i % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)  # a long walk must not hold up the other connections
        slot = pool.take() or await _wait_for_port(pool, ports)
        try:
            sock = await _connect_from(loop, family, proto, addr, slot)
        except (_Taken, _InUse) as e:
            pool.give_back(slot)
            if isinstance(e, _Taken) and not checked:  # unusable address: its error
                checked = True
                _check_address(family, addr)
            continue
        except BaseException:
            pool.give_back(slot)
            raise
        _exhausted.pop(key, None)
        return sock, slot
    _exhausted[key] = _clock() + EXHAUSTED_BACKOFF
    raise NoSourcePort(ports)


async def _wait_for_port(pool: _Pool, ports: tuple[int, int]) -> Slot:
    """Every port is held by this process's own connections: wait (up to
    :data:`PORT_WAIT` seconds, looking every 10 ms) for one to be given back, so a burst
    that outlasts the shadow's answers briefly is delivered late rather than dropped;
    then :class:`NoSourcePort`."""
    for _ in range(int(PORT_WAIT / 0.01)):
        await asyncio.sleep(0.01)
        slot = pool.take()
        if slot is not None:
            return slot
    raise NoSourcePort(ports)


class _InUse(Exception):
    """The source port cannot be bound (EADDRINUSE)."""


class _Taken(Exception):
    """The connect failed with EADDRNOTAVAIL: the 4-tuple is taken, or the address unusable."""


async def _connect_from(loop: asyncio.AbstractEventLoop, family: int, proto: int, addr: Any,
                        slot: Slot) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        try:
            _bind(sock, slot[1], slot[0])
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise _InUse from None
            raise
        try:
            await loop.sock_connect(sock, addr)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise _Taken from None
            raise
    except BaseException:  # a cancelled connect must not leak its socket either
        sock.close()
        raise
    return sock


def _check_address(family: int, addr: Any) -> None:
    """Raise the error any connect to ``addr`` gets, whatever its source port (no route, no
    source address: IPv6 off). A UDP connect picks route and source without sending."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(addr)


#: Seconds a closed connection stays in TIME_WAIT on the side that closed first (Linux's
#: TCP_TIMEWAIT_LEN): its (address, port) pair to that target is not reused meanwhile.
TIME_WAIT_SECONDS = 60


def _tw_reuse() -> int:
    """``net.ipv4.tcp_tw_reuse`` of this network namespace (0, 1, or 2: loopback only)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_tw_reuse") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def forward_capacity(ports: tuple[int, int], target_host: str,
                     addresses: int = 1) -> dict[str, object]:
    """What the reserved source ports allow to one target, for the start-up log and
    ``/status``: every connection the agent closes first holds its (address, port) for
    :data:`TIME_WAIT_SECONDS`, so at most ``addresses * ports / 60`` new connections a
    second when that is every connection; connections the shadow closes first (HTTP
    ``Connection: close``, the agent's default when the service closed first) leave no
    TIME_WAIT here and are not bound by ports. With ``tcp_tw_reuse`` (1, or 2 and a loopback
    target) the kernel reuses a pair after 1 s instead."""
    lo, hi = ports
    pairs = (hi - lo + 1) * max(1, addresses)
    reuse = _tw_reuse()
    loopback = False
    with contextlib.suppress(ValueError):
        loopback = ipaddress.ip_address(target_host.strip("[]")).is_loopback
    hold = 1 if reuse == 1 or (reuse == 2 and loopback) else TIME_WAIT_SECONDS
    return {"source_ports": hi - lo + 1, "source_addresses": max(1, addresses),
            "time_wait_seconds": hold,
            "max_new_connections_per_second_agent_closing_first": pairs // hold}
