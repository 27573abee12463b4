"""A replay stopped mid-run (SIGINT, SIGTERM, ``--duration``) counts the requests it sent
and had no answer to yet (issue 19, finding 5): every request sent is answered, unanswered
(its connection failed) or unanswered at stop, in the report and in ``--report-json``.
Before, those in flight at the stop were in no count."""

from __future__ import annotations

import contextlib
import json
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.replay_util import write_native

AGENT = [sys.executable, "-m", "agent.cli", "--log-level", "warning", "replay"]
CONNS = 3
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Stalling(socketserver.StreamRequestHandler):
    """Answers each request 200, except ``/stall``: never answered (nor anything after it
    on that connection); the server counts the requests it saw."""

    server: _Server

    def handle(self) -> None:
        stalled = False
        try:
            while line := self.rfile.readline():
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                path = line.split(b" ")[1]
                self.server.seen(path)
                stalled = stalled or path == b"/stall"
                if not stalled:
                    self.wfile.write(OK)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Stalling)
        self.requests = 0
        self._lock = threading.Lock()

    def seen(self, _path: bytes) -> None:
        with self._lock:
            self.requests += 1


@contextlib.contextmanager
def stalling() -> Iterator[_Server]:
    srv = _Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def recording(path: Path) -> None:
    """CONNS connections of GET /a, /stall, /b, each answered in the recording."""
    items = []
    t = 100.0
    for flow in range(1, CONNS + 1):
        for p in ("/a", "/stall", "/b"):
            items.append((flow, True, t, f"GET {p} HTTP/1.1\r\nHost: h\r\n\r\n".encode()))
            items.append((flow, False, t + 0.001, OK))
            t += 0.01
    write_native(path, items)


def _wait_for(srv: _Server, n: int) -> None:
    deadline = time.monotonic() + 20
    while srv.requests < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.requests == n


@pytest.mark.parametrize(("how", "pipeline"), [(signal.SIGINT, False), (signal.SIGTERM, True),
                                               (None, False)])
def test_requests_in_flight_at_the_stop_are_counted(tmp_path: Path, how: signal.Signals | None,
                                                    pipeline: bool) -> None:
    rec, report = tmp_path / "r.bin", tmp_path / "report.json"
    recording(rec)
    sent = CONNS * (3 if pipeline else 2)  # waiting: /b waits for /stall's answer
    with stalling() as srv:
        cmd = [*AGENT, str(rec), "--target", f"127.0.0.1:{srv.server_address[1]}",
               "--speed", "max", "--timeout", "60", "--source-ports", "any",
               "--report-json", str(report)]
        cmd += ["--pipeline"] if pipeline else []
        cmd += ["--duration", "2"] if how is None else []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        _wait_for(srv, sent)
        if how is not None:
            proc.send_signal(how)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == (130 if how is not None else 0), err
    tgt = json.loads(report.read_text())["target"]
    assert (tgt["requests_sent"], tgt["responses"]) == (sent, CONNS)
    assert tgt["requests_sent"] == (tgt["responses"] + tgt["unanswered_requests"]
                                    + tgt.get("unanswered_at_stop", 0))
    assert (tgt["unanswered_requests"], tgt["unanswered_at_stop"]) == (0, sent - CONNS)
    assert tgt["connections"]["stopped"] == CONNS and not tgt["connections"]["failed"]
    assert f"{sent - CONNS} request(s) sent had no response yet when the stop" in out
