"""The observed-port limit (issue 19, finding 5): one bound (agent.sources.MAX_PORTS) checked
before anything changes, at start (``--port``, the config file, ``mirror-agent config``:
exit 2, one line) and by ``PUT /ports`` (400); a change the capture refuses leaves the old
ports everywhere, so ``GET /ports``, the mirror's classifier and the capture never disagree.
The kernel side is tests/integration/test_port_limit.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.control import RunningAgent
from agent.cli.layers import parse_options
from agent.cli.parser import UsageError
from agent.control.api import Api, Request
from agent.mirror.config import FORWARD_SOURCE_PORTS, ForwardConfig, MirrorConfig
from agent.mirror.driver import TrafficMirror
from agent.model import Segment
from agent.sources import MAX_PORTS, PortLimitError, SourceError, check_port_count
from agent.sources.afpacket import BPF_MAXINSNS, AfPacketSource, capture_expression
from agent.sources.ebpf.decap import Decap
from agent.sources.ebpf.program import Build
from agent.sources.filter import BpfFilter

AGENT = [sys.executable, "-m", "agent.cli"]
TOO_MANY = list(range(10000, 10000 + MAX_PORTS + 1))


def _csv(ports: list[int]) -> str:
    return ",".join(map(str, ports))


def test_the_bound_is_named_and_inclusive() -> None:
    check_port_count(range(MAX_PORTS))
    with pytest.raises(PortLimitError, match=f"{MAX_PORTS + 1} ports, but a live capture "
                                             f"observes at most {MAX_PORTS}"):
        check_port_count(TOO_MANY)
    assert issubclass(PortLimitError, ValueError)  # answered like any refused change


def test_the_afpacket_filter_for_the_bound_fits_the_kernel_with_room() -> None:
    """What MAX_PORTS is derived from: the classic BPF for the most ports, far-apart numbers
    (no ranges to share code), with --decap and a --filter, is well under BPF_MAXINSNS."""
    ports = list(range(1000, 1000 + 7 * MAX_PORTS, 7))
    plain = BpfFilter(capture_expression(ports, None, FORWARD_SOURCE_PORTS))
    full = BpfFilter(capture_expression(ports, "not net 198.51.100.0/24 and not host "
                                               "192.0.2.7", FORWARD_SOURCE_PORTS,
                                        Decap.parse("vxlan,gre,ipip")))
    assert len(plain.instructions()) < BPF_MAXINSNS // 2
    assert len(full.instructions()) < BPF_MAXINSNS * 3 // 4


def test_the_ebpf_map_is_built_to_the_bound() -> None:
    assert f"-DMAX_PORTS={MAX_PORTS}" in Build("tc", 4, (1, 0)).cflags()


# ---------------------------------------------------------------- start-up


@pytest.mark.parametrize("command", ["run", "config"])
def test_too_many_ports_exit_2_naming_port_and_the_limit(command: str) -> None:
    res = subprocess.run([*AGENT, command, "--iface", "lo", "--port", _csv(TOO_MANY)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "--port" in lines[0] and str(MAX_PORTS) in lines[0], lines
    assert "Traceback" not in res.stderr and "BpfError" not in res.stderr


def test_too_many_ports_from_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(f"port = {json.dumps(TOO_MANY)}\n")
    with pytest.raises(UsageError, match=f"--port names {MAX_PORTS + 1} ports.*at most "
                                         f"{MAX_PORTS}"):
        parse_options(["run", "--iface", "lo", "--config", str(conf)], {})


def test_the_bound_itself_is_accepted_and_repeats_do_not_count() -> None:
    ok = list(range(10000, 10000 + MAX_PORTS))
    opts = parse_options(["run", "--iface", "lo", "--port", _csv(ok + ok[:5])], {})
    assert len(opts.pipe.ports) == MAX_PORTS


def test_offline_is_not_bound_by_a_kernel_it_does_not_use() -> None:
    opts = parse_options(["offline", "x.pcap", "--port", _csv(TOO_MANY)], {})
    assert len(opts.pipe.ports) == MAX_PORTS + 1


def test_afpacket_source_refuses_too_many_ports_before_opening_anything() -> None:
    with pytest.raises(SourceError, match=f"at most {MAX_PORTS}"):
        AfPacketSource(["lo"], TOO_MANY)


# ---------------------------------------------------------------- PUT /ports


class SteerableSource:
    """A PortSteerable capture that refuses a change when told to, keeping its old ports."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = sorted(ports)
        self.refuse: str | None = None
        self.calls = 0

    @property
    def ifaces(self) -> list[str]:
        return ["lo"]

    @property
    def ports(self) -> list[int]:
        return list(self._ports)

    def set_ports(self, ports: list[int]) -> None:
        self.calls += 1
        check_port_count(ports)
        if self.refuse:
            raise ValueError(self.refuse)
        self._ports = sorted(ports)

    def batches(self) -> Iterator[list[Segment]]:
        yield []

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}


@pytest.fixture
def running() -> tuple[RunningAgent, SteerableSource, Api]:
    agent = RunningAgent(parse_options(["run", "--iface", "lo", "--port", "9000"], {}))
    agent.mirror = TrafficMirror(MirrorConfig(observed_port=9000))
    src = SteerableSource([9000])
    agent.source = src
    return agent, src, Api(agent)


def _put(api: Api, ports: list[int]) -> tuple[int, dict[str, object]]:
    body = json.dumps({"ports": ports}).encode()
    r = api.handle(Request("PUT", "/ports", {"content-length": str(len(body))}, body))
    return r.status, json.loads(r.body)


def _get(api: Api) -> list[int]:
    out = json.loads(api.handle(Request("GET", "/ports")).body)["ports"]
    assert isinstance(out, list)
    return out


def test_put_too_many_is_400_naming_the_limit_and_changes_nothing(
        running: tuple[RunningAgent, SteerableSource, Api]) -> None:
    agent, src, api = running
    status, body = _put(api, TOO_MANY)
    assert status == 400 and f"at most {MAX_PORTS}" in str(body["error"]), body
    assert src.calls == 0  # refused before the capture was asked
    assert _get(api) == src.ports == [9000] and agent.mirror is not None
    assert agent.mirror.ports == {9000}
    # ...and the next change works: nothing was left half done.
    assert _put(api, [9000, 9001]) == (200, {"ports": [9000, 9001]})
    assert src.ports == [9000, 9001] and agent.mirror.ports == {9000, 9001}


def test_put_the_bound_itself_is_applied(
        running: tuple[RunningAgent, SteerableSource, Api]) -> None:
    _agent, src, api = running
    ports = list(range(10000, 10000 + MAX_PORTS))
    assert _put(api, ports) == (200, {"ports": ports})
    assert src.ports == ports


def test_a_change_the_capture_refuses_leaves_the_old_ports_everywhere(
        running: tuple[RunningAgent, SteerableSource, Api]) -> None:
    """Before the fix the mirror kept old | new after a failure, and GET /ports showed
    ports the kernel did not capture."""
    agent, src, api = running
    src.refuse = "the kernel refused the port map change (Cannot allocate memory)"
    status, body = _put(api, [9000, 9001, 9002])
    assert status == 409 and "refused" in str(body["error"])
    assert agent.mirror is not None
    assert _get(api) == src.ports == sorted(agent.mirror.ports) == [9000]
    src.refuse = None
    assert _put(api, [9002]) == (200, {"ports": [9002]})
    assert _get(api) == src.ports == sorted(agent.mirror.ports) == [9002]


@pytest.mark.parametrize("mode", ["connection", "request"])
def test_status_forward_capacity_is_the_forward_modes(mode: str) -> None:
    """Connection mode: bound by source ports (each captured connection dials one); request
    mode: a pool of keep-alive connections, so new captured connections cost none."""
    agent = RunningAgent(parse_options(["run", "--iface", "lo", "--port", "9000"], {}))
    agent.mirror = TrafficMirror(MirrorConfig(
        observed_port=9000, target_addr="127.0.0.1:19000",
        forward=ForwardConfig(mode=mode, pool_size=8)))
    agent.source = SteerableSource([9000])
    capacity = agent.status()["forward_capacity"]
    assert capacity["mode"] == mode
    if mode == "request":
        assert capacity["pool_connections"] == 8
        assert capacity["new_connections_per_captured_connection"] == 0
    else:
        assert capacity["source_ports"] == 65535 - 61000 + 1
        assert "pool_connections" not in capacity
