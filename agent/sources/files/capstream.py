"""An open capture file, read front to back in large chunks: never mapped into memory.

:class:`Capture` opens a file (``-`` is standard input), a FIFO, a pipe or a device, checks
its global header (the 24 bytes of pcap, pcapng's whole Section Header Block: a missing,
non-capture or truncated one is a :class:`SourceError`) and hands out its bytes in chunks
(:meth:`Capture.refill`) to the frame parsers of :mod:`agent.sources.files.capfile`. A file
truncated, grown or replaced while it is read cannot fault the process (a mapped file that
shrinks is a SIGBUS); a regular file that ends before the size it had when opened, or whose
read fails, is said to have ended early (:meth:`Capture.ended_early`).
"""

from __future__ import annotations

import io
import os
import select
import stat
import struct
from pathlib import Path
from types import TracebackType

from agent.sources import SourceError

__all__ = ["CHUNK", "MAX_BLOCK", "PCAPNG_SHB", "PCAP_HEADER", "SHB_ENDIAN", "STDIN", "Capture",
           "bad_block_length", "display", "kind_of"]

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAP_HEADER = 24
PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_SHB_BYTES = b"\x0a\x0d\x0d\x0a"  # the same in either byte order
SHB_ENDIAN = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
_SHB_MIN = 28  # type, length, byte-order magic, version, section length, length again
#: No pcapng block is read whole if longer (a packet block is at most a frame, 256 KiB, plus its
#: options): a longer one is taken for corruption, so a bad length costs no huge buffer.
MAX_BLOCK = 16 << 20
#: Bytes asked of the file per read once its header is checked.
CHUNK = 1 << 20
#: The path that means standard input.
STDIN = Path("-")


def display(path: Path) -> str:
    """What messages call ``path`` (``-`` is standard input)."""
    return "standard input" if path == STDIN else str(path)


class Capture:
    """An open capture whose global header was checked, read front to back.

    ``kind`` ("pcap" or "pcapng"), ``endian``, ``unit`` (seconds per pcap tick) and
    ``linktype`` (pcap) are what the header says. ``buf`` holds what the check read (``head``,
    bytes of the file read before, first); the frames start at ``buf[pos]``. A reader keeps
    its own buffer from there on, passing it back to :meth:`refill` for more; ``base`` is the
    offset of that buffer's first byte. ``size`` is what a regular file had left to read when
    opened (None for a stream). Owns ``raw``: closing the capture closes it, also when the
    header is refused (:class:`SourceError`).
    """

    def __init__(self, raw: io.RawIOBase, path: Path, head: bytes = b"") -> None:
        self.path, self.name, self._raw = path, display(path), raw
        self.buf, self.pos, self.base = head, 0, 0
        self.eof = False
        self.error = ""  # why reading failed, if it did
        self.kind, self.endian, self.unit, self.linktype = "pcap", "<", 1e-6, 0
        try:
            st = os.fstat(raw.fileno())
            self.size: int | None = None
            if stat.S_ISREG(st.st_mode):  # standard input may be a file read in part
                self.size = st.st_size - raw.tell() + len(head)
            self._global_header()
        except BaseException:
            raw.close()
            raise

    @classmethod
    def open(cls, path: Path, regular: bool = False) -> Capture:
        """``path`` (``-``: a duplicate of standard input) opened and its header checked.
        ``regular``: refuse anything but a regular file, without waiting on a FIFO.
        SourceError (one line) if it cannot be opened or is not a capture."""
        try:
            if path == STDIN:
                fd = os.dup(0)
            else:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
                             | (os.O_NONBLOCK if regular else 0))
        except FileNotFoundError:
            raise SourceError(f"{display(path)}: no such file") from None
        except OSError as e:
            raise SourceError(f"cannot open {display(path)}: {e.strerror}") from None
        return cls.from_fd(fd, path, regular)

    @classmethod
    def from_fd(cls, fd: int, path: Path, regular: bool = False) -> Capture:
        """A capture read from ``fd`` (owned from here on, closed on error) and called
        ``path``; ``regular`` as for :meth:`open`."""
        try:
            mode = os.fstat(fd).st_mode
            if regular:
                if not stat.S_ISREG(mode):
                    raise SourceError(f"{display(path)}: not a regular file ({kind_of(mode)})")
                os.set_blocking(fd, True)
            if stat.S_ISDIR(mode):
                raise SourceError(f"cannot open {display(path)}: Is a directory")
            raw = io.FileIO(fd, "rb", closefd=True)
        except BaseException:
            os.close(fd)
            raise
        return cls(raw, path)

    @property
    def regular(self) -> bool:
        """A regular file (it can be opened again); not a pipe, FIFO, socket or device."""
        return self.size is not None

    def refill(self, buf: bytes, pos: int, need: int, ahead: int = CHUNK) -> bytes:
        """``buf`` from ``pos`` on, followed by more of the file: at least ``need`` bytes in
        all unless the file ends first (then :attr:`eof`). Reads ask for ``ahead`` bytes at
        least. ``base`` moves on by ``pos``: the result's first byte is ``buf[pos]``."""
        self.base += pos
        parts = [buf[pos:]]
        have = len(buf) - pos
        while have < need and not self.eof:
            piece = self._read(max(ahead, need - have))
            if not piece:
                self.eof = True
                break
            parts.append(piece)
            have += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read(self, n: int) -> bytes:
        """One read of up to ``n`` bytes; b"" at the end or on a read error (kept in
        :attr:`error`)."""
        while True:
            try:
                piece = self._raw.read(n)
            except OSError as e:
                self.error = f"reading failed ({e.strerror or e})"
                return b""
            if piece is not None:
                return piece
            select.select([self._raw], [], [])  # a descriptor someone made non-blocking

    def ended_early(self, at: int) -> str:
        """Why the input ended at byte ``at`` without its content saying so: the read failed,
        or a regular file is shorter than when it was opened; "" if neither."""
        if self.error:
            return f"{self.error} at byte offset {at}"
        if self.size is not None and self.eof and at < self.size:
            return (f"reading ended at byte offset {at}, but the file had {self.size} bytes "
                    "when opened: it shrank while being read")
        return ""

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()

    def _need(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer if the file is shorter), read without reading ahead."""
        if len(self.buf) < n:
            self.buf = self.refill(self.buf, 0, n, ahead=n - len(self.buf))
        return self.buf

    def _global_header(self) -> None:
        """Sets what the header says; SourceError unless the file starts with a whole pcap
        header (24 bytes) or Section Header Block."""
        data = self._need(4)
        head = data[:4]
        if head in _PCAP_MAGICS:
            data = self._need(PCAP_HEADER)
            if len(data) < PCAP_HEADER:
                raise SourceError(f"{self.name}: truncated pcap header ({len(data)} of "
                                  f"{PCAP_HEADER} bytes)")
            self.endian, self.unit = _PCAP_MAGICS[head]
            # The field's low 16 bits; the high bits say whether frames end with a frame check
            # sequence (and how long), which the decoder never reads (the IP length bounds
            # every payload).
            self.linktype = int(struct.unpack_from(self.endian + "I", data, 20)[0]) & 0xFFFF
            self.pos = PCAP_HEADER
            return
        if head != _PCAPNG_SHB_BYTES:
            why = "empty" if not data else "too short" if len(data) < 4 else f"magic {head.hex()}"
            raise SourceError(f"{self.name}: not a pcap or pcapng file ({why})")
        self._section_header()

    def _section_header(self) -> None:
        data = self._need(_SHB_MIN)
        if len(data) < _SHB_MIN:
            raise SourceError(f"{self.name}: truncated pcapng section header ({len(data)} of at "
                              f"least {_SHB_MIN} bytes)")
        endian = SHB_ENDIAN.get(data[8:12])
        if endian is None:
            raise SourceError(f"{self.name}: not a pcapng file (byte-order magic "
                              f"{data[8:12].hex()})")
        blen = struct.unpack_from(endian + "I", data, 4)[0]
        if blen <= MAX_BLOCK:
            data = self._need(blen)
        bad = bad_block_length(data, 0, blen, endian)
        if bad or blen < _SHB_MIN:
            raise SourceError(f"{self.name}: truncated or damaged pcapng section header "
                              f"({bad or f'block length {blen}'})")
        self.kind, self.endian, self.unit = "pcapng", endian, 0.0


def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, for messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def bad_block_length(data: bytes, pos: int, blen: int, endian: str) -> str:
    """Why a pcapng block's length cannot be trusted, or "" if it can (``data`` holds the
    whole block, or all the file has from ``pos``)."""
    if blen < 12 or blen % 4:
        return f"invalid block length {blen}"
    if blen > MAX_BLOCK:
        return f"invalid block length {blen} (longer than any block read, {MAX_BLOCK})"
    if pos + blen > len(data):
        return f"block length {blen} runs past the end of the file ({len(data) - pos} bytes left)"
    trailer = struct.unpack_from(endian + "I", data, pos + blen - 4)[0]
    if trailer != blen:
        return f"block length {blen} does not match its trailer ({trailer})"
    return ""
