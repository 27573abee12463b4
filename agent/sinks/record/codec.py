"""Compressed recording files: gzip (zlib, level 1) or zstd (the ``zstandard`` package, level
3), written a batch at a time on the writer thread, and read back whatever they are.

A compressed file is a sequence of complete gzip members or zstd frames, as both formats
allow: :meth:`Compressor.sync` makes everything given so far decodable from the bytes out
(a flush point the reader can decode up to, used for each written batch), and
:meth:`Compressor.finish` ends the member or frame (when a file is closed or the recording
flushed for good), so a file closed cleanly is a complete ``.gz`` / ``.zst`` that ``zcat``
or ``zstdcat`` decode. A file cut by a crash decodes up to its last flush point.

Reading (:func:`decoded`) detects the format by its magic bytes, so ``mirror-agent inspect``
takes a recording compressed or not, whatever its name.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, cast

__all__ = ["COMPRESSIONS", "SUFFIXES", "Compressor", "Decoded", "check_compression", "decoded",
           "new_compressor"]

#: What ``--record-compress`` takes.
COMPRESSIONS = ("gzip", "zstd")
#: The file name suffix each compression adds (unless the path already ends with it).
SUFFIXES = {"gzip": ".gz", "zstd": ".zst"}
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_LEVEL = 1  # ~5x on HTTP headers at a fraction of level 6's CPU: the agent is a guest
_ZSTD_LEVEL = 3  # zstd's own default, already faster than gzip -1
_READ_PIECE = 64 << 10
_OUT_PIECE = 4 << 20  # most bytes one decompress call may produce (gzip)


class Compressor(Protocol):
    """A compressed stream, fed a batch at a time."""

    def compress(self, data: bytes) -> bytes:
        """Compressed bytes for ``data`` (maybe none yet: the compressor may hold them)."""
        ...

    def sync(self) -> bytes:
        """What the compressor holds, so that everything given so far decodes."""
        ...

    def finish(self) -> bytes:
        """The end of the member or frame; the next :meth:`compress` starts a new one."""
        ...


class _Gzip:
    def __init__(self) -> None:
        self._z: Any = None  # zlib's compress object, made on first use

    def compress(self, data: bytes) -> bytes:
        if self._z is None:
            self._z = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip framing
        return cast(bytes, self._z.compress(data))

    def sync(self) -> bytes:
        return b"" if self._z is None else cast(bytes, self._z.flush(zlib.Z_SYNC_FLUSH))

    def finish(self) -> bytes:
        z, self._z = self._z, None
        return b"" if z is None else cast(bytes, z.flush(zlib.Z_FINISH))


class _Zstd:
    def __init__(self) -> None:
        import zstandard

        self._zstd = zstandard
        self._cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        self._z: Any = None

    def compress(self, data: bytes) -> bytes:
        if self._z is None:
            self._z = self._cctx.compressobj()
        return cast(bytes, self._z.compress(data))

    def sync(self) -> bytes:
        if self._z is None:
            return b""
        return cast(bytes, self._z.flush(self._zstd.COMPRESSOBJ_FLUSH_BLOCK))

    def finish(self) -> bytes:
        z, self._z = self._z, None
        return b"" if z is None else cast(bytes, z.flush())


def check_compression(name: str) -> None:
    """ValueError (one line) unless ``name`` is a compression this installation can write."""
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r} (expected one of "
                         f"{', '.join(COMPRESSIONS)})")
    if name == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ValueError("--record-compress zstd needs the zstandard package (pip install "
                             "zstandard); gzip needs nothing") from None


def new_compressor(name: str) -> Compressor:
    """A compressor for ``name`` (one of :data:`COMPRESSIONS`; see :func:`check_compression`)."""
    check_compression(name)
    return _Gzip() if name == "gzip" else _Zstd()


def _gzip_decompressor() -> Any:
    return zlib.decompressobj(31)


def _zstd_decompressor() -> Any:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


class Decoded(io.RawIOBase):
    """The decompressed bytes of a gzip or zstd file (members/frames one after another).

    Reading stops early, without raising, where the data is corrupt or the file ends inside a
    member; :attr:`problem` then says so (empty after a clean end)."""

    def __init__(self, src: BinaryIO, make: Callable[[], Any], kind: str) -> None:
        self._src = src
        self._make = make
        self._d: Any = make()
        self._kind = kind
        self._out = b""
        self._pos = 0
        self._pending = b""  # input not decompressed yet (the next member, or held back)
        self._open = False  # inside a member: bytes of it were fed, its end not seen
        self.problem = ""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        while self._pos >= len(self._out):
            if not self._fill():
                return 0
        n = min(len(view), len(self._out) - self._pos)
        view[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _fill(self) -> bool:
        """Decompress more into ``_out``; False at the end (clean, or with :attr:`problem`)."""
        data, self._pending = self._pending or self._src.read(_READ_PIECE), b""
        if not data:
            if self._open:
                self.problem = f"the {self._kind} stream is cut short (the file ends inside it)"
            return False
        try:
            if self._kind == "gzip":
                out = self._d.decompress(data, _OUT_PIECE)
                self._pending = self._d.unconsumed_tail
            else:
                out = self._d.decompress(data)
        except Exception as e:  # zlib.error, zstandard.ZstdError
            self.problem = f"the {self._kind} data is corrupt ({e})"
            return False
        self._open = True
        if self._d.eof:  # a member or frame ended: what follows starts another
            self._pending, self._d, self._open = self._d.unused_data, self._make(), False
        self._out, self._pos = out, 0
        return True


def decoded(src: io.BufferedReader) -> tuple[BinaryIO, Decoded | None]:
    """``src`` itself if it is not compressed, else its decompressed bytes and the
    :class:`Decoded` that reports problems; the format is told by the magic bytes."""
    magic = src.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        dec = Decoded(src, _gzip_decompressor, "gzip")
    elif magic == _ZSTD_MAGIC:
        dec = Decoded(src, _zstd_decompressor, "zstd")
    else:
        return src, None
    return io.BufferedReader(dec, _READ_PIECE), dec
