"""Connection churn: one new TCP connection per HTTP/1.1 request (``Connection: close``).

``--workers`` processes (default 4) share a total rate of new connections a second
(``--rate``) for ``--duration`` seconds, open loop: each worker starts its connections on a
fixed schedule (catching up at once when behind), with up to ``--max-inflight`` of its own
in flight, on non-blocking sockets and one epoll each. ``--rate 0`` is closed loop instead:
each worker keeps ``--concurrency`` connections busy for the duration, i.e. the most the
client and the server manage together (this client's own maximum when the server is fast).

Request ``k`` of worker ``w`` is ``GET /churn/<w>/<k>`` (``--tag T``: ``/churn/T/<w>/<k>``), so
a shadow's access log can be matched exactly; ``--body-bytes N`` sends a POST with an N-byte
body instead. A request is ``ok`` when the response was read to the server's close and is a
200 whose body has its Content-Length. Every connection ends ok or failed (with its reason:
``connect`` errno name, ``timeout`` after ``--timeout`` s, ``reset``, ``bad_response``,
``not_sent`` when the run ended before its start time).

Prints one JSON line: attempted, ok, failed, failed_by_reason, elapsed, achieved_rate
(connections started a second of the sending time), ok_rate, p50_ms/p99_ms/max_ms (connect
to close, ok requests), late_ms_p99 (how far behind schedule starts were), behind (starts more
than 10 ms late). ``--ok-file PATH``: the paths of the ok requests, one a line.

usage: python -m lab.churn_client HOST PORT [--rate 1000] [--duration 10]
       [--workers 4] [--max-inflight 2000] [--timeout 5] [--concurrency 16]
       [--tag T] [--body-bytes N] [--ok-file PATH]
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import json
import multiprocessing as mp
import resource
import select
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["main", "run"]

_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
_OUT = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
#: Hard bounds, whatever the flags say.
_MAX_RATE, _MAX_DURATION, _MAX_WORKERS = 200_000, 3_600.0, 64


@dataclass
class _Conn:
    sock: socket.socket
    path: str
    started: float
    request: bytes
    sent: int = 0
    connected: bool = False
    response: bytearray = field(default_factory=bytearray)


@dataclass
class _Plan:
    host: str
    port: int
    rate: float  # this worker's connections/s; 0: closed loop
    count: int  # at most this many connections
    offset: float  # first start, seconds after t0
    duration: float
    max_inflight: int
    timeout: float
    tag: str
    body: bytes
    keep_paths: bool


def _request(host: str, path: str, body: bytes) -> bytes:
    if not body:
        return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: churn\r\n"
                f"Connection: close\r\n\r\n").encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: churn\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    return head + body


def _complete(resp: bytes | bytearray) -> bool:
    """A 200 with its whole Content-Length body (the server closed after it)."""
    head, sep, body = bytes(resp).partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.") or head[9:12] != b"200":
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) == int(value.strip())
    return True  # no length: delimited by the close we saw


class _Worker:
    def __init__(self, wid: int, plan: _Plan) -> None:
        self.wid, self.plan = wid, plan
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.failed: Counter[str] = Counter()
        self.lat = array.array("d")  # seconds, ok requests
        self.late = array.array("d")  # seconds behind schedule at start
        self.ok_paths: list[str] = []
        self.attempted = self.ok = 0
        self.peak = 0
        self.last_start = 0.0

    # ---------------------------------------------------------------- one connection

    def start(self, seq: int, now: float) -> None:
        p = self.plan
        path = f"/churn/{p.tag + '/' if p.tag else ''}{self.wid}/{seq}"
        self.attempted += 1
        self.last_start = now
        try:
            s = socket.socket(socket.AF_INET6 if ":" in p.host else socket.AF_INET,
                              socket.SOCK_STREAM)
        except OSError as e:
            self.failed[f"socket_{errno.errorcode.get(e.errno or 0, 'error')}"] += 1
            return
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = s.connect_ex((p.host, p.port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            self.failed[f"connect_{errno.errorcode.get(rc, str(rc))}"] += 1
            return
        c = _Conn(s, path, now, _request(p.host, path, p.body))
        self.conns[s.fileno()] = c
        self.ep.register(s.fileno(), _OUT)
        self.peak = max(self.peak, len(self.conns))

    def finish(self, fd: int, why: str | None, now: float) -> None:
        c = self.conns.pop(fd)
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
        c.sock.close()
        if why is None and _complete(c.response):
            self.ok += 1
            self.lat.append(now - c.started)
            if self.plan.keep_paths:
                self.ok_paths.append(c.path)
        else:
            self.failed[why or "bad_response"] += 1

    def event(self, fd: int, ev: int, now: float) -> None:
        c = self.conns[fd]
        if not c.connected:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.finish(fd, f"connect_{errno.errorcode.get(err, str(err))}", now)
                return
            c.connected = True
        if c.sent < len(c.request):
            try:
                c.sent += c.sock.send(c.request[c.sent:])
            except BlockingIOError:
                return
            except OSError:
                self.finish(fd, "reset", now)
                return
            if c.sent == len(c.request):
                self.ep.modify(fd, _IN)
            return
        while True:
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                self.finish(fd, "reset", now)
                return
            if not data:
                self.finish(fd, None, now)
                return
            c.response += data

    def expire(self, now: float) -> None:
        limit = now - self.plan.timeout
        for fd in [fd for fd, c in self.conns.items() if c.started < limit]:
            self.finish(fd, "timeout", now)

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        p = self.plan
        t0 = time.monotonic()
        end_send = t0 + p.duration
        # Open loop: starts already due may catch up a little past the duration.
        stop_send = end_send + (min(1.0, 0.1 * p.duration) if p.rate else 0.0)
        hard_end = stop_send + p.timeout + 1.0
        interval = 1.0 / p.rate if p.rate else 0.0
        due = t0 + p.offset
        seq = 0
        last_expire = t0
        while True:
            now = time.monotonic()
            if p.rate:
                while (seq < p.count and due <= now and now < stop_send
                       and len(self.conns) < p.max_inflight):
                    self.late.append(now - due)
                    self.start(seq, now)
                    seq += 1
                    due += interval
            elif now < end_send:
                while len(self.conns) < p.max_inflight and seq < p.count:
                    self.start(seq, now)
                    seq += 1
            sending = now < stop_send and seq < p.count
            if not sending and not self.conns:
                break
            if now >= hard_end:
                break
            wait = 0.05
            if sending and p.rate:
                wait = max(0.0, min(wait, due - now))
            for fd, ev in self.ep.poll(wait):
                if fd in self.conns:
                    self.event(fd, ev, time.monotonic())
            if now - last_expire > 0.1:
                self.expire(now)
                last_expire = now
        now = time.monotonic()
        for fd in list(self.conns):
            self.finish(fd, "timeout", now)
        if p.rate and seq < p.count:  # the schedule ran out of time (or in-flight room)
            self.failed["not_sent"] += p.count - seq
        send_span = max(min(self.last_start, stop_send) - t0, min(now, end_send) - t0)
        return {"attempted": self.attempted, "ok": self.ok, "failed": dict(self.failed),
                "send_span": send_span, "peak_inflight": self.peak,
                "lat": self.lat.tobytes(), "late": self.late.tobytes(),
                "ok_paths": self.ok_paths}


def _child(wid: int, plan: _Plan, start_at: float, out: Connection) -> None:
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    try:
        out.send(_Worker(wid, plan).run())
    finally:
        out.close()


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def run(host: str, port: int, rate: float, duration: float, workers: int = 4,
        max_inflight: int = 2000, timeout: float = 5.0, concurrency: int = 16, tag: str = "",
        body_bytes: int = 0, ok_file: str | None = None) -> dict[str, Any]:
    """Run the load; the summary (see the module doc)."""
    rate = max(0.0, min(rate, _MAX_RATE))
    duration = max(0.1, min(duration, _MAX_DURATION))
    workers = max(1, min(workers, _MAX_WORKERS))
    total = round(rate * duration) if rate else _MAX_RATE * int(duration + 1)
    body = bytes(i % 251 for i in range(body_bytes)) if body_bytes else b""
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    start_at = time.time() + 0.2
    for w in range(workers):
        share = total // workers + (1 if w < total % workers else 0)
        plan = _Plan(host, port, rate / workers, share, w / rate if rate else 0.0, duration,
                     max(1, max_inflight // workers) if rate else max(1, concurrency),
                     timeout, tag, body, ok_file is not None)
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(w, plan, start_at, send), daemon=True)
        proc.start()
        send.close()
        pipes.append(recv)
        procs.append(proc)
    results = []
    deadline = time.monotonic() + duration + timeout + 30
    for recv, proc in zip(pipes, procs, strict=True):
        if recv.poll(max(0.0, deadline - time.monotonic())):
            results.append(recv.recv())
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    failed: Counter[str] = Counter()
    lat: list[float] = []
    late: list[float] = []
    paths: list[str] = []
    for r in results:
        failed.update(r["failed"])
        lat.extend(array.array("d", r["lat"]))
        late.extend(array.array("d", r["late"]))
        paths.extend(r["ok_paths"])
    if len(results) < workers:
        failed["worker_lost"] += workers - len(results)
    lat.sort()
    late.sort()
    attempted = sum(r["attempted"] for r in results)
    ok = sum(r["ok"] for r in results)
    span = max((r["send_span"] for r in results), default=duration) or duration
    if ok_file is not None:
        with open(ok_file, "w") as f:
            f.write("".join(p + "\n" for p in paths))
    return {"rate": rate, "duration": duration, "workers": workers,
            "attempted": attempted, "ok": ok, "failed": sum(failed.values()),
            "failed_by_reason": dict(failed), "elapsed": round(span, 3),
            "achieved_rate": round(attempted / span, 1), "ok_rate": round(ok / span, 1),
            "p50_ms": round(_pct(lat, 0.50) * 1e3, 3), "p99_ms": round(_pct(lat, 0.99) * 1e3, 3),
            "max_ms": round((lat[-1] if lat else 0.0) * 1e3, 3),
            "late_ms_p99": round(_pct(late, 0.99) * 1e3, 3),
            "behind": sum(1 for x in late if x > 0.010),
            "peak_inflight": sum(r["peak_inflight"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="new connections a second over all workers; 0: closed loop")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-inflight", type=int, default=2000,
                    help="open-loop: connections in flight at most, over all workers")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="closed loop (--rate 0): connections in flight per worker")
    ap.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    ap.add_argument("--tag", default="")
    ap.add_argument("--body-bytes", type=int, default=0)
    ap.add_argument("--ok-file")
    a = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(a.max_inflight, a.concurrency * a.workers) + 256
    if soft < need and (hard == resource.RLIM_INFINITY or need <= hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    out = run(a.host, a.port, a.rate, a.duration, a.workers, a.max_inflight, a.timeout,
              a.concurrency, a.tag, a.body_bytes, a.ok_file)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
