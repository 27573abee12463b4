"""Built-in HTTP/1.x request hooks: inject a header, redact headers.

Both sit on :class:`HttpRequestEditor`, which frames the client→service byte stream into
requests (header block, then a body sized by ``Content-Length`` or chunked encoding), holds a
header block split across chunks until it is complete (up to ``max_head`` bytes), and lets a
subclass rewrite each complete header block. Other directions pass through untouched. Streams
that are not HTTP/1.x, upgrades (``CONNECT``, ``Upgrade:``) and oversize header blocks pass
through unchanged; after a gap it resynchronises on the next chunk that starts a request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agent.model import Direction, TrafficChunk

__all__ = ["HttpRequestEditor", "InjectHeader", "RedactHeaders", "check_header",
           "check_header_name"]

_REQUEST_START = re.compile(rb"[A-Z]{3,12} ")
_REQUEST_LINE = re.compile(rb"[A-Z]{3,12} \S+ HTTP/1\.[01]\r\n")

#: An HTTP field name: a token (RFC 9110 5.1).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A field value: visible ASCII, spaces and tabs (no control characters, nothing that is not
#: ASCII: the bytes on the wire would depend on an encoding).
_VALUE = re.compile(r"[\x20-\x7e\t]*")
#: Headers that frame or route a request, or manage its connection: injecting one would make
#: the shadow read the stream differently from the service.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection",
                             "upgrade", "te", "trailer", "keep-alive", "proxy-connection"})

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _PASS, _RESYNC = range(7)


class _Stream:
    """Framing state of one client→service stream."""

    __slots__ = ("buf", "mode", "remaining")

    def __init__(self) -> None:
        self.mode = _HEAD
        self.buf = bytearray()  # held header block, chunk-size or trailer line
        self.remaining = 0  # body or chunk bytes (+CRLF) still to pass


class HttpRequestEditor:
    """Frames HTTP/1.x requests and hands each complete header block to :meth:`edit_head`."""

    def __init__(self, max_head: int = 64 * 1024) -> None:
        self.max_head = max_head
        self._streams: dict[tuple[int, str], _Stream] = {}
        self.heads_edited = 0
        self.passthrough_streams = 0

    def edit_head(self, head: bytes) -> bytes:
        """Rewrite one complete header block (request line through the blank line)."""
        return head

    def handle(self, chunk: TrafficChunk) -> tuple[bytes, bool]:
        if chunk.direction is not Direction.TO_OBSERVED:
            return chunk.data, True
        key = (chunk.flow_id, chunk.from_addr)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        data = chunk.data
        if chunk.gap_bytes and st.mode != _PASS:
            st.mode, st.buf = _RESYNC, bytearray()
        out = bytearray()
        self._feed(st, memoryview(data), out)
        return bytes(out), True

    def flow_end(self, chunk: TrafficChunk) -> bytes:
        """Release a header block still held when the connection ends (sent as it is)."""
        st = self._streams.pop((chunk.flow_id, chunk.from_addr), None)
        if st is None or st.mode != _HEAD:
            return b""
        return bytes(st.buf)

    def _feed(self, st: _Stream, data: memoryview, out: bytearray) -> None:
        i, n = 0, len(data)
        while i < n:
            mode = st.mode
            if mode == _PASS:
                out += data[i:]
                return
            if mode == _RESYNC:
                if not _REQUEST_LINE.match(bytes(data[i : i + 8200])):
                    out += data[i:]
                    return
                st.mode = _HEAD
            elif mode in (_BODY, _CHUNK_DATA):
                take = min(st.remaining, n - i)
                out += data[i : i + take]
                i += take
                st.remaining -= take
                if not st.remaining:
                    st.mode = _HEAD if mode == _BODY else _CHUNK_SIZE
            elif mode == _HEAD:
                i = self._head(st, data, i, out)
            else:  # chunk-size line or trailer section
                i = self._line(st, data, i, out)

    def _head(self, st: _Stream, data: memoryview, i: int, out: bytearray) -> int:
        buf = st.buf
        before = len(buf)
        start = bytes(data[i : i + 13])
        # Not a request start (and not a short prefix of one): this stream is not HTTP/1.x.
        if not before and not _REQUEST_START.match(start) and (
            len(start) >= 13 or not start.isupper()
        ):
            self._give_up(st, out)
            return i
        buf += data[i:]
        end = buf.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0:
            if len(buf) > self.max_head:
                self._give_up(st, out)
            return len(data)
        head = bytes(buf[: end + 4])
        consumed = end + 4 - before
        st.buf = bytearray()
        out += self._frame(st, head)
        return i + consumed

    def _give_up(self, st: _Stream, out: bytearray) -> None:
        """Not HTTP/1.x (or a runaway header block): pass the rest of the stream through."""
        out += st.buf
        st.buf = bytearray()
        st.mode = _PASS
        self.passthrough_streams += 1

    def _frame(self, st: _Stream, head: bytes) -> bytes:
        """Edit ``head`` and set up framing for the body that follows it."""
        if not _REQUEST_LINE.match(head):
            st.mode = _PASS
            self.passthrough_streams += 1
            return head
        edited = self.edit_head(head)
        self.heads_edited += 1
        method = head[: head.index(b" ")]
        length, chunked, upgrade = _body_framing(head)
        if method == b"CONNECT" or upgrade:
            st.mode = _PASS
        elif chunked:
            st.mode = _CHUNK_SIZE
        elif length:
            st.mode, st.remaining = _BODY, length
        else:
            st.mode = _HEAD
        return edited

    def _line(self, st: _Stream, data: memoryview, i: int, out: bytearray) -> int:
        """Pass one chunk-size or trailer line through, acting on it once complete."""
        nl = bytes(data[i:]).find(b"\n")
        if nl < 0:
            st.buf += data[i:]
            out += data[i:]
            if len(st.buf) > self.max_head:
                st.mode = _PASS
            return len(data)
        line = bytes(st.buf) + bytes(data[i : i + nl + 1])
        out += data[i : i + nl + 1]
        st.buf = bytearray()
        if st.mode == _CHUNK_SIZE:
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                st.mode = _PASS
                return i + nl + 1
            if size:
                st.mode, st.remaining = _CHUNK_DATA, size + 2  # data plus its CRLF
            else:
                st.mode = _TRAILER
        elif line in (b"\r\n", b"\n"):
            st.mode = _HEAD  # blank line: the chunked request is complete
        return i + nl + 1


def _body_framing(head: bytes) -> tuple[int, bool, bool]:
    """(Content-Length, chunked?, upgrade?) from a request header block."""
    length, chunked, upgrade = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                length = 0
        elif name == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif name == b"upgrade":
            upgrade = True
    return length, chunked, upgrade


def check_header_name(name: str) -> None:
    """ValueError unless ``name`` is a valid HTTP header name."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid header name (letters, digits and "
                         "!#$%&'*+-.^_`|~ only)")


def check_header(name: str, value: str) -> None:
    """ValueError unless ``name: value`` is a header :class:`InjectHeader` may add."""
    check_header_name(name)
    if name.lower() in FRAMING_HEADERS:
        raise ValueError(f"{name} cannot be injected: it frames or routes the request, so the "
                         "shadow would read the stream differently from the service")
    if not _VALUE.fullmatch(value):
        raise ValueError(f"header value {value!r} must be printable ASCII (spaces and tabs "
                         "allowed)")


class InjectHeader(HttpRequestEditor):
    """Adds ``name: value`` to every HTTP/1.x request (replacing a header of the same name)."""

    def __init__(self, name: str, value: str, max_head: int = 64 * 1024) -> None:
        super().__init__(max_head)
        check_header(name, value)
        self._header = f"{name}: {value}\r\n".encode("latin-1")
        self._strip = re.compile(
            rb"\r\n" + re.escape(name.encode("latin-1")) + rb"[ \t]*:[^\r\n]*", re.IGNORECASE
        )

    def edit_head(self, head: bytes) -> bytes:
        body = self._strip.sub(b"", head[:-2])
        return body + self._header + b"\r\n"


class RedactHeaders(HttpRequestEditor):
    """Replaces the values of the named request headers (``Authorization`` and ``Cookie`` by
    default) with ``replacement``."""

    def __init__(
        self, names: Iterable[str] = ("Authorization", "Cookie"), replacement: str = "[REDACTED]",
        max_head: int = 64 * 1024,
    ) -> None:
        super().__init__(max_head)
        stripped = [n.strip() for n in names if n.strip()]
        if not stripped:
            raise ValueError("no header names to redact")
        for name in stripped:
            check_header_name(name)
        alts = b"|".join(re.escape(n.encode("ascii")) for n in stripped)
        self._re = re.compile(rb"(\r\n(?:" + alts + rb")[ \t]*:[ \t]*)[^\r\n]*", re.IGNORECASE)
        self._repl = replacement.encode("latin-1")
        self.redacted = 0

    def edit_head(self, head: bytes) -> bytes:
        new, n = self._re.subn(lambda m: m.group(1) + self._repl, head)
        self.redacted += n
        return new
