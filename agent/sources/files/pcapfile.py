"""pcap and pcapng files as a packet source (several files, read in the order given).

Every file's global header (the 24 bytes of pcap, pcapng's whole Section Header Block) is
checked when the source is made: a missing, non-capture or truncated one is a
:class:`SourceError` before any file is read. A regular file is closed after the check and
opened again when its turn comes: one that can no longer be read then (changed since, or no
longer a regular file) is cut short like a damaged one. A stream (``-`` for standard input, a
pipe, a FIFO, a device) is read once: it stays open, the bytes of its checked header kept.
Files are read in chunks (:class:`~agent.sources.files.capstream.Capture`), never mapped, so one
that shrinks, grows or is replaced while it is read cannot fault the process.

A damaged file is read up to the damage. A pcapng block whose framing is intact (its length
repeated at its end) but whose content is not (a packet longer than its block, an unknown
interface) is skipped and counted (``bad_frames``). Where the next record cannot be found (a
pcap record with an absurd captured length, a pcapng block length that is invalid or runs past
the end, a truncated last record, a file that ends before the size it had when opened) the
file is cut short there: a warning names the file, the frame number and the byte offset, the
rest of that file is skipped, and ``cut_short_files`` counts it.

Frames go through one :class:`~agent.decode.Decoder` per link type, all sharing one
:class:`~agent.decode.Defragmenter` (one memory bound, ``DecodeConfig.defrag_bytes``). The
segments of IP datagrams given up (memory, timeout) come in the batch of the frame that made
room or, for timeouts, that of the first frame past the deadline (checked at least once a
batch); at the end of the last file every datagram still waiting is given up.
"""

from __future__ import annotations

import functools
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import structlog

from agent.decode import (
    ETH_IPV4_TCP,
    ETH_IPV4_TCP_MIN,
    LINKTYPE_ETHERNET,
    SUPPORTED_LINKTYPES,
    DecodeConfig,
    Decoder,
    DecodeStats,
    Defragmenter,
)
from agent.model import Segment
from agent.sources import SourceError
from agent.sources.files.capfile import (
    MAX_CAPLEN,
    CutShort,
    Frame,
    bad_record,
    cut_record,
    frames,
    read_frames,
)
from agent.sources.files.capstream import STDIN, Capture, display

__all__ = ["Capture", "CutShort", "PcapFileSource", "read_frames"]


log = structlog.get_logger("agent.pcapfile")

#: A batch ends at this many segments or once its frames took this many bytes of the file,
#: whichever comes first. Offline, nothing waits for a batch to fill: larger ones make fewer,
#: larger chunks (the reassembler merges within a batch) and fewer calls per segment.
_BATCH = 4096
_BATCH_BYTES = 1 << 20
#: Decides whether a raw frame is kept: (link type, frame) → bool.
FrameFilter = Callable[[int, bytes], bool]


class PcapFileSource:
    """Reads pcap/pcapng files in order and decodes their frames into segments.

    ``paths``: files (``-`` is standard input, at most once) or captures already open (their
    header checked; the source owns them from here on). ``frame_filter`` (for example a
    compiled tcpdump expression) sees each raw frame first; frames it rejects are counted as
    ``filtered``. Damaged files: see the module docstring; each is logged (a warning with the
    file, frame number and byte offset). ``config``: the tunnel ports, layer bound and
    defragmentation limits (the defaults without it).
    """

    def __init__(self, paths: Sequence[Path | Capture], frame_filter: FrameFilter | None = None,
                 config: DecodeConfig | None = None) -> None:
        if not paths:
            raise SourceError("no capture files given")
        if sum(1 for p in paths if p == STDIN) > 1:
            raise SourceError("standard input (-) is given more than once")
        self.paths = [p if isinstance(p, Path) else p.path for p in paths]
        #: What is left to read: paths of regular files (checked, closed), open captures.
        self._inputs: deque[Path | Capture] = deque()
        try:
            self._inputs.extend(_checked(p) for p in paths)
        except BaseException:
            self.close()
            raise
        self._filter = frame_filter
        self.decode_stats = DecodeStats()
        self._config = config or DecodeConfig()
        self._defrag = Defragmenter(self._config.defrag_bytes, self._config.defrag_timeout,
                                    self.decode_stats.defrag)
        self._frames = 0
        self._filtered = 0
        self._cut_short_files = 0
        self._bad_frames = 0
        self._warned: set[Path] = set()
        self._decoders: dict[int, Decoder] = {}
        self._closed = False

    def batches(self) -> Iterator[list[Segment]]:
        while not self._closed:
            try:
                item = self._inputs.popleft()
            except IndexError:
                break
            if isinstance(item, Capture):
                cap = item
            else:
                try:
                    cap = Capture.open(item, regular=True)
                except SourceError as e:  # changed since the check at start
                    self._cut_short(item, f"{e} (changed since the check at start)",
                                    frames_read=0)
                    continue
            with cap:
                yield from self._file_batches(cap)
        if not self._closed and self._defrag.pending:
            rest: list[Segment] = []
            for dec in self._decoders.values():
                dec.finish()
                rest += dec.take_ready()
            if rest:
                yield rest

    def _file_batches(self, cap: Capture) -> Iterator[list[Segment]]:
        if cap.kind == "pcap" and self._filter is None:
            return self._pcap_batches(cap)
        found = frames(cap, functools.partial(self._bad_frame, cap.path))
        return self._frame_batches(cap.path, found)

    def _frame_batches(self, path: Path, found: Iterator[Frame]) -> Iterator[list[Segment]]:
        """Segments of one file's frames, each through the filter and a decoder."""
        keep = self._filter
        batch: list[Segment] = []
        read = size = 0
        while not self._closed:
            try:
                linktype, ts, frame, orig = next(found)
            except StopIteration:
                break
            except CutShort as e:
                self._cut_short(path, e.reason, frames_read=read, frame=e.frame,
                                offset=e.offset)
                break
            read += 1
            self._frames += 1
            if keep is not None and not keep(linktype, frame):
                self._filtered += 1
                continue
            if self._decode_into(linktype, frame, ts, orig, batch):
                size += len(frame)
                if len(batch) >= _BATCH or size >= _BATCH_BYTES:
                    self._expire(ts, batch)
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch

    def _pcap_batches(self, cap: Capture) -> Iterator[list[Segment]]:
        """Segments of a pcap file read without a filter: the common frame (see
        :func:`~agent.decode.fast_frame`) is decoded right from the read buffer in the
        reading loop, any other one by :meth:`_decode_into`. Frames and segments are counted
        once per batch."""
        linktype, unit = cap.linktype, cap.unit
        ethernet = linktype == LINKTYPE_ETHERNET
        unpack_rec = struct.Struct(cap.endian + "IIII").unpack_from
        unpack_head = ETH_IPV4_TCP.unpack_from
        buf, pos = cap.buf, cap.pos
        n = len(buf)
        batch: list[Segment] = []
        fast = other = 0  # frames decoded here, frames handed to _decode_into (not yet counted)
        read = 0  # frames of this file counted
        full = pos + _BATCH_BYTES  # where the batch is full, whatever its length
        while True:
            if pos + 16 > n:  # the buffer ends inside a record header: read on
                full -= pos
                buf, pos = cap.refill(buf, pos, 16), 0
                n = len(buf)
                if n < 16:
                    break
            sec, frac, incl, orig = unpack_rec(buf, pos)
            at, pos = pos + 16, pos + 16 + incl
            if pos > n or incl > MAX_CAPLEN:  # the buffer ends inside the record, or damage
                pos = at - 16
                if incl > MAX_CAPLEN:
                    break
                full -= pos
                buf, pos = cap.refill(buf, pos, 16 + incl), 0
                n = len(buf)
                if 16 + incl > n:
                    break
                at, pos = 16, 16 + incl
            seg = None
            # The IPv4 header's first byte, checked first: other frames skip the unpack.
            if ethernet and incl >= ETH_IPV4_TCP_MIN and buf[at + 14] == 0x45:
                (etype, vihl, total, frag, proto, src, dst, sport, dport, seq, ack, doff,
                 flags, window) = unpack_head(buf, at)
                start, end = 34 + (doff >> 4) * 4, 14 + total
                # decode.fast_frame(), inlined: a call per frame costs ~10% of this loop.
                if (etype == 0x0800 and vihl == 0x45 and proto == 6 and not frag & 0x3FFF
                        and ETH_IPV4_TCP_MIN <= start <= end <= incl):
                    fast += 1
                    seg = Segment(src, sport, dst, dport, seq, ack, flags,
                                  buf[at + start : at + end], sec + frac * unit, window)
            if seg is None:
                other += 1
                if not self._decode_into(linktype, buf[at:pos], sec + frac * unit, orig,
                                         batch):
                    continue
            else:
                batch.append(seg)
            if len(batch) < _BATCH and pos < full:
                continue
            self._expire(sec + frac * unit, batch)
            full = pos + _BATCH_BYTES
            read += self._count(fast, other)
            fast = other = 0
            yield batch
            batch = []
            if self._closed:
                return
        self._pcap_end(cap, buf, pos, read + self._count(fast, other))
        if batch:
            yield batch

    def _count(self, fast: int, other: int) -> int:
        """Count ``fast`` frames decoded in the reading loop and ``other`` ones; their sum."""
        self._frames += fast + other
        self.decode_stats.decoded += fast
        return fast + other

    def _pcap_end(self, cap: Capture, buf: bytes, pos: int, read: int) -> None:
        """The pcap file ended at ``buf[pos]``, after ``read`` frames: cut short unless it
        ended cleanly, at the end of a record and of all the file had."""
        left = len(buf) - pos
        if left:
            incl = struct.unpack_from(cap.endian + "I", buf, pos + 8)[0] if left >= 16 else -1
            reason = cut_record(cap, incl, left) if incl <= MAX_CAPLEN else bad_record(incl, left)
        else:
            reason = cap.ended_early(cap.base + pos)
        if reason:
            self._cut_short(cap.path, reason, frames_read=read, frame=read + 1,
                            offset=cap.base + pos)

    def _decode_into(self, linktype: int, frame: bytes, ts: float, orig: int,
                     batch: list[Segment]) -> bool:
        """A frame through its link type's decoder (counted if it has none): its segment,
        after those of datagrams it made the defragmenter give up, onto ``batch``. True if
        any was added."""
        dec = self._decoders.get(linktype)
        if dec is None:
            if linktype not in SUPPORTED_LINKTYPES:
                self.decode_stats.skip(f"linktype_{linktype}")
                return False
            dec = self._decoders[linktype] = Decoder(linktype, self.decode_stats,
                                                     self._config, self._defrag)
        seg = dec.decode(frame, ts, orig)
        if dec.ready:
            batch += dec.take_ready()
        elif seg is None:
            return False
        if seg is not None:
            batch.append(seg)
        return True

    def _expire(self, now: float, batch: list[Segment]) -> None:
        """Once a batch: give up datagrams past the defragmentation timeout (the fast path
        does not look)."""
        if now >= self._defrag.deadline:
            dec = next(iter(self._decoders.values()))
            dec.expire(now)
            batch += dec.take_ready()

    def _cut_short(self, path: Path, reason: str, **where: int) -> None:
        self._cut_short_files += 1
        log.warning("capture file cut short: the rest of it is skipped", file=display(path),
                    reason=reason, **where)

    def _bad_frame(self, path: Path, frame: int, offset: int, why: str) -> None:
        """Count a damaged frame skipped; warn of the first one in each file."""
        self._bad_frames += 1
        if path not in self._warned:
            self._warned.add(path)
            log.warning("damaged frame skipped (counted as bad_frames; later ones in this file "
                        "are only counted)", file=display(path), frame=frame, offset=offset,
                        reason=why)

    def close(self) -> None:
        """Stop reading; close the captures still open (the one being read closes as its
        reading ends). Idempotent."""
        self._closed = True
        while True:
            try:
                item = self._inputs.pop()
            except IndexError:
                return
            if isinstance(item, Capture):
                item.close()

    def stats(self) -> dict[str, int]:
        return {
            "frames": self._frames,
            "filtered": self._filtered,
            "cut_short_files": self._cut_short_files,
            "bad_frames": self._bad_frames,
            **self.decode_stats.as_dict(),
        }


def _checked(path: Path | Capture) -> Path | Capture:
    """``path`` with its header checked: a regular file's path (closed again), an open
    capture for a stream or standard input (read once, so it stays open) or one given
    open."""
    if isinstance(path, Capture):
        return path
    cap = Capture.open(path)
    if cap.regular and path != STDIN:  # a duplicate of stdin shares its offset: keep it
        cap.close()
        return path
    return cap
