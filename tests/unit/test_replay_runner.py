"""Replaying to real loopback servers (agent.replay.runner, agent.replay.driver): bytes per
connection, pacing, concurrency, failures counted per connection, stopping."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Sequence

from agent.replay.assemble import assemble
from agent.replay.diff import Differ
from agent.replay.feed import WINDOW, Feed
from agent.replay.http import frame_requests
from agent.replay.report import Tally
from agent.replay.runner import Plan, Replayer
from agent.replay.spill import Spill
from agent.sinks.record import RecordedChunk
from tests.unit.replay_util import Item, chunk, http_items


def conns_of(items: Sequence[Item]) -> list[RecordedChunk]:
    """The records of ``items`` (what a replay reads)."""
    recs = []
    for it in items:
        c = chunk(*it)
        recs.append(RecordedChunk("chunk", it[0], c.direction, it[2], 0, c.from_addr,
                                  c.to_addr, it[3]))
    return recs


def client_streams(recs: Sequence[RecordedChunk]) -> list[bytes]:
    """Every connection's client bytes, sorted."""
    return sorted(b"".join(b.data for b in c.bursts) for c in assemble(recs)[0])


class Server:
    """An HTTP/1.1 server on loopback that keeps every connection's bytes; ``/fail``
    answers 500; ``reset_after`` requests, it resets the connection; ``silent``: never
    answers."""

    def __init__(self, reset_after: int = 0, silent: bool = False) -> None:
        self.received: list[bytearray] = []
        self.active = self.peak = 0
        self._reset_after = reset_after
        self._silent = silent

    async def start(self) -> str:
        self._srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self._srv.sockets[0].getsockname()[1]}"

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.received.append(buf)
        self.active += 1
        self.peak = max(self.peak, self.active)
        answered = 0
        try:
            while data := await r.read(65536):
                buf += data
                reqs, _ = frame_requests(bytes(buf))
                for req in reqs[answered:]:
                    answered += 1
                    if self._reset_after and answered > self._reset_after:
                        sock = w.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        w.transport.abort()
                        return
                    if not self._silent:
                        fail = req.path == "/fail"
                        w.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops" if fail
                                else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except ConnectionError:
            pass
        finally:
            self.active -= 1
            w.close()

    def close(self) -> None:
        self._srv.close()


def replay(recs: Sequence[RecordedChunk], server: Server | None, *, differ: Differ | None = None,
           budget: int | None = None, **plan: object) -> tuple[Tally, Replayer, Server | None]:
    async def main() -> tuple[Tally, Replayer]:
        target = await server.start() if server else "127.0.0.1:1"
        tally = Tally(target)
        p = Plan(target=target, **plan)  # type: ignore[arg-type]
        spill = Spill()
        feed = Feed(lambda: iter(recs), p.speed, p.max_wait, budget or WINDOW, spill)
        r = Replayer(feed, p, tally, None, differ)
        try:
            await r.run()
        finally:
            spill.close()
        if server:
            server.close()
        return tally, r

    tally, r = asyncio.run(main())
    return tally, r, server


def test_every_connection_gets_exactly_its_client_bytes() -> None:
    conns = conns_of(http_items(12, 20, paths=("/a", "/b?q=1", "/fail")))
    for plan in ({"pipeline": False}, {"pipeline": True, "source_ports": (62000, 62999)}):
        tally, _r, srv = replay(conns, Server(), speed=float("inf"), connections=4, **plan)
        assert srv is not None
        assert sorted(bytes(b) for b in srv.received) == client_streams(conns)
        assert (tally.requests_sent, tally.responses, tally.connections_ok) == (240, 240, 12)
        assert tally.status == {200: 168, 500: 72}
        assert srv.peak <= 4


def test_diff_names_the_broken_path() -> None:
    differ = Differ()
    conns = conns_of(http_items(3, 9, paths=("/a", "/fail", "/c")))
    replay(conns, Server(), differ=differ, speed=float("inf"))
    s = differ.summary(production=True)
    assert (s["compared"], s["different_status"]) == (27, 9)
    assert [p["path"] for p in s["paths"]] == ["GET /fail"]


def test_recorded_pacing_speed_and_max_wait() -> None:
    items = http_items(1, 4, answered=False, step=0.1)  # 0.3 s from first to last
    items.append((1, True, 105.0, b"GET /late HTTP/1.1\r\nHost: h\r\n\r\n"))  # after 4.7 s
    conns = conns_of(items)
    for speed, max_wait, low, high in ((2.0, 0.2, 0.25, 0.6), (float("inf"), None, 0.0, 0.2)):
        began = time.monotonic()
        tally, _r, _s = replay(conns, Server(), speed=speed, max_wait=max_wait)
        took = time.monotonic() - began
        assert tally.responses == 5
        assert low <= took <= high, (speed, took)


def test_refused_target_counts_each_connection() -> None:
    tally, r, _ = replay(conns_of(http_items(5, 2)), None, speed=float("inf"),
                         source_ports=None)
    assert tally.failed == {"refused": 5}
    assert tally.connections_ok == 0 and not r.interrupted


def test_reset_and_silence_are_counted_not_raised() -> None:
    conns = conns_of(http_items(3, 4))
    tally, _r, _s = replay(conns, Server(reset_after=2), speed=float("inf"))
    assert tally.failed == {"reset": 3}
    assert tally.responses == 6 and tally.unanswered == 3
    tally, _r, _s = replay(conns, Server(silent=True), speed=float("inf"), timeout=0.3)
    assert tally.failed == {"timeout": 3}


def test_loop_until_duration() -> None:
    conns = conns_of(http_items(2, 3, answered=False, step=0.05))
    began = time.monotonic()
    tally, r, _ = replay(conns, Server(), loop=True, duration=0.6)
    assert 0.55 <= time.monotonic() - began < 2
    assert tally.connections_ok >= 4  # several passes of 0.25 s
    assert not r.interrupted and not tally.failed


def test_non_http_bytes_are_sent_and_end_quietly() -> None:
    items = [(1, True, 1.0, b"\x00binary"), (1, True, 1.01, b"\x01more")]
    tally, _r, srv = replay(conns_of(items), Server(), speed=float("inf"))
    assert srv is not None and [bytes(b) for b in srv.received] == [b"\x00binary\x01more"]
    assert tally.connections_ok == 1 and tally.bytes_sent == 12
