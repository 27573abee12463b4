"""The control server: :class:`agent.control.api.Api` over HTTP/1.0, on an asyncio event loop
in a thread of its own, so that ``/healthz`` and ``/readyz`` are answered within a second
whatever other clients do.

Standard library only (:mod:`asyncio` protocols, no task per connection): an idle or slow
connection is a transport, a small object and a timer check, not a thread, so thousands cost
a few MiB (:mod:`agent.control.admission` has the arithmetic). What keeps clients from
starving the probes:

- the request head (at most 8 KiB) must arrive within ``head_timeout`` seconds of connecting
  and the body (at most 64 KiB) within ``body_timeout`` of the head; the whole connection
  lives at most ``deadline`` seconds (checked every ``poll``); then it is closed unanswered;
- each client address (an IPv6 /64) holds at most ``per_address`` connections and all of
  them at most ``max_connections``; at a cap the oldest connection not being answered gives
  way to the newcomer, so no set of held connections can keep a probe out;
- the probe routes are answered on the loop itself; every other route (``/metrics``
  rendering, ``POST /pcap``, ``PUT /ports``, ``/status``) on one of ``workers`` threads, at
  most 64 queued (then 503), so a slow render never delays a probe;
- one request per connection (HTTP/1.0, ``Connection: close``).

Binding: loopback by default. Any other address (``0.0.0.0`` included) needs a token: without
one the constructor raises ValueError (the CLI exits 2 with its message).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from typing import Any

import structlog

from agent.control.admission import PER_ADDRESS, Admission, default_max_connections
from agent.control.api import Api, check_token
from agent.control.conn import Conn, Hub, Limits
from agent.control.workers import DaemonPool

__all__ = ["ControlServer", "is_loopback", "parse_listen", "read_token"]

log = structlog.get_logger("agent.control")

#: Connections the kernel queues for accept (and the loop accepts per turn); Linux caps it
#: at net.core.somaxconn (4096).
BACKLOG = 1024


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
    line naming the file) if it cannot be read, is empty, or is not one word of printable
    ASCII (:func:`agent.control.api.check_token`)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"control token file {path}: {getattr(e, 'strerror', None) or e}"
                         ) from None
    if not token:
        raise ValueError(f"control token file {path} is empty")
    why = check_token(token)
    if why is not None:
        raise ValueError(f"control token file {path}: {why}")
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
    address cannot be bound (it is bound and listening on return). :meth:`start` serves;
    :meth:`stop` closes every connection and the listener (a request running on a worker
    thread finishes there, unanswered). ``max_connections`` None: see
    :func:`~agent.control.admission.default_max_connections`.
    """

    def __init__(self, api: Api, host: str = "127.0.0.1", port: int = 0, *,
                 max_connections: int | None = None, per_address: int = PER_ADDRESS,
                 head_timeout: float = 5.0, body_timeout: float = 5.0,
                 deadline: float = 10.0, poll: float = 0.25, sample_every: float = 5.0,
                 workers: int = 4) -> None:
        if not is_loopback(host) and api.token is None:
            raise ValueError(f"the control server may listen on {host} (not loopback) only "
                             "with a token file")
        self.api = api
        self.limits = Limits(head_timeout=head_timeout, body_timeout=body_timeout,
                             deadline=deadline)
        self.admission = Admission(max_connections or default_max_connections(),
                                   per_address)
        self._poll = poll
        self._sample_every = sample_every
        self._workers = workers
        self._sock = _listen(host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._hub: Hub | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._sampling = False
        self._next_sample = 0.0
        self._next_log = 0.0
        self._shed_logged: dict[str, int] = {}

    @property
    def address(self) -> tuple[str, int]:
        """The address bound (the real port when 0 was asked)."""
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stats(self) -> dict[str, int]:
        """Connections held now (``open``) and, since start, connections closed or refused
        by a limit, by reason (read from any thread; a moment's view)."""
        hub = self._hub
        out = {"open": len(self.admission), **self.admission.counts}
        return out | dict(hub.counts) if hub is not None else out

    def start(self) -> None:
        """Serve from a new thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the control server is already started")
        loop = self._loop = asyncio.new_event_loop()
        pool = DaemonPool(self._workers, "control-worker")
        self._hub = Hub(self.api, self.limits, self.admission, pool)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(loop, ready),
                                        name="control-server", daemon=True)
        self._thread.start()
        ready.wait()
        if self._server is None:
            raise RuntimeError("the control server's event loop did not start (see the log)")
        log.info("control server listening", url=self.url, auth=self.api.token is not None,
                 max_connections=self.admission.max_connections,
                 per_address=self.admission.per_address)

    def stop(self) -> None:
        """Stop accepting, close every connection and the listening socket. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(self._shutdown)
            thread.join()
        if self._hub is not None:
            self._hub.pool.shutdown(wait=False, cancel_futures=True)
        self._sock.close()

    # ------------------------------------------------------------ the loop thread

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_loop_error)
        try:
            hub = self._hub
            assert hub is not None
            self._server = loop.run_until_complete(loop.create_server(
                lambda: Conn(hub, loop), sock=self._sock, backlog=BACKLOG))
            loop.call_soon(self._tick)
            ready.set()
            loop.run_forever()
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def _tick(self) -> None:
        """Every ``poll`` seconds: close connections past their time; sample the rates
        (on a worker thread) every ``sample_every``; log what the limits shed."""
        loop, hub = self._loop, self._hub
        assert loop is not None and hub is not None
        self._ticker = loop.call_later(self._poll, self._tick)
        now = loop.time()
        try:
            hub.sweep(now)
            if not self._sampling and now >= self._next_sample:
                self._next_sample = now + self._sample_every
                self._sampling = True
                loop.run_in_executor(hub.pool, self._sample).add_done_callback(
                    lambda _f: setattr(self, "_sampling", False))
            if now >= self._next_log:
                self._next_log = now + 10.0
                self._log_shed()
        except Exception:
            log.exception("control server housekeeping failed")

    def _sample(self) -> None:
        try:
            self.api.sample()
        except Exception:
            log.exception("sampling the metrics for /status rates failed")

    def _log_shed(self) -> None:
        """One warning per 10 s at most with the connections limits closed or refused."""
        now = self.stats()
        now.pop("open")
        new = {k: v - self._shed_logged.get(k, 0) for k, v in now.items()
               if v > self._shed_logged.get(k, 0)}
        if new:
            self._shed_logged = now
            log.warning("control connections closed or refused by a limit", **new,
                        open=len(self.admission))

    def _shutdown(self) -> None:
        assert self._loop is not None
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for conn in self.admission:
            conn.shed()
        self._loop.call_soon(self._loop.stop)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (address reuse on, as http.server had)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An exception in a connection's callback: one line, the connection is closed."""
    exc = context.get("exception")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        log.debug("control connection failed", error=str(exc))
        return
    log.error("control server error", message=context.get("message"),
              error=repr(exc) if exc else None)
    with contextlib.suppress(Exception):
        transport = context.get("transport")
        if transport is not None:
            transport.abort()
