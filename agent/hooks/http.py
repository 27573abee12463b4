"""Built-in HTTP/1.x request hooks: inject a header, redact headers; and the request framing
they (and :mod:`agent.hooks.select`) sit on.

:class:`HttpRequestEditor` frames the client→service byte stream into requests (header block,
then a body sized by ``Content-Length`` or chunked encoding), holds a header block split across
chunks until it is complete (up to ``max_head`` bytes), and hands each complete header block
to :meth:`~HttpRequestEditor.request`: what it returns is sent instead, or ``None`` drops the
request whole (its body, chunks and trailers too). Other directions pass through untouched.
Streams that are not HTTP/1.x, upgrades (``CONNECT``, ``Upgrade:``) and oversize header
blocks pass through unchanged (a subclass may drop them instead:
:meth:`~HttpRequestEditor.pass_unframed`); after a gap it resynchronises on the next chunk
that starts a request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agent.model import Direction, TrafficChunk

__all__ = ["BAD_BODY", "NOT_HTTP", "OVERSIZE", "REQUEST_LINE", "HttpRequestEditor",
           "InjectHeader", "RedactHeaders", "body_framing", "check_header", "check_header_name",
           "chunk_size", "could_start_request"]

_REQUEST_START = re.compile(rb"[A-Z]{3,12} ")
#: An HTTP/1.x request line, CRLF included (``match`` it where a request should start).
REQUEST_LINE = _REQUEST_LINE = re.compile(rb"[A-Z]{3,12} \S+ HTTP/1\.[01]\r\n")

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

#: Why framing was lost (:meth:`HttpRequestEditor.pass_unframed`): bytes that do not start
#: an HTTP/1.x request where one should start; a header block over ``max_head``; a body
#: length that is not one (``Content-Length`` or a chunk-size line; inside the request).
NOT_HTTP, OVERSIZE, BAD_BODY = "not_http", "oversize", "bad_body"
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class _Stream:
    """Framing state of one client→service stream."""

    __slots__ = ("buf", "keep", "mode", "remaining", "requests")

    def __init__(self) -> None:
        self.mode = _HEAD
        self.buf = bytearray()  # held header block, chunk-size or trailer line
        self.remaining = 0  # body or chunk bytes (+CRLF) still to pass
        self.keep = True  # the current request's bytes pass on (False: dropped)
        self.requests = 0  # header blocks framed so far


class HttpRequestEditor:
    """Frames HTTP/1.x requests and hands each complete header block to :meth:`request`.

    Counters: ``heads_edited`` (header blocks framed), ``passthrough_streams`` (streams whose
    framing was lost), ``dropped_bytes`` (bytes of dropped requests not passed on)."""

    def __init__(self, max_head: int = 64 * 1024) -> None:
        self.max_head = max_head
        self._streams: dict[tuple[int, str], _Stream] = {}
        self.heads_edited = 0
        self.passthrough_streams = 0
        self.dropped_bytes = 0

    def edit_head(self, head: bytes) -> bytes:
        """Rewrite one complete header block (request line through the blank line)."""
        return head

    def request(self, head: bytes, chunk: TrafficChunk) -> bytes | None:
        """What to send for one complete header block (request line through the blank
        line), ``chunk`` being the one that completed it: by default :meth:`edit_head`'s
        result. ``None`` drops the request whole: the header block, its body (chunked: every
        chunk and the trailers) and, for ``CONNECT`` or an ``Upgrade``, the rest of the
        stream; the stream's later requests are framed and judged as usual."""
        return self.edit_head(head)

    def pass_unframed(self, why: str, started: bool) -> bool:
        """Whether the rest of a stream whose framing is lost passes on (True, the default)
        or is dropped. ``why``: :data:`NOT_HTTP`, :data:`OVERSIZE` or :data:`BAD_BODY`
        (inside the current request); ``started``: a request was framed on this stream
        before. Once a request was dropped, the rest of it is dropped whatever this says."""
        return True

    def held_at_end(self, held: bytes) -> bytes:
        """What to send of an incomplete header block still held when the connection ends:
        by default the bytes as they are. Also told of one a gap cut (what it returns then
        is counted in ``dropped_bytes``: it cannot be sent before the gap)."""
        return held

    def handle(self, chunk: TrafficChunk) -> tuple[bytes, bool]:
        if chunk.direction is not Direction.TO_OBSERVED:
            return chunk.data, True
        key = (chunk.flow_id, chunk.from_addr)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        if chunk.gap_bytes and st.mode != _PASS:
            if st.mode == _HEAD and st.buf:  # a header block cut by the gap: it cannot go
                lost = self.held_at_end(bytes(st.buf))  # before the gap
                self.dropped_bytes += len(lost)
            st.mode, st.buf = _RESYNC, bytearray()
        out = bytearray()
        self._feed(st, memoryview(chunk.data), out, chunk)
        return bytes(out), True

    def flow_end(self, chunk: TrafficChunk) -> bytes:
        """Release a header block still held when the connection ends
        (:meth:`held_at_end`)."""
        st = self._streams.pop((chunk.flow_id, chunk.from_addr), None)
        if st is None or st.mode != _HEAD:
            return b""
        return self.held_at_end(bytes(st.buf))

    def _emit(self, st: _Stream, out: bytearray, piece: bytes | bytearray | memoryview) -> None:
        """``piece`` of the current request: passed on, or counted as dropped."""
        if st.keep:
            out += piece
        else:
            self.dropped_bytes += len(piece)

    def _feed(self, st: _Stream, data: memoryview, out: bytearray, chunk: TrafficChunk) -> None:
        i, n = 0, len(data)
        while i < n:
            mode = st.mode
            if mode == _PASS:
                self._emit(st, out, data[i:])
                return
            if mode == _RESYNC:  # the rest of the request the gap cut shares its fate
                if not _REQUEST_LINE.match(bytes(data[i : i + 8200])):
                    self._emit(st, out, data[i:])
                    return
                st.mode = _HEAD
            elif mode in (_BODY, _CHUNK_DATA):
                take = min(st.remaining, n - i)
                self._emit(st, out, data[i : i + take])
                i += take
                st.remaining -= take
                if not st.remaining:
                    st.mode = _HEAD if mode == _BODY else _CHUNK_SIZE
            elif mode == _HEAD:
                i = self._head(st, data, i, out, chunk)
            else:  # chunk-size line or trailer section
                i = self._line(st, data, i, out)

    def _head(self, st: _Stream, data: memoryview, i: int, out: bytearray,
              chunk: TrafficChunk) -> int:
        buf = st.buf
        before = len(buf)
        # Not a request start (and not a short prefix of one): this stream is not HTTP/1.x.
        if not before and not could_start_request(bytes(data[i : i + 13])):
            self._lose(st, out, NOT_HTTP)
            return i
        buf += data[i:]
        end = buf.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0:
            if len(buf) > self.max_head:
                self._lose(st, out, OVERSIZE)
            return len(data)
        head = bytes(buf[: end + 4])
        consumed = end + 4 - before
        st.buf = bytearray()
        self._frame(st, head, out, chunk)
        return i + consumed

    def _lose(self, st: _Stream, out: bytearray, why: str) -> None:
        """Framing is lost (``why``): the held bytes and the rest of the stream pass on
        unframed, unless the current request was dropped or :meth:`pass_unframed` says no."""
        st.keep = st.keep and self.pass_unframed(why, st.requests > 0)
        self._emit(st, out, st.buf)
        st.buf = bytearray()
        st.mode = _PASS
        self.passthrough_streams += 1

    def _frame(self, st: _Stream, head: bytes, out: bytearray, chunk: TrafficChunk) -> None:
        """Judge and edit ``head``, and set up framing for the body that follows it."""
        if not _REQUEST_LINE.match(head):
            st.buf = bytearray(head)
            self._lose(st, out, NOT_HTTP)
            return
        edited = self.request(head, chunk)
        self.heads_edited += 1
        st.requests += 1
        st.keep = edited is not None
        if edited is None:
            self.dropped_bytes += len(head)
        else:
            out += edited
        method = head[: head.index(b" ")]
        length, chunked, upgrade = body_framing(head)
        if length < 0 and not chunked:
            self._lose(st, out, BAD_BODY)
        elif method == b"CONNECT" or upgrade:
            st.mode = _PASS  # a tunnel: the rest of the stream shares the request's fate
        elif chunked:
            st.mode = _CHUNK_SIZE
        elif length:
            st.mode, st.remaining = _BODY, length
        else:
            st.mode = _HEAD

    def _line(self, st: _Stream, data: memoryview, i: int, out: bytearray) -> int:
        """Pass one chunk-size or trailer line through, acting on it once complete."""
        nl = bytes(data[i:]).find(b"\n")
        if nl < 0:
            st.buf += data[i:]
            self._emit(st, out, data[i:])
            if len(st.buf) > self.max_head:
                st.buf = bytearray()  # passed on already
                self._lose(st, out, BAD_BODY)
            return len(data)
        line = bytes(st.buf) + bytes(data[i : i + nl + 1])
        self._emit(st, out, data[i : i + nl + 1])
        st.buf = bytearray()
        if st.mode == _CHUNK_SIZE:
            size = chunk_size(line)
            if size is None:
                self._lose(st, out, BAD_BODY)
                return i + nl + 1
            if size:
                st.mode, st.remaining = _CHUNK_DATA, size + 2  # data plus its CRLF
            else:
                st.mode = _TRAILER
        elif line in (b"\r\n", b"\n"):
            st.mode = _HEAD  # blank line: the chunked request is complete
        return i + nl + 1


def could_start_request(start: bytes) -> bool:
    """Whether ``start``, the first (up to 13) bytes where a request should begin, can be
    the start of an HTTP/1.x request line (a method and a space, or a short prefix of one)."""
    start = start[:13]
    return bool(_REQUEST_START.match(start)) or (len(start) < 13 and start.isupper())


def chunk_size(line: bytes) -> int | None:
    """The size a chunk-size line (``1a;ext=x\\r\\n``) gives; None if it gives none."""
    token = line.split(b";", 1)[0].strip()
    return int(token, 16) if _HEX.fullmatch(token) else None


def body_framing(head: bytes) -> tuple[int, bool, bool]:
    """(Content-Length, chunked?, upgrade?) from a request header block; the length is -1
    if it is not a decimal number."""
    length, chunked, upgrade = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            text = value.strip()
            length = int(text) if text.isdigit() and text.isascii() else -1
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
