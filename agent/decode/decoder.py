"""The :class:`Decoder`: a captured frame, through its link layer, any tunnels and IP
fragments, to one TCP :class:`~agent.model.Segment`.

Layers are decoded one after the other (:mod:`agent.decode.layers`), at most
``max_layers`` of them: a frame nested deeper is skipped (``too_deep``). The common frame,
untagged Ethernet/IPv4/TCP, takes a fast path that reads its three headers in one unpack
(:func:`fast_frame`). A fragment is held by the :class:`~agent.decode.defrag.Defragmenter`
(shared by every decoder of a source); the fragment that completes a datagram decodes to
its segment, and a datagram given up decodes to :attr:`Decoder.ready` (see
:meth:`Decoder.take_ready`). Nothing here raises on bad input: every frame that gives no
segment is counted in :class:`DecodeStats`, by reason, or held as a fragment.
"""

from __future__ import annotations

import functools
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from agent.decode import ip, linktypes, tunnels
from agent.decode.defrag import DEFRAG_BYTES, DEFRAG_TIMEOUT, Datagram, Defragmenter, DefragStats
from agent.decode.layers import (
    CHDLC,
    ETHERNET,
    FRAGMENT,
    GRE,
    KIND_NAMES,
    LOOP,
    NULL,
    PPP,
    PPP_HDLC,
    PPPOE,
    RAW,
    SLL,
    SLL2,
    TCP,
    UDP,
    UNBOUNDED,
    VLAN,
    Cursor,
)
from agent.model import Segment

__all__ = ["ETH_IPV4_TCP", "ETH_IPV4_TCP_MIN", "MAX_LAYERS", "DecodeConfig", "DecodeStats",
           "Decoder", "fast_frame"]

_TCP = struct.Struct("!HHIIBBH")  # sport dport seq ack off flags window
#: Ethernet, IPv4 and TCP headers read in one call from a frame's first byte: ethertype,
#: version/IHL, total length, flags/fragment offset, protocol, source, destination, then
#: the TCP fields of ``_TCP``. The common frame (untagged, no IP options, not a fragment) is
#: whole after it: see :func:`fast_frame`.
ETH_IPV4_TCP = struct.Struct("!12xHBxHxxHxB2x4s4sHHIIBBH")
#: The shortest such frame: Ethernet (14) + IPv4 (20) + TCP (20) headers.
ETH_IPV4_TCP_MIN = 54
#: Layers decoded at most per frame (each header counts: Ethernet, a VLAN tag, IP, UDP,
#: VXLAN ...). Ethernet/VLAN/IPv4/UDP/VXLAN/Ethernet/VLAN/IPv4 is 8 before TCP; 16 leaves
#: room for a second tunnel and stops a crafted frame from nesting without end.
MAX_LAYERS = 16

Layer = Callable[[Cursor], "int | str"]


def fast_frame(etype: int, vihl: int, frag: int, proto: int, start: int, end: int,
               n: int) -> bool:
    """Do the fields of :data:`ETH_IPV4_TCP` describe a whole common segment: untagged
    Ethernet, IPv4 without options and not a fragment, TCP, its payload at ``[start, end)``
    within the ``n`` captured bytes (``start`` after a whole TCP header, ``end`` from the IP
    total length)? Anything else takes the general path of :meth:`Decoder.decode`."""
    return (etype == 0x0800 and vihl == 0x45 and proto == 6
            and not frag & 0x3FFF and ETH_IPV4_TCP_MIN <= start <= end <= n)


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Decoding settings: the UDP ports of VXLAN and Geneve, the layer bound, and the
    defragmenter's memory (a share of the memory budget, :attr:`agent.mirror.budget.Budget.defrag`)
    and timeout."""

    vxlan_ports: frozenset[int] = frozenset({tunnels.VXLAN_PORT})
    geneve_ports: frozenset[int] = frozenset({tunnels.GENEVE_PORT})
    max_layers: int = MAX_LAYERS
    defrag_bytes: int = DEFRAG_BYTES
    defrag_timeout: float = DEFRAG_TIMEOUT


class DecodeStats:
    """Counts: frames decoded; skipped, by reason (``truncated``, ``not_tcp`` …); segments
    by each encapsulation they came through (``vxlan``, ``gre`` …); the defragmenter's."""

    __slots__ = ("decoded", "defrag", "encaps", "skipped")

    def __init__(self) -> None:
        self.decoded = 0
        self.skipped: Counter[str] = Counter()
        self.encaps: Counter[str] = Counter()
        self.defrag = DefragStats()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self) -> dict[str, int]:
        return {"decoded": self.decoded, **{f"skipped_{k}": v for k, v in self.skipped.items()},
                **{f"encap_{k}": v for k, v in self.encaps.items()}, **self.defrag.as_dict()}


def _unreachable(_c: Cursor) -> int | str:  # TCP and FRAGMENT are the decoder's own
    return "bad_state"


def _layers(config: DecodeConfig) -> list[Layer]:
    """Every layer kind's function, indexed by kind."""
    table: list[Layer] = [_unreachable] * len(KIND_NAMES)
    own: dict[int, Layer] = {
        ETHERNET: linktypes.ethernet, VLAN: linktypes.vlan, SLL: linktypes.sll,
        SLL2: linktypes.sll2, NULL: linktypes.family, LOOP: linktypes.family,
        RAW: linktypes.raw, PPP: linktypes.ppp, PPP_HDLC: linktypes.ppp_hdlc,
        CHDLC: linktypes.chdlc, PPPOE: linktypes.pppoe,
        UDP: functools.partial(tunnels.udp, vxlan_ports=config.vxlan_ports,
                               geneve_ports=config.geneve_ports),
        **ip.LAYERS, **tunnels.LAYERS, GRE: tunnels.gre,
    }
    for kind, fn in own.items():
        table[kind] = fn
    return table


class Decoder:
    """Decodes frames of one link type; skipped frames are counted in :attr:`stats`.

    ``defrag`` is shared by every decoder of one source (one memory bound); by default the
    decoder makes its own from ``config``. Segments of datagrams given up (memory, timeout,
    :meth:`finish`) collect in :attr:`ready`: a caller must take them with
    :meth:`take_ready` (after each :meth:`decode` whose call left it non-empty), or they
    pile up.
    """

    __slots__ = ("_first", "_layers", "_max", "defrag", "linktype", "ready", "stats")

    def __init__(self, linktype: int, stats: DecodeStats | None = None,
                 config: DecodeConfig | None = None,
                 defrag: Defragmenter | None = None) -> None:
        first = linktypes.FIRST_LAYER.get(linktype)
        if first is None:
            raise ValueError(f"unsupported link type {linktype}")
        config = config or DecodeConfig()
        self.linktype = linktype
        self.stats = stats if stats is not None else DecodeStats()
        self.defrag = defrag if defrag is not None else Defragmenter(
            config.defrag_bytes, config.defrag_timeout, self.stats.defrag)
        self.ready: list[Segment] = []
        self._first = first
        self._layers = _layers(config)
        self._max = config.max_layers

    def decode(self, frame: bytes, ts: float, orig_len: int = 0) -> Segment | None:
        """Decode one captured frame; ``orig_len`` is its length on the wire (0: unknown).

        Returns ``None`` (and counts why, or holds the fragment) for anything that is not
        a well-formed TCP segment. Bytes cut off by the capture's snap length are reported
        in ``Segment.lost``.
        """
        n = len(frame)
        # Fast path (fast_frame); the bytes checked first keep other frames from paying for
        # the unpack: IPv4 without options, untagged.
        if self._first == ETHERNET and n >= ETH_IPV4_TCP_MIN and frame[14] == 0x45 \
                and frame[12] == 8 and frame[13] == 0:
            (etype, vihl, total, frag, proto, src, dst, sport, dport, seq, ack, doff, flags,
             window) = ETH_IPV4_TCP.unpack_from(frame)
            start = 34 + (doff >> 4) * 4
            end = 14 + total
            if fast_frame(etype, vihl, frag, proto, start, end, n):
                self.stats.decoded += 1
                return Segment(src, sport, dst, dport, seq, ack, flags, frame[start:end], ts,
                               window)
        if ts >= self.defrag.deadline:
            self.expire(ts)
        c = Cursor(frame, orig_len if orig_len >= n else n if orig_len else UNBOUNDED)
        return self._walk(c, self._first, ts)

    def take_ready(self) -> list[Segment]:
        """The segments of datagrams given up since the last call (to feed after the
        segment :meth:`decode` returned, if any)."""
        ready, self.ready = self.ready, []
        return ready

    def expire(self, now: float) -> None:
        """Give up datagrams older than the defragmentation timeout (into :attr:`ready`)."""
        self.defrag.expire(now)
        self._given_up()

    def finish(self) -> None:
        """End of input: give up every datagram still waiting (into :attr:`ready`)."""
        self.defrag.finish()
        self._given_up()

    def _walk(self, c: Cursor, kind: int | str, ts: float, partial: bool = False
              ) -> Segment | None:
        """Decode layer after layer from ``kind`` at ``c.off`` to the TCP segment. A
        ``partial`` datagram (given up, with bytes missing) whose headers are cut counts as
        ``fragment_headers_missing``."""
        layers = self._layers
        while True:
            if isinstance(kind, str):
                if partial and kind == "truncated":
                    kind = "fragment_headers_missing"
                self.stats.skipped[kind] += 1
                return None
            if kind == TCP:
                return self._tcp(c, ts)
            if kind == FRAGMENT:
                found = self._fragment(c, ts)
                if found is None:
                    return None
                kind = found
                continue
            c.depth += 1
            if c.depth > self._max:
                kind = "too_deep"
                continue
            kind = layers[kind](c)

    def _fragment(self, c: Cursor, ts: float) -> int | str | None:
        """Hand the fragment at ``c`` to the defragmenter: None while it is held; the layer
        inside the datagram it completes (``c`` then on the datagram's payload)."""
        version, ident, offset, more, proto = c.frag
        key = (c.tunnel, version, c.src, c.dst, ident, proto if version == 4 else -1)
        data = c.buf[c.off : c.end]
        found = self.defrag.add(key, offset, c.end - c.off, data, more, proto, ts, c.depth,
                                c.encaps)
        if self.defrag.given_up:
            self._given_up()
        if found is None or isinstance(found, str):
            return found
        c.buf, c.off, c.end = found.data, 0, found.length
        return ip.carried(c, found.proto)

    def _given_up(self) -> None:
        """Decode the datagrams the defragmenter gave up into :attr:`ready`."""
        given_up: list[Datagram] = self.defrag.given_up
        self.defrag.given_up = []
        for dg in given_up:
            c = Cursor(dg.data, dg.length)
            c.tunnel, _v, c.src, c.dst, _id, _p = dg.key
            c.depth, c.encaps = dg.depth, dg.encaps
            seg = self._walk(c, ip.carried(c, dg.proto), dg.ts, partial=not dg.complete)
            if seg is not None:
                self.ready.append(seg)

    def _tcp(self, c: Cursor, ts: float) -> Segment | None:
        """The TCP header at ``c.off``; its payload up to the IP datagram's end, the bytes
        of it past the captured ones reported as lost."""
        frame, off, ip_end = c.buf, c.off, c.end
        n = len(frame)
        stats = self.stats
        if n < off + 20:
            stats.skipped["truncated"] += 1
            return None
        sport, dport, seq, ack, doff, flags, window = _TCP.unpack_from(frame, off)
        hlen = (doff >> 4) * 4
        if hlen < 20 or off + hlen > ip_end:
            stats.skipped["bad_tcp_header"] += 1
            return None
        if n < off + hlen:
            stats.skipped["truncated"] += 1
            return None
        start = off + hlen
        lost = 0
        if ip_end > n:
            # Cut by the snap length: the bytes exist but we do not have them.
            lost = ip_end - n
            ip_end = n
        stats.decoded += 1
        for e in c.encaps:
            stats.encaps[e] += 1
        return Segment(c.src, sport, c.dst, dport, seq, ack, flags, frame[start:ip_end], ts,
                       window, lost, c.tunnel)
