"""Framing one client→service byte stream into whole HTTP/1.x requests, for the request-level
forward sink (:mod:`agent.sinks.request_forward`).

:class:`RequestFramer` is fed a flow's bytes in order, in pieces of any size
(:meth:`~RequestFramer.feed`), told of bytes that will never come (:meth:`~RequestFramer.hole`:
a capture gap, or bytes the sink's hand-off refused) and of the flow's end
(:meth:`~RequestFramer.end`). Each call returns what it framed, in stream order:

- :class:`Request`: one whole request (header block, then a body sized by ``Content-Length`` or
  chunked encoding, trailers included), to be sent as ``data``;
- :class:`Dropped`: bytes that will not be sent. With a ``reason``, they are (the start of) one
  request, dropped whole; without one, bytes of no request, or the rest of a request already
  dropped.

Every byte fed is in exactly one item (``size``; sizes count bytes as fed, before the rewrite
below), so the caller can give each byte back to its budget once. Parsing is shared with the
request hooks (:mod:`agent.hooks.http`).

Reasons a request is dropped: ``not_http`` (no request line where a request must start),
``unframed`` (a header block over ``max_head``, or a body length that is none),
``upgrade`` (``CONNECT`` or ``Upgrade:``: the rest of the flow is a tunnel, dropped),
``flow_buffer`` (a request over ``max_request`` bytes), ``incomplete`` (the flow ended inside
it), or the reason of the :meth:`~RequestFramer.hole` that cut it (``gap``, ``total_buffer``).

Where framing is lost, the stream resynchronises at the next request line of a common method
(:data:`_RESYNC_AT`); requests before it are not seen, their bytes are dropped. A hole inside
a body of known length keeps framing exact (the request it cut is dropped, the next one is
found where it starts). Bytes that are not a request at the
flow's very start are dropped as one ``not_http`` request; if no request line turns up within
:data:`PICKUP_SCAN` bytes (a connection picked up mid-stream finds one sooner), the flow is not
HTTP/1.x and the rest of it is dropped (:attr:`RequestFramer.dead`).

Byte-exactness: each request is sent as it was fed, except that an HTTP/1.1 request's
``Connection`` header loses its ``close`` token (the header goes if nothing is left), so the
pooled connection it is sent on stays open. An HTTP/1.0 request goes as it is
(:attr:`Request.close` says whether it ends its connection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.hooks.http import REQUEST_LINE, body_framing, chunk_size, could_start_request

__all__ = ["PICKUP_SCAN", "Dropped", "Framed", "Request", "RequestFramer", "keep_alive"]

#: Bytes searched for a request line when a flow does not start with one.
PICKUP_SCAN = 64 << 10

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _RESYNC, _DEAD = range(7)
#: Where framing is lost, the next request starts at a request line of a common method,
#: wherever it is (after a body that did not end in a newline too). Not merely where the
#: first piece after a hole starts (``OST / HTTP/1.1`` is the end of a cut ``POST``), nor at
#: any line start (``AGET / HTTP/1.1`` is a body's ``A`` and a ``GET``).
_RESYNC_AT = re.compile(rb"(?:GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE|CONNECT) "
                        rb"\S+ HTTP/1\.[01]\r\n")
_MAX_TAIL = 8 << 10  # a partial last line held while resynchronising, at most
_CONNECTION = re.compile(rb"\r\nconnection[ \t]*:([^\r\n]*)", re.IGNORECASE)
_CLOSE_ONLY = re.compile(rb"\r\nconnection[ \t]*:[ \t]*close[ \t]*(?=\r\n)", re.IGNORECASE)
_CLOSE_TOKEN = re.compile(rb"\r\nconnection[ \t]*:[^\r\n]*close", re.IGNORECASE)


@dataclass(slots=True, eq=False)
class Request:
    """One whole request: ``data`` goes to the shadow; ``size`` bytes of the stream it took;
    ``head_only``: its response has no body (``HEAD``); ``close``: it asks for the
    connection to close after it (HTTP/1.0 without ``keep-alive``). ``ready_at`` and
    ``retried`` are the sender's."""

    data: bytes
    size: int
    head_only: bool = False
    close: bool = False
    ready_at: float = 0.0
    retried: bool = False


@dataclass(slots=True, frozen=True)
class Dropped:
    """``size`` bytes not sent: one request dropped for ``reason``, or (None) bytes of none."""

    reason: str | None
    size: int


Framed = Request | Dropped


def keep_alive(head: bytes) -> bytes:
    """``head`` with the ``close`` token taken out of its ``Connection`` header(s); a header
    left with no token goes."""

    def strip(m: re.Match[bytes]) -> bytes:
        tokens = [t.strip() for t in m.group(1).split(b",") if t.strip()]
        kept = [t for t in tokens if t.lower() != b"close"]
        if len(kept) == len(tokens):
            return m.group(0)
        return b"\r\nConnection: " + b", ".join(kept) if kept else b""

    head, n = _CLOSE_ONLY.subn(b"", head)  # the usual case, without a call per header
    if n and not _CLOSE_TOKEN.search(head):
        return head
    return _CONNECTION.sub(strip, head)


class RequestFramer:
    """Frames one stream (see the module doc). Not thread-safe: one thread feeds it."""

    __slots__ = ("buf", "close", "dead", "dropping", "head", "head_only", "line", "max_head",
                 "max_request", "mode", "parts", "remaining", "scanned", "size", "started")

    def __init__(self, max_head: int = 64 << 10, max_request: int = 8 << 20) -> None:
        self.max_head = max_head
        self.max_request = max_request
        self.mode = _HEAD
        self.buf = b""  # a header block so far (not in ``size`` yet)
        self.line = b""  # a chunk-size or trailer line so far (in ``parts`` too)
        self.head = b""  # the current request's header block (as it will be sent)
        self.parts: list[bytes] = []  # its bytes after the header block
        self.size = 0  # stream bytes of the current request once its header block is whole
        self.head_only = False
        self.close = False
        self.remaining = 0  # body or chunk bytes (+CRLF) still to come
        self.dropping: str | None = None  # the current request was dropped for this
        self.started = False  # a request was framed on this stream
        self.scanned = 0  # bytes searched for a first request line
        #: The rest of the stream is dropped (not HTTP/1.x, or a tunnel).
        self.dead = False

    # ---------------------------------------------------------------- the caller's verbs

    def feed(self, data: bytes) -> list[Framed]:
        """Frame ``data``, the stream's next bytes."""
        out: list[Framed] = []
        if self.buf and self.mode == _RESYNC:  # a partial line held back: searched again
            data, self.buf = self.buf + data, b""
        i, n = 0, len(data)
        while i < n:
            mode = self.mode
            if mode == _HEAD:
                i = self._head(data, i, out)
            elif mode in (_BODY, _CHUNK_DATA):
                i = self._take(data, i, out)
            elif mode == _RESYNC:
                i = self._resync(data, i, out)
            elif mode == _DEAD:
                out.append(Dropped(None, n - i))
                i = n
            else:
                i = self._line(data, i, out)
        return out

    def hole(self, n: int, reason: str, starts: int = 0) -> list[Framed]:
        """``n`` bytes of the stream will never come (``reason``: ``gap``, ``total_buffer``);
        ``starts``: requests known to start inside them, each dropped for ``reason``."""
        out: list[Framed] = []
        if self.dead or n <= 0:
            return out
        if self.mode in (_BODY, _CHUNK_DATA) and n <= self.remaining:
            self._drop(reason, out)  # inside the body: framing stays exact, skip the bytes
            self.remaining -= n
            if not self.remaining:
                self._piece_done(out)
            return out
        if self._between():
            self._release_held(out)
        else:
            self._drop(reason, out)
        out.extend(Dropped(reason, 0) for _ in range(starts))
        self._lose()
        return out

    def end(self) -> list[Framed]:
        """The stream ended: what is held goes (a request cut short: ``incomplete``)."""
        out: list[Framed] = []
        if self._between():
            self._release_held(out)
        else:
            self._drop("incomplete", out)
        self._reset()
        return out

    def give_up(self) -> int:
        """Drop the rest of the stream, from what is held on (not framed: the bytes held are
        returned, for the caller to count)."""
        held = self.held
        self.dead = True
        self._reset()
        return held

    @property
    def held(self) -> int:
        """Stream bytes held for the current request."""
        return self.size + len(self.buf)

    # ---------------------------------------------------------------- modes

    def _head(self, data: bytes, i: int, out: list[Framed]) -> int:
        buf = self.buf
        if not buf:  # the usual case: a whole header block in one piece, one slice
            end = data.find(b"\r\n\r\n", i)
            if 0 <= end < i + self.max_head:
                if self._frame_head(data[i : end + 4], out):
                    return end + 4
                self._not_http(out)  # data[i:] is searched for a request line
                return i
        probe = (buf[:15] + data[i : i + 15]).lstrip(b"\r\n")[:13]
        if probe and not could_start_request(probe):
            self._not_http(out)  # what was held goes with it; data[i:] is searched again
            return i
        before = len(buf)
        buf = self.buf = buf + data[i:]
        end = buf.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0 or end >= self.max_head:
            if len(buf) > self.max_head:
                self._unframed(out)
            return len(data)
        self.buf = b""
        if self._frame_head(buf[: end + 4], out):
            return i + end + 4 - before
        self.buf = buf[:before]
        self._not_http(out)
        return i

    def _frame_head(self, head: bytes, out: list[Framed]) -> bool:
        """Judge a whole header block and set up framing for its body; False (nothing
        done) if it does not start with a request line."""
        skip = 0
        if head[0] in b"\r\n":
            skip = len(head) - len(head.lstrip(b"\r\n"))  # empty lines before a request
        if not REQUEST_LINE.match(head, skip):
            return False
        self.size = len(head)
        self.started = True
        length, chunked, upgrade = body_framing(head[skip:])
        method = head[skip : head.index(b" ", skip)]
        if method == b"CONNECT" or upgrade:
            self._drop("upgrade", out)
            self.dead = True
            self.mode = _DEAD
            return True
        if length < 0 and not chunked:
            self._unframed(out)
            return True
        self.head_only = method == b"HEAD"
        line_end = head.index(b"\r\n", skip)
        if head[line_end - 3 : line_end] == b"1.1":
            self.head, self.close = keep_alive(head), False
        else:  # HTTP/1.0 closes unless it says keep-alive
            self.head = head
            self.close = not any(b"keep-alive" in m.lower() for m in _CONNECTION.findall(head))
        if chunked:
            self.mode = _CHUNK_SIZE
        elif length:
            self.mode, self.remaining = _BODY, length
            if self.size + length > self.max_request:
                self._drop("flow_buffer", out)
        else:
            self._complete(out)
        return True

    def _take(self, data: bytes, i: int, out: list[Framed]) -> int:
        take = min(self.remaining, len(data) - i)
        self._keep(data[i : i + take] if take < len(data) else data, out)
        self.remaining -= take
        if not self.remaining:
            self._piece_done(out)
        return i + take

    def _line(self, data: bytes, i: int, out: list[Framed]) -> int:
        """A chunk-size or trailer line: kept with the request, acted on once whole."""
        nl = data.find(b"\n", i)
        end = len(data) if nl < 0 else nl + 1
        piece = data[i:end]
        self._keep(piece, out)
        line = self.line = self.line + piece
        if nl < 0:
            if len(line) > self.max_head:
                self._unframed(out)
            return end
        self.line = b""
        if self.mode == _TRAILER:
            if line in (b"\r\n", b"\n"):  # the blank line: the chunked request is whole
                self._complete(out)
            return end
        size = chunk_size(line)
        if size is None:
            self._unframed(out)
        elif size:
            self.mode, self.remaining = _CHUNK_DATA, size + 2  # data and its CRLF
        else:
            self.mode = _TRAILER
        return end

    def _resync(self, data: bytes, i: int, out: list[Framed]) -> int:
        """Skip to the next request line (:data:`_RESYNC_AT`); the last line, if it may be
        the start of one, is held back (with its newline) for the next piece."""
        m = _RESYNC_AT.search(data, i)
        if m is not None:
            start = end = m.start()
        else:
            end = len(data)
            start = max(i, data.rfind(b"\n", i))
            if end - start > _MAX_TAIL:
                start = end
            self.buf = data[start:]
        if start > i:
            out.append(Dropped(None, start - i))
        if not self.started:
            self.scanned += start - i
            if m is None and self.scanned > PICKUP_SCAN:
                self.dead = True  # no request within reach: not HTTP/1.x at all
                self.mode = _DEAD
                self._release_held(out)
        if m is not None:
            self.mode = _HEAD
        return end

    def _between(self) -> bool:
        """Not inside a request: resynchronising, dead, or only empty lines held."""
        return self.mode in (_RESYNC, _DEAD) or (
            self.mode == _HEAD and not self.buf.strip(b"\r\n"))

    def _release_held(self, out: list[Framed]) -> None:
        if self.buf:
            out.append(Dropped(None, len(self.buf)))
            self.buf = b""

    # ---------------------------------------------------------------- the current request

    def _keep(self, piece: bytes, out: list[Framed]) -> None:
        if self.dropping is not None:
            out.append(Dropped(None, len(piece)))
            return
        self.parts.append(piece)
        self.size += len(piece)
        if self.size > self.max_request:
            self._drop("flow_buffer", out)

    def _piece_done(self, out: list[Framed]) -> None:
        """A body, or a chunk's data, is all there."""
        if self.mode == _BODY:
            self._complete(out)
        else:
            self.mode = _CHUNK_SIZE

    def _complete(self, out: list[Framed]) -> None:
        if self.dropping is None:
            data = self.head + b"".join(self.parts) if self.parts else self.head
            out.append(Request(data, self.size, self.head_only, self.close))
        self._reset()

    def _drop(self, reason: str, out: list[Framed]) -> None:
        """Drop the current request (once): what it holds goes now, the rest as it comes."""
        if self.dropping is None:
            out.append(Dropped(reason, self.held))
            self.dropping = reason
        self.buf, self.head, self.parts, self.size = b"", b"", [], 0

    def _reset(self) -> None:
        self.mode = _DEAD if self.dead else _HEAD
        self.buf, self.line, self.head, self.parts, self.size = b"", b"", b"", [], 0
        self.dropping = None
        self.remaining = 0

    def _lose(self) -> None:
        """Framing is lost: resynchronise at the next request line."""
        self._reset()
        if not self.dead:
            self.mode = _RESYNC

    def _not_http(self, out: list[Framed]) -> None:
        self._drop("not_http", out)
        self._lose()

    def _unframed(self, out: list[Framed]) -> None:
        self.started = True
        self._drop("unframed", out)
        self._lose()
