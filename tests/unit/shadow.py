"""Loopback shadow targets for forwarding tests (test helper): real sockets, 127.0.0.1/::1 only."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator


class Shadow:
    """A TCP server on loopback. Per accepted connection it records the client's address
    (``peers``) and, with ``read``, everything it sent (``received``, at EOF) and when its EOF
    came (``eof_at``, monotonic). Without ``read`` it accepts and never reads. With ``pace``
    it reads slowly: at most ``chunk`` bytes, then a pause of ``pace`` seconds."""

    def __init__(self, host: str = "127.0.0.1", read: bool = True,
                 rcvbuf: int | None = None, port: int = 0, pace: float = 0.0,
                 chunk: int = 65536) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # inherited by accepted connections
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((host, port))
        self.sock.listen(64)
        port = self.sock.getsockname()[1]
        self.addr = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self.read = read
        self.pace = pace
        self.chunk = chunk
        self.peers: list[tuple[str, int]] = []
        self.received: list[bytes] = []
        self.eof_at: list[float] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append((peer[0], peer[1]))
            self._conns.append(conn)
            if self.read:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(self.chunk):
                data += chunk
                if self.pace:
                    time.sleep(self.pace)
        self.eof_at.append(time.monotonic())
        self.received.append(data)
        conn.close()

    def read_late(self, index: int = 0) -> int:
        """Read accepted connection ``index`` (one not read so far) until its end or a reset;
        the number of bytes it got."""
        n = 0
        with contextlib.suppress(OSError):
            while chunk := self._conns[index].recv(65536):
                n += len(chunk)
        return n

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept (close alone would not)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self._conns:
            conn.close()


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """``host:port`` on loopback whose SYNs are never answered: a listener (backlog 0) whose
    accept queue one never-accepted connection already fills, so the kernel drops new SYNs."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        with socket.create_connection(srv.getsockname()):
            yield f"127.0.0.1:{srv.getsockname()[1]}"


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def wait_until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``cond`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
