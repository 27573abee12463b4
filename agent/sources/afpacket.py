"""Live capture without eBPF: an AF_PACKET socket with a classic BPF filter (``--engine afpacket``).

For hosts where the eBPF program cannot load. libpcap compiles the filter (observed ports,
packets that carry payload/SYN/FIN/RST, and ``--filter``) and the kernel runs it on the socket,
so user space only sees what the eBPF program would have sent. Frames go through the same
:class:`~agent.decode.Decoder` as pcap files. Kernel drops (``PACKET_STATISTICS``) reach
:meth:`stats`; the bytes they held become gaps in the reassembler, never silent loss.

With ``decap`` (``--decap``) the filter also passes the named tunnels' packets whatever is
inside them (classic BPF cannot walk a tunnel's variable-length headers), the decoder opens
them, and the observed ports, the agent's own ports and the pure-ACK rule are applied in user
space to the decoded segments; what that drops is counted (``filtered``).
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence

from agent.decode import LINKTYPE_ETHERNET, Decoder
from agent.model import FIN, RST, SYN, Segment
from agent.sources import SourceError, check_port_count
from agent.sources.ebpf.decap import Decap
from agent.sources.ebpf.links import IfaceSpec, resolve_ifaces
from agent.sources.filter import BpfFilter, FilterError

__all__ = ["AfPacketSource", "capture_expression"]

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_PACKET_OUTGOING = 4
_SO_RCVBUFFORCE = 33
_SO_ATTACH_FILTER = 26
#: Larger than any GSO/GRO frame (64 KiB + headers), so no frame is cut short.
_FRAME_BUF = 256 * 1024
#: Frames taken per batch at most, so a flood cannot starve timers and sinks.
_BATCH = 4096
#: The most instructions the kernel takes in a socket filter (BPF_MAXINSNS); MAX_PORTS
#: ports take ~1,600 of them (see agent/sources/__init__.py), --filter and --decap the rest.
BPF_MAXINSNS = 4096


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def capture_expression(ports: list[int], user_filter: str | None = None,
                       own_ports: tuple[int, int] | None = None,
                       decap: Decap | None = None) -> str:
    """The tcpdump expression the kernel runs: our ports, minus pure ACKs, or (``decap``)
    a packet of one of those tunnels; minus the agent's own forwarded connections (a port
    in ``own_ports``, the forward sink's source ports), and ``user_filter`` (which, as for
    capture files, sees a tunnel's outer headers).

    A pure ACK (no payload, no SYN/FIN/RST) tells the reassembler nothing, so it is dropped in
    the kernel, as the eBPF program does.
    """
    port_expr = " or ".join(f"tcp port {p}" for p in ports)
    # libpcap's tcp[] reads IPv4 only; IPv6 is read at fixed offsets (TCP right after the
    # 40-byte header; with extension headers the packet is kept and user space decides).
    carries = ("(ip and (tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0"
               " or ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2) != 0))"
               " or (ip6 and (ip6[6] != 6 or ip6[53] & 0x07 != 0"
               " or ip6[4:2] - ((ip6[52] & 0xf0) >> 2) != 0))")
    expr = f"({port_expr}) and ({carries})"
    if decap is not None:
        expr = f"(({expr}) or {decap.capture_expression()})"
    if own_ports is not None:
        expr += f" and not tcp portrange {own_ports[0]}-{own_ports[1]}"
    if user_filter:
        expr += f" and ({user_filter})"
    return expr


class AfPacketSource:
    """Captures ``ports`` on ``ifaces`` with one AF_PACKET socket; a live packet source.

    ``ifaces``: names, or a spec resolved once here (:func:`~agent.sources.ebpf.links.
    resolve_ifaces`: fixed names and ``any``; a pattern is a SourceError). Interfaces that
    appear later are not followed.

    On ``lo`` every packet is seen leaving and arriving; only the arriving copy is kept.
    Raises :class:`SourceError` (a usage problem, exit 2) if the filter does not compile, is
    longer than the kernel takes (:data:`BPF_MAXINSNS`) or the socket cannot be opened.

    :class:`~agent.sources.PortSteerable`: :meth:`set_ports` (any thread) swaps the socket's
    filter in one ``SO_ATTACH_FILTER``, which the kernel replaces atomically: a frame meets
    the old filter or the new one, so nothing on a port that stays is lost, and a change
    the kernel refuses leaves the old filter and :attr:`ports` as they were. Frames of a
    removed port already queued on the socket still come out; the mirror drops them.

    ``decap``: also the TCP inside these tunnels (see the module's doc); the decoder may open
    nested tunnels too, which the eBPF engines do not.
    """

    def __init__(self, ifaces: IfaceSpec | str | Sequence[str], ports: list[int],
                 user_filter: str | None = None,
                 rcvbuf_mib: int = 64, poll_ms: int = 10,
                 own_ports: tuple[int, int] | None = None,
                 decap: Decap | None = None) -> None:
        if isinstance(ifaces, IfaceSpec | str):
            ifaces = resolve_ifaces(ifaces)
        self.ifaces = list(ifaces)
        self._user_filter = user_filter
        self._own_ports = own_ports
        self._decap = decap
        self._ports = sorted(ports)
        self._wanted = frozenset(ports)  # checked in user space with decap
        self._filtered = 0
        try:
            check_port_count(frozenset(ports))
            self._bpf = self._compile(ports)
        except ValueError as e:
            raise SourceError(str(e)) from None
        self._lock = threading.Lock()  # set_ports against close
        self._poll_ms = poll_ms
        self._decoder = Decoder(LINKTYPE_ETHERNET,
                                config=decap.decode_config() if decap is not None else None)
        self._want = set(self.ifaces)
        self._buf = bytearray(_FRAME_BUF)
        self._frames = 0
        self._truncated = 0
        self._outgoing_lo = 0
        self._other_iface = 0
        self._kernel_seen = 0
        self._kernel_drops = 0
        self._closed = False
        self._sock = self._open(rcvbuf_mib)

    def _open(self, rcvbuf_mib: int) -> socket.socket:
        # Protocol 0 receives nothing until bind(): the filter is in place before any frame.
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise SourceError("AF_PACKET capture needs root or CAP_NET_RAW") from None
        try:
            _attach(sock, self._bpf)
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf_mib << 20)
            except OSError:  # without CAP_NET_ADMIN: as much as rmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_mib << 20)
            # One interface: bind to it. Several: take all and keep the wanted ones.
            # (Python converts the protocol to network order itself.)
            sock.bind((self.ifaces[0] if len(self.ifaces) == 1 else "", _ETH_P_ALL))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise SourceError(f"cannot open AF_PACKET capture on {','.join(self.ifaces)}: "
                              f"{e.strerror or e}") from None
        return sock

    def _compile(self, ports: list[int]) -> BpfFilter:
        """The kernel filter for ``ports``; ValueError with libpcap's message, or saying
        it is longer than the kernel takes."""
        try:
            bpf = BpfFilter(capture_expression(ports, self._user_filter, self._own_ports,
                                               self._decap), LINKTYPE_ETHERNET, _FRAME_BUF)
        except FilterError as e:
            raise ValueError(str(e)) from None
        size = len(bpf.instructions())
        if size > BPF_MAXINSNS:  # the kernel would say only "Invalid argument"
            extra = " and --filter" if self._user_filter else ""
            raise ValueError(f"the capture filter for {len(ports)} ports{extra} is {size} "
                             f"classic BPF instructions, more than the kernel's "
                             f"{BPF_MAXINSNS}: observe fewer ports"
                             + (" or shorten --filter" if self._user_filter else ""))
        return bpf

    @property
    def ports(self) -> list[int]:
        """The observed ports, sorted."""
        return list(self._ports)

    def set_ports(self, ports: list[int]) -> None:
        """Observe exactly ``ports`` (non-empty) from now on: the socket's filter is replaced
        in place (see the class doc). ValueError (PortLimitError: more than
        :data:`~agent.sources.MAX_PORTS`) if the filter cannot be made or the kernel refuses
        it; the old filter and :attr:`ports` then stay."""
        check_port_count(frozenset(ports))
        bpf = self._compile(ports)
        with self._lock:
            if self._closed:
                raise ValueError("the capture is closed")
            try:
                _attach(self._sock, bpf)
            except OSError as e:
                raise ValueError(f"the kernel refused the new filter: {e.strerror or e}") \
                    from None
            self._bpf, self._ports = bpf, sorted(ports)
            self._wanted = frozenset(ports)

    def kernel_filter(self) -> list[tuple[int, int, int, int]]:
        """The classic BPF program on the socket now, read back (``SO_GET_FILTER``): the
        compiled filter of :attr:`ports`, unless a bug."""
        with self._lock:
            if self._closed:
                return []
            return _installed(self._sock)

    def attachments(self) -> list[dict[str, str | int]]:
        """:class:`agent.sources.HasAttachments`: one socket over every interface."""
        return [{"name": name, "ifindex": _ifindex(name), "how": "afpacket", "side": "all"}
                for name in sorted(self.ifaces)]

    def tracked(self) -> dict[str, int]:
        """Nothing: the interfaces are fixed at start."""
        return {}

    def batches(self) -> Iterator[list[Segment]]:
        """Everything the socket holds, every ``poll_ms`` at most; empty lists while idle."""
        sock = self._sock
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while not self._closed:
            poller.poll(self._poll_ms)
            yield self._read()

    def _read(self) -> list[Segment]:
        out: list[Segment] = []
        sock, buf, want = self._sock, self._buf, self._want
        decode = self._decoder.decode
        view = memoryview(buf)
        now = time.time()
        for _ in range(_BATCH):
            try:
                n, addr = sock.recvfrom_into(buf, _FRAME_BUF, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError:
                if self._closed:
                    break
                raise
            ifname, pkttype = addr[0], addr[2]
            if ifname == "lo" and pkttype == _PACKET_OUTGOING:
                self._outgoing_lo += 1  # the same packet arrives on lo's ingress next
                continue
            if ifname not in want:
                self._other_iface += 1
                continue
            self._frames += 1
            if n > _FRAME_BUF:
                self._truncated += 1
                seg = decode(bytes(view[:_FRAME_BUF]), now, n)
            else:
                seg = decode(bytes(view[:n]), now)
            if seg is not None:
                out.append(seg)
            if self._decoder.ready:  # IP datagrams given up (timeout, memory)
                out += self._decoder.take_ready()
        return self._keep(out) if self._decap is not None else out

    def _keep(self, segs: list[Segment]) -> list[Segment]:
        """With decap, the part of the capture expression classic BPF could not apply to
        a tunnel's inner TCP: observed ports, not the agent's own, not a pure ACK."""
        ports, own = self._wanted, self._own_ports or (1, 0)
        kept = [s for s in segs
                if (s.dst_port in ports or s.src_port in ports)
                and not (own[0] <= s.src_port <= own[1] or own[0] <= s.dst_port <= own[1])
                and (s.payload or s.lost or s.flags & (SYN | FIN | RST))]
        self._filtered += len(segs) - len(kept)
        return kept

    def drain(self) -> list[Segment]:
        """What the socket still holds (for a clean stop)."""
        out: list[Segment] = []
        while batch := self._read():
            out += batch
        return out

    def _kernel_stats(self) -> None:
        # Reading PACKET_STATISTICS resets it, so the totals are kept here.
        try:
            raw = self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        except OSError:
            return
        packets, drops = struct.unpack("II", raw)
        self._kernel_seen += packets
        self._kernel_drops += drops

    def stats(self) -> dict[str, int]:
        if not self._closed:
            self._kernel_stats()
        out = {"frames": self._frames, "kernel_packets": self._kernel_seen,
               "kernel_drops": self._kernel_drops, "frames_truncated": self._truncated,
               "lo_outgoing_skipped": self._outgoing_lo, "other_iface": self._other_iface}
        if self._decap is not None:
            out["filtered"] = self._filtered
        out.update({f"decode_{k}": v for k, v in self._decoder.stats.as_dict().items()})
        return out

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._kernel_stats()
            self._closed = True
            self._sock.close()


def _attach(sock: socket.socket, bpf: BpfFilter) -> None:
    """Put ``bpf`` on ``sock`` (replacing any filter there, atomically)."""
    insns = bpf.instructions()
    arr = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    prog = _SockFprog(len(insns), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(prog))


def _installed(sock: socket.socket) -> list[tuple[int, int, int, int]]:
    """The filter on ``sock`` as (code, jt, jf, k). ``SO_GET_FILTER``'s length counts
    instructions, not bytes, so Python's getsockopt cannot read it: libc's does."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = ctypes.c_uint(0)  # 0: the kernel answers with the instruction count
    if libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, _SO_ATTACH_FILTER, None,
                       ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), "SO_GET_FILTER")
    arr = (_SockFilter * size.value)()
    if size.value and libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, _SO_ATTACH_FILTER,
                                      arr, ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), "SO_GET_FILTER")
    return [(i.code, i.jt, i.jf, i.k) for i in arr[:size.value]]


def _ifindex(name: str) -> int:
    """The index of interface ``name`` in this namespace (0 if it is gone)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0
