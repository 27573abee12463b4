"""What user space knows of the kernel side's record and counters, read from their one
definition, ``bpf/mirror_event.h``, not copied.

- :data:`COUNTERS`: the program's per-CPU counters in index order, each ``(name, help)``,
  from the ``MIRROR_COUNTERS`` X-macro (``NAME`` lower-cased);
- :data:`EVENT_SIZE`: ``MIRROR_EVENT_SIZE``, the record's size (payload follows), which the
  header asserts with ``_Static_assert`` against ``sizeof(struct mirror_event)``;
- :data:`EVENT`: the record's fields as a ``struct`` format, and :data:`EVENT_TUNNEL` the
  tunnel fields after them (at ``EVENT.size``; zero outside tunnels), checked at import to
  fill ``EVENT_SIZE`` up to the C alignment (8), so a field added on one side only fails at
  once rather than misreading every record;
- :func:`tunnel_name`: a record's tunnel identity as :mod:`agent.decode.tunnels` writes it
  (``vxlan:42``), from the ``MIRROR_TUNNEL_*`` kinds.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

__all__ = ["BPF_DIR", "COUNTERS", "EVENT", "EVENT_SIZE", "EVENT_TUNNEL", "LayoutError",
           "parse_header", "tunnel_name"]

_AGENT = Path(__file__).resolve().parents[2]  # agent/sources/ebpf/layout.py -> agent/
_INSTALLED = _AGENT / "bpf"  # a wheel: bpf/ as agent/bpf
#: The BPF sources: inside the installed package, else beside it in a checkout.
BPF_DIR = _INSTALLED if _INSTALLED.is_dir() else _AGENT.parent / "bpf"
#: struct mirror_event's fields: ts_ns, ifindex, hook, family, tcp_flags, elided, saddr,
#: daddr, sport, dport, seq, ack, window, piece_len, piece_off, payload_len, lost.
EVENT = struct.Struct("<QIBBBB16s16sHHIIHHIII")
#: ... then tunnel_id, tunnel (MIRROR_TUNNEL_*), at offset EVENT.size.
EVENT_TUNNEL = struct.Struct("<IB")
_COUNTER = re.compile(r'^\s*X\((\w+),\s*"([^"]*)"\)', re.MULTILINE)
_SIZE = re.compile(r"^#define MIRROR_EVENT_SIZE (\d+)$", re.MULTILINE)
_TUNNEL = re.compile(r"^#define MIRROR_TUNNEL_([A-Z]+) (\d+)", re.MULTILINE)


class LayoutError(RuntimeError):
    """``bpf/mirror_event.h`` and this module disagree."""


def parse_header(text: str) -> tuple[list[tuple[str, str]], int]:
    """(counters as ``(name, help)`` in index order, event size) from the header's text."""
    counters = [(name.lower(), help_) for name, help_ in _COUNTER.findall(text)]
    size = _SIZE.search(text)
    if not counters or size is None:
        raise LayoutError("bpf/mirror_event.h: no MIRROR_COUNTERS list or MIRROR_EVENT_SIZE")
    event_size = int(size.group(1))
    fields = EVENT.size + EVENT_TUNNEL.size
    if (fields + 7) // 8 * 8 != event_size:
        raise LayoutError(f"struct mirror_event is {event_size} bytes in C, but its fields "
                          f"here take {fields}: update agent/sources/ebpf/layout.py")
    return counters, event_size


def tunnel_kinds(text: str) -> dict[int, str]:
    """``MIRROR_TUNNEL_*`` of the header's text: kind number → name (``vxlan``), NONE left
    out."""
    return {int(n): name.lower() for name, n in _TUNNEL.findall(text) if name != "NONE"}


_HEADER = (BPF_DIR / "mirror_event.h").read_text()
COUNTERS, EVENT_SIZE = parse_header(_HEADER)
_KINDS = tunnel_kinds(_HEADER)


def tunnel_name(kind: int, ident: int) -> str:
    """A record's tunnel identity (``Segment.tunnel``): ``vxlan:42``; "" for kind 0 (no
    tunnel, or one without an identity)."""
    if not kind:
        return ""
    return f"{_KINDS.get(kind, f'tunnel{kind}')}:{ident}"
