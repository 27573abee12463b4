"""pcap and pcapng files as a packet source (several files, read in the order given)."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.capture import SourceError
from agent.decode import SUPPORTED_LINKTYPES, Decoder, DecodeStats
from agent.model import Segment

__all__ = ["PcapFileSource", "read_frames"]

_BATCH = 512
_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG_SHB = 0x0A0D0D0A

#: (link type, timestamp seconds, captured bytes, original length)
Frame = tuple[int, float, bytes, int]
#: Decides whether a raw frame is kept: (link type, frame) → bool.
FrameFilter = Callable[[int, bytes], bool]




def read_frames(path: Path) -> Iterator[Frame]:
    """Every frame of a pcap or pcapng file. Raises :class:`SourceError` on a bad file;
    a truncated last record ends the iteration (reported through ``truncated`` in stats)."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from None
    with f:
        head = f.read(4)
        if len(head) < 4:
            raise SourceError(f"{path}: not a pcap or pcapng file (too short)")
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as e:
            raise SourceError(f"cannot map {path}: {e}") from None
        with data:
            if head in _PCAP_MAGICS:
                yield from _pcap(path, data, *_PCAP_MAGICS[head])
            elif struct.unpack("<I", head)[0] == _PCAPNG_SHB:
                yield from _pcapng(path, data)
            else:
                raise SourceError(f"{path}: not a pcap or pcapng file (magic {head.hex()})")


def _pcap(path: Path, data: mmap.mmap, endian: str, unit: float) -> Iterator[Frame]:
    if len(data) < 24:
        raise SourceError(f"{path}: truncated pcap header")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    rec = struct.Struct(endian + "IIII")
    pos, n = 24, len(data)
    unpack = rec.unpack_from
    while pos + 16 <= n:
        sec, frac, incl, orig = unpack(data, pos)
        pos += 16
        if pos + incl > n:
            raise _TruncatedFile(path, n - pos + 16)
        yield linktype, sec + frac * unit, data[pos : pos + incl], orig
        pos += incl
    if pos != n:
        raise _TruncatedFile(path, n - pos)


class _TruncatedFile(Exception):
    def __init__(self, path: Path, missing: int) -> None:
        super().__init__(f"{path}: last record truncated ({missing} bytes left over)")


def _pcapng(path: Path, data: mmap.mmap) -> Iterator[Frame]:
    n = len(data)
    pos = 0
    endian = "<"
    ifaces: list[tuple[int, float]] = []  # (link type, seconds per tick)
    while pos + 12 <= n:
        btype = struct.unpack_from(endian + "I", data, pos)[0]
        if btype == _PCAPNG_SHB:
            bom = data[pos + 8 : pos + 12]
            endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            ifaces = []
        blen = struct.unpack_from(endian + "I", data, pos + 4)[0]
        if blen < 12 or blen % 4:
            raise SourceError(f"{path}: corrupt pcapng block at offset {pos}")
        if pos + blen > n:
            raise _TruncatedFile(path, n - pos)
        body = pos + 8
        if btype == 1:  # Interface Description Block
            linktype = struct.unpack_from(endian + "H", data, body)[0]
            ifaces.append((linktype, _tsresol(data, body + 8, pos + blen - 4, endian)))
        elif btype in (6, 2):  # Enhanced Packet Block, obsolete Packet Block
            if btype == 6:
                iface, hi, lo, incl, orig = struct.unpack_from(endian + "IIIII", data, body)
            else:
                iface, _drops, hi, lo, incl, orig = struct.unpack_from(
                    endian + "HHIIII", data, body
                )
            if iface >= len(ifaces):
                raise SourceError(f"{path}: packet for undeclared interface {iface}")
            linktype, unit = ifaces[iface]
            start = body + 20
            yield linktype, ((hi << 32) | lo) * unit, data[start : start + incl], orig
        elif btype == 3:  # Simple Packet Block
            orig = struct.unpack_from(endian + "I", data, body)[0]
            incl = min(orig, blen - 16)
            linktype, _unit = ifaces[0] if ifaces else (1, 1e-6)
            yield linktype, 0.0, data[body + 4 : body + 4 + incl], orig
        pos += blen


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
    """Fail early, with one clear line, on a missing or non-capture file."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from None
    if head not in _PCAP_MAGICS and (len(head) < 4 or struct.unpack("<I", head)[0] != _PCAPNG_SHB):
        raise SourceError(f"{path}: not a pcap or pcapng file")


class PcapFileSource:
    """Reads pcap/pcapng files in order and decodes their frames into segments.

    ``frame_filter`` (for example a compiled tcpdump expression) sees each raw frame first;
    frames it rejects are counted as ``filtered``.
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
        self._truncated_files = 0
        self._closed = False

    def batches(self) -> Iterator[list[Segment]]:
        decoders: dict[int, Decoder] = {}
        stats = self.decode_stats
        keep = self._filter
        for path in self.paths:
            batch: list[Segment] = []
            frames = read_frames(path)
            while not self._closed:
                try:
                    linktype, ts, frame, orig = next(frames)
                except StopIteration:
                    break
                except _TruncatedFile:
                    self._truncated_files += 1
                    break
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

    def close(self) -> None:
        self._closed = True

    def stats(self) -> dict[str, int]:
        return {
            "frames": self._frames,
            "filtered": self._filtered,
            "truncated_files": self._truncated_files,
            **self.decode_stats.as_dict(),
        }
