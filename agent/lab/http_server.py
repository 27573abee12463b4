"""A keep-alive HTTP/1.1 server for the lab: any method, reads the body, answers briefly.

usage: http_server.py HOST PORT [LOG]  — LOG, if given, gets one line per request:
``METHOD PATH BODY_LEN HEADER_NAMES`` (used to count what a shadow received).
"""

from __future__ import annotations

import socket
import sys
from typing import TextIO
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_file: TextIO | None = None

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.log_file is not None:
            names = ",".join(f"{k}={v}" for k, v in self.headers.items()
                             if k.lower().startswith("x-"))
            self.log_file.write(f"{self.command} {self.path} {len(body)} {names}\n")
            self.log_file.flush()
        reply = f"ok {self.command} {self.path} {len(body)}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3:
        Handler.log_file = open(sys.argv[3], "a")  # noqa: SIM115
    if ":" in host:
        Server.address_family = socket.AF_INET6
    Server((host, port), Handler).serve_forever()
