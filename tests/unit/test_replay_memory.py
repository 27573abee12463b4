"""``replay`` streams the recording with bounded memory (issue 19, finding 1): it is read
while it replays, what is read ahead stays within a window, and records of connections that
wait for a slot go to a temporary file. Before, the whole recording was read into memory
first: a 300 MB recording took the process to 337 MB."""

from __future__ import annotations

import contextlib
import json
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.model import Direction, FlowEnd, TrafficChunk
from agent.sinks.record import NativeWriter
from tests.unit.replay_util import http_items
from tests.unit.test_replay_runner import Server, client_streams, conns_of, replay

BODY = 64 << 10
CONNS, REQUESTS = 46, 100  # 4,600 requests of 64 KiB: 302 MB recorded


def write_big(path: Path) -> int:
    """A recording of CONNS keep-alive connections taking turns (as a busy service's do),
    each REQUESTS POSTs of BODY bytes answered 200, then their ends; its size."""
    req = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % BODY + b"x" * BODY
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    t = 1000.0
    with path.open("wb") as f:
        w = NativeWriter(f)
        for _ in range(REQUESTS):
            for c in range(1, CONNS + 1):
                cli, srv = f"192.0.2.1:{40000 + c}", "192.0.2.2:80"
                w.write(TrafficChunk(req, cli, srv, Direction.TO_OBSERVED, t, c), req)
                w.write(TrafficChunk(resp, srv, cli, Direction.FROM_OBSERVED, t + 5e-4, c),
                        resp)
                t += 0.001
        for c in range(1, CONNS + 1):
            w.flow_end(FlowEnd(c, "fin"))
        w.flush()
    return path.stat().st_size


class _Sink(socketserver.StreamRequestHandler):
    """Reads each request (head, then its Content-Length body) and answers 200."""

    def handle(self) -> None:
        try:
            while head := self._head():
                length = next((int(line.split(b":")[1]) for line in head
                               if line.lower().startswith(b"content-length:")), 0)
                if len(self.rfile.read(length)) < length:
                    return
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass

    def _head(self) -> list[bytes]:
        lines = []
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            lines.append(line)
        return lines


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 128  # 46 connections at once (the default, 5, resets some)


@contextlib.contextmanager
def sink() -> Iterator[str]:
    srv = _Server(("127.0.0.1", 0), _Sink)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


#: Runs argv[2:] and writes its peak RSS (KiB) to argv[1]. A child's ru_maxrss also holds
#: the memory of the process it was forked from until its exec (vfork included): measured
#: from this small process, not from the test's (hundreds of MB late in a test run).
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_pid, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args: list[str], out: Path) -> tuple[int, int]:
    """Run the agent with ``args`` (stdout to ``out``); its exit status and peak RSS in
    bytes."""
    peak = out.with_suffix(".rss")
    with out.open("wb") as f:
        res = subprocess.run([sys.executable, "-c", _MEASURE, str(peak), sys.executable, "-m",
                              "agent.cli.commands", "--log-level", "warning", *args],
                             stdout=f, stderr=subprocess.PIPE, timeout=300)
    assert b"Traceback" not in res.stderr, res.stderr.decode()
    return res.returncode, int(peak.read_text()) * 1024


@pytest.mark.parametrize("connections", [64, 4])
def test_a_recording_larger_than_memory_replays_within_it(tmp_path: Path,
                                                          connections: int) -> None:
    """300 MB replayed in well under 150 MB: every connection at once (64 slots), and 4
    slots for 46 connections, whose records then wait on disk."""
    rec = tmp_path / "big.bin"
    size = write_big(rec)
    try:
        with sink() as target:
            status, peak = run_measured(
                ["replay", str(rec), "--target", target, "--speed", "max",
                 "--connections", str(connections), "--source-ports", "any",
                 "--report-json", "-"], tmp_path / "report.json")
    finally:
        rec.unlink()
    rep = json.loads((tmp_path / "report.json").read_text())
    assert status == 0, json.dumps(rep, indent=1)
    assert size > 300e6 and peak < 150 << 20, (size, peak)
    tgt, src = rep["target"], rep["source"]
    assert (src["connections"], src["requests"]) == (CONNS, CONNS * REQUESTS)
    assert src["client_bytes"] > 300e6 - CONNS * REQUESTS * 100
    assert tgt["requests_sent"] == tgt["responses"] == CONNS * REQUESTS
    assert rep["diff"]["compared"] == CONNS * REQUESTS and rep["diff"]["different_status"] == 0
    if connections < CONNS:
        assert src["spilled_bytes"] > 100e6  # the connections waiting for a slot
    print(f"peak RSS {peak / 2**20:.0f} MiB for {size / 1e6:.0f} MB ({connections} slots, "
          f"{src['spilled_bytes'] / 1e6:.0f} MB spilled)")


@pytest.mark.parametrize(("connections", "pipeline"), [(1, False), (3, True)])
def test_a_tiny_window_spills_and_every_connection_gets_its_bytes(connections: int,
                                                                  pipeline: bool) -> None:
    """A window of 4 KiB for 40 KiB of requests: connections waiting for a slot go to disk
    and come back in order, each byte where it was."""
    recs = conns_of(http_items(12, 20, paths=("/a", "/b?q=1", "/fail")))
    tally, r, srv = replay(recs, Server(), budget=4096, speed=float("inf"),
                           connections=connections, pipeline=pipeline)
    assert srv is not None
    assert sorted(bytes(b) for b in srv.received) == client_streams(recs)
    assert (tally.requests_sent, tally.responses, tally.connections_ok) == (240, 240, 12)
    assert r.feed.spill is not None and r.feed.spill.written > 0
    assert r.feed.window.used == 0 and r.feed.window.peak < 4096 + (256 << 10)


def test_a_connection_read_ahead_of_its_requests_waits_for_the_reader() -> None:
    """A long connection whose requests are spread over the recording, among many short
    ones, with one slot: nothing waits on something that waits on it."""
    items = []
    t = 100.0
    for i in range(30):
        items.append((1, True, t, f"GET /long{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode()))
        items.append((1, False, t + 0.001, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        items.append((100 + i, True, t + 0.002, b"GET /short HTTP/1.1\r\nHost: h\r\n\r\n"))
        t += 0.01
    recs = conns_of(items)
    tally, _r, srv = replay(recs, Server(), budget=2048, speed=float("inf"), connections=1)
    assert srv is not None
    assert sorted(bytes(b) for b in srv.received) == client_streams(recs)
    assert tally.responses == 60 and tally.connections_ok == 31

