"""Rewriting forwarded HTTP/1.x requests (agent/hooks/rewrite.py): the target and the Host,
split any way, with bodies and their framing untouched."""

from __future__ import annotations

import re

import pytest

from agent.hooks.rewrite import RewriteRequests, check_host, parse_rewrite_path
from tests.unit.test_http_select import every_split, run

BODY = b"POST /api/v1/x HTTP/1.1\r\n\r\n"  # looks like a request: must not be rewritten
STREAM = (b"GET /api/v1/users?id=1 HTTP/1.1\r\nHost: prod.example\r\n\r\n"
          b"POST /api/v1/orders HTTP/1.1\r\nhost:prod\r\nContent-Length: %d\r\n\r\n%s"
          b"PUT /other HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
          b"4\r\n/api\r\n0\r\n\r\n" % (len(BODY), BODY))
EXPECTED = (b"GET /v2/users?id=1 HTTP/1.1\r\nHost: shadow:8080\r\n\r\n"
            b"POST /v2/orders HTTP/1.1\r\nHost: shadow:8080\r\nContent-Length: %d\r\n\r\n%s"
            b"PUT /other HTTP/1.0\r\nTransfer-Encoding: chunked\r\nHost: shadow:8080\r\n\r\n"
            b"4\r\n/api\r\n0\r\n\r\n" % (len(BODY), BODY))


def test_path_and_host_rewritten_at_every_split() -> None:
    rule = parse_rewrite_path("^/api/v1/=/v2/")
    for pieces in every_split(STREAM):
        hook = RewriteRequests([rule], "shadow:8080")
        assert run([hook], pieces) == EXPECTED
        assert (hook.paths_rewritten, hook.hosts_rewritten, hook.invalid) == (2, 3, 0)


def test_rules_apply_in_order_with_groups() -> None:
    hook = RewriteRequests([parse_rewrite_path(r"^/u/(\d+)=/users/\1"),
                            parse_rewrite_path(r"id\=(\w+)=uid=\1"),
                            parse_rewrite_path(r"/users/=/people/")])
    got = run([hook], [b"GET /u/42?id=7&id=8 HTTP/1.1\r\n\r\n"])
    assert got == b"GET /people/42?uid=7&uid=8 HTTP/1.1\r\n\r\n"


def test_host_header_collapses_to_one_and_absolute_targets_follow() -> None:
    hook = RewriteRequests([parse_rewrite_path("^/a=/b")], "[2001:db8::1]:81")
    got = run([hook], [b"GET http://prod/a?x HTTP/1.1\r\nX: 1\r\nHOST: prod\r\nHost: dup\r\n\r\n"])
    assert got == (b"GET http://[2001:db8::1]:81/b?x HTTP/1.1\r\nX: 1\r\n"
                   b"Host: [2001:db8::1]:81\r\n\r\n")


def test_an_invalid_result_keeps_the_target() -> None:
    hook = RewriteRequests([parse_rewrite_path(".*=")])
    assert run([hook], [b"GET /x HTTP/1.1\r\n\r\n"]) == b"GET /x HTTP/1.1\r\n\r\n"
    assert hook.invalid == 1 and hook.paths_rewritten == 0
    newline = RewriteRequests([(re.compile("x"), "\\n")])
    assert run([newline], [b"GET /x HTTP/1.1\r\n\r\n"]) == b"GET /x HTTP/1.1\r\n\r\n"


def test_no_rule_that_matches_changes_nothing() -> None:
    hook = RewriteRequests([parse_rewrite_path("^/nomatch=/y")])
    assert run([hook], [STREAM]) == STREAM
    assert hook.mirror_stats() == {"rewrite_paths": 0, "rewrite_hosts": 0,
                                   "rewrite_invalid": 0}


@pytest.mark.parametrize(("text", "message"), [
    ("/a", "expected REGEX=REPLACEMENT"),
    ("(=/b", "not a valid regular expression"),
    ("^/a=/b/\\2", "invalid group reference"),
    ("^/a=/b c", "printable ASCII without spaces"),
])
def test_bad_rewrite_rules_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_rewrite_path(text)


def test_hosts() -> None:
    assert check_host(" shadow.internal:8080 ") == "shadow.internal:8080"
    assert check_host("192.0.2.7") == "192.0.2.7"
    for bad in ("a b", "host\r\nX: y", "h:port", "", "[zz]"):
        with pytest.raises(ValueError):
            check_host(bad)
