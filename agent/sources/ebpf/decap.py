"""``--decap``: the tunnels a live capture looks inside, for every engine.

The text is a comma-separated list of ``vxlan[:PORT]``, ``geneve[:PORT]``, ``gre``,
``erspan`` and ``ipip`` (a UDP tunnel may be named more than once with different ports:
``vxlan,vxlan:8472``; the default ports are IANA's, 4789 and 6081). :class:`Decap` turns it
into what each engine needs:

- eBPF (tc, xdp): ``-D`` flags for ``bpf/decap.h`` (:meth:`Decap.cflags`), which parses one
  level of those tunnels in the kernel and applies the observed ports to the inner TCP;
- AF_PACKET: a classic BPF expression that also passes those tunnels' packets
  (:meth:`Decap.capture_expression`; classic BPF cannot look inside them, so the observed
  ports are then checked in user space on the decoded segments, see
  :mod:`agent.sources.afpacket`), and the decoder's UDP ports (:meth:`Decap.decode_config`).

``gre`` is GRE (version 0) with IP or Ethernet inside; ``erspan`` is ERSPAN (types I-III),
which GRE carries too: either may be asked for without the other.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.decode import DecodeConfig

__all__ = ["GENEVE_PORT", "KINDS", "VXLAN_PORT", "Decap", "decap_arg"]

VXLAN_PORT = 4789
GENEVE_PORT = 6081
KINDS = ("vxlan", "geneve", "gre", "erspan", "ipip")
#: The GRE protocol type as classic BPF reads it (IPv4 with options, IPv6 without extension
#: headers): ERSPAN type I/II (0x88be) or III (0x22eb).
_GRE_TYPE4 = "ip[((ip[0] & 0xf) << 2) + 2:2]"
_GRE_TYPE6 = "ip6[42:2]"


@dataclass(frozen=True, slots=True)
class Decap:
    """Which tunnels to open; the UDP ones by port."""

    vxlan_ports: tuple[int, ...] = ()
    geneve_ports: tuple[int, ...] = ()
    gre: bool = False
    erspan: bool = False
    ipip: bool = False

    @classmethod
    def parse(cls, text: str) -> Decap:
        """The ``--decap`` text; ValueError naming what is wrong."""
        ports: dict[str, list[int]] = {"vxlan": [], "geneve": []}
        flags = dict.fromkeys(("gre", "erspan", "ipip"), False)
        items = [t.strip().lower() for t in text.split(",") if t.strip()]
        if not items:
            raise ValueError("no tunnel named (e.g. --decap vxlan)")
        for item in items:
            kind, colon, port = item.partition(":")
            if kind not in KINDS:
                raise ValueError(f"unknown tunnel {kind!r} (one of {', '.join(KINDS)})")
            if kind in flags:
                if colon:
                    raise ValueError(f"{kind} takes no port ({item!r})")
                flags[kind] = True
                continue
            number = _port(port) if colon else VXLAN_PORT if kind == "vxlan" else GENEVE_PORT
            if number not in ports[kind]:
                ports[kind].append(number)
        both = set(ports["vxlan"]) & set(ports["geneve"])
        if both:
            raise ValueError(f"port {min(both)} cannot be both VXLAN and Geneve")
        return cls(tuple(sorted(ports["vxlan"])), tuple(sorted(ports["geneve"])), **flags)

    def __str__(self) -> str:
        """The canonical text (what :meth:`parse` reads back to the same value)."""
        parts = [f"vxlan:{p}" for p in self.vxlan_ports]
        parts += [f"geneve:{p}" for p in self.geneve_ports]
        parts += [k for k in ("gre", "erspan", "ipip") if getattr(self, k)]
        return ",".join(parts)

    def cflags(self) -> list[str]:
        """The ``-D`` flags of ``bpf/decap.h``."""
        flags = ["-DMIRROR_DECAP"]
        for name, ports in (("VXLAN", self.vxlan_ports), ("GENEVE", self.geneve_ports)):
            if ports:
                test = "||".join(f"(p)=={p}" for p in ports)
                flags.append(f"-DMIRROR_DECAP_{name}(p)=({test})")
        flags += [f"-DMIRROR_DECAP_{k.upper()}" for k in ("gre", "erspan", "ipip")
                  if getattr(self, k)]
        return flags

    def capture_expression(self) -> str:
        """A tcpdump expression true for the packets of these tunnels (their outer
        headers: classic BPF cannot follow a tunnel's variable-length headers)."""
        terms = [f"udp port {p}" for p in (*self.vxlan_ports, *self.geneve_ports)]
        erspan = (f"((ip proto 47 and ({_GRE_TYPE4} = 0x88be or {_GRE_TYPE4} = 0x22eb)) or "
                  f"(ip6 proto 47 and ({_GRE_TYPE6} = 0x88be or {_GRE_TYPE6} = 0x22eb)))")
        if self.gre and self.erspan:
            terms.append("ip proto 47 or ip6 proto 47")
        elif self.gre:
            terms.append(f"((ip proto 47 or ip6 proto 47) and not {erspan})")
        elif self.erspan:
            terms.append(erspan)
        if self.ipip:
            terms.append("ip proto 4 or ip proto 41 or ip6 proto 4 or ip6 proto 41")
        return "(" + " or ".join(terms) + ")"

    def decode_config(self) -> DecodeConfig:
        """The user-space decoder's settings: these UDP ports (and no others) are tunnels."""
        from agent.decode import DecodeConfig

        return DecodeConfig(vxlan_ports=frozenset(self.vxlan_ports),
                            geneve_ports=frozenset(self.geneve_ports))


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"tunnel port {text!r} is not a number in 1-65535")
    return int(text)


def decap_arg(text: str) -> str:
    """``--decap``'s argparse type: the canonical text of a valid spec (kept as text, so
    ``mirror-agent config`` and ``/status`` show it as given)."""
    try:
        return str(Decap.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
