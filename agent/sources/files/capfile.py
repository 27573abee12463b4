"""Capture files: the frames of pcap and pcapng files.

The bytes come from a :class:`~agent.sources.files.capstream.Capture` (read in chunks, never
mapped; its global header already checked). A damaged file is read up to the damage; see
:mod:`agent.sources.files.pcapfile` for what is skipped and counted, and where a file is cut short
(:class:`CutShort`): also where a regular file ends before the size it had when opened
(truncated by someone else while it was read) or its read fails.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.sources.files.capstream import (
    MAX_BLOCK,
    PCAPNG_SHB,
    SHB_ENDIAN,
    STDIN,
    Capture,
    bad_block_length,
    display,
)

__all__ = ["MAX_CAPLEN", "STDIN", "BadFrame", "Capture", "CutShort", "Frame", "bad_record",
           "cut_record", "display", "frames", "read_frames"]

#: No frame is longer (libpcap's MAXIMUM_SNAPLEN): a larger captured length is corruption.
MAX_CAPLEN = 262_144

#: (link type, timestamp seconds, captured bytes, original length)
Frame = tuple[int, float, bytes, int]
#: Told about each skipped frame: (frame number, byte offset, why).
BadFrame = Callable[[int, int, str], None]


class CutShort(Exception):
    """The rest of a capture file cannot be read: where (frame number, byte offset) and why."""

    def __init__(self, path: Path, frame: int, offset: int, reason: str) -> None:
        super().__init__(f"{display(path)}: frame {frame} at byte offset {offset}: {reason}")
        self.path, self.frame, self.offset, self.reason = path, frame, offset, reason


def _ignore(_frame: int, _offset: int, _why: str) -> None:
    pass


def read_frames(path: Path, bad_frame: BadFrame = _ignore) -> Iterator[Frame]:
    """Every frame of a pcap or pcapng file. Raises :class:`SourceError` on a bad or
    truncated global header and :class:`CutShort` where the rest of the file cannot be read
    (after every frame before it); ``bad_frame`` hears of each damaged frame skipped."""
    with Capture.open(path) as cap:
        yield from frames(cap, bad_frame)


def frames(cap: Capture, bad_frame: BadFrame = _ignore) -> Iterator[Frame]:
    """The frames of ``cap`` from where it stands; raises like :func:`read_frames`."""
    if cap.kind == "pcap":
        return _pcap(cap)
    return _pcapng(cap, bad_frame)


def _pcap(cap: Capture) -> Iterator[Frame]:
    linktype, unit = cap.linktype, cap.unit
    unpack = struct.Struct(cap.endian + "IIII").unpack_from
    buf, pos = cap.buf, cap.pos
    n = len(buf)
    frame = 1
    while True:
        if pos + 16 > n:
            buf, pos = cap.refill(buf, pos, 16), 0
            n = len(buf)
            if n < 16:
                break
        sec, frac, incl, orig = unpack(buf, pos)
        end = pos + 16 + incl
        if incl > MAX_CAPLEN or end > n:
            if incl > MAX_CAPLEN:
                raise CutShort(cap.path, frame, cap.base + pos, bad_record(incl, n - pos))
            buf, pos = cap.refill(buf, pos, 16 + incl), 0
            n, end = len(buf), 16 + incl
            if end > n:
                raise CutShort(cap.path, frame, cap.base, cut_record(cap, incl, n))
        yield linktype, sec + frac * unit, buf[pos + 16 : end], orig
        pos = end
        frame += 1
    if pos != n:
        raise CutShort(cap.path, frame, cap.base + pos, cut_record(cap, -1, n - pos))
    early = cap.ended_early(cap.base + pos)
    if early:
        raise CutShort(cap.path, frame, cap.base + pos, early)


def bad_record(incl: int, left: int) -> str:
    """Why a pcap record cannot be read: its captured length ``incl`` (-1: its 16-byte
    header is cut) with ``left`` bytes from its start to the end of the file."""
    if incl < 0:
        return f"truncated record header ({left} of 16 bytes)"
    if incl > MAX_CAPLEN:
        return (f"captured length {incl} is larger than any frame ({MAX_CAPLEN}), so the "
                "next record cannot be found")
    return f"truncated record ({incl + 16} bytes, {left} in the file)"


def cut_record(cap: Capture, incl: int, left: int) -> str:
    """:func:`bad_record` for a record the end of ``cap`` cut, with why it ended early."""
    early = cap.ended_early(cap.base + left)
    return bad_record(incl, left) + (f"; {early}" if early else "")


def _pcapng(cap: Capture, bad_frame: BadFrame) -> Iterator[Frame]:
    buf, pos = cap.buf, cap.pos
    n = len(buf)
    frame = 1  # the number of the next packet block
    endian = "<"
    ifaces: list[tuple[int, float]] = []  # (link type, seconds per tick)
    while True:
        if pos + 12 > n:
            buf, pos = cap.refill(buf, pos, 12), 0
            n = len(buf)
            if n < 12:
                break
        btype = struct.unpack_from(endian + "I", buf, pos)[0]
        if btype == PCAPNG_SHB:
            endian = SHB_ENDIAN.get(buf[pos + 8 : pos + 12], ">")
            ifaces = []
        blen = struct.unpack_from(endian + "I", buf, pos + 4)[0]
        if pos + blen > n and blen <= MAX_BLOCK:
            buf, pos = cap.refill(buf, pos, blen), 0
            n = len(buf)
        bad = bad_block_length(buf, pos, blen, endian)
        if bad:
            early = cap.ended_early(cap.base + n) if pos + blen > n else ""
            raise CutShort(cap.path, frame, cap.base + pos,
                           f"{bad}, so the next block cannot be found"
                           + (f"; {early}" if early else ""))
        body = pos + 8
        if btype in (6, 2, 3):
            try:
                yield _packet(buf, btype, body, pos + blen - 4, endian, ifaces)
            except ValueError as e:
                bad_frame(frame, cap.base + pos, str(e))
            frame += 1
        elif btype == 1 and blen >= 20:  # Interface Description Block
            linktype = struct.unpack_from(endian + "H", buf, body)[0]
            ifaces.append((linktype, _tsresol(buf, body + 8, pos + blen - 4, endian)))
        pos += blen
    early = cap.ended_early(cap.base + n)
    if pos != n or early:
        why = f"truncated block header ({n - pos} bytes)" if pos != n else ""
        raise CutShort(cap.path, frame, cap.base + pos, "; ".join(filter(None, (why, early))))


def _packet(data: bytes, btype: int, body: int, end: int, endian: str,
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


def _tsresol(data: bytes, pos: int, end: int, endian: str) -> float:
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
