"""IP anonymisation (``--anonymize``): one function for every address that leaves the process.

``netblock`` (as m-lab's packet-headers does it) keeps the network and zeroes the host:
an IPv4 address keeps its /24 (``192.0.2.77`` → ``192.0.2.0``), an IPv6 address its /64
(``2001:db8:1:2:aa:bb:cc:dd`` → ``2001:db8:1:2::``), and an IPv4-mapped IPv6 address
(``::ffff:192.0.2.77``) is an IPv4 address: its embedded address keeps its /24
(``::ffff:192.0.2.0``), not the /64 that would keep it whole.

Where it applies (one callable, :attr:`agent.mirror.config.MirrorConfig.anonymize`): the addresses
of every chunk (the reassembler formats them once per flow, so records, hooks and the
record writers see only anonymised ones), the per-flow pcap files (packet addresses, with
checksums recomputed, and file names: :mod:`agent.sinks.flow_pcap`). Logs, metrics and
``/status`` carry no observed address: they name flows by id. Forwarding is unaffected: the
shadow gets payload bytes, never addresses. Payload is never rewritten (an address inside a
request, e.g. ``X-Forwarded-For``, stays as it was).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["METHODS", "Anonymizer", "anonymizer", "netblock"]

#: An anonymiser: a packed 4- or 16-byte address in, one of the same length out.
Anonymizer = Callable[[bytes], bytes]

#: ``--anonymize`` values.
METHODS = ("none", "netblock")

_V4_MAPPED = bytes(10) + b"\xff\xff"
_V6_HOST = bytes(8)


def netblock(ip: bytes) -> bytes:
    """``ip`` with its host part zeroed: IPv4 (and IPv4-mapped IPv6) keep the /24, IPv6 the
    /64. Any other length is returned as zeros of that length (never the address)."""
    n = len(ip)
    if n == 4:
        return ip[:3] + b"\0"
    if n == 16:
        if ip[:12] == _V4_MAPPED:
            return ip[:15] + b"\0"
        return ip[:8] + _V6_HOST
    return bytes(n)


def anonymizer(method: str) -> Anonymizer | None:
    """The anonymiser of ``--anonymize method`` (None for ``none``); ValueError if unknown."""
    if method == "none":
        return None
    if method == "netblock":
        return netblock
    raise ValueError(f"unknown anonymisation {method!r} (choose from {', '.join(METHODS)})")
