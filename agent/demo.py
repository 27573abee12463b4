"""``make demo``: mirror the bundled capture into a shadow HTTP server started here.

The capture (``agent/data/demo.pcap``) holds 61 real HTTP/1.1 requests over 7 keep-alive
connections to port 8080, one with credentials. The demo replays it through the same pipeline
``mirror-agent offline`` uses, forwards client→service bytes to a shadow on loopback with an
``X-Mirror: 1`` header injected, records them with ``Authorization``/``Cookie`` redacted, and
prints what the shadow received next to what the capture held.
"""

from __future__ import annotations

import io
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agent.capture.pcapfile import PcapFileSource
from agent.config import MirrorConfig
from agent.hooks import OnlyToObserved
from agent.http_hooks import InjectHeader, RedactHeaders
from agent.logsetup import configure_logging
from agent.mirror import TrafficMirror
from agent.sinks.record import NativeReader
from agent.summary import format_summary

CAPTURE = Path(__file__).parent / "data" / "demo.pcap"


class _Shadow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, int, str]] = []
    lock = threading.Lock()

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            self.seen.append((self.command, self.path, len(body),
                              self.headers.get("X-Mirror", "")))
        self.send_response(204)
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    configure_logging("warning")
    shadow = ThreadingHTTPServer(("127.0.0.1", 0), _Shadow)
    shadow.daemon_threads = True
    threading.Thread(target=shadow.serve_forever, daemon=True).start()
    port = shadow.server_address[1]
    recording = io.BytesIO()
    mirror = TrafficMirror(MirrorConfig(
        observed_port=8080,
        target_addr=f"127.0.0.1:{port}",
        writer=recording,
        forward_hook=[OnlyToObserved(), InjectHeader("X-Mirror", "1")],
        record_hook=[OnlyToObserved(), RedactHeaders()],
    ))
    print(f"replaying {CAPTURE.name} (service port 8080) into a shadow at 127.0.0.1:{port} ...")
    mirror.run(PcapFileSource([CAPTURE]))
    shadow.shutdown()
    recording.seek(0)
    records = [r for r in NativeReader(recording) if r.kind == "chunk"]
    requests_in_capture = sum(r.data.count(b" HTTP/1.1\r\n") for r in records)
    stats = mirror.stats()
    print(format_summary(stats), end="")
    tagged = sum(1 for s in _Shadow.seen if s[3] == "1")
    print(f"\nconnections in the capture:  {stats['reassembly_flows_opened']}")
    print(f"requests in the capture:     {requests_in_capture}")
    print(f"requests the shadow got:     {len(_Shadow.seen)} ({tagged} with X-Mirror: 1)")
    redacted = [r for r in records if b"[REDACTED]" in r.data]
    if redacted:
        line = next(x for x in redacted[0].data.split(b"\r\n") if b"[REDACTED]" in x)
        print(f"recorded with credentials redacted, e.g.: {line.decode()}")
    ok = len(_Shadow.seen) == requests_in_capture == tagged
    print("result: " + ("every request mirrored" if ok else "MISMATCH"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
