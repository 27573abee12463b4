"""Rewriting forwarded HTTP/1.x requests for the shadow: the request-target and the Host.

:class:`RewriteRequests` sits on the split-safe request framing of :mod:`agent.hooks.http`
and edits only header blocks, so the body and its framing (``Content-Length``, chunked
encoding) are untouched and stay right. Meant for the forward path only: the recording keeps
what production saw.

* Path rules (``REGEX=REPLACEMENT``) apply in order, each replacing every match
  (:meth:`re.Pattern.sub`: ``\\1`` and ``\\g<name>`` refer to groups) in the request-target's
  path and query as sent (for a proxy's absolute form ``http://host/p``, in the part after
  the authority). A result that would not be a valid target (empty, or with a space or
  control character) is not used: the request keeps its target, counted
  (``rewrite_invalid``).
* The host replaces every ``Host`` header with one (at the first one's place; added if the
  request had none), and the authority of an absolute-form target.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from agent.hooks.http import HttpRequestEditor

__all__ = ["RewriteRequests", "check_host", "parse_rewrite_path"]

#: ``host``, ``host:port``, ``[v6]:port``: a reg-name or IPv4 address, or an IPv6 literal.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(?::[0-9]{1,5})?")
_HOST_LINE = re.compile(rb"\r\nHost[ \t]*:[^\r\n]*", re.IGNORECASE)
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)", re.DOTALL)
_TARGET = re.compile(r"[^\x00-\x20\x7f]+")  # no space, no control character
_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_UNESCAPED_EQ = re.compile(r"(?<!\\)=")


def check_host(text: str) -> str:
    """``HOST[:PORT]`` for the ``Host`` header, stripped; ValueError if it is not one."""
    host = text.strip()
    if not _HOST.fullmatch(host):
        raise ValueError(f"{text!r} is not a host name or address with an optional :port")
    _, sep, port = host.rpartition(":")
    if sep and not host.endswith("]") and port.isdigit() and not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port {int(port)} is out of range 1-65535")
    return host


def parse_rewrite_path(text: str) -> tuple[re.Pattern[str], str]:
    """``REGEX=REPLACEMENT`` → (pattern, replacement), split at the first ``=`` not after a
    backslash (``\\=`` in the regex matches ``=``). ValueError for a bad regex, a
    replacement referring to a group the regex lacks, or one with a space or control
    character."""
    m = _UNESCAPED_EQ.search(text)
    if m is None:
        raise ValueError(f"{text!r}: expected REGEX=REPLACEMENT")
    regex, repl = text[: m.start()], text[m.end():]
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise ValueError(f"{regex!r} is not a valid regular expression: {e}") from None
    if repl and not _PRINTABLE.fullmatch(repl):
        raise ValueError(f"replacement {repl!r} must be printable ASCII without spaces")
    try:
        pattern.sub(repl, "")  # checks the group references
    except (re.error, IndexError) as e:
        raise ValueError(f"replacement {repl!r}: {e}") from None
    return pattern, repl


class RewriteRequests(HttpRequestEditor):
    """Rewrites each request's target by ``paths`` and its Host to ``host`` (module
    docstring). Counters: ``paths_rewritten``, ``hosts_rewritten``, ``invalid``."""

    def __init__(self, paths: Sequence[tuple[re.Pattern[str], str]] = (),
                 host: str | None = None, max_head: int = 64 * 1024) -> None:
        super().__init__(max_head)
        self.paths = list(paths)
        self.host = None if host is None else check_host(host).encode("ascii")
        self.paths_rewritten = 0
        self.hosts_rewritten = 0
        self.invalid = 0

    def edit_head(self, head: bytes) -> bytes:
        eol = head.index(b"\r\n")
        method, target, version = head[:eol].split(b" ", 2)
        new_target = self._target(target.decode("latin-1")).encode("latin-1")
        if new_target != target:
            self.paths_rewritten += 1
        rest = head[eol:]  # CRLF, the header lines, the blank line
        if self.host is not None:
            rest = self._host(rest)
            self.hosts_rewritten += 1
        return b" ".join((method, new_target, version)) + rest

    def _target(self, target: str) -> str:
        prefix, path = "", target
        absolute = _ABSOLUTE.fullmatch(target)
        if absolute is not None:
            authority = self.host.decode() if self.host is not None else absolute.group(2)
            prefix, path = absolute.group(1) + authority, absolute.group(3)
        new = path
        for pattern, repl in self.paths:
            new = pattern.sub(repl, new)
        if new != path and not _TARGET.fullmatch(prefix + new):
            self.invalid += 1
            new = path
        return prefix + new

    def _host(self, rest: bytes) -> bytes:
        assert self.host is not None
        line = b"\r\nHost: " + self.host
        first = _HOST_LINE.search(rest)
        stripped = _HOST_LINE.sub(b"", rest)
        if first is None:
            return stripped[:-4] + line + b"\r\n\r\n"
        return stripped[: first.start()] + line + stripped[first.start():]

    def mirror_stats(self) -> dict[str, int]:
        """Counters for the ``mirror`` stage (``rewrite_*``, declared in
        :mod:`agent.metrics`)."""
        return {"rewrite_paths": self.paths_rewritten, "rewrite_hosts": self.hosts_rewritten,
                "rewrite_invalid": self.invalid}
