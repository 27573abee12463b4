"""HTTP/1.x framing for replay (agent.replay.http), without sockets: requests in a client
stream, responses fed in every split."""

from __future__ import annotations

import pytest

from agent.replay.http import ResponseParser, frame_requests, looks_like_http

GET = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
POST = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nTrailer: t\r\n\r\n")


def test_frame_requests_lengths_chunked_and_paths() -> None:
    data = GET + POST + CHUNKED + GET
    reqs, whole = frame_requests(data)
    assert whole
    assert [(r.method, r.path, r.target) for r in reqs] == [
        ("GET", "/a", "/a?x=1"), ("POST", "/b", "/b"), ("PUT", "/c", "/c"),
        ("GET", "/a", "/a?x=1")]
    ends = [len(GET), len(GET + POST), len(GET + POST + CHUNKED), len(data)]
    assert [r.end for r in reqs] == ends


@pytest.mark.parametrize("tail", [POST[:-1], CHUNKED[:-3], b"\x16\x03\x01 tls",
                                  b"GET / HTTP/2\r\n\r\n"])
def test_frame_requests_stops_at_a_partial_or_foreign_request(tail: bytes) -> None:
    reqs, whole = frame_requests(GET + tail)
    assert not whole
    assert [r.end for r in reqs] == [len(GET)]


def test_looks_like_http() -> None:
    assert looks_like_http(GET)
    assert not looks_like_http(b"SSH-2.0-OpenSSH\r\n")
    assert looks_like_http(b"xx" + GET, 2)


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",  # answer to HEAD: no body
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nboom\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nX: y\r\n\r\nuntil the end",
]
METHODS = ["GET", "POST", "HEAD", "GET", "GET", "GET", "GET"]
EXPECT = [(200, b"abc"), (201, b""), (200, b""), (204, b""), (304, b""), (500, b"boom"),
          (200, b"until the end")]


@pytest.mark.parametrize("piece", [1, 2, 7, 1000])
def test_response_parser_in_every_split(piece: int) -> None:
    data = b"".join(RESPONSES)
    parser = ResponseParser(METHODS)
    got = []
    for i in range(0, len(data), piece):
        got += parser.feed(data[i : i + piece])
    last = parser.close()
    assert last is not None
    got.append(last)
    assert [(r.status, r.body) for r in got] == EXPECT
    assert parser.count == len(EXPECT)
    assert got[0].headers() == {"content-length": "3"}


def test_response_parser_without_bodies_and_broken_input() -> None:
    parser = ResponseParser(keep_bodies=False)
    [resp] = parser.feed(RESPONSES[0])
    assert (resp.status, resp.body) == (200, b"")
    assert parser.feed(b"garbage\r\n\r\n") == []
    assert parser.broken.startswith("not an HTTP/1.x response")
    assert parser.feed(RESPONSES[0]) == []


def test_response_cut_short_is_not_complete() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc") == []
    assert parser.pending
    assert parser.close() is None


def test_switching_protocols_ends_http() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x05hello") == []
    assert "101" in parser.broken
