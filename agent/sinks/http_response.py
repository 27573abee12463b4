"""Reading HTTP/1.x responses off a pooled shadow connection, one request at a time, to know
when each is whole and whether the connection can carry the next request.

:class:`ResponseFramer` is told a request went out (:meth:`~ResponseFramer.expect`), then fed
what the shadow sends (:meth:`~ResponseFramer.feed`) until the response is whole: a status line
and header block, interim ``1xx`` responses skipped, then a body framed as RFC 9112 6.3 says:
none for a ``HEAD`` request or a ``1xx``/``204``/``304`` status, else ``Transfer-Encoding:
chunked`` (trailers included), else ``Content-Length``, else everything up to the shadow's
close (:meth:`~ResponseFramer.eof`). The bytes are discarded as they are parsed.
"""

from __future__ import annotations

import re

from agent.hooks.http import chunk_size

__all__ = ["BadResponse", "ResponseFramer"]

_STATUS = re.compile(rb"HTTP/1\.([01]) (\d{3})[^\r\n]*\r\n")
_IDLE, _HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _TO_CLOSE = range(7)


class BadResponse(ValueError):
    """The shadow's bytes are not an HTTP/1.x response where one should be."""


class ResponseFramer:
    """Frames the responses of one connection (see the module doc); one thread uses it.

    After :meth:`feed` returned True, :attr:`reusable` says whether the connection may carry
    another request (an HTTP/1.1 response without ``Connection: close``, an HTTP/1.0 one with
    ``keep-alive``; never one read to the close, nor a ``101``)."""

    __slots__ = ("buf", "head_only", "max_head", "mode", "remaining", "reusable")

    def __init__(self, max_head: int = 64 << 10) -> None:
        self.max_head = max_head
        self.mode = _IDLE
        self.buf = b""
        self.head_only = False
        self.remaining = 0
        self.reusable = True

    @property
    def waiting(self) -> bool:
        """A request went out and its response is not whole yet."""
        return self.mode != _IDLE

    def expect(self, head_only: bool = False) -> None:
        """A request went out; ``head_only``: it was a ``HEAD`` (no body comes)."""
        self.mode = _HEAD
        self.head_only = head_only
        self.buf = b""

    def feed(self, data: bytes) -> bool:
        """Parse ``data``; True once the response is whole. BadResponse if it is not one,
        or if bytes come that answer no request."""
        i, n = 0, len(data)
        while i < n:
            mode = self.mode
            if mode == _IDLE:
                raise BadResponse(f"{n - i} bytes answer no request")
            if mode == _TO_CLOSE:
                return False
            if mode == _HEAD:
                i = self._head(data, i)
            elif mode in (_BODY, _CHUNK_DATA):
                take = min(self.remaining, n - i)
                self.remaining -= take
                i += take
                if not self.remaining:
                    self.mode = _IDLE if mode == _BODY else _CHUNK_SIZE
            else:
                i = self._line(data, i)
            if self.mode == _IDLE:
                if i < n:
                    raise BadResponse(f"{n - i} bytes after the response answer no request")
                return True
        return False

    def eof(self) -> bool:
        """The shadow closed: True if that ends the response (a body read to the close)."""
        if self.mode == _TO_CLOSE:
            self.mode = _IDLE
            return True
        return False

    def _head(self, data: bytes, i: int) -> int:
        before = len(self.buf)
        buf = self.buf = self.buf + data[i:] if before else data[i:]
        end = buf.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0:
            if len(buf) > self.max_head or (len(buf) >= 12 and not buf.startswith(b"HTTP/1.")):
                raise BadResponse(f"not an HTTP/1.x response: {bytes(buf[:40])!r}")
            return len(data)
        self.buf = b""
        self._frame(buf[: end + 4])
        return i + end + 4 - before

    def _frame(self, head: bytes) -> None:
        """Judge a whole header block; set up framing for the body that follows."""
        m = _STATUS.match(head)
        if m is None:
            raise BadResponse(f"not an HTTP/1.x status line: {head[:40]!r}")
        status = int(m.group(2))
        length, chunked, tokens = _fields(head)
        if 100 <= status < 200 and status != 101:
            self.mode = _HEAD  # interim (100 Continue, 103): the final response follows
            return
        self.reusable = (b"close" not in tokens if m.group(1) == b"1"
                         else b"keep-alive" in tokens)
        if status == 101:
            self.reusable = False  # the connection is something else now
            self.mode = _IDLE
        elif self.head_only or status in (204, 304):
            self.mode = _IDLE
        elif chunked:
            self.mode = _CHUNK_SIZE
        elif length is not None:
            self.mode, self.remaining = (_BODY, length) if length else (_IDLE, 0)
        else:
            self.mode = _TO_CLOSE
            self.reusable = False

    def _line(self, data: bytes, i: int) -> int:
        """A chunk-size or trailer line (discarded), acted on once whole."""
        nl = data.find(b"\n", i)
        end = len(data) if nl < 0 else nl + 1
        line = self.buf = self.buf + data[i:end]
        if nl < 0:
            if len(line) > self.max_head:
                raise BadResponse("chunk-size or trailer line too long")
            return end
        self.buf = b""
        if self.mode == _TRAILER:
            if line in (b"\r\n", b"\n"):
                self.mode = _IDLE
            return end
        size = chunk_size(line)
        if size is None:
            raise BadResponse(f"bad chunk-size line: {line[:40]!r}")
        if size:
            self.mode, self.remaining = _CHUNK_DATA, size + 2
        else:
            self.mode = _TRAILER
        return end


def _fields(head: bytes) -> tuple[int | None, bool, set[bytes]]:
    """(Content-Length or None, chunked?, Connection tokens, lowercase) of a header block;
    BadResponse for a Content-Length that is not one."""
    length: int | None = None
    chunked = False
    tokens: set[bytes] = set()
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            text = value.strip()
            if not (text.isdigit() and text.isascii()) or (length is not None
                                                            and length != int(text)):
                raise BadResponse(f"bad Content-Length: {text[:40]!r}")
            length = int(text)
        elif name == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return length, chunked, tokens
