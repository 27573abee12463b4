"""The memory budget's arithmetic (agent/mirror/budget.py) and its command-line face."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import pytest

from agent.cli.commands import main
from agent.cli.configure import memory_budget, mirror_config
from agent.cli.layers import parse_options
from agent.mirror import budget
from agent.mirror.budget import MIB, BudgetError, derive, host_limit, parse_size
from agent.mirror.config import MirrorConfig

GIB = 1 << 30


def parts(b: budget.Budget) -> int:
    return (b.base + b.kernel_rings + b.flow_table + b.defrag + b.slack + b.drain_backlog
            + b.reassembly_total + b.record_queue + b.forward_total)


def test_cgroup_limit_less_an_eighth_else_the_default() -> None:
    assert host_limit(GIB, 64 * GIB) == (896 * MIB, "cgroup")
    assert host_limit(None, 64 * GIB) == (GIB, "default")
    assert host_limit(None, 2 * GIB) == (512 * MIB, "default")  # a quarter of a small VM


def test_default_1gib_cgroup_on_2_cpus() -> None:
    b = derive(896 * MIB, cpus=2, origin="cgroup")
    assert b.buffer_mib == 16 and b.kernel_rings == 2 * (16 * MIB + 4096)
    assert b.base == 67 * MIB
    assert b.max_flows == 896 * MIB // 8 // 1640
    pool = 896 * MIB - b.base - b.kernel_rings - b.flow_table - b.defrag
    share = (pool - pool * 2 // 5) // 4  # 2/5 of the pool is slack
    assert abs(b.drain_backlog - share) <= 4
    assert b.drain_backlog == b.reassembly_total == b.record_queue == b.forward_total
    assert (b.reassembly_flow, b.forward_flow) == (4 * MIB, 8 * MIB)
    assert parts(b) <= b.limit


@pytest.mark.parametrize("limit", [128 * MIB, 512 * MIB, GIB, 4 * GIB, 64 * GIB])
@pytest.mark.parametrize("transport", ["perf", "ringbuf", "afpacket", "none"])
@pytest.mark.parametrize("cpus", [1, 2, 16, 128])
def test_everything_fits_the_limit(limit: int, transport: str, cpus: int) -> None:
    try:
        b = derive(limit, cpus=cpus, transport=transport)
    except BudgetError:  # only small limits on many CPUs (1 MiB per CPU at least)
        assert limit <= 128 * MIB or (cpus == 128 and limit <= 512 * MIB)
        return
    assert parts(b) <= limit
    assert b.kernel_rings <= limit // 4 or b.buffer_mib == 1
    assert b.max_flows <= 100_000 and b.flow_table <= limit // 8
    assert (b.drain_backlog == 0) == (transport == "none")


def test_small_limits_shrink_the_rings_and_flows() -> None:
    b = derive(128 * MIB, cpus=2)
    assert b.buffer_mib == 8 and b.max_flows == 128 * MIB // 8 // 1640


def test_explicit_values_win_and_the_rest_share_what_is_left() -> None:
    b = derive(GIB, cpus=2, buffer_mib=4, max_flows=1000, max_buffer=64 * MIB,
               max_flow_buffer=1 * MIB)
    assert (b.buffer_mib, b.max_flows, b.reassembly_total, b.reassembly_flow) == (
        4, 1000, 64 * MIB, MIB)
    assert b.drain_backlog > derive(GIB, cpus=2).drain_backlog  # more left for the others
    assert parts(b) <= GIB


class _Explicit(TypedDict, total=False):
    """Explicit sizes ``derive`` is given (as the command line would)."""

    buffer_mib: int
    max_flows: int


@pytest.mark.parametrize(("kw", "says"), [
    ({}, "--memory-limit 80 MiB is too small: base 67 MiB"),
    ({"buffer_mib": 256}, "(--buffer-mib 256)"),
    ({"max_flows": 1_000_000}, "flows, --max-flows)"),
])
def test_too_small_a_limit_says_what_does_not_fit(kw: _Explicit, says: str) -> None:
    limit = 80 * MIB if not kw else 512 * MIB
    with pytest.raises(BudgetError) as e:
        derive(limit, cpus=2, **kw)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_max_buffer_over_the_buffers_does_not_fit() -> None:
    with pytest.raises(BudgetError, match=r"^--max-buffer 400 MiB does not fit --memory-limit "
                                          r"512 MiB: base"):
        derive(512 * MIB, cpus=2, max_buffer=400 * MIB)


@pytest.mark.parametrize(("text", "value"), [("512MiB", 512 * MIB), ("1GiB", GIB),
                                             ("1G", GIB), ("300m", 300 * MIB),
                                             ("65536", 65536), ("1.5GiB", 3 * GIB // 2)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "1Gx", "1iB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_library_and_cli_defaults_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "_mem_total", lambda: 64 * GIB)
    budget.default.cache_clear()
    try:
        args = parse_options(["run", "--iface", "lo", "--port", "8080"])
        cli = mirror_config(args)
        lib = MirrorConfig(observed_port=8080)
        assert cli.budget == lib.budget == budget.default()
        for f in ("max_flows", "max_flow_buffer", "max_total_buffer"):
            assert getattr(cli.reassembly, f) == getattr(lib.reassembly, f)
        for f in ("max_flow_buffer", "max_total_buffer"):
            assert getattr(cli.forward, f) == getattr(lib.forward, f)
    finally:
        budget.default.cache_clear()


def test_cgroup_limit_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.sources.ebpf.privileges as privileges

    monkeypatch.setattr(privileges, "cgroup_memory_limit", lambda: 512 * MIB)
    args = parse_options(["offline", "x.pcap", "--port", "80"])
    b = memory_budget(args)
    assert (b.limit, b.origin) == (448 * MIB, "cgroup")
    args = parse_options(["offline", "x.pcap", "--port", "80",
                                      "--memory-limit", "256MiB"])
    assert (memory_budget(args).limit, memory_budget(args).origin) == (
        256 * MIB, "--memory-limit")


def test_cli_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pcap = tmp_path / "x.pcap"
    pcap.write_bytes(b"")
    assert main(["offline", str(pcap), "--port", "80", "--memory-limit", "64MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "mirror-agent: error: --memory-limit 64 MiB is too small:"), err
    assert main(["offline", str(pcap), "--port", "80", "--memory-limit", "lots"]) == 2
    assert "is not a size" in capsys.readouterr().err
