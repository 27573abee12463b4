"""The benchmark shadow counts each request line once, however the stream is split.

It counts request lines at line starts, so a request right after a body that does not end
in a newline is not counted: fine for wrk's GETs, which is what it is for."""

from __future__ import annotations

from lab.count_shadow import _Counter

STREAM = (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\n\r\n"
          b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhell\n"
          b"OPTIONS * HTTP/1.1\r\n\r\n")


def test_count_shadow_counts_request_lines_under_every_two_splits() -> None:
    for i in range(len(STREAM) + 1):
        for j in range(i, len(STREAM) + 1):
            _Counter.total = 0
            c = _Counter()
            for part in (STREAM[:i], STREAM[i:j], STREAM[j:]):
                c.data_received(part)
            assert _Counter.total == 4, (i, j)
