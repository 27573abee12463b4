"""Request selection on HTTP/1.x streams (agent/hooks/select.py): whole requests dropped or
kept, split any way, pipelined, chunked; the rate limit on an injected clock; consistent
sampling; the counters the metrics registry reads."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import pytest

from agent import metrics
from agent.hooks import HookPipeline
from agent.hooks.http import InjectHeader
from agent.hooks.select import (
    REASONS,
    HeaderRule,
    HeaderSample,
    RateLimiter,
    Selection,
    SelectRequests,
    hook_stats,
    parse_head,
    parse_header_rule,
    parse_methods,
    parse_rate,
    parse_sample,
)
from agent.model import Direction, TrafficChunk

GET = b"GET /api/users?id=1 HTTP/1.1\r\nHost: prod\r\nX-User-Id: alice\r\n\r\n"
BODY = b"GET /smuggled HTTP/1.1\r\n\r\n\r\n\r\n"
POST = b"POST /api/orders HTTP/1.1\r\nHost: prod\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY), BODY)
PUT = (b"PUT /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
       b"5\r\nhello\r\n1a;ext=1\r\n\r\n\r\nGET /fake HTTP/1.1\r\n\r\n\r\n0\r\nTrailer: v\r\n\r\n")
DELETE = b"DELETE /admin/x HTTP/1.1\r\nHost: prod\r\n\r\n"
HEALTH = b"GET /health HTTP/1.0\r\nx-debug:1\r\n\r\n"
REQUESTS = (GET, POST, PUT, DELETE, HEALTH)
STREAM = b"".join(REQUESTS)


def chunk(data: bytes, flow: int = 1, at: float = 0.0, gap: int = 0,
          direction: Direction = Direction.TO_OBSERVED) -> TrafficChunk:
    return TrafficChunk(data, "192.0.2.1:40000", "192.0.2.2:80", direction, at, flow, gap)


def run(hooks: Sequence[object], pieces: Sequence[bytes]) -> bytes:
    """Every piece through a pipeline of ``hooks`` (one flow), then its end."""
    p = HookPipeline(hooks)  # type: ignore[arg-type]
    out = b""
    for piece in pieces:
        data, keep = p.handle(chunk(piece))
        assert keep
        out += data
    return out + p.flow_end(chunk(b""))


def every_split(data: bytes) -> list[list[bytes]]:
    """Two pieces at every byte boundary, one byte at a time, and random cuts."""
    splits = [[data[:i], data[i:]] for i in range(1, len(data))]
    splits.append([data[i:i + 1] for i in range(len(data))])
    for seed in range(20):
        rng, pos, pieces = random.Random(seed), 0, []
        while pos < len(data):
            n = rng.randint(1, 40)
            pieces.append(data[pos:pos + n])
            pos += n
        splits.append(pieces)
    return splits


CASES: list[tuple[str, Callable[[], Selection], bytes, dict[str, int]]] = [
    ("deny methods", lambda: Selection(deny_methods=frozenset({"POST", "PUT"})),
     GET + DELETE + HEALTH, {"method": 2}),
    ("allow GET", lambda: Selection(allow_methods=frozenset({"GET"})), GET + HEALTH,
     {"method": 3}),
    ("deny path", lambda: Selection(deny_paths=(re.compile("^/admin/"),)),
     GET + POST + PUT + HEALTH, {"path": 1}),
    ("allow paths", lambda: Selection(allow_paths=(re.compile(r"\?id=\d+$"),
                                                   re.compile("^/upload$"))),
     GET + PUT, {"path": 3}),
    ("deny header presence", lambda: Selection(deny_headers=(parse_header_rule("X-Debug:"),)),
     GET + POST + PUT + DELETE, {"header": 1}),
    ("allow header", lambda: Selection(allow_headers=(parse_header_rule("host: ^prod$"),)),
     GET + POST + DELETE, {"header": 2}),
]


@pytest.mark.parametrize(("name", "make", "expected", "reasons"), CASES,
                         ids=[c[0] for c in CASES])
def test_whole_requests_selected_at_every_split(name: str, make: Callable[[], Selection],
                                                expected: bytes,
                                                reasons: dict[str, int]) -> None:
    for pieces in every_split(STREAM):
        hook = SelectRequests(make())
        assert run([hook], pieces) == expected
        assert hook.unselected == reasons and hook.requests == 5
        assert hook.dropped_bytes == len(STREAM) - len(expected)


def test_the_next_hook_sees_only_whole_requests() -> None:
    """Behind the selection, a second framer never loses step: every kept request gets its
    header, and no body byte is taken for a request."""
    for pieces in every_split(STREAM)[::7]:
        got = run([SelectRequests(Selection(deny_methods=frozenset({"POST", "DELETE"}))),
                   InjectHeader("X-Mirror", "1")], pieces)
        assert got.count(b"X-Mirror: 1\r\n") == 3
        assert got.replace(b"X-Mirror: 1\r\n", b"") == GET + PUT + HEALTH


def test_no_rules_keep_everything_unchanged() -> None:
    assert not Selection()
    assert run([SelectRequests(Selection())], [STREAM]) == STREAM


def test_responses_and_other_flows_are_untouched() -> None:
    hook = SelectRequests(Selection(deny_methods=frozenset({"GET"})))
    resp = chunk(b"HTTP/1.1 200 OK\r\n\r\n", direction=Direction.FROM_OBSERVED)
    assert hook.handle(resp) == (resp.data, True)
    assert hook.handle(chunk(GET, flow=1)) == (b"", True)
    assert hook.handle(chunk(DELETE, flow=2)) == (DELETE, True)


@pytest.mark.parametrize("head", [
    b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT db:5432 HTTP/1.1\r\n\r\n"])
def test_a_dropped_tunnel_drops_the_rest_of_the_connection(head: bytes) -> None:
    tunnel = b"\x81\x05hello GET /x HTTP/1.1\r\n\r\n"
    deny = SelectRequests(Selection(deny_paths=(re.compile("^/ws|:5432$"),)))
    assert run([deny], [GET, head, tunnel]) == GET
    allow = SelectRequests(Selection(deny_methods=frozenset({"POST"})))
    assert run([allow], [GET, head, tunnel]) == GET + head + tunnel


def test_framing_the_selection_cannot_vouch_for() -> None:
    tls = b"\x16\x03\x01\x02\x00binary" * 5
    hook = SelectRequests(Selection(deny_methods=frozenset({"POST"})))
    assert run([hook], [tls[:7], tls[7:]]) == tls
    assert hook.passed_unjudged == 1
    # Garbage where the next request should start: the rest of the connection goes.
    hook = SelectRequests(Selection(deny_methods=frozenset({"POST"})))
    assert run([hook], [GET + b"\x00garbage" + DELETE]) == GET
    # A header block over the limit cannot be judged: dropped, with the rest.
    hook = SelectRequests(Selection(deny_methods=frozenset({"POST"})), max_head=100)
    assert run([hook], [GET, b"GET / HTTP/1.1\r\nX: " + b"a" * 200, b"\r\n\r\n" + DELETE]) == GET
    # Cut by the connection's end: dropped too.
    hook = SelectRequests(Selection(deny_methods=frozenset({"POST"})))
    assert run([hook], [GET, DELETE[:20]]) == GET
    assert hook.unselected == {"incomplete": 1} and hook.dropped_bytes == 20


def test_a_bad_body_length_shares_its_requests_fate() -> None:
    bad = b"POST /x HTTP/1.1\r\nContent-Length: -5\r\n\r\nrest as the service saw it"
    keep = SelectRequests(Selection(deny_methods=frozenset({"PUT"})))
    assert run([keep], [GET + bad]) == GET + bad
    drop = SelectRequests(Selection(deny_methods=frozenset({"POST"})))
    assert run([drop], [GET + bad]) == GET


def test_after_a_gap_the_cut_request_keeps_its_fate() -> None:
    hook = SelectRequests(Selection(deny_methods=frozenset({"POST"})))
    assert hook.handle(chunk(POST[:70]))[0] == b""
    assert hook.handle(chunk(b"uest HTTP/1.1\r\n\r\n\r\n\r\n", gap=5))[0] == b""  # its tail
    assert hook.handle(chunk(GET))[0] == GET
    # A header block cut by a gap is dropped and counted, like one cut by the end.
    assert hook.handle(chunk(DELETE[:12]))[0] == b""
    assert hook.handle(chunk(GET, gap=9))[0] == GET
    assert hook.unselected == {"method": 1, "incomplete": 1}
    assert hook.dropped_bytes == len(POST[:70]) + len(b"uest HTTP/1.1\r\n\r\n\r\n\r\n") + 12


# ---------------------------------------------------------------- rate limit


def test_token_bucket_on_an_injected_clock() -> None:
    bucket = RateLimiter(2.0)  # burst 2, starts full
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert [bucket.take(0.5) for _ in range(2)] == [True, False]
    assert [bucket.take(10.0) for _ in range(3)] == [True, True, False]  # capped at the burst
    assert bucket.take(9.0) is False  # a clock going back adds nothing
    slow = RateLimiter(0.5)  # one every two seconds, burst 1
    assert [slow.take(t) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [True, False, True, False,
                                                                   True]


def test_rate_limit_counts_drops_across_connections_and_never_waits() -> None:
    now = [100.0]
    hook = SelectRequests(Selection(rate=1.0), clock=lambda: now[0])
    kept = [hook.handle(chunk(DELETE, flow=f))[0] for f in range(4)]
    assert kept == [DELETE, b"", b"", b""]
    now[0] = 101.0
    assert hook.handle(chunk(DELETE, flow=9))[0] == DELETE
    assert hook.unselected == {"rate_limit": 3}


def test_rate_limit_runs_on_capture_time_and_after_the_rules() -> None:
    hook = SelectRequests(Selection(deny_methods=frozenset({"GET"}), rate=1.0))
    assert hook.handle(chunk(GET, at=5.0))[0] == b""  # denied: takes no token
    assert hook.handle(chunk(DELETE, at=5.0))[0] == DELETE
    assert hook.handle(chunk(DELETE, at=5.5))[0] == b""
    assert hook.handle(chunk(DELETE, at=6.0))[0] == DELETE
    assert hook.unselected == {"method": 1, "rate_limit": 1}


# ---------------------------------------------------------------- sampling


def with_user(user: str | None) -> bytes:
    header = f"X-User-Id: {user}\r\n" if user is not None else ""
    return f"GET /u HTTP/1.1\r\n{header}\r\n".encode()


def test_sampling_is_consistent_per_user() -> None:
    sample = parse_sample("X-User-Id:10%")
    assert sample == HeaderSample("x-user-id", 10.0)
    users = [f"user-{i}" for i in range(5000)]
    picked = {u for u in users if sample.selects(u)}
    assert 400 < len(picked) < 600
    # The same users in every hook, process and connection: the key is fixed.
    assert {u for u in users if HeaderSample("x-user-id", 10.0).selects(u)} == picked
    assert HeaderSample("x", 50.0).selects("alice") is True  # pinned: fleet-wide consistency
    assert HeaderSample("x", 50.0).selects("bob") is False
    hook = SelectRequests(Selection(sample=sample))
    for flow, user in enumerate(users[:200] * 2):
        kept = hook.handle(chunk(with_user(user), flow=flow))[0] != b""
        assert kept == (user in picked)


def test_sampling_edges_and_a_missing_header() -> None:
    assert not any(HeaderSample("x", 0.0).selects(str(i)) for i in range(1000))
    assert all(HeaderSample("x", 100.0).selects(str(i)) for i in range(1000))
    hook = SelectRequests(Selection(sample=HeaderSample("x-user-id", 100.0)))
    assert run([hook], [with_user(None), with_user(""), with_user("a")]) == with_user("a")
    assert hook.unselected == {"sample_missing": 2}


# ---------------------------------------------------------------- parsing and rules


def test_parse_head_reads_methods_targets_and_headers() -> None:
    req = parse_head(b"PATCH /a?b=c HTTP/1.1\r\nHost:  x \r\nX-A: 1\r\n folded\r\nx-a:2\r\n"
                     b"junk\r\n\r\n")
    assert (req.method, req.target) == ("PATCH", "/a?b=c")
    assert req.values("x-a") == ["1 folded", "2"] and req.values("host") == ["x"]


def test_header_rules_search_every_value_of_the_name_in_any_case() -> None:
    req = parse_head(b"GET / HTTP/1.1\r\nAccept: text/html\r\naccept: application/json\r\n\r\n")
    assert parse_header_rule("ACCEPT: json$").matches(req)
    assert not parse_header_rule("Accept: ^json").matches(req)
    assert parse_header_rule("Accept:").matches(req)  # presence
    assert not parse_header_rule("X-Other:").matches(req)
    assert parse_header_rule("X-Time: ^\\d{1,2}:\\d\\d$") == HeaderRule(
        "x-time", re.compile("^\\d{1,2}:\\d\\d$"))  # the first colon splits


@pytest.mark.parametrize(("parse", "text", "message"), [
    (parse_header_rule, "X-A", "expected 'NAME: REGEX'"),
    (parse_header_rule, "X A: b", "not a valid header name"),
    (parse_header_rule, "X-A: (", "not a valid regular expression"),
    (parse_methods, "GET, ,", ""),
    (parse_methods, "G T", "not an HTTP method"),
    (parse_methods, ",", "no method"),
    (parse_sample, "X-User-Id", "expected NAME:PERCENT%"),
    (parse_sample, "X-User-Id:101%", "between 0% and 100%"),
    (parse_sample, "X-User-Id:ten", "not a percentage"),
    (parse_rate, "0/s", "above 0"),
    (parse_rate, "10/day", "expected N/s"),
    (parse_rate, "-1/s", "expected N/s"),
])
def test_bad_values_are_refused(parse: Callable[[str], object], text: str,
                                message: str) -> None:
    if not message:  # a valid one, for contrast
        assert parse(text) == ["GET"]
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(text)


def test_rates_and_methods_parse() -> None:
    assert parse_rate("100/s") == 100.0 and parse_rate("30/min") == 0.5
    assert parse_rate(" 2.5 ") == 2.5 and parse_rate("36/h") == 0.01
    assert parse_methods("get,Head") == ["GET", "HEAD"]


# ---------------------------------------------------------------- counters


def test_every_counter_is_declared_in_the_registry() -> None:
    fwd = SelectRequests(Selection(deny_methods=frozenset({"POST"})), "forward")
    rec = SelectRequests(Selection(deny_methods=frozenset({"POST"})), "record")
    for reason in REASONS:
        fwd.unselected[reason] += 1
        rec.unselected[reason] += 2
    run([fwd], [GET + POST])
    stats = hook_stats([fwd, rec], [rec], None)
    assert stats["select_forward_requests"] == 2 and stats["select_record_unselected_path"] == 2
    assert metrics.undeclared({"mirror": stats}) == []
    snap = metrics.snapshot(metrics.new_registry(lambda: {"mirror": stats}))
    name = "mirror_agent_mirror_forward_requests_unselected_total"
    assert snap[metrics.key(name, reason="method")] == 2
    assert snap[metrics.key("mirror_agent_mirror_unselected_bytes_total", hook="forward")] == (
        len(POST))
