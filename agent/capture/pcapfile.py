"""pcap and pcapng files as a packet source (several files, read in the order given).

Every file's global header (the 24 bytes of pcap, pcapng's whole Section Header Block) is
checked when the source is made: a missing, non-capture or truncated one is a
:class:`SourceError` before any file is read. A file that can no longer be read when its turn
comes (changed since) is cut short like a damaged one.

A damaged file is read up to the damage. A pcapng block whose framing is intact (its length
repeated at its end) but whose content is not (a packet longer than its block, an unknown
interface) is skipped and counted (``bad_frames``). Where the next record cannot be found (a
pcap record with an absurd captured length, a pcapng block length that is invalid or runs past
the end, a truncated last record) the file is cut short there: a warning names the file, the
frame number and the byte offset, the rest of that file is skipped, and ``cut_short_files``
counts it.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from agent.capture import SourceError
from agent.decode import SUPPORTED_LINKTYPES, Decoder, DecodeStats
from agent.model import Segment

__all__ = ["PcapFileSource", "read_frames"]

log = structlog.get_logger("agent.pcapfile")

_BATCH = 512
_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAP_HEADER = 24
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_SHB_BYTES = b"\x0a\x0d\x0d\x0a"  # the same in either byte order
_SHB_ENDIAN = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
_SHB_MIN = 28  # type, length, byte-order magic, version, section length, length again
#: No frame is longer (libpcap's MAXIMUM_SNAPLEN): a larger captured length is corruption.
_MAX_CAPLEN = 262_144

#: (link type, timestamp seconds, captured bytes, original length)
Frame = tuple[int, float, bytes, int]
#: Decides whether a raw frame is kept: (link type, frame) → bool.
FrameFilter = Callable[[int, bytes], bool]
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
    with _mapped(path) as (data, kind, endian, unit):
        if kind == "pcap":
            yield from _pcap(path, data, endian, unit)
        else:
            yield from _pcapng(path, data, bad_frame)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[tuple[mmap.mmap, str, str, float]]:
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
        if len(data) < _PCAP_HEADER:
            raise SourceError(f"{path}: truncated pcap header ({len(data)} of {_PCAP_HEADER} "
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


def _pcap(path: Path, data: mmap.mmap, endian: str, unit: float) -> Iterator[Frame]:
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    rec = struct.Struct(endian + "IIII")
    pos, n = _PCAP_HEADER, len(data)
    unpack = rec.unpack_from
    frame = 1
    while pos + 16 <= n:
        sec, frac, incl, orig = unpack(data, pos)
        if incl > _MAX_CAPLEN:
            raise CutShort(path, frame, pos, f"captured length {incl} is larger than any "
                           f"frame ({_MAX_CAPLEN}), so the next record cannot be found")
        if pos + 16 + incl > n:
            raise CutShort(path, frame, pos, f"truncated record ({incl + 16} bytes, "
                           f"{n - pos} in the file)")
        yield linktype, sec + frac * unit, data[pos + 16 : pos + 16 + incl], orig
        pos += 16 + incl
        frame += 1
    if pos != n:
        raise CutShort(path, frame, pos, f"truncated record header ({n - pos} of 16 bytes)")


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


def _check_header(path: Path) -> None:
    """Fail early, with one clear line, on a missing, non-capture or truncated file."""
    with _mapped(path):
        pass


class PcapFileSource:
    """Reads pcap/pcapng files in order and decodes their frames into segments.

    ``frame_filter`` (for example a compiled tcpdump expression) sees each raw frame first;
    frames it rejects are counted as ``filtered``. Damaged files: see the module docstring;
    each is logged (a warning with the file, frame number and byte offset).
    """

    def __init__(self, paths: list[Path], frame_filter: FrameFilter | None = None) -> None:
        if not paths:
            raise SourceError("no capture files given")
        for p in paths:
            _check_header(p)
        self.paths = paths
        self._filter = frame_filter
        self.decode_stats = DecodeStats()
        self._frames = 0
        self._filtered = 0
        self._cut_short_files = 0
        self._bad_frames = 0
        self._warned: set[Path] = set()
        self._closed = False

    def batches(self) -> Iterator[list[Segment]]:
        decoders: dict[int, Decoder] = {}
        stats = self.decode_stats
        keep = self._filter
        for path in self.paths:
            batch: list[Segment] = []
            frames = read_frames(path, functools.partial(self._bad_frame, path))
            read = 0
            while not self._closed:
                try:
                    linktype, ts, frame, orig = next(frames)
                except StopIteration:
                    break
                except CutShort as e:
                    self._cut_short(path, e.reason, frames_read=read, frame=e.frame,
                                    offset=e.offset)
                    break
                except SourceError as e:  # changed since the check at start
                    self._cut_short(path, str(e), frames_read=read)
                    break
                read += 1
                self._frames += 1
                if keep is not None and not keep(linktype, frame):
                    self._filtered += 1
                    continue
                dec = decoders.get(linktype)
                if dec is None:
                    if linktype not in SUPPORTED_LINKTYPES:
                        stats.skip(f"linktype_{linktype}")
                        continue
                    dec = decoders[linktype] = Decoder(linktype, stats)
                seg = dec.decode(frame, ts, orig)
                if seg is not None:
                    batch.append(seg)
                    if len(batch) >= _BATCH:
                        yield batch
                        batch = []
            if batch:
                yield batch

    def _cut_short(self, path: Path, reason: str, **where: int) -> None:
        self._cut_short_files += 1
        log.warning("capture file cut short: the rest of it is skipped", file=str(path),
                    reason=reason, **where)

    def _bad_frame(self, path: Path, frame: int, offset: int, why: str) -> None:
        """Count a damaged frame skipped; warn of the first one in each file."""
        self._bad_frames += 1
        if path not in self._warned:
            self._warned.add(path)
            log.warning("damaged frame skipped (counted as bad_frames; later ones in this file "
                        "are only counted)", file=str(path), frame=frame, offset=offset,
                        reason=why)

    def close(self) -> None:
        self._closed = True

    def stats(self) -> dict[str, int]:
        return {
            "frames": self._frames,
            "filtered": self._filtered,
            "cut_short_files": self._cut_short_files,
            "bad_frames": self._bad_frames,
            **self.decode_stats.as_dict(),
        }
