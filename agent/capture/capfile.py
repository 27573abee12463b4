"""Capture files: the frames of pcap and pcapng files, read from a memory map.

Every file's global header (the 24 bytes of pcap, pcapng's whole Section Header Block) is
checked first: a missing, non-capture or truncated one is a :class:`SourceError`. A damaged
file is read up to the damage; see :mod:`agent.capture.pcapfile` for what is skipped and
counted, and where a file is cut short (:class:`CutShort`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.capture import SourceError

__all__ = ["MAX_CAPLEN", "PCAP_HEADER", "BadFrame", "CutShort", "Frame", "bad_record",
           "check_header", "frames", "mapped", "pcap_linktype", "read_frames"]

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAP_HEADER = 24
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_SHB_BYTES = b"\x0a\x0d\x0d\x0a"  # the same in either byte order
_SHB_ENDIAN = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
_SHB_MIN = 28  # type, length, byte-order magic, version, section length, length again
#: No frame is longer (libpcap's MAXIMUM_SNAPLEN): a larger captured length is corruption.
MAX_CAPLEN = 262_144

#: (link type, timestamp seconds, captured bytes, original length)
Frame = tuple[int, float, bytes, int]
#: Told about each skipped frame: (frame number, byte offset, why).
BadFrame = Callable[[int, int, str], None]


class CutShort(Exception):
    """The rest of a capture file cannot be read: where (frame number, byte offset) and why."""

    def __init__(self, path: Path, frame: int, offset: int, reason: str) -> None:
        super().__init__(f"{path}: frame {frame} at byte offset {offset}: {reason}")
        self.path, self.frame, self.offset, self.reason = path, frame, offset, reason


def _ignore(_frame: int, _offset: int, _why: str) -> None:
    pass


def read_frames(path: Path, bad_frame: BadFrame = _ignore) -> Iterator[Frame]:
    """Every frame of a pcap or pcapng file. Raises :class:`SourceError` on a bad or
    truncated global header and :class:`CutShort` where the rest of the file cannot be read
    (after every frame before it); ``bad_frame`` hears of each damaged frame skipped."""
    with mapped(path) as (data, kind, endian, unit):
        yield from frames(path, data, kind, endian, unit, bad_frame)


def frames(path: Path, data: mmap.mmap, kind: str, endian: str, unit: float,
           bad_frame: BadFrame) -> Iterator[Frame]:
    """The frames of a file :func:`mapped` opened (``kind``, ``endian``, ``unit`` as it
    found them); raises like :func:`read_frames`."""
    if kind == "pcap":
        return _pcap(path, data, endian, unit)
    return _pcapng(path, data, bad_frame)


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[tuple[mmap.mmap, str, str, float]]:
    """The file mapped, with what :func:`_global_header` found; SourceError if it cannot be
    opened or is not a whole capture file header."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except (ValueError, OSError) as e:
            raise SourceError(f"cannot map {path}: {e}") from None
        if data is None:
            raise SourceError(f"{path}: not a pcap or pcapng file (empty)")
        with data:
            yield (data, *_global_header(path, data))


def _global_header(path: Path, data: mmap.mmap) -> tuple[str, str, float]:
    """``("pcap", endian, seconds per tick)`` or ``("pcapng", endian, 0.0)``; SourceError
    unless the file starts with a whole pcap header (24 bytes) or Section Header Block."""
    head = data[:4]
    if head in _PCAP_MAGICS:
        if len(data) < PCAP_HEADER:
            raise SourceError(f"{path}: truncated pcap header ({len(data)} of {PCAP_HEADER} "
                              "bytes)")
        return ("pcap", *_PCAP_MAGICS[head])
    if head != _PCAPNG_SHB_BYTES:
        why = "too short" if len(data) < 4 else f"magic {head.hex()}"
        raise SourceError(f"{path}: not a pcap or pcapng file ({why})")
    if len(data) < _SHB_MIN:
        raise SourceError(f"{path}: truncated pcapng section header ({len(data)} of at least "
                          f"{_SHB_MIN} bytes)")
    endian = _SHB_ENDIAN.get(data[8:12])
    if endian is None:
        raise SourceError(f"{path}: not a pcapng file (byte-order magic {data[8:12].hex()})")
    blen = struct.unpack_from(endian + "I", data, 4)[0]
    bad = _bad_block_length(data, 0, blen, endian)
    if bad or blen < _SHB_MIN:
        raise SourceError(f"{path}: truncated or damaged pcapng section header "
                          f"({bad or f'block length {blen}'})")
    return "pcapng", endian, 0.0


def pcap_linktype(data: mmap.mmap, endian: str) -> int:
    """The link type of a pcap file's header: the field's low 16 bits; the high bits say
    whether frames end with a frame check sequence (and how long), which the decoder never
    reads (the IP length bounds every payload)."""
    return int(struct.unpack_from(endian + "I", data, 20)[0]) & 0xFFFF


def _pcap(path: Path, data: mmap.mmap, endian: str, unit: float) -> Iterator[Frame]:
    linktype = pcap_linktype(data, endian)
    rec = struct.Struct(endian + "IIII")
    pos, n = PCAP_HEADER, len(data)
    unpack = rec.unpack_from
    frame = 1
    while pos + 16 <= n:
        sec, frac, incl, orig = unpack(data, pos)
        if incl > MAX_CAPLEN or pos + 16 + incl > n:
            raise CutShort(path, frame, pos, bad_record(incl, n - pos))
        yield linktype, sec + frac * unit, data[pos + 16 : pos + 16 + incl], orig
        pos += 16 + incl
        frame += 1
    if pos != n:
        raise CutShort(path, frame, pos, bad_record(-1, n - pos))


def bad_record(incl: int, left: int) -> str:
    """Why a pcap record cannot be read: its captured length ``incl`` (-1: its 16-byte
    header is cut) with ``left`` bytes from its start to the end of the file."""
    if incl < 0:
        return f"truncated record header ({left} of 16 bytes)"
    if incl > MAX_CAPLEN:
        return (f"captured length {incl} is larger than any frame ({MAX_CAPLEN}), so the "
                "next record cannot be found")
    return f"truncated record ({incl + 16} bytes, {left} in the file)"


def _pcapng(path: Path, data: mmap.mmap, bad_frame: BadFrame) -> Iterator[Frame]:
    n = len(data)
    pos = 0
    frame = 1  # the number of the next packet block
    endian = "<"
    ifaces: list[tuple[int, float]] = []  # (link type, seconds per tick)
    while pos + 12 <= n:
        btype = struct.unpack_from(endian + "I", data, pos)[0]
        if btype == _PCAPNG_SHB:
            endian = _SHB_ENDIAN.get(data[pos + 8 : pos + 12], ">")
            ifaces = []
        blen = struct.unpack_from(endian + "I", data, pos + 4)[0]
        bad = _bad_block_length(data, pos, blen, endian)
        if bad:
            raise CutShort(path, frame, pos, f"{bad}, so the next block cannot be found")
        body = pos + 8
        if btype in (6, 2, 3):
            try:
                yield _packet(data, btype, body, pos + blen - 4, endian, ifaces)
            except ValueError as e:
                bad_frame(frame, pos, str(e))
            frame += 1
        elif btype == 1 and blen >= 20:  # Interface Description Block
            linktype = struct.unpack_from(endian + "H", data, body)[0]
            ifaces.append((linktype, _tsresol(data, body + 8, pos + blen - 4, endian)))
        pos += blen
    if pos != n:
        raise CutShort(path, frame, pos, f"truncated block header ({n - pos} bytes)")


def _bad_block_length(data: mmap.mmap, pos: int, blen: int, endian: str) -> str:
    """Why a pcapng block's length cannot be trusted, or "" if it can."""
    if blen < 12 or blen % 4:
        return f"invalid block length {blen}"
    if pos + blen > len(data):
        return f"block length {blen} runs past the end of the file ({len(data) - pos} bytes left)"
    trailer = struct.unpack_from(endian + "I", data, pos + blen - 4)[0]
    if trailer != blen:
        return f"block length {blen} does not match its trailer ({trailer})"
    return ""


def _packet(data: mmap.mmap, btype: int, body: int, end: int, endian: str,
            ifaces: list[tuple[int, float]]) -> Frame:
    """The frame of an Enhanced (6), obsolete (2) or Simple (3) Packet Block whose body
    spans ``body``..``end``; ValueError if it does not fit there."""
    if btype == 3:  # Simple Packet Block
        if end - body < 4:
            raise ValueError("simple packet block too short")
        orig = struct.unpack_from(endian + "I", data, body)[0]
        linktype, _unit = ifaces[0] if ifaces else (1, 1e-6)
        return linktype, 0.0, data[body + 4 : body + 4 + min(orig, end - body - 4)], orig
    if end - body < 20:
        raise ValueError("packet block too short")
    if btype == 6:
        iface, hi, lo, incl, orig = struct.unpack_from(endian + "IIIII", data, body)
    else:
        iface, _drops, hi, lo, incl, orig = struct.unpack_from(endian + "HHIIII", data, body)
    if iface >= len(ifaces):
        raise ValueError(f"packet for undeclared interface {iface}")
    if body + 20 + incl > end:
        raise ValueError(f"captured length {incl} is larger than its block")
    linktype, unit = ifaces[iface]
    return linktype, ((hi << 32) | lo) * unit, data[body + 20 : body + 20 + incl], orig


def _tsresol(data: mmap.mmap, pos: int, end: int, endian: str) -> float:
    """Seconds per timestamp tick from an IDB's if_tsresol option (default microseconds)."""
    while pos + 4 <= end:
        code, length = struct.unpack_from(endian + "HH", data, pos)
        if code == 0:
            break
        if code == 9 and length >= 1:
            v = data[pos + 4]
            return 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
        pos += 4 + ((length + 3) & ~3)
    return 1e-6


def check_header(path: Path) -> None:
    """Fail early, with one clear line, on a missing, non-capture or truncated file."""
    with mapped(path):
        pass
