"""The control API without sockets: every route and status code, path containment (real
symlinks), heartbeats, rates, the pcap ingest as a live source, and the merged source."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent import metrics
from agent.control.api import (
    MAX_BODY,
    AgentStatus,
    Api,
    Forbidden,
    RateMeter,
    Request,
    Response,
    State,
    resolve_inside,
)
from agent.control.ingest import PcapIngest
from agent.control.merge import Beating, MergedSource
from agent.control.server import is_loopback, parse_listen, read_token
from agent.mirror.config import MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.mirror.heartbeat import Heartbeat, problems
from agent.model import Segment, TrafficChunk
from agent.sources.files.pcapfile import PcapFileSource

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
TOKEN = "s3cret-token"


class FakeAgent:
    """Implements agent.control.api.Agent over plain attributes."""

    def __init__(self) -> None:
        self.state: State = "ready"
        self.stages: dict[str, dict[str, int]] = {"reassembly": {"segments": 0}}
        self.metrics: CollectorRegistry = metrics.new_registry(lambda: self.stages)
        self.beats: list[Heartbeat] = []
        self._ports = [8080]

    def heartbeats(self) -> Sequence[Heartbeat]:
        return self.beats

    def status(self) -> AgentStatus:
        return {"config": {"observed_port": 8080}, "interfaces": ["lo"],
                "attachments": [{"name": "lo", "ifindex": 1, "how": "tcx", "side": "all"}],
                "tracked": {},
                "hooks": {"forward": ["default"], "record": ["default"]}, "flows_open": 3,
                "tunnels": {"vxlan:42": 1},
                "sinks": {"forward": None, "record": "disk full"},
                "forward_capacity": {"source_ports": 4536}}

    def ports(self) -> list[int]:
        return sorted(self._ports)

    def set_ports(self, ports: list[int]) -> None:
        if 9999 in ports:
            raise ValueError("port 9999 is the agent's own")
        self._ports = list(ports)


def _req(method: str, path: str, body: object = None, token: str | None = None,
         **headers: str) -> Request:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if raw:
        h.setdefault("content-length", str(len(raw)))
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return Request(method, path, h, raw)


def _json(resp: Response) -> Any:
    assert resp.content_type == "application/json"
    return json.loads(resp.body)


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def ingest() -> Iterator[PcapIngest]:
    """An ingest nobody consumes, with no room: its reader blocks in the first file."""
    ing = PcapIngest(max_queued=2, budget=0)
    yield ing
    ing.close()


@pytest.fixture
def pcaps(tmp_path: Path) -> Path:
    d = tmp_path / "pcaps"
    d.mkdir()
    shutil.copy(DEMO, d / "demo.pcap")
    return d


def _api(agent: FakeAgent, **kw: Any) -> Api:
    return Api(agent, **kw)


# ---------------------------------------------------------------- dispatch and auth


def test_unknown_path_wrong_method_and_body_limits(agent: FakeAgent) -> None:
    api = _api(agent)
    assert api.handle(_req("GET", "/nope")).status == 404
    assert api.handle(_req("GET", "/pcap/a/b")).status == 404
    r = api.handle(_req("DELETE", "/ports"))
    assert r.status == 405 and dict(r.headers)["Allow"] == "GET, PUT"
    assert "DELETE" in _json(r)["error"]
    assert dict(api.handle(_req("POST", "/metrics")).headers)["Allow"] == "GET"
    big = api.handle(_req("PUT", "/ports", content_length=str(MAX_BODY + 1)))
    assert big.status == 413 and "65536" in _json(big)["error"]
    assert api.handle(_req("PUT", "/ports", b"x" * (MAX_BODY + 1), content_length="1")
                      ).status == 413
    assert api.handle(_req("PUT", "/ports", transfer_encoding="chunked")).status == 411
    assert api.handle(_req("PUT", "/ports", content_length="12a")).status == 400
    # Query strings and a trailing slash do not change the route.
    assert api.handle(_req("GET", "/healthz/?verbose=1")).status == 200


def test_token_is_required_on_every_path(agent: FakeAgent) -> None:
    api = _api(agent, token=TOKEN)
    for path in ("/metrics", "/healthz", "/nope", "/pcap/1"):
        r = api.handle(_req("GET", path))
        assert r.status == 401, path
        assert dict(r.headers)["WWW-Authenticate"] == "Bearer"
    assert api.handle(_req("GET", "/healthz", token="wrong")).status == 401
    assert api.handle(_req("GET", "/healthz", token=TOKEN + "x")).status == 401
    assert api.handle(_req("GET", "/healthz", authorization=f"Basic {TOKEN}")).status == 401
    assert api.handle(_req("GET", "/healthz", token=TOKEN)).status == 200
    assert api.handle(_req("GET", "/healthz", authorization=f"bearer  {TOKEN} ")).status == 200
    # Without the token, nothing reveals which paths exist.
    assert api.handle(_req("DELETE", "/ports")).status == 401
    with pytest.raises(ValueError, match="empty"):
        Api(agent, token="  ")


# ---------------------------------------------------------------- metrics, health, readiness


def test_metrics_are_the_prometheus_text(agent: FakeAgent) -> None:
    agent.stages["reassembly"]["segments"] = 42
    r = _api(agent).handle(_req("GET", "/metrics"))
    assert r.status == 200
    assert r.content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"mirror_agent_reassembly_segments_total 42.0" in r.body


def test_healthz_reports_a_stuck_or_dead_loop(agent: FakeAgent) -> None:
    now = [100.0]
    hb = Heartbeat("mirror", max_silence=5, clock=lambda: now[0])
    agent.beats = [hb]
    api = _api(agent)
    assert _json(api.handle(_req("GET", "/healthz"))) == {"status": "ok"}  # not started
    hb.start()
    now[0] += 6
    r = api.handle(_req("GET", "/healthz"))
    assert r.status == 503
    assert _json(r) == {"status": "unhealthy",
                        "reason": "mirror: no progress for 6.0 s (limit 5 s)"}
    hb.beat()
    assert api.handle(_req("GET", "/healthz")).status == 200
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    dead = Heartbeat("ring-drain")
    dead.start(t)
    agent.beats.append(dead)
    assert _json(api.handle(_req("GET", "/healthz")))["reason"] == "ring-drain: thread is dead"


@pytest.mark.parametrize(("state", "code"), [("starting", 503), ("ready", 200),
                                             ("stopping", 503)])
def test_readyz_follows_the_state(agent: FakeAgent, state: State, code: int) -> None:
    agent.state = state
    r = _api(agent).handle(_req("GET", "/readyz"))
    assert r.status == code and _json(r)["status"] == state


def test_status_has_agent_fields_ports_and_rates(agent: FakeAgent) -> None:
    now = [0.0]
    api = _api(agent, clock=lambda: now[0])
    first = _json(api.handle(_req("GET", "/status")))
    assert first["rates"] is None  # one sample so far
    assert first["flows_open"] == 3 and first["sinks"]["record"] == "disk full"
    assert first["ports"] == [8080] and first["state"] == "ready" and first["health"] == []
    assert "pcap" not in first
    agent.stages["reassembly"]["segments"] = 500
    now[0] = 10.0
    rates = _json(api.handle(_req("GET", "/status")))["rates"]
    assert rates["segments_per_s"] == 50.0 and rates["interval_s"] == 10.0
    assert rates["forwarded_bytes_per_s"] == 0.0


def test_rates_use_an_interval_of_at_least_the_window() -> None:
    meter = RateMeter(window=10)
    for t in range(0, 31):
        meter.sample(float(t), {"x": t * t})
    rates = meter.rates()
    assert rates is not None
    assert rates["interval_s"] == 10.0 and rates["x"] == (900 - 400) / 10
    meter.sample(30.0, {"x": 0})  # not newer: ignored
    assert meter.rates() == rates


# ---------------------------------------------------------------- ports


def test_ports_get_and_put(agent: FakeAgent) -> None:
    api = _api(agent)
    assert _json(api.handle(_req("GET", "/ports"))) == {"ports": [8080]}
    r = api.handle(_req("PUT", "/ports", {"ports": [8081, 8080]}))
    assert r.status == 200 and _json(r) == {"ports": [8080, 8081]}
    assert agent.ports() == [8080, 8081]
    refused = api.handle(_req("PUT", "/ports", {"ports": [9999]}))
    assert refused.status == 409 and _json(refused)["error"] == "port 9999 is the agent's own"
    assert agent.ports() == [8080, 8081]


@pytest.mark.parametrize("body", [b"not json", b"[8080]", {"port": [80]}, {"ports": []},
                                  {"ports": 80}, {"ports": [0]}, {"ports": [65536]},
                                  {"ports": [80, 80]}, {"ports": ["80"]}, {"ports": [True]},
                                  {"ports": [80.0]}, b""])
def test_bad_ports_are_400(agent: FakeAgent, body: object) -> None:
    r = _api(agent).handle(_req("PUT", "/ports", body))
    assert r.status == 400, _json(r)
    assert agent.ports() == [8080]


# ---------------------------------------------------------------- path containment


def test_resolve_inside_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.pcap"
    outside.write_bytes(b"x")
    (root / "sub" / "a.pcap").write_bytes(b"x")
    (root / "escape.pcap").symlink_to(outside)
    (root / "escdir").symlink_to(tmp_path)
    (root / "inner.pcap").symlink_to(root / "sub" / "a.pcap")
    real = Path(root.resolve())
    assert resolve_inside(real, "sub/a.pcap") == real / "sub" / "a.pcap"
    assert resolve_inside(real, str(root / "sub" / "a.pcap")) == real / "sub" / "a.pcap"
    assert resolve_inside(real, "inner.pcap") == real / "sub" / "a.pcap"
    assert resolve_inside(real, "sub/../sub/a.pcap") == real / "sub" / "a.pcap"
    for bad in ("../secret.pcap", "sub/../../secret.pcap", str(outside), "/etc/passwd",
                "escape.pcap", "escdir/secret.pcap", "a\0b"):
        with pytest.raises(Forbidden):
            resolve_inside(real, bad)
    # A sibling whose name starts like the root is not inside it.
    (tmp_path / "root2").mkdir()
    with pytest.raises(Forbidden):
        resolve_inside(real, str(tmp_path / "root2"))


# ---------------------------------------------------------------- POST /pcap, GET /pcap/<id>


def test_pcap_without_a_directory_is_409(agent: FakeAgent) -> None:
    r = _api(agent).handle(_req("POST", "/pcap", {"path": "a.pcap"}))
    assert r.status == 409 and "no pcap directory" in _json(r)["error"]
    assert _api(agent).handle(_req("GET", "/pcap/1-x")).status == 404


@pytest.mark.parametrize("body", [b"{", b'"demo.pcap"', {"file": "demo.pcap"}, {"path": 3},
                                  {"path": ""}, {"path": None}, b""])
def test_pcap_bad_request_is_400(agent: FakeAgent, ingest: PcapIngest, pcaps: Path,
                                 body: object) -> None:
    r = _api(agent, ingest=ingest, pcap_dir=pcaps).handle(_req("POST", "/pcap", body))
    assert r.status == 400


def test_pcap_paths_outside_are_403(agent: FakeAgent, ingest: PcapIngest, pcaps: Path,
                                    tmp_path: Path) -> None:
    shutil.copy(DEMO, tmp_path / "outside.pcap")
    (pcaps / "link.pcap").symlink_to(tmp_path / "outside.pcap")
    (pcaps / "up").symlink_to(tmp_path)
    api = _api(agent, ingest=ingest, pcap_dir=pcaps)
    for path in ("../outside.pcap", str(tmp_path / "outside.pcap"), "link.pcap",
                 "up/outside.pcap", "/etc/hostname", "../nonexistent.pcap"):
        r = api.handle(_req("POST", "/pcap", {"path": path}))
        assert r.status == 403, path
    assert ingest.queued() == 0 and ingest.stats()["pcap_jobs_done"] == 0


def _headers() -> dict[str, bytes]:
    pcap = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    return {
        "le_us.pcap": pcap,
        "be_us.pcap": struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1),
        "le_ns.pcap": struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1),
        "be_ns.pcap": struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1),
        "le.pcapng": struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28),
        "be.pcapng": struct.pack(">IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28),
    }


def test_pcap_kinds_accepted_and_rejected(agent: FakeAgent, pcaps: Path) -> None:
    for name, data in _headers().items():
        (pcaps / name).write_bytes(data)
    (pcaps / "text.pcap").write_text("hello, not a capture\n")
    (pcaps / "short.pcap").write_bytes(_headers()["le_us.pcap"][:10])
    (pcaps / "empty.pcap").write_bytes(b"")
    (pcaps / "dir.pcap").mkdir()
    ing = PcapIngest(max_queued=16)
    try:
        api = _api(agent, ingest=ing, pcap_dir=pcaps)
        for name in _headers():
            r = api.handle(_req("POST", "/pcap", {"path": name}))
            assert r.status == 202, (name, _json(r))
        for name in ("text.pcap", "short.pcap", "empty.pcap", "dir.pcap"):
            r = api.handle(_req("POST", "/pcap", {"path": name}))
            assert r.status == 422, name
        assert "not a pcap or pcapng file" in _json(
            api.handle(_req("POST", "/pcap", {"path": "text.pcap"})))["error"]
        missing = api.handle(_req("POST", "/pcap", {"path": "missing.pcap"}))
        assert missing.status == 404 and "missing.pcap" in _json(missing)["error"]
    finally:
        ing.close()


def test_pcap_queue_full_is_429_and_jobs_are_visible(agent: FakeAgent, ingest: PcapIngest,
                                                     pcaps: Path) -> None:
    api = _api(agent, ingest=ingest, pcap_dir=pcaps)
    r = api.handle(_req("POST", "/pcap", {"path": "demo.pcap"}))
    assert r.status == 202
    first = _json(r)["id"]
    assert dict(r.headers)["Location"] == f"/pcap/{first}"
    _wait(lambda: _json(api.handle(_req("GET", f"/pcap/{first}")))["state"] == "running")
    for _ in range(ingest.max_queued):  # the reader holds the first: these wait
        assert api.handle(_req("POST", "/pcap", {"path": str(pcaps / "demo.pcap")})
                          ).status == 202
    full = api.handle(_req("POST", "/pcap", {"path": "demo.pcap"}))
    assert full.status == 429 and dict(full.headers)["Retry-After"] == "5"
    assert ingest.stats()["pcap_jobs_rejected"] == 1
    assert ingest.stats()["pcap_jobs_queued"] == 2
    job = _json(api.handle(_req("GET", f"/pcap/{first}")))
    assert job["path"] == str(pcaps.resolve() / "demo.pcap") and job["error"] is None
    assert job["segments"] > 0 and job["packets"] >= job["segments"]
    assert api.handle(_req("GET", "/pcap/nope")).status == 404
    status = _json(api.handle(_req("GET", "/status")))["pcap"]
    assert status == {"dir": str(pcaps.resolve()), "queued": 2, "max_queued": 2}
    ingest.close()
    assert _json(api.handle(_req("GET", f"/pcap/{first}")))["state"] == "failed"
    assert api.handle(_req("POST", "/pcap", {"path": "demo.pcap"})).status == 503


# ---------------------------------------------------------------- heartbeat


def test_heartbeat_states() -> None:
    now = [0.0]
    hb = Heartbeat("loop", max_silence=2, clock=lambda: now[0])
    assert hb.problem() is None and not hb.running
    hb.start()
    now[0] = 2.0
    assert hb.problem() is None  # at the limit, not over it
    now[0] = 2.5
    assert hb.problem() == "loop: no progress for 2.5 s (limit 2 s)"
    hb.beat()
    assert hb.problem() is None and hb.silence() == 0.0
    now[0] = 100.0
    hb.stop()
    assert hb.problem() is None  # stopped on purpose
    assert problems([hb]) == []
    with pytest.raises(ValueError):
        Heartbeat("x", max_silence=0)


def test_heartbeat_sees_its_thread_die() -> None:
    hb = Heartbeat("worker", max_silence=60)
    go = threading.Event()

    def work() -> None:
        hb.start()
        go.wait(5)
        # returns without stop(): as if it died

    t = threading.Thread(target=work)
    t.start()
    _wait(lambda: hb.running)
    assert hb.problem() is None
    go.set()
    t.join()
    assert hb.problem() == "worker: thread is dead"


# ---------------------------------------------------------------- the ingest as a source


def _record(source: Any, feed: Any) -> tuple[list[tuple[str, bytes]], TrafficMirror]:
    """Run a mirror recording client→service chunks over ``source`` while ``feed()`` runs."""
    got: list[tuple[str, bytes]] = []

    def write(chunk: TrafficChunk, data: bytes) -> None:
        got.append((chunk.from_addr, data))

    m = TrafficMirror(MirrorConfig(observed_port=8080, write_func=write))
    t = threading.Thread(target=m.run, args=(source,))
    t.start()
    try:
        feed()
    finally:
        source.close()
        t.join(10)
    assert not t.is_alive()
    return got, m


def _streams(chunks: list[tuple[str, bytes]]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for addr, data in chunks:
        out[addr] = out.get(addr, b"") + data
    return out


def _offline_truth() -> dict[str, bytes]:
    got: list[tuple[str, bytes]] = []
    m = TrafficMirror(MirrorConfig(observed_port=8080,
                                   write_func=lambda c, d: got.append((c.from_addr, d))))
    m.run(PcapFileSource([DEMO]))
    return _streams(got)


def test_ingest_feeds_the_mirror_and_goes_on_after_a_bad_file(tmp_path: Path) -> None:
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(DEMO.read_bytes()[:5000])
    ing = PcapIngest()
    jobs: list[str] = []
    before = time.time()

    def feed() -> None:
        jobs.extend(ing.submit(p).id for p in (cut, DEMO))
        _wait(lambda: all(ing.job(j)["state"] in ("done", "failed") for j in jobs))  # type: ignore[index]

    got, m = _record(ing, feed)
    bad, good = (ing.job(j) for j in jobs)
    assert bad is not None and good is not None
    assert bad["state"] == "failed" and "cut short" in bad["error"]
    assert good["state"] == "done" and good["error"] is None
    assert good["packets"] == good["segments"] == 474 and good["bytes"] == 60970
    # The cut file is the start of the same capture: its connections come first, cut, then
    # the whole file's (a new SYN on the same addresses starts a new connection).
    truth, ours = _offline_truth(), _streams(got)
    assert set(ours) == set(truth)
    for addr, data in truth.items():
        assert ours[addr].endswith(data), addr
    stats = m.stage_stats()
    assert stats["source"]["pcap_jobs_done"] == 1 and stats["source"]["pcap_jobs_failed"] == 1
    assert stats["source"]["cut_short_files"] == 1 and stats["source"]["frames"] > 474
    assert stats["handoff"]["items:pcap_ingest"] >= 2
    assert metrics.undeclared(stats) == []
    assert m.reassembler.now >= before  # rebased to now, not to the file's old times
    assert m.reassembler.now <= time.time()


def test_rebased_timestamps_start_now_and_never_run_ahead() -> None:
    ing = PcapIngest()
    seen: list[list[Segment]] = []
    try:
        start = time.time()
        job = ing.submit(DEMO)
        for batch in ing.batches():
            if batch:
                seen.append(batch)
            if ing.job(job.id)["state"] == "done":  # type: ignore[index]
                break
    finally:
        ing.close()
    ts = [s.ts for b in seen for s in b]
    assert len(ts) == 474
    assert start <= ts[0] <= time.time() and max(ts) <= time.time()
    assert ts == sorted(ts)


class _FakeLive:
    """A live source yielding given batches, then ending."""

    def __init__(self, batches: list[list[Segment]]) -> None:
        self._batches = batches
        self.closed = self.drained = False

    def batches(self) -> Iterator[list[Segment]]:
        yield from self._batches

    def drain(self) -> list[Segment]:
        self.drained = True
        return []

    def close(self) -> None:
        self.closed = True

    def stats(self) -> dict[str, int]:
        return {"frames": 5, "events": 7}


def test_merged_source_takes_one_ingest_batch_per_live_batch() -> None:
    ing = PcapIngest()
    ing.submit(DEMO)
    _wait(lambda: len(ing._handoff) >= 2)  # the file's one batch and its end
    seg = Segment(b"\x7f\0\0\1", 1, b"\x7f\0\0\1", 2, 0, 0, 0x10, b"", 0.0)
    live = _FakeLive([[seg], [], [seg]])
    merged = MergedSource(live, ing)
    out = list(merged.batches())
    assert [len(b) for b in out] == [1, 474, 0, 1]  # the end marker is no batch
    stats = merged.stats()
    assert stats["events"] == 7 and stats["frames"] == 5 + 474
    assert stats["pcap_jobs_done"] == 1 and stats["filtered"] == 0
    assert [h.name for h in merged.handoffs()] == ["pcap_ingest"]
    assert merged.drain() == [] and live.drained
    merged.close()
    assert live.closed and ing.stats()["pcap_jobs_queued"] == 0
    assert metrics.undeclared({"source": stats}) == []


def test_beating_source_beats_per_batch_and_stops_at_the_end() -> None:
    hb = Heartbeat("mirror", max_silence=60)
    src = Beating(_FakeLive([[], []]), hb)
    it = src.batches()
    next(it)
    assert hb.running and hb.problem() is None
    list(it)
    assert not hb.running
    assert src.stats()["events"] == 7 and src.handoffs() == []


# ---------------------------------------------------------------- listen addresses


def test_parse_listen_and_loopback() -> None:
    assert parse_listen("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_listen(":9090") == ("127.0.0.1", 9090)
    assert parse_listen("localhost:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9090") == ("::1", 9090)
    assert parse_listen("0.0.0.0:9090") == ("0.0.0.0", 9090)
    for bad in ("9090", "::1:9090", "host.example:80", "1.2.3.4:65536", "1.2.3.4:x", ""):
        with pytest.raises(ValueError, match="listen address"):
            parse_listen(bad)
    assert is_loopback("127.0.0.1") and is_loopback("127.5.0.1") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    for host in ("0.0.0.0", "::", "192.0.2.1", "2001:db8::1"):
        assert not is_loopback(host), host


def test_token_file_and_pcap_dir_errors_are_one_line(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text(f"  {TOKEN}\n")
    assert read_token(str(tok)) == TOKEN
    tok.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(str(tok))
    tok.write_text("two words")
    with pytest.raises(ValueError, match="one word"):
        read_token(str(tok))
    with pytest.raises(ValueError, match="No such file"):
        read_token(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a directory"):
        Api(FakeAgent(), pcap_dir=tmp_path / "missing")


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
