"""Who may hold a control connection: a cap per client address and a global cap, both kept
by shedding the oldest connection that is not being answered.

Refusing the newest connection at a cap would let whoever holds the slots (16 clients that
never finish their request) keep everyone else out, a liveness probe included. Here a new
connection always gets in while any held connection can give way: at the cap of its address,
that address's oldest sheddable connection is closed; at the global cap, the oldest
sheddable one of all. A connection is sheddable unless its request is being answered (a
thread runs its handler); a probe sends its request in one packet and is answered in the
turn of the loop that reads it, so while it waits it is among the newest, never the oldest.
Only when every held connection is being answered is the newcomer refused (503 at once).

The memory this bounds, per connection, measured (RssAnon of a server holding 2,000 to
4,000 connections from another process, CPython 3.11): an idle one (connected, nothing or a
partial head sent) 2.5-2.7 KiB (transport, protocol, bookkeeping); one that filled its head
buffer to :data:`agent.control.http1.MAX_HEAD` (4 KiB) 6.6 KiB. The kernel's socket (~2 KiB
idle; what it receives is read at once) is charged outside RSS. Bodies are capped apart:
:class:`agent.control.conn.Limits` ``bodies`` at once, each at most 64 KiB.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Iterator
from typing import Protocol

__all__ = ["MAX_CONNECTIONS", "PER_ADDRESS", "Admission", "Held", "client_key",
           "default_max_connections"]

#: The global cap: 4,096 connections x 6.6 KiB (each with a full 4 KiB head buffered, the
#: worst case) = 26 MiB; x 2.7 KiB = 11 MiB when they are merely idle, which is what
#: thousands of slow clients cost; plus 4,096 descriptors and 2 MiB of bodies. Legitimate
#: control traffic is a handful of connections (kubelet, Prometheus, an operator): this is
#: 256 x the old thread-per-connection server's 16, and past it connections are shed, not
#: refused, so the cap bounds memory without ever keeping a probe out.
MAX_CONNECTIONS = 4096
#: Connections one client address (an IPv6 /64) may hold: a scraper, probes and an operator
#: need a few at once; 16 is the old server's whole capacity.
PER_ADDRESS = 16
#: The control server takes at most this share of the process's descriptor limit, so the
#: forward sink's shadow connections and the capture keep theirs.
NOFILE_SHARE = 4


def default_max_connections() -> int:
    """:data:`MAX_CONNECTIONS`, or less when the soft RLIMIT_NOFILE is small (a quarter of
    it, at least 64)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(64, min(MAX_CONNECTIONS, soft // NOFILE_SHARE))


def client_key(host: str) -> str:
    """The address a per-address limit counts by: an IPv4 address (IPv4-mapped IPv6
    included) as itself, an IPv6 address by its /64 (one host gets a whole /64)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Held(Protocol):
    """A connection as :class:`Admission` sees it."""

    @property
    def key(self) -> str:
        """Its :func:`client_key`."""
        ...

    @property
    def sheddable(self) -> bool:
        """False while its request is being answered."""
        ...

    def shed(self) -> None:
        """Close it now, without an answer (it was told nothing it asked for)."""
        ...


class Admission:
    """The connections held, oldest first, by address and in all. Loop thread only."""

    def __init__(self, max_connections: int, per_address: int) -> None:
        if max_connections < 1 or per_address < 1:
            raise ValueError("connection limits must be at least 1")
        self.max_connections = max_connections
        self.per_address = per_address
        self._all: dict[Held, None] = {}
        self._by_key: dict[str, dict[Held, None]] = {}
        #: "address" / "global": connections shed to make room; "refused": newcomers
        #: turned away because nothing could be shed. Fixed keys: any thread may read them.
        self.counts = dict.fromkeys(("address", "global", "refused"), 0)

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Held]:
        return iter(list(self._all))

    def admit(self, conn: Held) -> bool:
        """Hold ``conn``, shedding another to make room if a cap is reached; False (not
        held) if nothing could be shed."""
        group = self._by_key.get(conn.key)
        if group is not None and len(group) >= self.per_address \
                and not self._shed_oldest(group, "address"):
            self.counts["refused"] += 1
            return False
        if len(self._all) >= self.max_connections and not self._shed_oldest(self._all,
                                                                            "global"):
            self.counts["refused"] += 1
            return False
        self._all[conn] = None
        self._by_key.setdefault(conn.key, {})[conn] = None
        return True

    def release(self, conn: Held) -> None:
        """``conn`` is closed (idempotent)."""
        if self._all.pop(conn, 0) is None:
            group = self._by_key[conn.key]
            del group[conn]
            if not group:
                del self._by_key[conn.key]

    def held_by(self, key: str) -> int:
        """Connections held by client address ``key``."""
        return len(self._by_key.get(key, ()))

    def _shed_oldest(self, conns: dict[Held, None], why: str) -> bool:
        for conn in conns:
            if conn.sheddable:
                self.release(conn)
                conn.shed()
                self.counts[why] += 1
                return True
        return False
