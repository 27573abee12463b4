"""The control server: :class:`agent.control.api.Api` over HTTP/1.0.

Standard library only (:class:`http.server.ThreadingHTTPServer`): control traffic is a few
requests a second (scrapes, probes, an operator), so a thread per connection costs nothing
and needs no dependency or event loop next to the capture threads. What keeps a slow or
hostile client from exhausting it:

- each socket read or write waits at most ``timeout`` seconds (default 5);
- each connection lives at most ``deadline`` seconds in all (default 10): a client that
  trickles its request a byte at a time is cut off (checked every ``poll`` seconds);
- at most ``max_connections`` (default 16) are served at once; the next one gets an
  immediate 503 and is closed, without a thread;
- the body is at most 64 KiB (413, decided on ``Content-Length`` before reading it);
- one request per connection (HTTP/1.0, ``Connection: close``).

Binding: loopback by default. Any other address (``0.0.0.0`` included) needs a token: without
one the constructor raises ValueError (the CLI exits 2 with its message).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from agent.control.api import Api, Request, Response, error

__all__ = ["ControlServer", "is_loopback", "parse_listen", "read_token"]

log = structlog.get_logger("agent.control")

_BUSY_BODY = b'{"error": "too many control connections"}\n'
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Connection: close\r\nRetry-After: 1\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback) → (IP, port). HOST is an IP
    address or ``localhost``; ValueError (one line) otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {text!r}: expected HOST:PORT or [IPv6]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen address {text!r}: put an IPv6 address in brackets, "
                         "[::1]:PORT")
    if host in ("", "localhost"):
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"listen address {text!r}: {host!r} is not an IP address") from None
    return host, int(port)


def read_token(path: str) -> str:
    """The bearer token in file ``path`` (surrounding whitespace stripped); ValueError (one
    line) if it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"control token file {path}: {getattr(e, 'strerror', None) or e}"
                         ) from None
    if not token:
        raise ValueError(f"control token file {path} is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"control token file {path}: the token must be one word")
    return token


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ::ffff:127.x; False for anything else, wildcards
    (``0.0.0.0``, ``::``) included."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class ControlServer:
    """Serves ``api`` on ``host``:``port`` (0: any free port) from a thread of its own.

    Raises ValueError if ``host`` is not loopback and ``api`` has no token, OSError if the
    address cannot be bound. :meth:`start` serves; :meth:`stop` stops and closes (in-flight
    requests finish on their own threads, within ``deadline``).
    """

    def __init__(self, api: Api, host: str = "127.0.0.1", port: int = 0, *,
                 max_connections: int = 16, timeout: float = 5.0, deadline: float = 10.0,
                 poll: float = 0.5, sample_every: float = 5.0) -> None:
        if not is_loopback(host) and api.token is None:
            raise ValueError(f"the control server may listen on {host} (not loopback) only "
                             "with a token file")
        self.api = api
        self._httpd = _Server((host, port), api, max_connections, timeout, deadline,
                              sample_every)
        self._poll = poll
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The address bound (the real port when 0 was asked)."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(self._poll,),
                                        name="control-server", daemon=True)
        self._thread.start()
        log.info("control server listening", url=self.url, auth=self.api.token is not None)

    def stop(self) -> None:
        """Stop accepting, close the listening socket. Idempotent."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], api: Api, max_connections: int,
                 timeout: float, deadline: float, sample_every: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.api = api
        self.conn_timeout = timeout
        self._deadline = deadline
        self._slots = threading.BoundedSemaphore(max_connections)
        self._active: dict[socket.socket, float] = {}
        self._active_lock = threading.Lock()
        self._sample_every = sample_every
        self._next_sample = 0.0
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Not HTTPServer's: it asks DNS for the host's name (slow, and nothing needs it).
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            _refuse(request)
            self.shutdown_request(request)
            return
        with self._active_lock:
            self._active[request] = time.monotonic() + self._deadline
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: socket.socket) -> None:
        with self._active_lock:
            if self._active.pop(request, None) is not None:
                self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (a client gone mid-answer): one debug line, no
        traceback on stderr."""
        log.debug("control connection failed", client=str(client_address[0]),
                  exc_info=True)

    def service_actions(self) -> None:
        """Between polls: cut off connections past their deadline; sample the rates."""
        now = time.monotonic()
        with self._active_lock:
            late = [s for s, t in self._active.items() if t <= now]
        for sock in late:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns
        if now >= self._next_sample:
            self._next_sample = now + self._sample_every
            try:
                self.api.sample()
            except Exception:
                log.exception("sampling the metrics for /status rates failed")


def _refuse(sock: socket.socket) -> None:
    """The busy answer, without waiting for the client (what does not fit is lost)."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(_BUSY)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"
    server_version = "mirror-agent"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.conn_timeout)

    def _dispatch(self) -> None:
        api = self.server.api
        req = Request(self.command, self.path,
                      {k.lower(): v for k, v in self.headers.items()})
        early = api.precheck(req)
        if early is not None:
            self._send(early)
            if req.headers.get("content-length", "0").strip() not in ("", "0"):
                self._linger()
            return
        n = int(req.headers.get("content-length", "0").strip() or "0")
        body = self.rfile.read(n) if n else b""
        if len(body) < n:
            return  # the client went away (or was cut off) before sending its body
        try:
            resp = api.handle(Request(req.method, req.path, req.headers, body))
        except Exception:
            log.exception("control request failed", method=self.command, path=self.path)
            resp = error(500, "internal error (see the agent's log)")
        self._send(resp)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _send(self, resp: Response) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Connection", "close")
        for name, value in resp.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    def _linger(self) -> None:
        """After answering early: read and discard what the client still sends (a little,
        briefly), so closing does not reset the connection before it reads the answer."""
        with contextlib.suppress(OSError, ValueError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            left = 1 << 20
            while left > 0 and (chunk := self.connection.recv(65536)):
                left -= len(chunk)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long, 501) as JSON."""
        with contextlib.suppress(OSError):
            self.close_connection = True
            resp = error(code, message or self.responses.get(code, ("error",))[0])
            self.command = getattr(self, "command", None) or ""
            self.request_version = "HTTP/1.0"  # not 0.9 (a bare body) for a bad request line
            self._send(resp)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control request", client=self.client_address[0], line=format % args)
