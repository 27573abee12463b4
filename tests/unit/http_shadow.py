"""A loopback HTTP/1.1 shadow for request-mode forwarding tests (test helper): real sockets on
127.0.0.1, a thread per connection, keep-alive. What it does with a request is named by the
first segment of its path:

``/ok/...`` (or anything else) answer 200 with a Content-Length body; ``/chunked/`` a chunked
body with a trailer; ``/continue/`` a ``100 Continue`` first; ``/nocontent/`` 204;
``/close/`` answer with ``Connection: close`` and close; ``/toclose/`` a body without length,
read to the close; ``/slow/`` answer after 0.2 s; ``/reset/`` reset the connection without an
answer; ``/silent/`` never answer; ``/bad/`` answer with bytes that are no HTTP.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

from agent.sinks.http_request import Request, RequestFramer


class HttpShadow:
    """The server; ``log`` holds every request it read (bytes as received, in order),
    ``connections`` how many connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.log: list[bytes] = []
        self.connections = 0
        self.lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def paths(self) -> list[str]:
        """The request-target of every request read, in order."""
        with self.lock:
            return [r.split(b" ", 2)[1].decode() for r in self.log]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        framer = RequestFramer()
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                for item in framer.feed(data):
                    if isinstance(item, Request):
                        with self.lock:
                            self.log.append(item.data)
                        if not _answer(conn, item.data):
                            return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()


def _answer(conn: socket.socket, request: bytes) -> bool:
    """Answer ``request`` as its path says; False once the connection is to end."""
    method, path = request.split(b" ", 2)[:2]
    kind = path.split(b"/")[1] if path.count(b"/") > 1 else b"ok"
    body = b"answer to " + path + b"\n"
    if kind == b"slow":
        time.sleep(0.2)
    if kind == b"reset":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False
    if kind == b"silent":
        return True  # reads on, never answers
    if kind == b"bad":
        conn.sendall(b"SSH-2.0-not-http\r\n\r\n")
        return True
    if kind == b"chunked":
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\nX-T: 1\r\n\r\n")
        return True
    if kind == b"nocontent":
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True
    if kind == b"toclose":
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body * 3)
        return False
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    if kind == b"continue":
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if kind == b"close":
        head += b"Connection: close\r\n"
    conn.sendall(head + b"\r\n" + (b"" if method == b"HEAD" else body))
    return kind != b"close"
