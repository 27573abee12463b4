"""HTTP/1.x framing for request-mode forwarding: requests out of a client's stream
(agent/sinks/http_request.py) and responses off a pooled connection
(agent/sinks/http_response.py). Every byte fed is in exactly one framed item, whatever the
split and the holes; the requests come out whole and byte-exact."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sinks.http_request import Dropped, Framed, Request, RequestFramer, keep_alive
from agent.sinks.http_response import BadResponse, ResponseFramer


def requests_strategy() -> st.SearchStrategy[list[bytes]]:
    path = st.text("abcxyz0189", min_size=1, max_size=8)
    body = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"."))

    def make(kind: int, p: str, b: bytes) -> bytes:
        if kind == 0:
            return f"GET /{p} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
        if kind == 1:
            return f"POST /{p} HTTP/1.1\r\nContent-Length: {len(b)}\r\n\r\n".encode() + b
        if kind == 2:
            chunks = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n"
                              for c in (b[:7], b[7:]) if c)
            return (f"PUT /{p} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                    + chunks + b"0\r\n\r\n")
        return f"HEAD /{p} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode()

    one = st.builds(make, st.integers(0, 3), path, body)
    return st.lists(one, min_size=1, max_size=12)


def run(framer: RequestFramer, pieces: list[bytes | int]) -> list[Framed]:
    """Feed byte pieces; an int is a hole of that many bytes; then the end."""
    out: list[Framed] = []
    for p in pieces:
        out += framer.hole(p, "gap") if isinstance(p, int) else framer.feed(p)
    return out + framer.end()


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=300, deadline=None)
@given(requests_strategy(), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_gives_the_requests_back_exactly(reqs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(reqs)
    out = run(RequestFramer(), list(split(stream, cuts)))
    assert [r.data for r in out if isinstance(r, Request)] == reqs
    assert not [d for d in out if isinstance(d, Dropped)]
    assert sum(r.size for r in out) == len(stream)


@settings(max_examples=300, deadline=None)
@given(requests_strategy(), st.lists(st.integers(0, 10_000), max_size=20),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 200)), max_size=3))
def test_holes_drop_what_they_hit_and_nothing_else_is_lost(
        reqs: list[bytes], cuts: list[int], holes: list[tuple[int, int]]) -> None:
    """Bytes cut out of the stream: every byte fed is in one item; every request sent is one
    of the originals, in order, once; an original that a hole did not touch and that follows
    a resynchronisation point is sent."""
    stream = b"".join(reqs)
    pieces: list[bytes | int] = []
    pos = 0
    for at, n in sorted(holes):
        at = max(at % (len(stream) + 1), pos)
        pieces += split(stream[pos:at], cuts)
        n = min(n, len(stream) - at)
        if n:
            pieces.append(n)
        pos = at + n
    pieces += split(stream[pos:], cuts)
    out = run(RequestFramer(), pieces)
    fed = sum(len(p) for p in pieces if isinstance(p, bytes))
    assert sum(r.size for r in out) == fed
    sent = [r.data for r in out if isinstance(r, Request)]
    it = iter(reqs)
    assert all(any(s == r for r in it) for s in sent), "sent in order, each an original"
    if not holes:
        assert sent == reqs


def test_connection_close_is_taken_out_of_http11_requests_only() -> None:
    head = b"GET / HTTP/1.1\r\nConnection: close\r\nHost: h\r\n\r\n"
    assert keep_alive(head) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert keep_alive(b"GET / HTTP/1.1\r\nconnection: Upgrade, Close\r\n\r\n") == (
        b"GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n")
    [r] = RequestFramer().feed(head)
    assert isinstance(r, Request) and r.data == keep_alive(head) and r.size == len(head)
    old = b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n"
    [r] = RequestFramer().feed(old)
    assert isinstance(r, Request) and r.data == old and r.close
    [r] = RequestFramer().feed(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert isinstance(r, Request) and not r.close


def test_not_http_from_the_start_kills_the_flow_once_nothing_turns_up() -> None:
    f = RequestFramer()
    out = f.feed(b"\x16\x03\x01" + b"\xff" * 70_000)
    assert [d.reason for d in out if isinstance(d, Dropped) and d.reason] == ["not_http"]
    assert f.dead
    assert sum(d.size for d in out) == 70_003
    assert f.feed(b"GET / HTTP/1.1\r\n\r\n") == [Dropped(None, 18)]


def test_a_connection_picked_up_mid_stream_finds_its_next_request() -> None:
    f = RequestFramer()
    out = f.feed(b"dy of an earlier POST\r\nGET /next HTTP/1.1\r\n\r\n")
    assert [type(x).__name__ for x in out] == ["Dropped", "Dropped", "Request"]
    assert out[0] == Dropped("not_http", 0) and not f.dead


def test_a_request_line_split_while_resynchronising_is_found() -> None:
    pieces: list[bytes | int] = [b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab", 100,
                                 b"xx\r\nGET /a HT", b"TP/1.1\r\n\r\n", 5,
                                 b"zzzzPOST /b HTTP/1.1\r\n\r\n"]
    out = run(RequestFramer(), pieces)
    sent = [r.data for r in out if isinstance(r, Request)]
    assert sent == [b"GET /a HTTP/1.1\r\n\r\n", b"POST /b HTTP/1.1\r\n\r\n"]
    assert sum(x.size for x in out) == sum(len(p) for p in pieces if isinstance(p, bytes))
    assert [d.reason for d in out if isinstance(d, Dropped) and d.reason] == ["gap"]


@pytest.mark.parametrize(("stream", "reason"), [
    (b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\nmore", "upgrade"),
    (b"CONNECT h:443 HTTP/1.1\r\n\r\nTLS", "upgrade"),
    (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", "unframed"),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20_000, "unframed"),
    (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nabc", "flow_buffer"),
    (b"GET / HTTP/1.1\r\nHost:", "incomplete"),
])
def test_requests_that_cannot_go_are_dropped_whole_by_reason(stream: bytes,
                                                            reason: str) -> None:
    out = run(RequestFramer(), [stream])
    assert [d.reason for d in out if isinstance(d, Dropped) and d.reason] == [reason]
    assert sum(x.size for x in out) == len(stream)


# ---------------------------------------------------------------- responses


def respond(framer: ResponseFramer, data: bytes, step: int, head_only: bool = False) -> bool:
    framer.expect(head_only)
    done = False
    for i in range(0, len(data), step):
        assert not done
        done = framer.feed(data[i : i + step])
    return done


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_responses_are_framed_as_rfc_9112_says(step: int) -> None:
    f = ResponseFramer()
    assert respond(f, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", step)
    assert f.reusable
    assert respond(f, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n", step)
    assert respond(f, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", step, head_only=True)
    assert respond(f, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", step)
    assert respond(f, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                   step) and f.reusable
    assert respond(f, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
                   step) and not f.reusable


def test_a_body_read_to_the_close_ends_at_the_close() -> None:
    f = ResponseFramer()
    assert not respond(f, b"HTTP/1.0 200 OK\r\n\r\nwhatever comes", 4)
    assert f.eof() and not f.reusable


@pytest.mark.parametrize("data", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\n"
                                  b"Content-Length: -1\r\n\r\n", b"HTTP/1.1 204 No\r\n\r\nextra"])
def test_what_is_no_response_is_bad(data: bytes) -> None:
    f = ResponseFramer()
    f.expect()
    with pytest.raises(BadResponse):
        f.feed(data)
