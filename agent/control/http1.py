"""HTTP/1.0 request heads in, responses out: the few rules the control server needs, sans I/O.

One request per connection, answered with ``Connection: close``. Limits: a head (request
line and headers) of at most :data:`MAX_HEAD` bytes (414 when the request line alone is
longer, 431 otherwise) and :data:`MAX_HEADERS` header lines (431). Header bytes are read as
Latin-1, as :mod:`http.server` reads them. Errors are the API's JSON errors.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from http import HTTPStatus

from agent.control.api import Request, Response, error

__all__ = ["MAX_HEAD", "MAX_HEADERS", "METHODS", "head_end", "oversized", "parse_head",
           "render"]

#: Request line plus headers, in bytes: a bearer token and the few headers of curl, kubelet
#: or Prometheus take a few hundred. It is most of what a slow client can make the server
#: hold (:mod:`agent.control.admission`), so it is small.
MAX_HEAD = 4 * 1024
MAX_HEADERS = 100
#: Methods answered by the API (which may still say 405); any other is 501.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """The index just past the blank line ending the head in ``buf`` (searched from
    ``start``), or -1 if it has not come yet."""
    m = _END.search(buf, max(0, start - 3))
    return m.end() if m else -1


def oversized(buf: bytes | bytearray) -> Response | None:
    """The answer to a head that is over :data:`MAX_HEAD` (``buf`` holds at least that much,
    complete or not), or None if it is within it."""
    if len(buf) <= MAX_HEAD:
        return None
    if b"\n" not in buf[:MAX_HEAD]:
        return error(414, f"request line over {MAX_HEAD} bytes")
    return error(431, f"request head over {MAX_HEAD} bytes")


def parse_head(head: bytes | bytearray) -> Request | Response:
    """The :class:`Request` of a complete head (body not read), or the error answer: 400
    malformed, 501 unknown method, 505 not HTTP/1.x, 431 too many headers."""
    lines = bytes(head).decode("latin-1").split("\n")
    words = lines[0].rstrip("\r").split()
    if len(words) != 3:
        return error(400, f"bad request line: {lines[0].rstrip()[:100]!r}")
    method, target, version = words
    if not re.fullmatch(r"HTTP/\d+\.\d+", version):
        return error(400, f"bad HTTP version: {version[:20]!r}")
    if not version.startswith("HTTP/1."):
        return error(505, f"HTTP version not supported: {version}")
    if method not in METHODS:
        return error(501, f"unsupported method {method[:20]!r}")
    if not target.startswith("/"):
        return error(400, f"bad request target: {target[:100]!r}")
    headers: dict[str, str] = {}
    fields = [line.rstrip("\r") for line in lines[1:]]
    fields = [f for f in fields if f]
    if len(fields) > MAX_HEADERS:
        return error(431, f"more than {MAX_HEADERS} header lines")
    for line in fields:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            return error(400, f"bad header line: {line[:100]!r}")
        headers[name.lower()] = value.strip()
    return Request(method, target, headers)


def render(resp: Response, *, head_only: bool = False) -> bytes:
    """``resp`` on the wire (HTTP/1.0, ``Connection: close``); no body for HEAD."""
    try:
        reason = HTTPStatus(resp.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.0 {resp.status} {reason}", "Server: mirror-agent",
             f"Date: {formatdate(usegmt=True)}", f"Content-Type: {resp.content_type}",
             f"Content-Length: {len(resp.body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in resp.headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
    return head if head_only else head + resp.body
