"""Issue 18: several source addresses (``--forward-source-addrs``). Shadow connections are
bound to each address in turn, so the (address, port) pairs a TIME_WAIT holds multiply: with
two ports and two addresses four connections are open at once, and the fifth has none.
Real loopback sockets (every 127.0.0.0/8 address is this host's)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.cli.commands import main
from agent.cli.configure import mirror_config
from agent.cli.layers import parse_options
from agent.mirror.config import ForwardConfig
from agent.sinks.forward import ForwardSink
from agent.sinks.source_ports import forward_capacity
from tests.unit.shadow import Shadow, wait_until
from tests.unit.test_forward_faults import free_port_pair, push

ADDRS = ("127.0.0.2", "127.0.0.3")


@pytest.fixture
def shadow() -> Iterator[Shadow]:
    s = Shadow()
    yield s
    s.close()


def test_connections_alternate_over_the_addresses_and_multiply_the_pairs(
        shadow: Shadow) -> None:
    p = free_port_pair()
    sink = ForwardSink(shadow.addr, config=ForwardConfig(source_ports=(p, p + 1),
                                                         source_addrs=ADDRS))
    with capture_logs():
        for flow_id in range(1, 6):  # all stay open: each holds an (address, port) pair
            push(sink, flow_id, b"x%d" % flow_id, end=False)
        wait_until(lambda: sink.stats["connections_dropped_no_source_port"] == 1)
        wait_until(lambda: len(shadow.peers) == 4)
        sink.close()
    assert sorted(shadow.peers) == sorted((a, port) for a in ADDRS for port in (p, p + 1))
    st = sink.stats
    assert st["connections_completed"] == 4 and st["connections_dropped"] == 1
    assert sink.capacity["source_addresses"] == 2
    assert forward_capacity((p, p + 1), "127.0.0.1", 2)["source_addresses"] == 2


@pytest.mark.parametrize(("value", "message"), [
    ("192.0.2.1", "--forward-source-addrs 192.0.2.1: not an address of this host"),
    ("127.0.0.2,::1", "argument --forward-source-addrs: the addresses must all be IPv4"),
    ("localhost", "argument --forward-source-addrs: 'localhost' is not an IP address"),
])
def test_a_bad_address_is_exit_2_naming_the_flag(value: str, message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pcap = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
    rc = main(["offline", str(pcap), "--port", "8080", "--target", "127.0.0.1:9",
               "--forward-source-addrs", value])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_option_reaches_the_forward_config_from_a_file_too(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('port = 8080\ntarget = "127.0.0.1:9"\n'
                    'forward-source-addrs = ["127.0.0.2", "127.0.0.3", "127.0.0.2"]\n')
    opts = parse_options(["offline", "x.pcap", "--config", str(conf)], {})
    assert opts.pipe.forward_source_addrs == ADDRS
    assert mirror_config(opts).forward.source_addrs == ADDRS
    flag = parse_options(["offline", "x.pcap", "--port", "1", "--forward-source-addrs",
                          "127.0.0.3"], {})
    assert flag.pipe.forward_source_addrs == ("127.0.0.3",)


def test_offline_forwards_from_the_addresses(shadow: Shadow, tmp_path: Path) -> None:
    pcap = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
    stats = tmp_path / "stats.json"
    rc = main(["--log-format", "json", "offline", str(pcap), "--port", "8080",
               "--target", shadow.addr, "--forward-source-addrs", ",".join(ADDRS),
               "--stats-json", str(stats)])
    assert rc == 0
    got = json.loads(stats.read_text())
    assert got["mirror_agent_forward_connections_completed_total"] == len(shadow.peers) > 1
    assert {a for a, _port in shadow.peers} == set(ADDRS)
    with socket.socket() as s:  # the pairs were given back: an address binds again
        s.bind((ADDRS[0], 0))
