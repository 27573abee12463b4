"""More observed ports than the old bound of 64, for real (issue 19, finding 5).

Before: ``PUT /ports`` with 65 ports answered 500 with the kernel map half written,
``GET /ports`` listed all 65, later changes failed and traffic to a port ``GET /ports``
showed was not captured; ``run --port`` with 65 ports died with a raw ``BpfError ...
Argument list too long`` (exit 1). Now up to MAX_PORTS are taken, more are refused before
anything changes (400), and a change is all or nothing: the kernel's port map (read back
here, from the agent's own map by its id) always holds what ``GET /ports`` says, even after
the kernel refused a change halfway."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sources import MAX_PORTS, PortLimitError
from agent.sources.ebpf.bpfsys import BpfError, BpfMap
from agent.sources.ebpf.program import Build, MirrorProgram
from agent.sources.ring.perfbuf import possible_cpus
from lab.control import ask, wait_for
from lab.netns import AGENT, LiveAgent, NetNS, run_clients, start_python_server

ROOT = Path(__file__).resolve().parents[2]
BASE = "http://127.0.0.1:19464"
SIXTY_FIVE = list(range(9100, 9165))  # the finding's count: one past the old map size
TOO_MANY = list(range(10000, 10001 + MAX_PORTS))


def agent_ports_map(pid: int) -> list[int]:
    """The ports in a running agent's map: its BPF map descriptors (``/proc/PID/fdinfo``),
    the ports map told apart by its sizes (u16 key, u8 value, MAX_PORTS entries), opened by
    id and read back key by key."""
    found = []
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            fields = dict(line.split(":\t", 1) for line in info.read_text().splitlines()
                          if ":\t" in line)
        except OSError:  # a descriptor closed meanwhile
            continue
        if (fields.get("map_type"), fields.get("key_size"), fields.get("value_size"),
                fields.get("max_entries")) == ("1", "2", "1", str(MAX_PORTS)):
            found.append(int(fields["map_id"]))
    assert len(found) == 1, f"ports maps of {pid}: {found}"
    table = BpfMap.from_id(found[0])
    try:
        return sorted(int.from_bytes(k, sys.byteorder) for k in table.dump_keys())
    finally:
        os.close(table.fd)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _forwarded(path: Path, expected: int, timeout: float = 10) -> int:
    """The shadow's request count once it reaches ``expected`` (or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while _lines(path) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # nothing more should come
    return _lines(path)


def _put(ns: NetNS, ports: list[int]) -> tuple[int, object]:
    return ask(f"{BASE}/ports", "PUT", json.dumps({"ports": ports}), ns=ns)


def _get(ns: NetNS) -> list[int]:
    code, body = ask(f"{BASE}/ports", ns=ns)
    assert code == 200 and isinstance(body, dict), (code, body)
    ports = body["ports"]
    assert isinstance(ports, list)
    return ports


@pytest.mark.parametrize("engine", ["tc", "afpacket"])
def test_sixty_five_ports_at_start_and_by_put_and_too_many_refused(
        tmp_path: Path, engine: str) -> None:
    shadow_log = tmp_path / "shadow.log"
    with NetNS() as ns:
        for port in (9000, 9164, 9200):
            start_python_server(ns, port)
        start_python_server(ns, 19000, log=shadow_log)
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port",
                          ",".join(map(str, SIXTY_FIVE)), "--engine", engine, "--listen",
                          "127.0.0.1:19464", "--target", "127.0.0.1:19000")
        wait_for(f"{BASE}/readyz", 200, ns=ns)

        def kernel_agrees() -> list[int]:
            ports = _get(ns)
            if engine == "tc":
                assert agent_ports_map(agent.proc.pid) == ports
            return ports

        assert kernel_agrees() == SIXTY_FIVE
        assert run_clients(ns, "127.0.0.1", 9164, 1, 5) == 5  # the 65th port
        assert _forwarded(shadow_log, 5) == 5
        # 65 again, most of them new: the map goes through a full change.
        new = [9000, *range(9200, 9264)]
        assert _put(ns, new) == (200, {"ports": new})
        assert kernel_agrees() == new
        assert run_clients(ns, "127.0.0.1", 9164, 1, 5) == 5  # no longer observed
        assert run_clients(ns, "127.0.0.1", 9000, 1, 5) == 5
        assert _forwarded(shadow_log, 10) == 10
        # Too many: refused up front, naming the limit; nothing changed.
        code, body = _put(ns, TOO_MANY)
        assert code == 400 and f"at most {MAX_PORTS}" in str(body), body
        assert kernel_agrees() == new
        # Refused by the agent (a forward source port): nothing changed either.
        assert _put(ns, [9000, 62000])[0] == 409
        assert kernel_agrees() == new
        # The bound itself, then back to two: later changes work.
        full = list(range(20000, 20000 + MAX_PORTS))
        assert _put(ns, full) == (200, {"ports": full})
        assert kernel_agrees() == full
        assert _put(ns, [9000, 9200]) == (200, {"ports": [9000, 9200]})
        assert kernel_agrees() == [9000, 9200]
        assert run_clients(ns, "127.0.0.1", 9200, 1, 5) == 5
        assert _forwarded(shadow_log, 15) == 15
        log = agent.stop()
    assert "Traceback" not in log and "internal error" not in log


def test_run_with_too_many_ports_exits_2_before_loading(tmp_path: Path) -> None:
    with NetNS() as ns:
        res = ns.run(*AGENT, "--iface", "lo", "--port",
                     ",".join(map(str, TOO_MANY)), check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "--port" in lines[0] and f"at most {MAX_PORTS}" in lines[0], lines


def test_afpacket_filter_too_long_for_the_kernel_is_refused_and_the_old_one_kept(
        tmp_path: Path) -> None:
    """A change the AF_PACKET socket cannot take (the filter for all the ports and this
    --filter is over the kernel's 4,096 instructions): 409 naming why, and the old filter
    still captures exactly the old port."""
    # ~1,500 instructions of --filter that never matches our traffic (no frame this long).
    never = " and ".join(f"len != {20000 + i}" for i in range(1500))
    shadow_log = tmp_path / "shadow.log"
    with NetNS() as ns:
        start_python_server(ns, 9000)
        start_python_server(ns, 20001)
        start_python_server(ns, 19000, log=shadow_log)
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000", "--engine",
                          "afpacket", "--filter", never, "--listen", "127.0.0.1:19464",
                          "--target", "127.0.0.1:19000")
        wait_for(f"{BASE}/readyz", 200, ns=ns)
        code, body = _put(ns, list(range(20000, 20000 + MAX_PORTS)))
        assert code == 409, body
        assert "instructions" in str(body) and "4096" in str(body), body
        assert _get(ns) == [9000]
        assert run_clients(ns, "127.0.0.1", 20001, 1, 5) == 5  # refused: not observed
        assert run_clients(ns, "127.0.0.1", 9000, 1, 5) == 5  # kept: observed
        assert _forwarded(shadow_log, 5) == 5
        assert _put(ns, [9000, 20001]) == (200, {"ports": [9000, 20001]})
        assert run_clients(ns, "127.0.0.1", 20001, 1, 5) == 5
        assert _forwarded(shadow_log, 10) == 10
        agent.stop()


@pytest.mark.parametrize("engine", ["tc", "afpacket"])
def test_a_change_refused_halfway_is_undone_and_get_ports_matches_the_kernel(
        engine: str) -> None:
    """The whole chain (API, RunningAgent, mirror, the capture on lo) in a namespace, the
    kernel refusing one change (the map's 40th update; the socket's new filter): 409, and
    GET /ports, the mirror's classifier and what the kernel holds (read back) all have the
    previous ports; the next change works."""
    with NetNS() as ns:
        res = ns.run(sys.executable, "-m", "tests.integration.port_chain", engine, "40",
                     check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = {s["step"]: s for s in map(json.loads, (line for line in res.stdout.splitlines()
                                                    if line.startswith('{"step"')))}
    assert len(steps) == 4, res.stdout
    for s in steps.values():
        assert s["get"] == s["mirror"] == s["kernel"], s
    assert steps["65 ports"]["status"] == 200
    assert steps["65 ports"]["kernel"] == SIXTY_FIVE
    assert steps["too many"]["status"] == 400
    assert f"at most {MAX_PORTS}" in steps["too many"]["answer"]["error"]
    refused = steps["refused halfway"]
    assert refused["status"] == 409 and refused["kernel"] == SIXTY_FIVE, refused
    assert "refused" in refused["answer"]["error"]
    assert steps["after the failure"]["status"] == 200
    assert steps["after the failure"]["kernel"] == [9000, 9200]


# ---------------------------------------------------------------- the program alone


class _FailingMap:
    """The program's ports map, failing the ``fail_at``-th update or delete (ENOMEM)."""

    def __init__(self, real: BpfMap, fail_at: int, on: str) -> None:
        self.real, self.fail_at, self.on, self.calls = real, fail_at, on, 0

    def _tick(self, op: str) -> None:
        if op == self.on:
            self.calls += 1
            if self.calls == self.fail_at:
                raise BpfError(errno.ENOMEM, f"map {op}: Cannot allocate memory")

    def update(self, key: bytes, value: bytes) -> None:
        self._tick("update")
        self.real.update(key, value)

    def delete(self, key: bytes) -> bool:
        self._tick("delete")
        return self.real.delete(key)

    def dump_keys(self) -> list[bytes]:
        return self.real.dump_keys()


@pytest.fixture(scope="module")
def program() -> Iterator[MirrorProgram]:
    prog = MirrorProgram(Build("tc", possible_cpus(), (61000, 65535)))
    yield prog
    prog.close()


def test_the_map_takes_the_bound_and_swaps_full_sets(program: MirrorProgram) -> None:
    assert program._loaded.maps["ports"].max_entries == MAX_PORTS
    program.set_ports(SIXTY_FIVE)
    assert program.kernel_ports() == program.ports == set(SIXTY_FIVE)
    # A full set for another full set: removals go first, so the map never overflows.
    for base in (20000, 30000):
        full = set(range(base, base + MAX_PORTS))
        program.set_ports(full)
        assert program.kernel_ports() == program.ports == full
    with pytest.raises(PortLimitError, match=f"at most {MAX_PORTS}"):
        program.set_ports(TOO_MANY)
    assert program.kernel_ports() == program.ports == full


@pytest.mark.parametrize(("on", "fail_at"), [("update", 1), ("update", 30),
                                             ("delete", 1), ("delete", 50)])
def test_a_change_the_kernel_refuses_is_undone(program: MirrorProgram, on: str,
                                               fail_at: int) -> None:
    before = set(range(9000, 9100))
    program.set_ports(before)
    maps = program._loaded.maps
    real = maps["ports"]
    maps["ports"] = _FailingMap(real, fail_at, on)  # type: ignore[assignment]
    try:
        with pytest.raises(ValueError, match="refused the port map change"):
            program.set_ports(range(9050, 9200))  # 50 removed, 100 added
    finally:
        maps["ports"] = real
    assert program.kernel_ports() == program.ports == before
    program.set_ports([9000, 9200])
    assert program.kernel_ports() == program.ports == {9000, 9200}
