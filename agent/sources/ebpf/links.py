"""Which interfaces to capture (``--iface``) and what the kernel says about them: links and
their addresses, read from rtnetlink (a dump, then events as they come).

The spec is comma-separated entries: a name (``eth0``), an ``fnmatch`` pattern (``veth*``,
``cali?*``, ``eth[01]``), or ``any``: every non-loopback interface that is up. Interfaces are
keyed by ifindex, never by name: names and indexes are reused as pods come and go.

rtnetlink is read with a plain ``NETLINK_ROUTE`` socket and a small parser (the few fields
used: ifindex, name, IFF_UP, addresses), not pyroute2: the watcher is one descriptor, starts
no threads or event loops of its own, and a dump and an event are parsed by the same code.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from agent.sources import SourceError

__all__ = ["AddrEvent", "Event", "IfaceSpec", "LinkEvent", "LinkWatcher", "captured_route",
           "check_names", "dump", "link_local", "map_key", "names_now", "parse",
           "resolve_ifaces"]

_RTMGRP_LINK, _RTMGRP_IPV4_IFADDR, _RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
_RTM_NEWLINK, _RTM_DELLINK, _RTM_GETLINK = 16, 17, 18
_RTM_NEWADDR, _RTM_DELADDR, _RTM_GETADDR = 20, 21, 22
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFLA_IFNAME, _IFA_ADDRESS, _IFA_LOCAL = 3, 1, 2
_IFF_UP = 0x1
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")
_RCVBUF = 4 << 20
_V4_MAPPED = bytes(10) + b"\xff\xff"


@dataclass(frozen=True)
class IfaceSpec:
    """A parsed ``--iface``: fixed ``names``, fnmatch ``patterns``, and ``any``.

    A spec of fixed names only is resolved once at start (each must exist then). A spec with
    a pattern or ``any`` *follows*: interfaces that appear later are attached, ones that
    vanish are forgotten, and one capture per connection is kept (``follow.py``).
    """

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    any: bool = False

    @classmethod
    def parse(cls, text: str | Sequence[str]) -> IfaceSpec:
        """``lo``, ``eth0,eth1``, ``veth*,eth0``, ``any`` (or a list of such entries)."""
        items = text.split(",") if isinstance(text, str) else list(text)
        entries = list(dict.fromkeys(e.strip() for e in items if e.strip()))
        if not entries:
            raise SourceError("--iface: no interface named (e.g. --iface eth0, 'veth*' or 'any')")
        names = tuple(e for e in entries if e != "any" and not _is_pattern(e))
        patterns = tuple(e for e in entries if _is_pattern(e))
        return cls(names, patterns, "any" in entries)

    @property
    def follows(self) -> bool:
        """Interfaces come and go with this spec (a pattern or ``any``)."""
        return self.any or bool(self.patterns)

    def matches(self, name: str, up: bool) -> bool:
        """Whether an interface called ``name`` (``up``: IFF_UP) is to be captured.

        Names and patterns match whatever the state (a TCX link works on a down interface,
        so the first packets after it comes up are seen); ``any`` wants it up.
        """
        if name in self.names or any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            return True
        return self.any and up and name != "lo"

    def __str__(self) -> str:
        return ",".join([*self.names, *self.patterns, *(["any"] if self.any else [])])


def _is_pattern(entry: str) -> bool:
    return any(c in entry for c in "*?[")


@dataclass(frozen=True)
class LinkEvent:
    """An interface exists (``gone=False``: new or changed) or no longer does."""

    ifindex: int
    name: str = ""
    up: bool = False
    gone: bool = False


@dataclass(frozen=True)
class AddrEvent:
    """An address of an interface, as a BPF map key (:func:`map_key`), added or removed."""

    ifindex: int
    addr: bytes
    gone: bool = False

    @property
    def link_local(self) -> bool:
        return link_local(self.addr)


Event = LinkEvent | AddrEvent


def link_local(addr: bytes) -> bool:
    """IPv6 link-local (fe80::/10, a :func:`map_key`): every up interface has one, so it
    does not make an interface the host's own."""
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def map_key(raw: bytes) -> bytes:
    """A 4- or 16-byte address as the program's ``local_addrs`` key (IPv4 v4-mapped)."""
    return _V4_MAPPED + raw if len(raw) == 4 else raw


def _attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    while off + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, off)
        if length < _RTA.size:
            return
        yield kind & 0x3FFF, data[off + _RTA.size:off + length]
        off += (length + 3) & ~3


def _link(mtype: int, data: bytes, off: int, end: int) -> LinkEvent:
    _fam, _type, index, flags, _change = _IFINFO.unpack_from(data, off)
    name = next((v.rstrip(b"\0").decode(errors="replace")
                 for k, v in _attrs(data, off + _IFINFO.size, end) if k == _IFLA_IFNAME), "")
    return LinkEvent(index, name, bool(flags & _IFF_UP), mtype == _RTM_DELLINK)


def _addr(mtype: int, data: bytes, off: int, end: int) -> AddrEvent | None:
    _fam, _plen, _flags, _scope, index = _IFADDR.unpack_from(data, off)
    found = dict(_attrs(data, off + _IFADDR.size, end))
    raw = found.get(_IFA_LOCAL) or found.get(_IFA_ADDRESS)  # IPv4 point-to-point: LOCAL
    if raw is None or len(raw) not in (4, 16):
        return None
    return AddrEvent(index, map_key(raw), mtype == _RTM_DELADDR)


def parse(data: bytes) -> tuple[list[Event], bool]:
    """The link and address messages in one netlink read, and whether a dump ended
    (NLMSG_DONE). An NLMSG_ERROR raises OSError."""
    out: list[Event] = []
    off, done = 0, False
    while off + _NLMSG.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            break
        body, end = off + _NLMSG.size, off + length
        if mtype == _NLMSG_DONE:
            done = True
        elif mtype == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, body)[0]
            if code:
                raise OSError(code, os.strerror(code))
        elif mtype in (_RTM_NEWLINK, _RTM_DELLINK) and end - body >= _IFINFO.size:
            out.append(_link(mtype, data, body, end))
        elif mtype in (_RTM_NEWADDR, _RTM_DELADDR) and end - body >= _IFADDR.size:
            event = _addr(mtype, data, body, end)
            if event is not None:
                out.append(event)
        off += (length + 3) & ~3
    return out, done


def _netlink(groups: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


def dump() -> list[Event]:
    """Every link, then every address, in this network namespace (as ``New`` events)."""
    out: list[Event] = []
    with _netlink() as sock:
        for seq, (mtype, body) in enumerate(((_RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0)),
                                             (_RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, 0))), 1):
            head = _NLMSG.pack(_NLMSG.size + len(body), mtype, _NLM_F_REQUEST | _NLM_F_DUMP,
                               seq, 0)
            sock.send(head + body)
            done = False
            while not done:
                events, done = parse(sock.recv(1 << 20))
                out += events
    return out


class LinkWatcher:
    """A netlink socket subscribed to link and address events (open it before the
    :func:`dump` it completes, so nothing falls between the two)."""

    def __init__(self) -> None:
        self._sock = _netlink(_RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR)
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[Event] | None:
        """The events waiting now, in order; None if the kernel dropped some (the socket
        overflowed, ENOBUFS): the caller must re-read everything with :func:`dump`."""
        out: list[Event] = []
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return None
                raise
            out += parse(data)[0]

    def close(self) -> None:
        self._sock.close()


def names_now(spec: IfaceSpec, events: Iterable[Event] | None = None) -> dict[int, str]:
    """ifindex → name of the interfaces ``spec`` matches right now."""
    links = [e for e in (dump() if events is None else events) if isinstance(e, LinkEvent)]
    return {e.ifindex: e.name for e in links if spec.matches(e.name, e.up)}


def resolve_ifaces(spec: str | IfaceSpec) -> list[str]:
    """The names ``spec`` matches now, for AF_PACKET, which takes a fixed list: each fixed
    name must exist, ``any`` must find one, and a pattern is refused (only the eBPF source
    follows interfaces). Raises SourceError."""
    parsed = spec if isinstance(spec, IfaceSpec) else IfaceSpec.parse(spec)
    if parsed.patterns:
        raise SourceError(f"--iface {','.join(parsed.patterns)}: interface patterns are "
                          "followed by --engine tc or xdp only; name the interfaces or use "
                          "'any' (resolved once at start)")
    events = dump()
    check_names(parsed, events)
    names = sorted(set(names_now(parsed, events).values()))
    if parsed.any and not names:
        raise SourceError("--iface any: no non-loopback interface is up")
    return names


def check_names(spec: IfaceSpec, events: Iterable[Event]) -> None:
    """SourceError (exit 2) naming a fixed name of ``spec`` that no interface has."""
    have = sorted({e.name for e in events if isinstance(e, LinkEvent)})
    for name in spec.names:
        if name not in have:
            raise SourceError(f"interface {name!r} not found (have: {', '.join(have)})")


def captured_route(host: str, ifaces: IfaceSpec | Sequence[str]) -> str | None:
    """The captured interface that traffic to ``host`` leaves by (``lo`` for a local
    address), or None: not captured, or ``host`` does not resolve or route."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    spec = ifaces if isinstance(ifaces, IfaceSpec) else IfaceSpec.parse(ifaces)
    try:
        addr = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
        with IPRoute() as ipr:
            route = ipr.route("get", dst=addr)[0]
            link = ipr.get_links(route.get_attr("RTA_OIF"))[0]
    except (OSError, NetlinkError, IndexError):
        return None
    name = str(link.get_attr("IFLA_IFNAME"))
    return name if spec.matches(name, bool(link["flags"] & _IFF_UP)) else None

