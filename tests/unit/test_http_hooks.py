"""Header injection and redaction on HTTP/1.x request streams, split any way."""

from __future__ import annotations

import random

from agent.hooks import HookPipeline, KeepAll
from agent.hooks.http import InjectHeader, RedactHeaders
from agent.model import Direction, TrafficChunk

STREAM = (
    b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 25\r\nCookie: s=1\r\n\r\n"
    b"body with \r\n\r\n inside it!"
    b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1a;ext=1\r\n\r\n\r\nGET /fake HTTP/1.1\r\n\r\n\r\n0\r\nTrailer: v\r\n\r\n"
    b"GET /d HTTP/1.0\r\nauthorization:basic xyz\r\n\r\n"
)


def chunks_of(data: bytes, rng: random.Random, gap_at: int = -1) -> list[TrafficChunk]:
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, 40)
        out.append(TrafficChunk(data[pos:pos + n], "192.0.2.1:1", "192.0.2.2:80",
                                Direction.TO_OBSERVED, 0.0, 1))
        pos += n
    return out


def run(hook: object, chunks: list[TrafficChunk]) -> bytes:
    p = HookPipeline([hook])  # type: ignore[list-item]
    out = b""
    for c in chunks:
        data, keep = p.handle(c)
        assert keep
        out += data
    return out + p.flow_end(chunks[-1])


def test_inject_header_any_split() -> None:
    for seed in range(50):
        got = run(InjectHeader("X-Mirror", "1"), chunks_of(STREAM, random.Random(seed)))
        assert got.count(b"X-Mirror: 1\r\n") == 4  # four real requests, not the body's fake
        assert b"GET /fake HTTP/1.1\r\n\r\n" in got  # chunked body untouched
        assert got.replace(b"X-Mirror: 1\r\n", b"") == STREAM


def test_redact_any_split() -> None:
    for seed in range(50):
        hook = RedactHeaders()
        got = run(hook, chunks_of(STREAM, random.Random(seed)))
        assert b"t0ken" not in got and b"s=1" not in got and b"xyz" not in got
        assert got.count(b"[REDACTED]") == 3
        assert b"body with \r\n\r\n inside it!" in got


def test_non_http_passes_through_untouched() -> None:
    data = b"\x16\x03\x01\x02\x00binary tls hello" * 10
    assert run(InjectHeader("X-A", "b"), chunks_of(data, random.Random(1))) == data


def test_held_partial_header_is_released_at_flow_end() -> None:
    partial = b"GET /x HTTP/1.1\r\nHost: y\r\n"
    c = TrafficChunk(partial, "a", "b", Direction.TO_OBSERVED, 0.0, 7)
    p = HookPipeline([InjectHeader("X-A", "1")])
    assert p.handle(c) == (b"", True)
    assert p.flow_end(c) == partial


def test_oversize_header_block_is_passed_through() -> None:
    data = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000
    c = TrafficChunk(data, "a", "b", Direction.TO_OBSERVED, 0.0, 1)
    assert InjectHeader("X-A", "1", max_head=1000).handle(c) == (data, True)


def test_resync_after_gap() -> None:
    hook = InjectHeader("X-A", "1")
    a = TrafficChunk(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123", "a", "b",
                     Direction.TO_OBSERVED, 0.0, 1)
    b = TrafficChunk(b"GET /next HTTP/1.1\r\n\r\n", "a", "b", Direction.TO_OBSERVED, 0.0, 1,
                     gap_bytes=96)
    hook.handle(a)
    assert hook.handle(b)[0] == b"GET /next HTTP/1.1\r\nX-A: 1\r\n\r\n"


def test_other_directions_untouched() -> None:
    c = TrafficChunk(b"HTTP/1.1 200 OK\r\n\r\n", "b", "a", Direction.FROM_OBSERVED, 0.0, 1)
    assert HookPipeline([KeepAll(), InjectHeader("X-A", "1")]).handle(c) == (c.data, True)
