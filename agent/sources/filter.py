"""Headless BPF: match a tcpdump expression against packet bytes, with no capture handle.

The expression is compiled by libpcap itself (``pcap_open_dead`` + ``pcap_compile``) and run
with ``pcap_offline_filter``, so its syntax and meaning are exactly tcpdump's. For sources that
carry no packet bytes (the eBPF source hands over addresses and payload),
:func:`synthesize_frame` builds a well-formed Ethernet/IP/TCP frame to match against.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct

from agent.decode import LINKTYPE_ETHERNET
from agent.model import ACK, PSH, Segment

__all__ = [
    "BpfFilter",
    "FilterError",
    "FrameMatcher",
    "SegmentMatcher",
    "synthesize_frame",
]


class FilterError(ValueError):
    """The expression does not compile (the message is libpcap's)."""


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]


class _Program(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_Insn))]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("ts", _Timeval), ("caplen", ctypes.c_uint), ("len", ctypes.c_uint)]


_lib: ctypes.CDLL | None = None


def _libpcap() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise FilterError(
                f"libpcap is not installed ({e}); apt-get install libpcap0.8") from None
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Program), ctypes.c_char_p,
                                     ctypes.c_int, ctypes.c_uint32]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_Program), ctypes.POINTER(_PktHdr),
                                            ctypes.c_char_p]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_Program)]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


class BpfFilter:
    """A compiled tcpdump expression for one link type."""

    def __init__(self, expression: str, linktype: int = LINKTYPE_ETHERNET,
                 snaplen: int = 262144) -> None:
        lib = _libpcap()
        self.expression = expression
        self.linktype = linktype
        self._lib = lib
        self._prog = _Program()
        handle = lib.pcap_open_dead(linktype, snaplen)
        if not handle:
            raise FilterError("pcap_open_dead failed")
        try:
            if lib.pcap_compile(handle, ctypes.byref(self._prog), expression.encode(), 1,
                                0xFFFFFFFF) != 0:
                msg = (lib.pcap_geterr(handle) or b"").decode(errors="replace")
                raise FilterError(f"bad filter {expression!r}: {msg}")
        finally:
            lib.pcap_close(handle)
        self._hdr = _PktHdr()

    def matches(self, frame: bytes, wire_len: int = 0) -> bool:
        """True if the frame passes the filter."""
        hdr = self._hdr
        hdr.caplen = len(frame)
        hdr.len = wire_len or len(frame)
        return bool(self._lib.pcap_offline_filter(ctypes.byref(self._prog), ctypes.byref(hdr),
                                                  frame))

    def instructions(self) -> list[tuple[int, int, int, int]]:
        """The classic BPF program as (code, jt, jf, k), e.g. for ``SO_ATTACH_FILTER``."""
        p = self._prog
        return [(p.bf_insns[i].code, p.bf_insns[i].jt, p.bf_insns[i].jf, p.bf_insns[i].k)
                for i in range(p.bf_len)]

    def __del__(self) -> None:
        if getattr(self, "_prog", None) is not None and self._prog.bf_insns:
            self._lib.pcap_freecode(ctypes.byref(self._prog))


class FrameMatcher:
    """``(linktype, frame) -> bool`` for sources of mixed link types (one program each)."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self._by_linktype: dict[int, BpfFilter] = {}
        BpfFilter(expression)  # fail early on a bad expression

    def __call__(self, linktype: int, frame: bytes) -> bool:
        f = self._by_linktype.get(linktype)
        if f is None:
            f = self._by_linktype[linktype] = BpfFilter(self.expression, linktype)
        return f.matches(frame)


class SegmentMatcher:
    """``segment -> bool``: matches a synthesised frame of each segment (sources without
    packet bytes)."""

    def __init__(self, expression: str) -> None:
        self._filter = BpfFilter(expression, LINKTYPE_ETHERNET)

    def __call__(self, seg: Segment) -> bool:
        frame = synthesize_frame(seg.src_ip, seg.dst_ip, seg.src_port, seg.dst_port, seg.payload,
                                 seg.seq, seg.ack, seg.flags, seg.window)
        return self._filter.matches(frame)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def synthesize_frame(
    src_ip: bytes, dst_ip: bytes, src_port: int, dst_port: int, payload: bytes = b"",
    seq: int = 0, ack: int = 0, flags: int = ACK | PSH, window: int = 65535,
) -> bytes:
    """An Ethernet + IPv4/IPv6 + TCP frame with correct lengths and checksums.

    Addresses are packed (4 or 16 bytes, both the same family). Payloads too large for one IP
    packet are cut to fit (filters look at headers, not at byte 65,000 of a payload).
    """
    if len(src_ip) != len(dst_ip) or len(src_ip) not in (4, 16):
        raise ValueError("source and destination must both be IPv4 or both IPv6")
    payload = payload[: 65535 - 60]
    tcp = struct.pack("!HHIIBBHHH", src_port, dst_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      5 << 4, flags & 0xFF, window & 0xFFFF, 0, 0)
    seg = tcp + payload
    if len(src_ip) == 4:
        pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, len(seg))
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 0, 0x4000, 64, 6, 0,
                         src_ip, dst_ip)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        pseudo = src_ip + dst_ip + struct.pack("!I3xB", len(seg), 6)
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(seg), 6, 64, src_ip, dst_ip)
        ethertype = 0x86DD
    csum = _checksum(pseudo + seg)
    seg = seg[:16] + struct.pack("!H", csum) + seg[18:]
    eth = b"\xff\xff\xff\xff\xff\xff" + b"\x00\x11\x22\x33\x44\x55" + struct.pack("!H", ethertype)
    return eth + ip + seg

