"""Checks of the command line's values, for :mod:`agent.cli.commands`: argparse ``type=`` functions
(a bad value is ``argument --FLAG: why``, exit 2, at parse time), and the start-up checks that
need the host (a target that must resolve, ports that need a capability, a ``--filter`` the
engine cannot honour). Each raises :class:`argparse.ArgumentTypeError` or ``ValueError`` with
one line that names what is wrong; :mod:`agent.cli.commands` turns them into exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from agent.hooks.http import check_header, check_header_name
from agent.mirror.config import parse_port_range, parse_target
from agent.sources.ebpf.privileges import CAPS, effective_caps

__all__ = [
    "REDACT_DEFAULT",
    "at_least_one",
    "ephemeral_overlap",
    "fraction",
    "header_names",
    "ifaces",
    "inject_header",
    "input_path",
    "ip_only_filter",
    "listen_address",
    "normalize_argv",
    "output_path",
    "port_range",
    "ports",
    "positive_seconds",
    "preflight_ebpf",
    "privileged_source_ports",
    "resolve_target",
    "rotation",
    "seconds",
    "size",
    "stats_interval",
    "target",
    "url_path",
]

REDACT_DEFAULT = "Authorization,Cookie"
_REDACT = "--redact-headers"

_Error = argparse.ArgumentTypeError


@contextlib.contextmanager
def _value_errors() -> Iterator[None]:
    """A parser's ValueError becomes argparse's error for the flag (exit 2, one line)."""
    try:
        yield
    except ValueError as e:
        raise _Error(str(e)) from None


# ------------------------------------------------------------------ ports, interfaces


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise _Error(f"port {text!r} is not a number")
    value = int(text)
    if not 0 < value < 65536:
        raise _Error(f"port {value} is out of range 1-65535")
    return value


def ports(text: str) -> list[int]:
    """``--port``: one port or several, comma-separated."""
    found = [_port(p.strip()) for p in text.split(",") if p.strip()]
    if not found:
        raise _Error("no port named (e.g. --port 8080)")
    return found


def ifaces(text: str) -> str:
    """``--iface``: kept as given (resolved at start) without repeated names, but it must
    name something."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise _Error("no interface named (e.g. --iface eth0, or 'any')")
    for name in names:
        if name.count("[") != name.count("]") or name.find("]") < name.find("["):
            raise _Error(f"{name!r}: unbalanced [ ] in the pattern (e.g. 'veth[0-9]*')")
    return ",".join(names)


def port_range(text: str) -> tuple[int, int]:
    with _value_errors():
        return parse_port_range(text)


def source_addrs(text: str) -> tuple[str, ...]:
    """``--forward-source-addrs``: IP literals (comma-separated, at least one), all of one
    family, each once, in RFC 5952 form."""
    seen: dict[str, None] = {}
    family = None
    for item in (x.strip() for x in text.split(",")):
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise _Error(f"{item!r} is not an IP address") from None
        if family is not None and ip.version != family:
            raise _Error("the addresses must all be IPv4 or all IPv6")
        family = ip.version
        seen[str(ip)] = None
    return tuple(seen)


def unbindable_source_addr(addrs: tuple[str, ...]) -> str | None:
    """Why the first of ``addrs`` that is not an address of this host (it cannot be bound)
    cannot be used, or None."""
    for addr in addrs:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((addr, 0))
            except OSError as e:
                return (f"--forward-source-addrs {addr}: not an address of this host "
                        f"({e.strerror})")
    return None


# ------------------------------------------------------------------ numbers


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Error(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise _Error(f"{text!r} is not a finite number")
    return value


def positive_seconds(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise _Error(f"{text} must be more than 0 seconds")
    return value


def seconds(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise _Error(f"{text} seconds must not be negative")
    return value


def stats_interval(text: str) -> float:
    value = _finite(text)
    if value != 0 and value < 0.1:
        raise _Error(f"{text} must be 0 (never) or at least 0.1 seconds")
    return value


def fraction(text: str) -> float:
    value = _finite(text)
    if not 0 <= value <= 1:
        raise _Error(f"{text} must be between 0 and 1")
    return value


def size(text: str) -> int:
    """``--memory-limit``: ``512MiB``, ``1GiB``, ``1G`` or bytes
    (:func:`agent.mirror.budget.parse_size`)."""
    from agent.mirror.budget import parse_size

    with _value_errors():
        return parse_size(text)


def rotation(text: str) -> str:
    """``--record-rotate``: SIZE, DURATION or SIZE,DURATION
    (:func:`agent.sinks.record.parse_rotation`); the text, checked."""
    from agent.sinks.record.files import parse_rotation

    with _value_errors():
        parse_rotation(text)
    return text.strip()


def at_least_one(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _Error(f"{text!r} is not a whole number") from None
    if value < 1:
        raise _Error(f"{value} must be at least 1")
    return value


# ------------------------------------------------------------------ paths


def _path_text(text: str) -> str:
    if not text:
        raise _Error("empty path")
    return text


def input_path(text: str) -> Path:
    """A capture file or recording to read."""
    return Path(_path_text(text))


def output_path(text: str) -> str:
    """``--record``/``--stats-json``: ``-`` (stdout), or a file; not one ending in ``/``,
    which names a directory (``Path`` would drop the slash and write a file)."""
    if _path_text(text).endswith("/"):
        raise _Error(f"{text!r} ends in /, so it names a directory; name a file")
    return text


# ------------------------------------------------------------------ target


def target(text: str) -> str:
    """``--target``: a well-formed ``HOST:PORT`` (resolved at start, :func:`resolve_target`)."""
    with _value_errors():
        parse_target(text)
    return text


def listen_address(text: str) -> str:
    """``--listen``: ``HOST:PORT`` or ``[v6]:PORT`` with a literal address (the control API
    must not depend on name resolution); port 0 is not allowed (nobody could find it)."""
    import ipaddress

    with _value_errors():
        try:
            host, _port = parse_target(text)
        except ValueError as e:  # said of a listen address, not of a target
            raise ValueError(str(e).replace(f"target {text!r}", f"listen address {text!r}")
                             .replace("target is empty", "listen address is empty")) from None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ValueError(f"--listen {text!r}: give an IP address (127.0.0.1:9464, "
                                 "0.0.0.0:9464, [::1]:9464), not a name") from None
    return text


def url_path(text: str) -> str:
    """``probe PATH``: an absolute URL path of printable ASCII without spaces (``/healthz``)."""
    if not text.startswith("/") or not all(33 <= ord(c) < 127 for c in text):
        raise _Error(f"{text!r} is not a URL path: give one like /healthz or /readyz")
    return text


def resolve_target(addr: str) -> None:
    """ValueError unless the host of ``addr`` resolves (once, at start)."""
    host, port = parse_target(addr)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"--target: target host {host!r} does not resolve ({why})") from None


# ------------------------------------------------------------------ HTTP headers


def inject_header(text: str) -> tuple[str, str]:
    """``--inject-header 'NAME: VALUE'`` → (name, value), checked as InjectHeader will."""
    name, sep, value = text.partition(":")
    if not sep:
        raise _Error(f"{text!r}: expected 'NAME: VALUE'")
    name, value = name.strip(), value.strip()
    with _value_errors():
        check_header(name, value)
    return name, value


def header_names(text: str) -> list[str]:
    """``--redact-headers=NAMES``: comma-separated header names, at least one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise _Error("no header name given (--redact-headers=NAME[,NAME...], or "
                     f"--redact-headers alone for {REDACT_DEFAULT})")
    with _value_errors():
        for name in names:
            check_header_name(name)
    return names


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """``--redact-headers`` takes its names only as ``--redact-headers=NAMES``: alone (or
    abbreviated) it means the default names and never takes the next argument, which is a
    capture file or another option. ValueError if the next argument is no file but looks like
    header names given the old way (it would be read as a file)."""
    out: list[str] = []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if len(arg) >= len("--red") and _REDACT.startswith(arg):
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt == "":
                raise ValueError(f"{_REDACT}: an empty argument follows it; give the names as "
                                 f"{_REDACT}=NAMES ({_REDACT} alone redacts {REDACT_DEFAULT})")
            if nxt and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*(,[A-Za-z][A-Za-z0-9-]*)*", nxt) and (
                    not os.path.exists(nxt)):
                raise ValueError(f"{_REDACT}: give the names as {_REDACT}={nxt} ({_REDACT} "
                                 f"alone redacts {REDACT_DEFAULT}, and {nxt!r} would be read "
                                 "as a capture file)")
            arg = f"{_REDACT}={REDACT_DEFAULT}"
        out.append(arg)
    return out


# ------------------------------------------------------------------ --filter


#: tcpdump primitives about the link layer (or protocols other than IP), which the eBPF
#: engines cannot honour: they match each segment's IP/TCP headers on a made-up Ethernet frame.
_LINK_PRIMITIVES = frozenset({
    "ether", "fddi", "tr", "wlan", "link", "vlan", "mpls", "llc", "pppoed", "pppoes", "geneve",
    "vxlan", "arp", "rarp", "atalk", "aarp", "decnet", "ipx", "netbeui", "stp", "iso", "esis",
    "isis", "clnp", "lat", "mopdl", "moprc", "sca", "gateway", "inbound", "outbound", "ifname",
    "ifindex",
})
_IP = frozenset({"ip", "ip6"})
_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")


def ip_only_filter(expr: str) -> str | None:
    """Why ``expr`` cannot be honoured by the eBPF engines (a link-layer term), or None."""
    tokens = _TOKEN.findall(expr)
    for i, tok in enumerate(tokens):
        bare_cast = tok in ("broadcast", "multicast") and (i == 0 or tokens[i - 1] not in _IP)
        if tok in _LINK_PRIMITIVES or bare_cast:
            return (f"--filter {expr!r}: the tc and xdp engines match IP/TCP only, and "
                    f"{tok!r} is about the link layer (it would match every packet or none); "
                    "drop it, or use --engine afpacket")
    return None


def filter_message(expr: str, compiled: str, error: Exception) -> str:
    """libpcap's complaint about ``compiled``, the agent's expression with the user's ``expr``
    inside it, said about ``expr`` only."""
    text = str(error)
    why = text.removeprefix(f"bad filter {compiled!r}: ")
    if why == "expression rejects all packets":
        why = "together with the agent's own capture filter it matches no packet"
    return f"--filter {expr!r}: {why}"


# ------------------------------------------------------------------ privileges


def preflight_ebpf(buffer_mib: int | None, transport: str, default: bool = False) -> None:
    """The first checks :func:`agent.sources.ebpf.source.check_environment` makes (the --buffer-mib
    range, then capabilities), with CAP_IPC_LOCK named among the missing capabilities when the
    perf rings will need it too, so one grant is enough. SourceError (exit 2)."""
    from agent.sources.ebpf import privileges
    from agent.sources.ebpf.source import default_buffer_mib

    host = privileges.Host.read()
    mib = default_buffer_mib(host.cpus) if buffer_mib is None else buffer_mib
    privileges.check_buffer_mib(host, mib, True, transport,
                                default=default or buffer_mib is None)
    privileges.check_capabilities(host, True, mib=mib, transport=transport)


# ------------------------------------------------------------------ source ports


def privileged_source_ports(ports: tuple[int, int],
                            start_file: Path = Path(
                                "/proc/sys/net/ipv4/ip_unprivileged_port_start"),
                            caps: Callable[[], int] | None = None) -> str | None:
    """Why shadow connections cannot bind ``ports`` (privileged ones without
    CAP_NET_BIND_SERVICE), or None."""
    start = _read_ints(start_file) or [1024]
    if ports[0] >= start[0]:
        return None
    have = (caps or effective_caps)()
    if have >> CAPS["CAP_NET_BIND_SERVICE"] & 1:
        return None
    return (f"--forward-source-ports {ports[0]}-{ports[1]} has ports below {start[0]}, which "
            "only a process with CAP_NET_BIND_SERVICE (root has it) may bind, and this one "
            f"lacks it: choose ports of {start[0]} or more, or grant it")


def ephemeral_overlap(ports: tuple[int, int],
                      sysctl: Path = Path("/proc/sys/net/ipv4/ip_local_port_range"),
                      ) -> str | None:
    """A warning if ``ports`` overlaps the host's ephemeral port range (the host's own client
    connections may then get ports that capture skips), or None."""
    found = _read_ints(sysctl)
    if len(found) != 2:
        return None
    lo, hi = ports
    elo, ehi = found
    if hi < elo or lo > ehi:
        return None
    if lo > elo:
        move = f"{elo} {lo - 1}"
    elif hi < ehi:
        move = f"{hi + 1} {ehi}"
    else:
        move = None
    how = (f", or shrink it: sysctl -w net.ipv4.ip_local_port_range='{move}'" if move
           else "")
    return (f"--forward-source-ports {lo}-{hi} overlaps this host's ephemeral ports "
            f"{elo}-{ehi} (net.ipv4.ip_local_port_range): the host's own client connections "
            "may get a port in it, and capture skips every packet with such a port; choose "
            f"--forward-source-ports outside {elo}-{ehi}{how}")


def _read_ints(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []
