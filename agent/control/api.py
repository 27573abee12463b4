"""The control API, sans I/O: a :class:`Request` in, a :class:`Response` out.

Every answer is JSON (``{"error": "..."}`` for errors) except ``GET /metrics`` (Prometheus
text). Routes, and what they need from the running agent (:class:`Agent`):

==============  ======  ==========================================================
path            method  answer
==============  ======  ==========================================================
/metrics        GET     the registry in the Prometheus text format
/healthz        GET     200 ``{"status":"ok"}``; 503 with the reason when a watched loop
                        is dead or makes no progress (:mod:`agent.mirror.heartbeat`)
/readyz         GET     200 when the agent is ``ready``; 503 ``starting`` / ``stopping``
/status         GET     state, ports, the agent's :class:`AgentStatus`, rates, pcap queue
/ports          GET     ``{"ports": [...]}``
/ports          PUT     ``{"ports": [8080, 8081]}``: 400 if invalid or more than
                        :data:`~agent.sources.MAX_PORTS`, 409 if refused (nothing changed)
/pcap           POST    ``{"path": "..."}`` → 202 ``{"id": ...}`` (see :meth:`Api.post_pcap`)
/pcap/<id>      GET     the job's state and counters; 404 if unknown
==============  ======  ==========================================================

Also, before any route: 401 without the right ``Authorization: Bearer <token>`` (when a
token is set), 404 for an unknown path, 405 (with ``Allow``) for a wrong method, 413 when the
announced body is over :data:`MAX_BODY`, 411 for a body of unknown length.

``/healthz`` and ``/readyz`` are the probe routes (:data:`QUICK`): they only read the
heartbeats and the state, never wait, and the server answers them on its event loop, ahead of
everything else; every other route may take time and runs on a worker thread.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TypedDict

from prometheus_client import CollectorRegistry

from agent import metrics
from agent.control.ingest import IngestClosed, PcapIngest, QueueFull
from agent.control.pcapdir import PathRefused, open_inside
from agent.mirror.heartbeat import Heartbeat, problems
from agent.sources import PortLimitError, check_port_count

__all__ = ["MAX_BODY", "QUICK", "Agent", "AgentStatus", "Api", "Forbidden", "RateMeter",
           "Request", "Response", "State", "check_token", "resolve_inside"]

MAX_BODY = 64 * 1024
#: The probe routes: answered without waiting on anything (see the module doc).
QUICK = frozenset({"/healthz", "/readyz"})
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE = "application/json"
State = Literal["starting", "ready", "stopping"]

#: /status "rates": name → the counter whose per-second increase it is.
RATES = {
    "frames_per_s": "mirror_agent_source_frames_total",
    "ring_records_per_s": "mirror_agent_ring_records_total",
    "segments_per_s": "mirror_agent_reassembly_segments_total",
    "delivered_bytes_per_s": "mirror_agent_reassembly_delivered_bytes_total",
    "gap_bytes_per_s": "mirror_agent_reassembly_gap_bytes_total",
    "flows_opened_per_s": "mirror_agent_reassembly_flows_opened_total",
    "forwarded_bytes_per_s": "mirror_agent_forward_forwarded_bytes_total",
    "forward_dropped_bytes_per_s": "mirror_agent_forward_dropped_bytes_total",
    "recorded_bytes_per_s": "mirror_agent_record_written_bytes_total",
}


class AgentStatus(TypedDict):
    """What the agent tells ``GET /status`` about itself (JSON-serialisable values)."""

    config: dict[str, Any]
    """The effective configuration (secrets left out)."""
    interfaces: list[str]
    """Interfaces the capture is attached to (empty for ``serve``)."""
    attachments: list[dict[str, str | int]]
    """Those interfaces in detail: ``{"name", "ifindex", "how", "side"}`` each
    (:class:`agent.sources.HasAttachments`)."""
    tracked: dict[str, int]
    """What the capture holds to follow interfaces (links, sides, local addresses,
    attachments; empty if it follows none): flat while pods come and go."""
    hooks: dict[str, list[str]]
    """Hook names by path: ``{"forward": [...], "record": [...]}``."""
    flows_open: int
    """Connections the reassembler tracks now."""
    tunnels: dict[str, int]
    """Of those, how many inside each tunnel (``{"vxlan:42": 3}``; plain flows left out)."""
    sinks: dict[str, str | None]
    """Each sink (``forward``, ``record``, ...) → its last error (None: no error)."""
    forward_capacity: dict[str, object]
    """What the reserved source ports allow to the target
    (:func:`agent.sinks.source_ports.forward_capacity`; empty without a target)."""


class Agent(Protocol):
    """What the control server needs from the running agent. Every member is called from
    the server's request threads, concurrently with the pipeline: each must be thread-safe
    and quick (no waiting on the pipeline)."""

    @property
    def state(self) -> State:
        """``starting`` until capture is live, ``ready``, then ``stopping`` on shutdown."""
        ...

    @property
    def metrics(self) -> CollectorRegistry:
        """The one registry (:attr:`agent.mirror.driver.TrafficMirror.metrics`)."""
        ...

    def heartbeats(self) -> Sequence[Heartbeat]:
        """The loops ``/healthz`` watches (mirror loop, ring drain, pcap reader, ...)."""
        ...

    def status(self) -> AgentStatus:
        """The agent's part of ``GET /status``."""
        ...

    def ports(self) -> list[int]:
        """The observed ports now, sorted."""
        ...

    def set_ports(self, ports: list[int]) -> None:
        """Observe exactly ``ports`` from now on (valid: 1..65535, unique, non-empty, at
        most :data:`~agent.sources.MAX_PORTS`). Raises ValueError with a one-line reason if
        they cannot be applied (answered 409); the old ports are then observed as before."""
        ...


@dataclass(frozen=True)
class Request:
    """An HTTP request: ``headers`` with lower-case names; ``path`` may carry a query."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, obj: object, *headers: tuple[str, str]) -> Response:
    return Response(status, json.dumps(obj, sort_keys=True).encode() + b"\n", JSON_TYPE,
                    headers)


def error(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return json_response(status, {"error": message}, *headers)


def check_token(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token, or None: it must be one word of printable
    ASCII, the only bytes every client sends in a header as they are (a non-ASCII token is
    encoded differently by different clients, so it could never match)."""
    if not token:
        return "the token is empty"
    if not all("!" <= c <= "~" for c in token):
        if any(c.isspace() for c in token):
            return "the token must be one word"
        return "the token must be printable ASCII (a header carries it as bytes)"
    return None


class Forbidden(ValueError):
    """A path outside the allowed directory."""


def resolve_inside(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) with every symlink resolved; raises
    :class:`Forbidden` unless it is ``root`` itself or below it. ``root`` must already be a
    real path (:func:`os.path.realpath`)."""
    if "\0" in path:
        raise Forbidden("path contains a NUL byte")
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([str(root), real]) != str(root):
        raise Forbidden(f"{path!r} is outside the pcap directory")
    return Path(real)


class RateMeter:
    """Per-second rates of counters between snapshots at least ``window`` seconds apart:
    ``sample`` keeps snapshots (any rate), ``rates`` compares the newest with the newest one
    ``window`` or more seconds older (the oldest kept if none is)."""

    def __init__(self, window: float = 10.0, keep: int = 64) -> None:
        self.window = window
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=keep)

    def sample(self, now: float, values: Mapping[str, float]) -> None:
        if self._samples and now <= self._samples[-1][0]:
            return
        self._samples.append((now, dict(values)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rates(self) -> dict[str, float] | None:
        """Name → per second over the last interval (None until two samples exist)."""
        if len(self._samples) < 2:
            return None
        t1, new = self._samples[-1]
        t0, old = self._samples[0]
        for t, snap in reversed(self._samples):
            if t1 - t >= self.window:
                t0, old = t, snap
                break
        dt = t1 - t0
        return {k: round((v - old.get(k, 0.0)) / dt, 3) for k, v in new.items()} | {
            "interval_s": round(dt, 3)}


class Api:
    """Routes requests to ``agent``, ``ingest`` and files under ``pcap_dir``.

    ``token``: when set, every request needs ``Authorization: Bearer <token>``. ``pcap_dir``
    (made a real path here) bounds what ``POST /pcap`` may read; without it or without
    ``ingest`` that route answers 409. ``clock`` (monotonic seconds) times the rates.
    ValueError (one line) for an empty token or a ``pcap_dir`` that is not a directory.
    """

    def __init__(self, agent: Agent, *, token: str | None = None,
                 ingest: PcapIngest | None = None, pcap_dir: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if token is not None and not token.strip():
            raise ValueError("the control token is empty")
        if token is not None and (why := check_token(token)) is not None:
            raise ValueError(f"control token: {why}")
        self.agent = agent
        self.token = token
        self.ingest = ingest
        self.pcap_dir = Path(os.path.realpath(pcap_dir)) if pcap_dir is not None else None
        if self.pcap_dir is not None and not self.pcap_dir.is_dir():
            raise ValueError(f"pcap directory {pcap_dir} is not a directory")
        self._clock = clock
        self.rates = RateMeter()
        self._routes: dict[str, dict[str, Callable[[Request], Response]]] = {
            "/metrics": {"GET": self.get_metrics},
            "/healthz": {"GET": self.get_healthz},
            "/readyz": {"GET": self.get_readyz},
            "/status": {"GET": self.get_status},
            "/ports": {"GET": self.get_ports, "PUT": self.put_ports},
            "/pcap": {"POST": self.post_pcap},
        }

    # ---------------------------------------------------------------- dispatch

    def precheck(self, req: Request) -> Response | None:
        """The answer a request gets from its head alone (401, 404, 405, 411, 413), or None
        to go on: the server calls this before reading any body."""
        if self.token is not None and not self._authorized(req.headers):
            return error(401, "missing or wrong bearer token", ("WWW-Authenticate", "Bearer"))
        methods = self._methods(req.path)
        if methods is None:
            return error(404, f"no such path: {_path(req.path)}")
        if req.method not in methods:
            allow = ", ".join(sorted(methods))
            return error(405, f"{req.method} is not allowed here (allowed: {allow})",
                         ("Allow", allow))
        if "chunked" in req.headers.get("transfer-encoding", "").lower():
            return error(411, "send the body with a Content-Length")
        length = req.headers.get("content-length", "0").strip() or "0"
        if not length.isdigit():
            return error(400, f"bad Content-Length: {length!r}")
        if int(length) > MAX_BODY:
            return error(413, f"body of {length} bytes is over the limit of {MAX_BODY}")
        return None

    def handle(self, req: Request) -> Response:
        """The answer to ``req`` (its body read, at most :data:`MAX_BODY` bytes)."""
        early = self.precheck(req)
        if early is not None:
            return early
        if len(req.body) > MAX_BODY:
            return error(413, f"body over the limit of {MAX_BODY} bytes")
        path = _path(req.path)
        if path.startswith("/pcap/"):
            return self.get_pcap_job(path.removeprefix("/pcap/"))
        return self._routes[path][req.method](replace(req, path=path))

    def quick(self, req: Request) -> bool:
        """True for a probe route (:data:`QUICK`): its answer never waits on anything."""
        return _path(req.path) in QUICK

    def _methods(self, raw: str) -> Mapping[str, object] | None:
        path = _path(raw)
        if path.startswith("/pcap/") and path.count("/") == 2 and len(path) > len("/pcap/"):
            return {"GET": None}
        return self._routes.get(path)

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").strip().partition(" ")
        assert self.token is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode())

    # ---------------------------------------------------------------- routes

    def get_metrics(self, _req: Request) -> Response:
        return Response(200, metrics.render(self.agent.metrics), METRICS_TYPE)

    def get_healthz(self, _req: Request) -> Response:
        wrong = problems(self.agent.heartbeats())
        if wrong:
            return json_response(503, {"status": "unhealthy", "reason": "; ".join(wrong)})
        return json_response(200, {"status": "ok"})

    def get_readyz(self, _req: Request) -> Response:
        state = self.agent.state
        return json_response(200 if state == "ready" else 503,
                             {"status": state, "ready": state == "ready"})

    def get_status(self, _req: Request) -> Response:
        self.sample()
        out: dict[str, Any] = dict(self.agent.status())
        out.update(state=self.agent.state, ports=self.agent.ports(), rates=self.rates.rates(),
                   health=problems(self.agent.heartbeats()))
        if self.ingest is not None:
            out["pcap"] = {"dir": str(self.pcap_dir) if self.pcap_dir else None,
                           "queued": self.ingest.queued(), "max_queued": self.ingest.max_queued}
        return json_response(200, out)

    def sample(self) -> None:
        """Take a snapshot of the rate counters (the server does so every few seconds)."""
        snap = metrics.snapshot(self.agent.metrics)
        self.rates.sample(self._clock(), {k: metrics.total(snap, m) for k, m in RATES.items()})

    def get_ports(self, _req: Request) -> Response:
        return json_response(200, {"ports": self.agent.ports()})

    def put_ports(self, req: Request) -> Response:
        body = _json_object(req.body)
        ports = body.get("ports") if body is not None else None
        why = _bad_ports(ports)
        if body is None or why:
            return error(400, why or 'expected a JSON object {"ports": [8080, ...]}')
        assert isinstance(ports, list)
        try:
            self.agent.set_ports(ports)
        except ValueError as e:
            return error(409, str(e))
        return json_response(200, {"ports": self.agent.ports()})

    def post_pcap(self, req: Request) -> Response:
        """202 ``{"id"}``; 400 bad JSON or ``path``; 403 outside the pcap directory or through
        a symbolic link; 404 no such file; 409 no pcap directory; 422 not a regular capture
        file; 429 the queue is full; 503 shutting down. The file is opened now, by descriptor
        (:func:`~agent.control.pcapdir.open_inside`), and the job reads that descriptor."""
        if self.ingest is None or self.pcap_dir is None:
            return error(409, "capture file ingest is off: no pcap directory is configured")
        body = _json_object(req.body)
        if body is None or not isinstance(body.get("path"), str) or not body["path"]:
            return error(400, 'expected a JSON object {"path": "<file in the pcap directory>"}')
        try:
            job = self.ingest.submit(open_inside(self.pcap_dir, body["path"]))
        except PathRefused as e:
            return error(e.status, str(e))
        except QueueFull as e:
            return error(429, str(e), ("Retry-After", "5"))
        except IngestClosed as e:
            return error(503, str(e))
        return json_response(202, {"id": job.id, "state": job.state},
                             ("Location", f"/pcap/{job.id}"))

    def get_pcap_job(self, job_id: str) -> Response:
        job = self.ingest.job(job_id) if self.ingest is not None else None
        if job is None:
            return error(404, f"no such job: {job_id}")
        return json_response(200, job)


def _path(raw: str) -> str:
    """The path without query or fragment, without a trailing slash (``/`` stays)."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    return path.rstrip("/") or "/"


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _bad_ports(ports: object) -> str | None:
    """Why ``ports`` is not a valid port list, or None."""
    if not isinstance(ports, list) or not ports:
        return '"ports" must be a non-empty list of port numbers'
    try:  # the capture's limit, before anything is changed
        check_port_count(ports)
    except PortLimitError as e:
        return f'"ports" names {e}'
    for p in ports:
        if type(p) is not int or not 1 <= p <= 65535:
            return f"not a port number (1..65535): {json.dumps(p)}"
    if len(set(ports)) != len(ports):
        return f"duplicate ports in {ports}"
    return None
