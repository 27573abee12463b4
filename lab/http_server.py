"""A keep-alive HTTP/1.1 server for the lab: any method, reads the body, answers briefly.

usage: http_server.py HOST PORT [LOG]  — LOG, if given, gets one line per request:
``METHOD PATH BODY_LEN DIGEST X-HEADERS``, DIGEST a hash of the request line, headers and
body as received (so a service's and a shadow's logs can be compared request for request).
"""

from __future__ import annotations

import hashlib
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_file: TextIO | None = None

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.log_file is not None:
            names = ",".join(f"{k}={v}" for k, v in self.headers.items()
                             if k.lower().startswith("x-"))
            digest = hashlib.sha256((self.requestline + str(self.headers)).encode("latin-1")
                                    + body).hexdigest()[:16]
            self.log_file.write(f"{self.command} {self.path} {len(body)} {digest} {names}\n")
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
