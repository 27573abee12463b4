"""Selecting HTTP/1.x requests before they are forwarded or recorded.

:class:`SelectRequests` is a hook on the request framing of :mod:`agent.hooks.http`
(split-safe: a request may come in any number of chunks). Each complete header block is
judged by a :class:`Selection`; a request that is not selected is dropped whole (header
block, body, every chunk and trailer of a chunked body; for ``CONNECT`` or an ``Upgrade``, the
rest of the connection) and counted by reason, so the next hook and the sink only ever see
whole requests; the connection's later requests are judged as usual.

The rules, in the order they are checked (the first that fails names the reason):

* ``method``: a method in ``deny_methods`` is dropped; with ``allow_methods``, a method not
  in it is dropped (methods are case-sensitive, as in HTTP);
* ``path``: the request-target as sent (path and query, undecoded; a proxy's absolute form
  as it is) is searched (:meth:`re.Pattern.search`: anchor with ``^`` and ``$``) with each
  regex: one deny match drops, and with allow regexes one of them must match;
* ``header``: ``NAME: REGEX`` rules search each value (spaces around it trimmed) of the
  headers called ``NAME`` (any case); a deny rule drops if any value matches; with allow
  rules, one must match; an empty regex matches any value, so it tests presence;
* ``sample`` / ``sample_missing``: consistent sampling by a header's value (the first
  one): a keyed BLAKE2b hash of the value decides, the same in every process and run, so a
  user is always in or always out. A request without the header (or with an empty value) is
  dropped, counted as ``sample_missing``: sampling by user keeps exactly the sampled users;
* ``rate_limit``: a token bucket over every connection (:class:`RateLimiter`): only
  requests that passed every other rule take a token; without one the request is dropped.
  It never waits. Its clock is the capture time of the chunk that completed the header
  block (``seen_at``), so the forward and the record path, each with its own bucket, decide
  alike, and an offline replay keeps what a live agent would have kept.

Framing the selection cannot vouch for: a stream that is not HTTP/1.x from its first byte
passes on unjudged (``passthrough_streams``); a header block over ``max_head``, or bytes that
are not a request where one should start, drop the rest of the connection (``unframed``); a
bad body length inside a selected request lets the rest pass as the service saw it; an
incomplete header block at the end of the connection is dropped (``incomplete``). Other
directions (responses) pass through untouched.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.hooks import ReportsStats, hook_stats
from agent.hooks.http import BAD_BODY, NOT_HTTP, HttpRequestEditor, check_header_name
from agent.model import TrafficChunk

__all__ = ["REASONS", "HeaderRule", "HeaderSample", "RateLimiter", "ReportsStats",
           "RequestHead", "SelectRequests", "Selection", "hook_stats", "parse_head",
           "parse_header_rule", "parse_methods", "parse_rate", "parse_regex", "parse_sample"]

#: Why a request was not selected: the label values of the ``*_requests_unselected`` metrics.
REASONS = ("method", "path", "header", "sample", "sample_missing", "rate_limit", "incomplete",
           "unframed")

#: The fixed key of the sampling hash: the same user is in or out in every agent of a fleet.
SAMPLE_KEY = b"mirror-agent sample-by-header v1"
_OWS = " \t"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """One parsed request header block: the method, the request-target as sent, and the
    headers as (lower-case name, value with spaces and tabs around it trimmed), in order."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        """Every value of the headers called ``name`` (lower case), in order."""
        return [v for n, v in self.headers if n == name]


def parse_head(head: bytes) -> RequestHead:
    """Parse a complete header block whose request line the framing already checked
    (``METHOD SP TARGET SP HTTP/1.x``). Bytes are read as Latin-1; a folded line (starting
    with a space or tab) continues the value before it; a line without ``:`` is ignored."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, (value + " " + line.strip(_OWS)).strip(_OWS))
            continue
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(_OWS).lower(), value.strip(_OWS)))
    return RequestHead(method, target, tuple(headers))


def parse_methods(text: str) -> list[str]:
    """``GET,HEAD`` → ``["GET", "HEAD"]``: HTTP methods (tokens), upper-cased; ValueError if
    one is not a token or none is given."""
    methods = [m.strip().upper() for m in text.split(",") if m.strip()]
    if not methods:
        raise ValueError("no method given")
    for m in methods:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Z-]+", m):
            raise ValueError(f"{m!r} is not an HTTP method")
    return methods


def parse_regex(text: str) -> re.Pattern[str]:
    """A Python regular expression; ValueError naming the problem if it does not compile."""
    try:
        return re.compile(text)
    except re.error as e:
        raise ValueError(f"{text!r} is not a valid regular expression: {e}") from None


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """``NAME: REGEX``: matches a request with a header called ``name`` (lower case) whose
    value ``pattern`` finds (:meth:`re.Pattern.search`)."""

    name: str
    pattern: re.Pattern[str]

    def matches(self, req: RequestHead) -> bool:
        return any(self.pattern.search(v) for v in req.values(self.name))


def parse_header_rule(text: str) -> HeaderRule:
    """``'NAME: REGEX'`` (spaces after the colon are not part of the regex) → a rule;
    ValueError for a bad name or regex."""
    name, sep, regex = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected 'NAME: REGEX'")
    name = name.strip()
    check_header_name(name)
    return HeaderRule(name.lower(), parse_regex(regex.lstrip(" \t")))


@dataclass(frozen=True, slots=True)
class HeaderSample:
    """Keeps ``percent`` % of the values of header ``name`` (lower case), consistently: a
    value is in if its keyed BLAKE2b hash falls below the threshold."""

    name: str
    percent: float

    def selects(self, value: str) -> bool:
        digest = hashlib.blake2b(value.encode("latin-1"), digest_size=8, key=SAMPLE_KEY)
        return int.from_bytes(digest.digest(), "big") < self.percent / 100 * 2**64


def parse_sample(text: str) -> HeaderSample:
    """``NAME:PCT%`` (``X-User-Id:10%``; the ``%`` is optional) → a sample; ValueError for a
    bad name or a percentage outside 0..100."""
    name, sep, pct = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected NAME:PERCENT% (X-User-Id:10%)")
    name = name.strip()
    check_header_name(name)
    try:
        percent = float(pct.strip().removesuffix("%"))
    except ValueError:
        raise ValueError(f"{pct.strip()!r} is not a percentage") from None
    if not 0 <= percent <= 100:
        raise ValueError(f"{pct.strip()!r} must be between 0% and 100%")
    return HeaderSample(name.lower(), percent)


_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?:/\s*(s|sec|m|min|h))?\s*")
_PER = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """``100/s``, ``30/min``, ``0.5/s`` (a bare number is per second) → requests a second;
    ValueError unless it is a positive, finite rate."""
    m = _RATE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r}: expected N/s (or N/min, N/h)")
    rate = float(m.group(1)) / _PER[m.group(2)]
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"{text!r} must be a rate above 0")
    return rate


class RateLimiter:
    """A token bucket: ``rate`` tokens a second up to ``burst`` (default: one second's worth,
    at least one); it starts full. :meth:`take` never waits."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("the rate must be above 0")
        self.rate = rate
        self.burst = max(1.0, rate) if burst is None else burst
        self._tokens = self.burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        """Take a token at time ``now`` (seconds): True if there was one. A clock that goes
        back adds nothing (and takes nothing back)."""
        last = self._last
        if last is None or now > last:
            if last is not None:
                self._tokens = min(self.burst, self._tokens + (now - last) * self.rate)
            self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


@dataclass(frozen=True, slots=True)
class Selection:
    """Which requests are selected (see the module docstring for the rules and their
    order). Empty: every request is."""

    allow_methods: frozenset[str] = frozenset()
    deny_methods: frozenset[str] = frozenset()
    allow_paths: tuple[re.Pattern[str], ...] = ()
    deny_paths: tuple[re.Pattern[str], ...] = ()
    allow_headers: tuple[HeaderRule, ...] = ()
    deny_headers: tuple[HeaderRule, ...] = ()
    sample: HeaderSample | None = None
    rate: float | None = None
    """Requests a second (:class:`RateLimiter`; each hook has its own bucket)."""

    def __bool__(self) -> bool:
        return bool(self.allow_methods or self.deny_methods or self.allow_paths
                    or self.deny_paths or self.allow_headers or self.deny_headers
                    or self.sample is not None or self.rate is not None)

    def verdict(self, req: RequestHead) -> str | None:
        """The reason ``req`` is not selected (one of :data:`REASONS`), or None; the rate
        limit is the hook's to check, after this."""
        if req.method in self.deny_methods or (
                self.allow_methods and req.method not in self.allow_methods):
            return "method"
        if _any_search(self.deny_paths, req.target) or (
                self.allow_paths and not _any_search(self.allow_paths, req.target)):
            return "path"
        if any(r.matches(req) for r in self.deny_headers) or (
                self.allow_headers and not any(r.matches(req) for r in self.allow_headers)):
            return "header"
        if self.sample is not None:
            value = next(iter(req.values(self.sample.name)), "")
            if not value:
                return "sample_missing"
            if not self.sample.selects(value):
                return "sample"
        return None


def _any_search(patterns: Iterable[re.Pattern[str]], text: str) -> bool:
    return any(p.search(text) for p in patterns)


class SelectRequests(HttpRequestEditor):
    """Drops the HTTP/1.x requests ``selection`` does not select, whole (module docstring).

    ``path`` (``forward`` or ``record``) names the hook in its counters (:meth:`mirror_stats`).
    ``clock`` replaces the chunks' capture time for the rate limit (tests). Give each path a
    hook of its own: the framing state and the rate limiter's bucket are per hook."""

    def __init__(self, selection: Selection, path: str = "forward",
                 clock: Callable[[], float] | None = None, max_head: int = 64 * 1024) -> None:
        super().__init__(max_head)
        self.selection = selection
        self.path = path
        self._clock = clock
        self._limiter = RateLimiter(selection.rate) if selection.rate is not None else None
        self.requests = 0
        self.unselected: Counter[str] = Counter()
        self.passed_unjudged = 0

    def request(self, head: bytes, chunk: TrafficChunk) -> bytes | None:
        self.requests += 1
        why = self.selection.verdict(parse_head(head))
        if why is None and self._limiter is not None:
            now = self._clock() if self._clock is not None else chunk.seen_at
            if not self._limiter.take(now):
                why = "rate_limit"
        if why is None:
            return head
        self.unselected[why] += 1
        return None

    def pass_unframed(self, why: str, started: bool) -> bool:
        if why == BAD_BODY or (why == NOT_HTTP and not started):
            self.passed_unjudged += 1
            return True
        self.unselected["unframed"] += 1
        return False

    def held_at_end(self, held: bytes) -> bytes:
        if held:
            self.unselected["incomplete"] += 1
            self.dropped_bytes += len(held)
        return b""

    def mirror_stats(self) -> dict[str, int]:
        """This hook's counters, keyed as the ``mirror`` stage reports them
        (``select_<path>_...``, declared in :mod:`agent.metrics`)."""
        p = f"select_{self.path}_"
        out = {f"{p}requests": self.requests, f"{p}dropped_bytes": self.dropped_bytes,
               f"{p}passthrough_streams": self.passed_unjudged}
        out.update({f"{p}unselected_{why}": n for why, n in self.unselected.items()})
        return out
