"""The control server for real: a TrafficMirror over the pcap ingest forwarding to a loopback
Python shadow, every error status through real curl, slow clients, and a token-protected
listener on a non-loopback address inside a network namespace made here."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.control import Api, Beating, ControlServer, PcapIngest
from agent.control.api import AgentStatus, State
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.mirror.heartbeat import Heartbeat
from lab.netns import NetNS
from tests.integration.truth import tshark_streams
from tests.unit.shadow import Shadow

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "integration-token-0123456789"


class MirrorAgent:
    """The Agent protocol over a running TrafficMirror (what the CLI does, in small)."""

    def __init__(self, mirror: TrafficMirror, beats: Sequence[Heartbeat]) -> None:
        self.mirror = mirror
        self.beats = list(beats)
        self.state: State = "starting"
        self._ports = sorted(mirror.config.ports)

    @property
    def metrics(self) -> CollectorRegistry:
        return self.mirror.metrics

    def heartbeats(self) -> Sequence[Heartbeat]:
        return self.beats

    def status(self) -> AgentStatus:
        return {"config": {"observed_port": self.mirror.config.observed_port,
                           "target_addr": self.mirror.config.target_addr},
                "interfaces": [], "attachments": [], "tracked": {},
                "hooks": {"forward": ["default"], "record": ["default"]},
                "flows_open": len(self.mirror.reassembler._flows), "tunnels": {},
                "sinks": {"forward": None}, "forward_capacity": {}}

    def ports(self) -> list[int]:
        return self._ports

    def set_ports(self, ports: list[int]) -> None:
        raise ValueError("this agent cannot change its ports")


@dataclass
class Served:
    url: str
    agent: MirrorAgent
    shadow: Shadow
    ingest: PcapIngest
    pcaps: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """``serve`` in small: the mirror runs over the ingest alone, forwarding to a shadow."""
    pcaps = tmp_path / "pcaps"
    pcaps.mkdir()
    shadow = Shadow()
    ingest = PcapIngest()
    mirror = TrafficMirror(MirrorConfig(observed_port=8080, target_addr=shadow.addr))
    beat = Heartbeat("mirror", max_silence=5)
    agent = MirrorAgent(mirror, [beat, ingest.heartbeat])
    server = ControlServer(Api(agent, ingest=ingest, pcap_dir=pcaps), "127.0.0.1", 0)
    runner = threading.Thread(target=mirror.run, args=(Beating(ingest, beat),), name="mirror")
    runner.start()
    server.start()
    agent.state = "ready"
    try:
        yield Served(server.url, agent, shadow, ingest, pcaps)
    finally:
        agent.state = "stopping"
        ingest.close()
        runner.join(10)
        server.stop()
        shadow.close()
        assert not runner.is_alive()


def curl(url: str, *args: str, ns: NetNS | None = None,
         timeout: float = 30) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers with lower-case names) of one real curl request."""
    cmd = ["curl", "-sS", "--max-time", "20", "-D", "/dev/stderr", "-o", "/dev/stdout",
           "-w", "\n%{http_code}", *args, url]
    if ns is not None:
        cmd = ns.cmd(*cmd)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    body, _, code = res.stdout.rpartition("\n")
    headers = {}
    for line in res.stderr.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(code or 0), body, headers


def post_json(url: str, obj: object, *args: str) -> tuple[int, Any]:
    code, body, _ = curl(url, "-X", "POST", "-H", "Content-Type: application/json",
                         "--data-binary", json.dumps(obj), *args)
    return code, json.loads(body) if body else None


def _wait(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_posted_pcap_is_forwarded_to_the_shadow(served: Served) -> None:
    shutil.copy(DEMO, served.pcaps / "demo.pcap")
    code, body = post_json(served.url + "/pcap", {"path": "demo.pcap"})
    assert code == 202, body
    job_url = f"{served.url}/pcap/{body['id']}"

    def done() -> bool:
        state = json.loads(curl(job_url)[1])["state"]
        assert state != "failed"
        return bool(state == "done")

    _wait(done)
    job = json.loads(curl(job_url)[1])
    assert job["packets"] == 474 and job["segments"] == 474 and job["error"] is None
    truth = tshark_streams(DEMO, 8080)
    sent = sorted(v for (_src, dst), v in truth.items() if dst.endswith(":8080"))
    _wait(lambda: len(served.shadow.received) == len(sent))
    assert sorted(served.shadow.received) == sent
    code, text, headers = curl(served.url + "/metrics")
    assert code == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("mirror_agent_source_pcap_jobs_done_total", ())] == 1
    assert samples[("mirror_agent_source_pcap_jobs_failed_total", ())] == 0
    assert samples[("mirror_agent_source_frames_total", ())] == 474
    assert samples[("mirror_agent_forward_forwarded_bytes_total", ())] == sum(map(len, sent))
    assert samples[("mirror_agent_handoff_items_total", (("handoff", "pcap_ingest"),))] >= 2
    assert not any(name == "mirror_agent_undeclared_stat" for name, _ in samples)
    status = json.loads(curl(served.url + "/status")[1])
    assert status["state"] == "ready" and status["ports"] == [8080]
    assert status["pcap"]["queued"] == 0 and status["health"] == []
    code, body, _ = curl(served.url + "/healthz")
    assert (code, json.loads(body)) == (200, {"status": "ok"})
    assert curl(served.url + "/readyz")[0] == 200


def test_every_error_status_through_curl(served: Served, tmp_path: Path) -> None:
    url = served.url
    shutil.copy(DEMO, tmp_path / "outside.pcap")
    (served.pcaps / "escape.pcap").symlink_to(tmp_path / "outside.pcap")
    (served.pcaps / "notes.pcap").write_text("not a capture\n")
    assert post_json(url + "/pcap", {"file": "x"})[0] == 400
    assert curl(url + "/pcap", "-X", "POST", "--data-binary", "{nope")[0] == 400
    assert post_json(url + "/pcap", {"path": 7})[0] == 400
    for path in ("../outside.pcap", str(tmp_path / "outside.pcap"), "escape.pcap"):
        code, body = post_json(url + "/pcap", {"path": path})
        assert code == 403, (path, body)
    assert post_json(url + "/pcap", {"path": "missing.pcap"})[0] == 404
    assert curl(url + "/pcap/123-unknown")[0] == 404
    assert curl(url + "/no/such/path")[0] == 404
    code, body, headers = curl(url + "/pcap", "-X", "GET")
    assert code == 405 and headers["allow"] == "POST" and "error" in json.loads(body)
    assert curl(url + "/metrics", "-X", "DELETE")[2]["allow"] == "GET"
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"path": "x" * 100_000}))
    code, body, _ = curl(url + "/pcap", "-X", "POST", "--data-binary", f"@{big}")
    assert code == 413 and "65536" in json.loads(body)["error"]
    code, body = post_json(url + "/pcap", {"path": "notes.pcap"})
    assert code == 422 and "not a pcap or pcapng file" in body["error"]
    code, body = post_json(url + "/ports", {"ports": [80, 80]}, "-X", "PUT")
    assert code == 400 and "duplicate" in body["error"]
    code, body = post_json(url + "/ports", {"ports": [80]}, "-X", "PUT")
    assert code == 409 and body["error"] == "this agent cannot change its ports"


def test_queue_full_is_429_and_token_is_401(tmp_path: Path) -> None:
    """A token-protected loopback server whose ingest nobody consumes (so files wait)."""
    shutil.copy(DEMO, tmp_path / "demo.pcap")
    stub = MirrorAgent(TrafficMirror(MirrorConfig(observed_port=8080)), [])
    stub.state = "ready"
    ingest = PcapIngest(max_queued=1, budget=0)
    server = ControlServer(Api(stub, token=TOKEN, ingest=ingest, pcap_dir=tmp_path),
                           "127.0.0.1", 0)
    server.start()
    auth = ("-H", f"Authorization: Bearer {TOKEN}")
    try:
        assert curl(server.url + "/healthz")[0] == 401
        assert curl(server.url + "/healthz", "-H", "Authorization: Bearer nope")[0] == 401
        assert post_json(server.url + "/pcap", {"path": "demo.pcap"})[0] == 401
        code, first = post_json(server.url + "/pcap", {"path": "demo.pcap"}, *auth)
        assert code == 202
        _wait(lambda: json.loads(curl(f"{server.url}/pcap/{first['id']}", *auth)[1])
              ["state"] == "running")
        assert post_json(server.url + "/pcap", {"path": "demo.pcap"}, *auth)[0] == 202
        code, body, headers = curl(server.url + "/pcap", "-X", "POST", "--data-binary",
                                   '{"path": "demo.pcap"}', *auth)
        assert code == 429 and headers["retry-after"] == "5", body
        assert curl(server.url + "/healthz", *auth)[0] == 200
    finally:
        server.stop()
        ingest.close()


def _half_request(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    s.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n")  # and never the blank line
    return s


def test_slow_clients_cannot_block_the_server() -> None:
    stub = MirrorAgent(TrafficMirror(MirrorConfig(observed_port=8080)), [])
    server = ControlServer(Api(stub), "127.0.0.1", 0, max_connections=3, deadline=2.0,
                           poll=0.1)
    server.start()
    slow: list[socket.socket] = []
    try:
        slow.append(_half_request(server.address))
        t0 = time.monotonic()
        assert curl(server.url + "/readyz")[0] == 503  # starting; answered at once
        assert time.monotonic() - t0 < 1.5
        slow.append(_half_request(server.address))
        slow.append(_half_request(server.address))
        time.sleep(0.3)  # all three are held (waiting for the rest of the request)
        # At the cap the oldest slow one gives way: they cannot keep a probe out (issue 19;
        # the thread-per-connection server answered 503 "too many" here).
        code, body, _ = curl(server.url + "/healthz")
        assert code == 200, body
        # Past their deadline the slow ones are cut off (the first one already was).
        for s in slow:
            s.settimeout(5)
            assert s.recv(100) == b""  # closed without an answer
        assert time.monotonic() - t0 < 5
        _wait(lambda: curl(server.url + "/healthz")[0] == 200, timeout=5)
    finally:
        for s in slow:
            s.close()
        server.stop()


def _raw(addr: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    return out


def test_malformed_requests_get_json_errors() -> None:
    stub = MirrorAgent(TrafficMirror(MirrorConfig(observed_port=8080)), [])
    server = ControlServer(Api(stub), "127.0.0.1", 0)
    server.start()
    try:
        for request, status in ((b"NONSENSE\r\n\r\n", b"400"),
                                (b"BREW /metrics HTTP/1.0\r\n\r\n", b"501"),
                                (b"GET /" + b"x" * 70_000 + b" HTTP/1.0\r\n\r\n", b"414")):
            answer = _raw(server.address, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split()[1] == status, answer[:200]
            assert b"Content-Type: application/json" in head
            assert "error" in json.loads(body)
    finally:
        server.stop()


_NS_SERVER = """
import sys
from agent import metrics
from agent.control import Api, ControlServer, parse_listen

class Stub:
    state = "ready"
    metrics = metrics.new_registry(dict)
    def heartbeats(self): return []
    def status(self): return {}
    def ports(self): return [8080]
    def set_ports(self, ports): raise ValueError("no")

host, port = parse_listen(sys.argv[1])
token = open(sys.argv[2]).read().strip() if len(sys.argv) > 2 else None
try:
    server = ControlServer(Api(Stub(), token=token), host, port)
except ValueError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
server.start()
print("listening", flush=True)
sys.stdin.read()
server.stop()
"""


def test_token_listener_on_a_namespace_address(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with NetNS("mirctl") as ns:
        ns.run("ip", "addr", "add", "192.0.2.10/32", "dev", "lo")
        listen = "192.0.2.10:9464"
        refused = ns.run(sys.executable, "-c", _NS_SERVER, listen, check=False)
        assert refused.returncode == 2
        assert refused.stderr.strip() == ("the control server may listen on 192.0.2.10 (not "
                                          "loopback) only with a token file")
        proc = ns.popen(sys.executable, "-c", _NS_SERVER, listen, str(token_file),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(ROOT))
        assert proc.stdout is not None and proc.stdin is not None
        lines = [proc.stdout.readline() for _ in range(2)]  # a log line, then ours
        assert lines[-1] == b"listening\n", lines
        url = "http://192.0.2.10:9464"
        code, body, headers = curl(url + "/healthz", ns=ns)
        assert code == 401 and headers["www-authenticate"] == "Bearer", body
        assert curl(url + "/healthz", "-H", "Authorization: Bearer wrong", ns=ns)[0] == 401
        code, body, _ = curl(url + "/ports", "-H", f"Authorization: Bearer {TOKEN}", ns=ns)
        assert (code, json.loads(body)) == (200, {"ports": [8080]})
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        assert proc.wait(10) == 0
