"""Recordings for replay tests: native and JSON-lines files from plain (flow, direction,
time, bytes) tuples."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record import NativeWriter, chunk_json

#: (flow id, to the service?, time, bytes)
Item = tuple[int, bool, float, bytes]


def chunk(flow: int, to_service: bool, at: float, data: bytes, gap: int = 0,
          port: int = 80) -> TrafficChunk:
    cli, srv = f"192.0.2.1:{40000 + flow}", f"192.0.2.2:{port}"
    if to_service:
        return TrafficChunk(data, cli, srv, Direction.TO_OBSERVED, at, flow, gap)
    return TrafficChunk(data, srv, cli, Direction.FROM_OBSERVED, at, flow, gap)


def write_native(path: Path, items: Iterable[Item | TrafficChunk],
                 ends: Iterable[int] = ()) -> None:
    with path.open("wb") as f:
        w = NativeWriter(f)
        for it in items:
            w.write(it if isinstance(it, TrafficChunk) else chunk(*it),
                    it.data if isinstance(it, TrafficChunk) else it[3])
        for flow in ends:
            w.flow_end(FlowEnd(flow, "fin"))
        w.flush()


def write_jsonl(path: Path, items: Iterable[Item]) -> None:
    with path.open("w") as f:
        for it in items:
            c = chunk(*it)
            f.write(json.dumps(chunk_json(c, c.data)) + "\n")


def http_items(flows: int, requests: int, paths: Iterable[str] = ("/a",),
               answered: bool = True, step: float = 0.01) -> list[Item]:
    """``flows`` keep-alive connections of ``requests`` GETs each (paths in turn), each
    answered 200 before the next if ``answered``."""
    items: list[Item] = []
    names = list(paths)
    t = 100.0
    for f in range(1, flows + 1):
        for i in range(requests):
            path = names[i % len(names)]
            items.append((f, True, t, f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode()))
            t += step
            if answered:
                items.append((f, False, t, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
                t += step
    return items
