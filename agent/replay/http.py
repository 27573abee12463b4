"""HTTP/1.x framing for replay, sans I/O: requests in a recorded client stream, responses in
a byte stream fed piece by piece.

- :func:`frame_requests` splits a client stream into requests (request line and headers,
  then a body sized by ``Content-Length`` or chunked encoding) and says where each ends.
  A stream that is not HTTP/1.x, or stops being parseable, yields the requests before that
  point and ``complete=False``: the rest is replayed as bytes, without matching responses.
  :class:`RequestFramer` does the same for a stream fed piece by piece, holding no more than
  an unfinished request head (or chunked body): a ``Content-Length`` body is counted, not
  kept.
- :class:`ResponseParser` frames the responses to those requests, in order: no body for
  ``HEAD``, 1xx, 204 and 304; ``Content-Length``; chunked (the body is de-chunked); else
  the body runs to the end of the connection (:meth:`ResponseParser.close`). Interim 1xx
  responses (``100 Continue``) are skipped; ``101 Switching Protocols`` ends HTTP.

The per-response work is kept small: a response costs one ``find`` for the end of its head
and a scan of the head's lower-cased bytes; headers are split into names and values only
when a diff asks (:meth:`Response.headers`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["HttpError", "Request", "RequestFramer", "Response", "ResponseParser",
           "frame_requests", "looks_like_http"]

_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ",
            b"TRACE ", b"CONNECT ", b"PROPFIND ", b"PURGE ")
_MAX_HEAD = 64 << 10


class HttpError(ValueError):
    """The bytes are not the HTTP/1.x message they should be (why, and where)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a client stream: its method and target, and the offset just past its
    last byte in that stream."""

    method: str
    target: str
    end: int

    @property
    def path(self) -> str:
        """The target without its query string (what reports group by)."""
        return self.target.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class Response:
    """One response: status, raw head (status line and headers) and body (de-chunked; empty
    when the parser was told not to keep bodies)."""

    status: int
    head: bytes
    body: bytes

    def headers(self) -> dict[str, str]:
        """Header names (lower case) → values (repeated ones joined by ``, ``)."""
        out: dict[str, str] = {}
        for line in self.head.split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = name.strip().lower().decode("latin-1")
            text = value.strip().decode("latin-1")
            out[key] = f"{out[key]}, {text}" if key in out else text
        return out


def looks_like_http(data: bytes, pos: int = 0) -> bool:
    """Does a client stream have an HTTP/1.x request line at ``pos``?"""
    if not data.startswith(_METHODS, pos):
        return False
    eol = data.find(b"\r\n", pos, pos + 8192)
    return eol > pos and data[eol - 9 : eol - 1] == b" HTTP/1."


def _framing(lower_head: bytes) -> tuple[bool, int | None]:
    """(chunked, content length) from a lower-cased head; HttpError on a bad length."""
    chunked = False
    te = lower_head.find(b"\r\ntransfer-encoding:")
    if te >= 0:
        end = lower_head.find(b"\r\n", te + 2)
        chunked = lower_head[te + 20 : end if end >= 0 else None].strip().endswith(b"chunked")
    cl = lower_head.find(b"\r\ncontent-length:")
    if cl < 0 or chunked:
        return chunked, None
    end = lower_head.find(b"\r\n", cl + 2)
    text = lower_head[cl + 17 : end if end >= 0 else None].strip()
    if not text.isdigit():
        raise HttpError(f"bad Content-Length {text[:20]!r}")
    return False, int(text)


def _chunked_end(data: bytes, pos: int, body: bytearray | None) -> int:
    """The offset past a chunked body starting at ``pos`` (its trailer included), -1 if it
    is not all there yet; its data is appended to ``body``. HttpError if malformed."""
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            if len(data) - pos > 1024:
                raise HttpError("chunk size line too long")
            return -1
        size_text = data[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            end = data.find(b"\r\n\r\n", eol)  # trailer section, usually empty
            if end < 0:
                return -1
            return end + 4
        if eol + 2 + size + 2 > len(data):
            return -1
        if body is not None:
            body += data[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


def frame_requests(data: bytes) -> tuple[list[Request], bool]:
    """The whole requests at the start of ``data``, and whether they cover all of it (False:
    a partial last request, or bytes that are not HTTP/1.x; those are not in the list)."""
    out: list[Request] = []
    pos, n = 0, len(data)
    while pos < n:
        head_end = data.find(b"\r\n\r\n", pos, pos + _MAX_HEAD)
        if head_end < 0 or not looks_like_http(data, pos):
            return out, False
        line_end = data.find(b"\r\n", pos)
        method, _, rest = data[pos:line_end].partition(b" ")
        target = rest.rpartition(b" ")[0]
        lower = data[line_end:head_end + 2].lower()
        try:
            chunked, length = _framing(lower)
            end = head_end + 4
            if chunked:
                end = _chunked_end(data, end, None)
            elif length:
                end = end + length if end + length <= n else -1
        except HttpError:
            return out, False
        if end < 0:
            return out, False
        out.append(Request(method.decode("latin-1"), target.decode("latin-1"), end))
        pos = end
    return out, True


_LONGEST_METHOD = max(len(m) for m in _METHODS)


class RequestFramer:
    """:func:`frame_requests` for a client stream fed piece by piece (:meth:`feed`): the
    same requests, with the same ``end`` offsets in the whole stream. Once the stream stops
    being HTTP/1.x (or a request is malformed) nothing more is framed (``stopped``). Holds at
    most an unfinished request head (up to 64 KiB) or an unfinished chunked request; the
    bytes of a ``Content-Length`` body are counted, not kept."""

    __slots__ = ("_base", "_buf", "_head", "_skip", "count", "stopped")

    def __init__(self) -> None:
        self._buf = b""
        self._base = 0  # stream offset of _buf[0]
        self._skip = 0  # body bytes still to come of the request in _head
        self._head: tuple[str, str] = ("", "")  # (method, target) of the last request seen
        self.stopped = False
        self.count = 0  # requests framed so far

    def feed(self, data: bytes) -> list[Request]:
        """The requests ``data`` completes (possibly none)."""
        if self.stopped or not data:
            return []
        out: list[Request] = []
        if self._skip:
            used = min(self._skip, len(data))
            self._skip -= used
            self._base += used
            data = data[used:]
            if self._skip:
                return out
            out.append(self._done(self._base))
            if not data:
                return out
        out += self._scan(self._buf + data if self._buf else data)
        return out

    def _done(self, end: int) -> Request:
        self.count += 1
        return Request(self._head[0], self._head[1], end)

    def _scan(self, buf: bytes) -> list[Request]:
        """Frame what ``buf`` (starting at stream offset ``_base``) completes; keep the
        unfinished rest, or count the body still to come."""
        out: list[Request] = []
        pos = 0
        while pos < len(buf):
            end = self._one(buf, pos)
            if end is None:
                break
            if end > len(buf):  # the body goes on: counted as it comes
                self._skip = end - len(buf)
                self._base += len(buf)
                self._buf = b""
                return out
            out.append(self._done(self._base + end))
            pos = end
        self._base += pos
        self._buf = b"" if self.stopped else buf[pos:]
        return out

    def _one(self, buf: bytes, pos: int) -> int | None:
        """The end (in ``buf``) of the request at ``pos``, maybe past ``buf``'s end for a
        body still to come; None if more is needed first, or (``stopped``) never."""
        head_end = buf.find(b"\r\n\r\n", pos, pos + _MAX_HEAD)
        if head_end < 0:
            start = buf[pos : pos + _LONGEST_METHOD]
            if len(buf) - pos >= _MAX_HEAD or (len(start) == _LONGEST_METHOD
                                                 and not start.startswith(_METHODS)):
                self.stopped = True
            return None
        if not looks_like_http(buf, pos):
            self.stopped = True
            return None
        line_end = buf.find(b"\r\n", pos)
        method, _, rest = buf[pos:line_end].partition(b" ")
        try:
            chunked, length = _framing(buf[line_end:head_end + 2].lower())
            end = _chunked_end(buf, head_end + 4, None) if chunked else head_end + 4 + (length or 0)
        except HttpError:
            self.stopped = True
            return None
        if end < 0:
            return None  # a chunked body not whole yet: framed again with more
        self._head = (method.decode("latin-1"), rest.rpartition(b" ")[0].decode("latin-1"))
        return end


class ResponseParser:
    """Frames the responses of one connection, fed in pieces (:meth:`feed`).

    ``methods`` gives each expected response's request method, in order (a ``HEAD`` response
    has no body), and :meth:`expect` adds more as requests go; responses past them are framed
    as for ``GET``. With ``keep_bodies`` False the bodies are framed but not kept. After an
    :class:`HttpError` or a 101 the parser takes no more (``broken`` says why). Of the
    methods only the ``HEAD`` requests' places are kept.
    """

    __slots__ = ("_buf", "_expected", "_heads", "_keep", "broken", "count")

    def __init__(self, methods: Iterable[str] | None = None, keep_bodies: bool = True) -> None:
        self._expected = 0  # requests expected (given to expect)
        self._heads: deque[int] | None = None  # the places of HEAD requests among them
        for method in methods or ():
            self.expect(method)
        self._keep = keep_bodies
        self._buf = b""
        self.count = 0  # responses framed so far
        self.broken = ""

    def feed(self, data: bytes) -> list[Response]:
        """The responses ``data`` completes (possibly none)."""
        if self.broken:
            return []
        buf = self._buf + data if self._buf else data
        out: list[Response] = []
        pos = 0
        try:
            while pos < len(buf):
                got = self._one(buf, pos)
                if got is None:
                    break
                pos, resp = got
                if resp is not None:
                    out.append(resp)
        except HttpError as e:
            self.broken = str(e)
            pos = len(buf)
        self._buf = buf[pos:]
        return out

    def close(self) -> Response | None:
        """The connection ended: a response whose body runs to the end is complete now."""
        buf, self._buf = self._buf, b""
        if self.broken or not buf:
            return None
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        lower = buf[:head_end + 2].lower()
        try:
            chunked, length = _framing(lower)
        except HttpError:
            return None
        if chunked or length is not None:
            return None  # framed, but cut short
        self.count += 1
        head = buf[:head_end]
        return Response(_status(head), head, buf[head_end + 4 :] if self._keep else b"")

    def expect(self, method: str) -> None:
        """One more request went: its response is framed as for ``method``."""
        if method == "HEAD":
            if self._heads is None:
                self._heads = deque()
            self._heads.append(self._expected)
        self._expected += 1

    @property
    def pending(self) -> int:
        """Bytes held: a response not complete yet."""
        return len(self._buf)

    def _one(self, buf: bytes, pos: int) -> tuple[int, Response | None] | None:
        """(offset past the next response, the response or None for an interim one), or None
        if it is not all there yet."""
        head_end = buf.find(b"\r\n\r\n", pos)
        if head_end < 0:
            if len(buf) - pos > _MAX_HEAD:
                raise HttpError("response head over 64 KiB")
            return None
        head = buf[pos:head_end]
        status = _status(head)
        start = head_end + 4
        if status < 200:
            if status == 101:
                self.broken = "101 Switching Protocols: not HTTP from here on"
                return len(buf), None
            return start, None
        heads = self._heads
        head_request = heads is not None and bool(heads) and heads[0] == self.count
        body: bytearray | None = bytearray() if self._keep else None
        end = start
        if not head_request and status not in (204, 304):
            chunked, length = _framing(head.lower() + b"\r\n")
            if chunked:
                end = _chunked_end(buf, start, body)
            elif length is not None:
                end = start + length if start + length <= len(buf) else -1
                if body is not None and end >= 0:
                    body += buf[start:end]
            else:
                return None  # to the end of the connection: close() has it
            if end < 0:
                return None
        self.count += 1
        if head_request and heads is not None:
            heads.popleft()
        return end, Response(status, head, bytes(body) if body else b"")


def _status(head: bytes) -> int:
    """The status code of a response head; HttpError if it is no HTTP/1.x status line."""
    if not head.startswith(b"HTTP/1."):
        raise HttpError(f"not an HTTP/1.x response: {head[:20]!r}")
    code = head[9:12]
    if not code.isdigit():
        raise HttpError(f"bad status line {head[:30]!r}")
    return int(code)
