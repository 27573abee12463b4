"""The command line's face of the control API (:mod:`agent.control`): :class:`Control`, the
server of one ``run`` or ``serve`` with the running agent behind it, and ``mirror-agent
probe`` (a liveness or readiness probe that needs no curl in the image and reads the token
from the same config file as the agent).

Order in a run: :class:`Control` is made (and its address bound) before anything starts, so
a bad ``--listen`` is exit 2; :meth:`Control.start` serves once the mirror exists (``/readyz``
503 "starting" while capture attaches); :meth:`Control.source` wraps the capture (the pcap
ingest merged in, the mirror's heartbeat; ``/healthz`` also watches the source's own threads)
and makes the agent ready; a signal makes it
``stopping``; :meth:`Control.close` stops serving after the run.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from agent.cli.options import ControlOptions, Options
from agent.cli.parser import UsageError
from agent.cli.summary import degradation
from agent.control import (
    AgentStatus,
    Api,
    Beating,
    ControlServer,
    MergedSource,
    PcapIngest,
    State,
    parse_listen,
)
from agent.control import read_token as read_token_file
from agent.metrics import snapshot
from agent.mirror.config import MirrorConfig, parse_target
from agent.mirror.driver import TrafficMirror
from agent.mirror.heartbeat import Heartbeat
from agent.sinks.source_ports import forward_capacity
from agent.sources import HasAttachments, LiveSource, PacketSource, PortSteerable

__all__ = ["Control", "RunningAgent", "local_url", "probe"]

#: Bytes of segments the pcap reader may hold ahead of the mirror: a few batches (a batch
#: is at most a few MiB), enough to keep the mirror busy, small next to the budget's slack.
INGEST_BUDGET = 8 << 20
#: Seconds the mirror loop may go without asking for a batch before /healthz fails: a live
#: source yields at least every ~20 ms, the ingest every 50 ms, so 10 s is a stuck loop.
MIRROR_SILENCE = 10.0


def _capacity(cfg: MirrorConfig) -> dict[str, object]:
    """``/status``'s ``forward_capacity``: what the forward mode allows (empty without a
    target). Connection mode is bound by source ports (each captured connection is a shadow
    connection); request mode reuses at most ``pool_size`` connections, so churn costs none."""
    if not cfg.target_addr:
        return {}
    if cfg.forward.mode == "request":
        return {"mode": "request", "pool_connections": cfg.forward.pool_size,
                "new_connections_per_captured_connection": 0}
    fwd = cfg.forward
    return {"mode": "connection",
            **forward_capacity(fwd.source_ports, parse_target(cfg.target_addr)[0],
                               max(1, len(fwd.source_addrs)))}


class RunningAgent:
    """What the control API asks of a running ``run`` or ``serve``
    (:class:`agent.control.Agent`). Read from the server's threads: every answer is a read
    of fields the pipeline writes atomically."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self._state: State = "starting"
        self.mirror: TrafficMirror | None = None
        self.source: PacketSource | None = None
        self.beats: list[Heartbeat] = []
        self._ports_lock = threading.Lock()  # one PUT /ports at a time

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        self._state = value

    @property
    def metrics(self) -> CollectorRegistry:
        assert self.mirror is not None, "the server starts once the mirror exists"
        return self.mirror.metrics

    def heartbeats(self) -> Sequence[Heartbeat]:
        return self.beats

    def status(self) -> AgentStatus:
        mirror, src = self.mirror, self.source
        assert mirror is not None
        cfg = mirror.config
        degraded = degradation(snapshot(mirror.metrics))
        attached: list[dict[str, str | int]] = (
            src.attachments() if isinstance(src, HasAttachments) else [])
        return {
            "config": {k: v for k, (v, _origin) in self.opts.effective().items()},
            "interfaces": ([str(a["name"]) for a in attached]
                           if isinstance(src, HasAttachments) else self._interfaces()),
            "attachments": attached,
            "tracked": src.tracked() if isinstance(src, HasAttachments) else {},
            "hooks": {"forward": _names(cfg.forward_hook), "record": _names(cfg.record_hook)},
            "flows_open": mirror.reassembler.flow_count,
            "tunnels": mirror.reassembler.flows_by_tunnel(),
            "sinks": {sink: next((d for d in degraded if sink in d), None)
                      for sink in ("forward", "record")},
            "forward_capacity": _capacity(cfg),
        }

    def _interfaces(self) -> list[str]:
        src = self.source
        if isinstance(src, PortSteerable):
            return src.ifaces
        return []

    def ports(self) -> list[int]:
        assert self.mirror is not None
        return sorted(self.mirror.ports)

    def set_ports(self, ports: list[int]) -> None:
        """The mirror classifies the new ports first, then the capture takes them: a segment
        of a new port is never seen before its port is known. All or nothing: if the capture
        refuses (ValueError), it still observes the old ports, and so does the mirror."""
        mirror, src = self.mirror, self.source
        assert mirror is not None
        if src is not None and not isinstance(src, PortSteerable):
            raise ValueError("this capture cannot change its ports while running")
        lo, hi = mirror.config.forward.source_ports
        inside = [p for p in ports if lo <= p <= hi]
        if inside and src is not None:
            raise ValueError(f"port {inside[0]} is inside the forward source ports {lo}-{hi}, "
                             "whose packets capture skips")
        with self._ports_lock:
            mirror.set_ports(mirror.ports | set(ports))
            try:
                if src is not None:
                    src.set_ports(ports)
            finally:  # what the capture observes now, new or old: GET /ports says the same
                mirror.set_ports(frozenset(src.ports if src is not None else ports))


def _names(hooks: object) -> list[str]:
    items = hooks if isinstance(hooks, list | tuple) else [] if hooks is None else [hooks]
    return [getattr(h, "__name__", type(h).__name__) for h in items]


class Control:
    """The control server of one run (see the module doc). UsageError (exit 2) for a bad
    ``--listen``, ``--listen-token-file`` or ``--pcap-dir``, or an address in use."""

    def __init__(self, opts: Options) -> None:
        c = opts.control
        if c.listen is None:
            raise UsageError("--listen is needed for the control API")
        self.agent = RunningAgent(opts)
        self.ingest: PcapIngest | None = None
        try:
            host, port = parse_listen(c.listen)
            token = read_token_file(str(c.listen_token_file)) if c.listen_token_file else None
            api_ingest = PcapIngest(budget=INGEST_BUDGET) if c.pcap_dir else None
            self.ingest = api_ingest
            api = Api(self.agent, token=token, ingest=api_ingest, pcap_dir=c.pcap_dir)
            self.server = ControlServer(api, host, port)
        except ValueError as e:
            self._close_ingest()
            raise UsageError(_flag_message(str(e), c)) from None
        except OSError as e:
            self._close_ingest()
            raise UsageError(f"--listen {c.listen}: cannot listen there "
                             f"({e.strerror or e})") from None

    def start(self, mirror: TrafficMirror) -> None:
        """Serve, answering for ``mirror`` (not ready yet)."""
        self.agent.mirror = mirror
        self.server.start()

    def source(self, live: PacketSource | None) -> PacketSource:
        """The source the mirror runs over: ``live`` with the pcap ingest merged in (or the
        ingest alone for ``serve``), beating the mirror's heartbeat. ``/healthz`` watches
        that one and the sources' own threads' (ring drain, pcap reader). The agent is
        ready."""
        self.agent.source = live
        src: LiveSource
        if live is None:
            assert self.ingest is not None, "serve has an ingest"
            src = self.ingest
        elif self.ingest is not None:
            assert isinstance(live, LiveSource)
            src = MergedSource(live, self.ingest)
        elif isinstance(live, LiveSource):
            src = live
        else:
            return live
        beating = Beating(src, Heartbeat("mirror", MIRROR_SILENCE))
        inner = [self.ingest.heartbeat] if src is self.ingest else beating.heartbeats()
        self.agent.beats = [beating.heartbeat, *inner]
        self.agent.state = "ready"
        return beating

    def stopping(self) -> None:
        """Shutting down: not ready (safe from a signal handler)."""
        self.agent.state = "stopping"

    def close(self) -> None:
        """Stop serving; close the ingest if the run never took it over."""
        self.agent.state = "stopping"
        self.server.stop()
        self._close_ingest()

    def _close_ingest(self) -> None:
        if self.ingest is not None:
            self.ingest.close()


def _flag_message(message: str, c: ControlOptions) -> str:
    """Prefix the flag a control start-up error is about."""
    if "token" in message:
        return f"--listen-token-file {c.listen_token_file}: {message}" \
            if "file" not in message else message
    if "pcap directory" in message:
        return f"--pcap-dir: {message}"
    return f"--listen {c.listen}: {message}"

#: Seconds a probe waits for the answer; kubelet's own timeoutSeconds should be larger.
PROBE_TIMEOUT = 3.0


def local_url(listen: str, path: str) -> str:
    """The URL of ``path`` on the listener ``listen`` as seen from this host: a wildcard
    address (0.0.0.0, ::) is asked on loopback."""
    host, port = parse_target(listen)
    if host == "localhost":
        host = "127.0.0.1"
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        addr = ipaddress.ip_address("::1" if addr.version == 6 else "127.0.0.1")
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"http://{shown}:{port}/{path.lstrip('/')}"


def probe(opts: Options) -> int:
    """``mirror-agent probe PATH``: 0 when the agent answers 200, else 1 with one line
    saying what it answered (or why it could not be asked)."""
    control: ControlOptions = opts.control
    if not control.listen:
        raise UsageError("probe needs --listen (or 'listen' in the --config file): the "
                         "address the agent serves its control API on")
    url = local_url(control.listen, opts.path)
    request = urllib.request.Request(url)
    if control.listen_token_file is not None:
        try:
            token = read_token_file(str(control.listen_token_file))
        except ValueError as e:
            raise UsageError(str(e)) from None
        request.add_header("Authorization", f"Bearer {token}")
    # Straight to the agent, never through http_proxy & co.: a proxy would get the bearer
    # token and answer in the agent's place.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(request, timeout=PROBE_TIMEOUT) as answer:
            sys.stdout.write(answer.read().decode(errors="replace").rstrip() + "\n")
            return 0
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        sys.stderr.write(f"mirror-agent: probe {url}: {e.code} {_reason(body)}\n")
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        sys.stderr.write(f"mirror-agent: probe {url}: not answered ({why})\n")
    return 1


def _reason(body: str) -> str:
    """The ``reason`` (or ``error``) of a JSON error body, else the body's first line."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip().splitlines()[0] if body.strip() else ""
    if isinstance(data, dict):
        return str(data.get("reason") or data.get("error") or data)
    return body.strip()
