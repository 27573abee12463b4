"""Comparing the target's responses with production's, and Diffy-style noise filtering.

A response becomes *fields*: ``status``, ``header NAME`` for each header not ignored, and
the body: for JSON, one field per leaf (``body $.user.id``), else ``body`` as a whole. Two
responses differ in the fields whose values differ (or that one lacks).

- Without a baseline the candidate is compared with production (the recorded response).
- With a baseline (today's build, given the same requests), a field counts only where the
  candidate differs from the baseline and the baseline does not differ from production:
  what differs between two runs of the same build (timestamps, request ids, random values)
  is noise, counted apart (``noise``) and not reported as a difference. Without recorded
  production responses, candidate is compared with baseline as is.

Per request the counts are: a different status, a different body (any body field), different
headers; per ``METHOD path`` (query string dropped) the same, the status changes
(``200 -> 500``) and the fields most often different. The 20 paths with the most differing
requests are reported.

Responses are compared as they come (:class:`Pairing`, one per replayed connection): a
request's comparison is made, and its responses let go, once production's, the target's and
the baseline's response to it are all there (or known never to come).
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from agent.replay.http import Request, Response

__all__ = ["DEFAULT_IGNORED", "Differ", "Pairing", "fields", "size"]

#: Headers ignored by default: they differ between any two responses (Date), describe the
#: transfer rather than the content, or name the server.
DEFAULT_IGNORED = ("Date", "Server", "Connection", "Keep-Alive", "Transfer-Encoding",
                   "Content-Length", "Age", "Expires", "Last-Modified", "ETag", "Set-Cookie",
                   "X-Request-Id")
_MAX_LEAVES = 2000
_TOP_PATHS = 20
_TOP_FIELDS = 5


def _leaves(value: Any, path: str, out: dict[str, Any]) -> None:
    if len(out) >= _MAX_LEAVES:
        return
    if isinstance(value, dict):
        if not value:
            out[path] = {}
        for k, v in value.items():
            _leaves(v, f"{path}.{k}", out)
    elif isinstance(value, list):
        if not value:
            out[path] = []
        for i, v in enumerate(value):
            _leaves(v, f"{path}[{i}]", out)
    else:
        out[path] = value


def fields(resp: Response, ignored: frozenset[str]) -> dict[str, Any]:
    """The fields of one response (see the module docstring); ``ignored``: lower-case
    header names left out."""
    out: dict[str, Any] = {"status": resp.status}
    for name, value in resp.headers().items():
        if name not in ignored:
            out[f"header {name}"] = value
    body = resp.body
    if body[:1] in (b"{", b"[") or body.lstrip()[:1] in (b"{", b"["):
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if doc is not None:
            leaves: dict[str, Any] = {}
            _leaves(doc, "body $", leaves)
            return out | leaves
    if body:
        out["body"] = body
    return out


def _differing(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


class _PathStats:
    __slots__ = ("body", "compared", "different", "fields", "headers", "status",
                 "status_changes")

    def __init__(self) -> None:
        self.compared = self.different = self.status = self.body = self.headers = 0
        self.status_changes: Counter[str] = Counter()
        self.fields: Counter[str] = Counter()


class Differ:
    """Accumulates the comparison of every replayed request (:meth:`add`), then
    :meth:`summary`."""

    def __init__(self, ignored: Sequence[str] = DEFAULT_IGNORED,
                 with_baseline: bool = False) -> None:
        self.ignored = frozenset(h.lower() for h in ignored)
        self.with_baseline = with_baseline
        self.compared = self.not_compared = 0
        self.status = self.body = self.headers = 0
        self.noise: Counter[str] = Counter()
        self._paths: dict[str, _PathStats] = {}

    def add(self, requests: Sequence[Request], production: Sequence[Response] | None,
            candidate: Sequence[Response], baseline: Sequence[Response] | None) -> None:
        """Compare one connection's responses, matched to ``requests`` by position."""
        for i, req in enumerate(requests):
            cand = candidate[i] if i < len(candidate) else None
            prod = production[i] if production is not None and i < len(production) else None
            base = baseline[i] if baseline is not None and i < len(baseline) else None
            self.compare(req, prod, cand, base, baseline is not None)

    def compare(self, req: Request, prod: Response | None, cand: Response | None,
                base: Response | None, with_baseline: bool) -> None:
        """One request's responses (None: missing); ``with_baseline``: a baseline response
        was due. Counted as not compared when the target's, or every reference, is
        missing."""
        if cand is None or (prod is None and base is None) or (with_baseline and base is None):
            self.not_compared += 1
            return
        self._compare(req, prod, cand, base)

    def _compare(self, req: Request, prod: Response | None, cand: Response,
                 base: Response | None) -> None:
        ign = self.ignored
        c = fields(cand, ign)
        if base is None:
            assert prod is not None
            ref = fields(prod, ign)
            real = _differing(c, ref)
        else:
            ref = fields(base, ign)
            real = _differing(c, ref)
            if prod is not None and real:
                noise = real & _differing(ref, fields(prod, ign))
                self.noise.update(noise)
                real -= noise
        self.compared += 1
        stats = self._paths.get(key := f"{req.method} {req.path}")
        if stats is None:
            stats = self._paths[key] = _PathStats()
        stats.compared += 1
        if not real:
            return
        stats.different += 1
        stats.fields.update(real)
        if "status" in real:
            self.status += 1
            stats.status += 1
            stats.status_changes[f"{ref['status']} -> {cand.status}"] += 1
        if any(k.startswith("body") for k in real):
            self.body += 1
            stats.body += 1
        if any(k.startswith("header ") for k in real):
            self.headers += 1
            stats.headers += 1

    def summary(self, production: bool) -> dict[str, Any]:
        """The diff as a JSON-able object; ``production``: did the recording hold responses
        (it names what was compared with)."""
        reference = ("baseline, noise filtered with production" if self.with_baseline
                     and production else "baseline" if self.with_baseline else "production")
        worst = sorted((p for p in self._paths.items() if p[1].different),
                       key=lambda p: (-p[1].different, p[0]))[:_TOP_PATHS]
        return {
            "reference": reference,
            "compared": self.compared,
            "not_compared": self.not_compared,
            "different_status": self.status,
            "different_body": self.body,
            "different_headers": self.headers,
            "paths": [{"path": name, "compared": s.compared, "different": s.different,
                       "different_status": s.status, "different_body": s.body,
                       "different_headers": s.headers,
                       "status_changes": dict(s.status_changes.most_common(_TOP_FIELDS)),
                       "fields": [f for f, _n in s.fields.most_common(_TOP_FIELDS)]}
                      for name, s in worst],
            "noise": dict(self.noise.most_common(10)),
        }


def size(resp: Response) -> int:
    """The bytes a response holds."""
    return len(resp.head) + len(resp.body)


class Pairing:
    """One replayed connection's requests, matched with production's responses and the
    target's (side 0) and baseline's (side 1, with ``sides`` 2) by position; each request is
    compared in ``differ`` as soon as every response to it is there or will never come
    (:meth:`production_end`, :meth:`side_end`), and then let go. ``hold`` is told the bytes
    of responses held (+) and let go (-)."""

    def __init__(self, differ: Differ, sides: int, hold: Callable[[int], None]) -> None:
        self._differ = differ
        self._hold = hold
        self._requests: deque[Request] = deque()
        self._prod: deque[Response] = deque()
        self._answers: list[deque[Response]] = [deque() for _ in range(sides)]
        self._prod_ended = False
        self._ended = [False] * sides

    def request(self, req: Request) -> None:
        self._requests.append(req)

    def production(self, resp: Response) -> None:
        if not self._prod_ended:
            self._prod.append(resp)
            self._hold(len(resp.head) + len(resp.body))
            self._drain()

    def production_end(self) -> None:
        """No more production responses (the recorded connection ended, or a gap)."""
        self._prod_ended = True
        self._drain()

    def answer(self, side: int, resp: Response) -> None:
        self._answers[side].append(resp)
        self._hold(len(resp.head) + len(resp.body))
        self._drain()

    def side_end(self, side: int) -> None:
        """That side's connection ended: no more answers from it."""
        self._ended[side] = True
        self._drain()

    def finish(self) -> None:
        """Every side ended: what is left is compared with what there is."""
        self._prod_ended = True
        self._ended = [True] * len(self._ended)
        self._drain()
        left = [*self._prod, *(r for a in self._answers for r in a)]
        self._hold(-sum(size(r) for r in left))  # answers to no request
        self._prod.clear()
        for a in self._answers:
            a.clear()

    def _drain(self) -> None:
        reqs, prod, answers, ended = self._requests, self._prod, self._answers, self._ended
        compare, hold = self._differ.compare, self._hold
        cand = answers[0]
        base = answers[1] if len(answers) > 1 else None
        while reqs and (prod or self._prod_ended) and (cand or ended[0]) and (
                base is None or base or ended[1]):
            n = 0
            p = c = b = None
            if prod:
                p = prod.popleft()
                n += len(p.head) + len(p.body)
            if cand:
                c = cand.popleft()
                n += len(c.head) + len(c.body)
            if base:
                b = base.popleft()
                n += len(b.head) + len(b.body)
            hold(-n)
            compare(reqs.popleft(), p, c, b, base is not None)
