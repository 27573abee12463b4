"""Opening what ``replay`` reads: a file, ``-`` (standard input), a pipe, a FIFO, process
substitution; told apart by their first bytes, not by their names.

:func:`open_input` reads an input's first bytes to tell its kind (a native or JSON-lines
recording, either maybe compressed with gzip or zstd; or a pcap/pcapng capture) and hands the
input back open, with those bytes still to be read: a stream is read once, from the check on.
A regular file may be closed after the check and opened again later (:func:`reopen`).
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from agent.sinks.record import MAGIC, VERSION, decoded
from agent.sinks.record.codec import Decoded
from agent.sinks.record.format import FILE_HEADER
from agent.sources import SourceError as CaptureSourceError
from agent.sources.files.capstream import STDIN, Capture, display

__all__ = ["Opened", "SourceError", "open_input", "reopen"]

_PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1",
                b"\xa1\xb2\x3c\x4d", b"\x0a\x0d\x0d\x0a")
_HEAD = FILE_HEADER.size  # bytes that tell the kind: a native file header is the longest
_PIECE = 1 << 20


class SourceError(Exception):
    """A source cannot be replayed at all (missing, unreadable, no known format, a native
    recording of a version this reader does not know): exit 2."""


@dataclass
class Opened:
    """An open input: its ``kind`` ("native", "jsonl" or "pcap") and ``name``; a recording's
    decompressed bytes in ``stream`` (``decoder`` set if it was compressed) or a capture,
    its header checked, in ``capture``. ``regular``: a regular file, which can be opened
    again. Closing it closes the file."""

    kind: str
    name: str
    raw: io.FileIO
    regular: bool
    stream: BinaryIO = field(default_factory=io.BytesIO)
    decoder: Decoded | None = None
    capture: Capture | None = None

    def problems(self) -> list[str]:
        """After reading: a compressed stream cut short or corrupt; else nothing."""
        if self.decoder is None or not self.decoder.problem:
            return []
        return [f"{self.name}: {self.decoder.problem}"]

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
        self.raw.close()

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_input(path: Path) -> Opened:
    """``path`` (``-``: standard input) open, its kind told by its first bytes; nothing of it
    is lost for the reader. SourceError (one line) if it cannot be read or is of no known
    kind (an empty input is a native recording of nothing)."""
    name = display(path)
    try:
        raw = io.FileIO(os.dup(0) if path == STDIN else path, "rb")
    except OSError as e:
        raise SourceError(f"cannot read {name}: {e.strerror or e}") from None
    try:
        regular = stat.S_ISREG(os.fstat(raw.fileno()).st_mode)
        head = _head(raw, _HEAD)
        if head[:4] in _PCAP_MAGICS:
            return Opened("pcap", name, raw, regular, capture=Capture(raw, path, head))
        stream, decoder = decoded(io.BufferedReader(_Joined(head, raw), _PIECE))
        if decoder is not None:
            head = _head(stream, _HEAD)
            stream = io.BufferedReader(_Joined(head, stream), _PIECE)
        return Opened(_kind(name, head, decoder), name, raw, regular, stream, decoder)
    except CaptureSourceError as e:
        raise SourceError(str(e)) from None
    except OSError as e:
        raw.close()
        raise SourceError(f"cannot read {name}: {e.strerror or e}") from None
    except BaseException:
        raw.close()
        raise


def reopen(path: Path, opened: Opened | None, kind: str, problems: list[str]) -> Opened | None:
    """``opened`` if given, else ``path`` opened again (a regular file checked earlier); None,
    with why in ``problems``, if it cannot be read now or is no longer of ``kind``."""
    if opened is not None:
        return opened
    try:
        opened = open_input(path)
    except SourceError as e:
        problems.append(f"{e} (since it was checked)")
        return None
    if opened.kind != kind:
        opened.close()
        problems.append(f"{display(path)}: changed since it was checked (now {opened.kind})")
        return None
    return opened


def _kind(name: str, head: bytes, decoder: Decoded | None) -> str:
    if not head:
        return "native"  # a recording of nothing
    if head.startswith(MAGIC):
        if len(head) < FILE_HEADER.size:
            raise SourceError(f"{name}: a native recording whose file header is cut short")
        version = FILE_HEADER.unpack(head)[1]
        if version != VERSION:
            raise SourceError(f"{name}: recording version {version} is not supported (this "
                              f"mirror-agent reads version {VERSION})")
        return "native"
    if head.lstrip()[:1] == b"{":
        return "jsonl"
    if decoder is not None and head[:4] in _PCAP_MAGICS:
        raise SourceError(f"{name}: a compressed capture: decompress it first (zcat or zstdcat "
                          "into mirror-agent replay -)")
    raise SourceError(f"{name}: not a recording (native or JSON lines) nor a pcap/pcapng "
                      "capture")


def _head(src: Any, n: int) -> bytes:
    """The first ``n`` bytes of ``src`` (fewer at its end), consumed: several reads if a
    pipe gives them in pieces."""
    parts: list[bytes] = []
    have = 0
    while have < n:
        piece = src.read(n - have)
        if not piece:
            break
        parts.append(piece)
        have += len(piece)
    return b"".join(parts)


class _Joined(io.RawIOBase):
    """``head`` and then the rest of ``rest``: a stream whose first bytes were read already."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        piece = getattr(self._rest, "read1", self._rest.read)(len(view))
        view[: len(piece)] = piece
        return len(piece)
