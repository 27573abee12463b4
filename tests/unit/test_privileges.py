"""Start-up privilege and buffer checks with injected host facts (nothing here depends on the
machine's numbers), plus the CLI's answer to the out-of-range ``--buffer-mib`` reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.sources import SourceError
from agent.sources.ebpf.privileges import (
    CAPS,
    Host,
    buffer_mib_range,
    cgroup_memory_limit,
    check_buffer_mib,
    check_capabilities,
    check_memlock,
    effective_caps,
    max_memlock_mib,
    perf_locked_bytes,
)
from agent.sources.ebpf.source import check_environment

MIB = 1 << 20
GIB = 1 << 30


def caps(*names: str) -> int:
    return sum(1 << CAPS[n] for n in names)


EBPF = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")
#: The lab machine's shape: 2 CPUs, perf_event_mlock_kb 516, an 8 MiB RLIMIT_MEMLOCK.
BASE = Host(caps=caps(*EBPF, "CAP_NET_RAW", "CAP_IPC_LOCK"), cap_last=40, uid=0, cpus=2,
            possible_cpus=2, perf_mlock_kb=516, perf_paranoid=2, memlock_rlimit=8 * MIB,
            mem_available=64 * GIB, cgroup_limit=None)


def host(**kw: object) -> Host:
    return dataclasses.replace(BASE, **kw)  # type: ignore[arg-type]


def test_effective_caps_come_from_capeff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000005000\n")
    assert effective_caps(status) == caps(*EBPF, "CAP_IPC_LOCK")
    assert effective_caps(tmp_path / "missing") == 0


def test_root_without_the_capabilities_is_refused_naming_them() -> None:
    """uid 0 is not enough: a container or a systemd bounding set may drop capabilities."""
    with pytest.raises(SourceError) as e:
        check_capabilities(host(caps=caps("CAP_BPF", "CAP_NET_ADMIN")), ebpf=True)
    msg = str(e.value)
    assert "needs root or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN" in msg
    assert "(root) lacks CAP_PERFMON:" in msg
    assert "capabilities.add [PERFMON]" in msg and "AmbientCapabilities=CAP_PERFMON " in msg
    assert "\n" not in msg


def test_every_missing_capability_is_named() -> None:
    with pytest.raises(SourceError) as e:
        check_capabilities(host(caps=0, uid=1000), ebpf=True)
    assert "(uid 1000) lacks CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN:" in str(e.value)
    assert "add [BPF, PERFMON, NET_ADMIN]" in str(e.value)


def test_sys_admin_stands_in_for_bpf_and_perfmon_only() -> None:
    check_capabilities(host(caps=caps("CAP_SYS_ADMIN", "CAP_NET_ADMIN")), ebpf=True)
    with pytest.raises(SourceError, match="lacks CAP_NET_ADMIN:"):
        check_capabilities(host(caps=caps("CAP_SYS_ADMIN")), ebpf=True)


def test_kernels_without_cap_bpf_need_sys_admin() -> None:
    old = host(cap_last=37, caps=caps("CAP_NET_ADMIN"))
    with pytest.raises(SourceError, match="lacks CAP_SYS_ADMIN:"):
        check_capabilities(old, ebpf=True)


def test_afpacket_needs_net_raw_only() -> None:
    check_capabilities(host(caps=caps("CAP_NET_RAW")), ebpf=False)
    with pytest.raises(SourceError, match=r"needs root or CAP_NET_RAW.*add \[NET_RAW\]"):
        check_capabilities(host(caps=caps(*EBPF)), ebpf=False)


def test_perf_rings_lock_a_ring_and_a_header_page_per_cpu() -> None:
    assert perf_locked_bytes(16, 2) == 2 * (16 * MIB + 4096)
    assert perf_locked_bytes(5, 4) == 4 * (8 * MIB + 4096)  # rounded up to a power of two


def test_memlock_counts_only_what_is_sure_at_the_page() -> None:
    """perf_mmap charges the uid's share (perf_event_mlock_kb per CPU) first, the rest to
    RLIMIT_MEMLOCK; the share is shared with the uid's other processes, so only the rlimit is
    sure. 1 MiB rings on 2 CPUs lock 2 x (256 + 1) pages. (Measured on the lab machine with
    the share free: the rings then map with the rlimit 256 pages smaller, and not one less;
    with the share taken by other root processes, they need all 514 pages.)"""
    no_lock = caps(*EBPF)
    check_memlock(host(caps=no_lock, memlock_rlimit=514 * 4096), 1, "perf")
    with pytest.raises(SourceError):
        check_memlock(host(caps=no_lock, memlock_rlimit=513 * 4096), 1, "perf")


def test_memlock_message_says_need_limit_and_every_way_out() -> None:
    h = host(caps=caps(*EBPF))
    with pytest.raises(SourceError) as e:
        check_memlock(h, 16, "perf")
    msg = str(e.value)
    assert "need 32.0 MiB of locked memory" in msg
    assert "only RLIMIT_MEMLOCK, 8.0 MiB, is sure" in msg
    assert "perf_event_mlock_kb, 516 KiB per CPU, is shared" in msg
    assert "capabilities.add [IPC_LOCK]" in msg and "AmbientCapabilities=CAP_IPC_LOCK" in msg
    assert "LimitMEMLOCK=" in msg and "ulimit -l" in msg
    # 4 MiB rings would need 2 x 1025 pages: 8 KiB over 8 MiB.
    assert "--buffer-mib 2 or less" in msg and "--transport ringbuf" in msg
    assert "\n" not in msg
    check_memlock(h, max_memlock_mib(h), "perf")  # the suggestion fits
    assert max_memlock_mib(h) == 2


def test_memlock_passes_with_ipc_lock_no_rlimit_unparanoid_or_ringbuf() -> None:
    check_memlock(host(), 1024, "perf")  # CAP_IPC_LOCK
    no_lock = caps(*EBPF)
    check_memlock(host(caps=no_lock, memlock_rlimit=None), 1024, "perf")
    check_memlock(host(caps=no_lock, perf_paranoid=-1), 1024, "perf")
    check_memlock(host(caps=no_lock), 1024, "ringbuf")  # charged to the memcg instead


def test_memlock_without_any_fitting_buffer_offers_no_buffer_size() -> None:
    tight = host(caps=caps(*EBPF), memlock_rlimit=64 << 10)
    with pytest.raises(SourceError) as e:
        check_memlock(tight, 1, "perf")
    assert "--buffer-mib" not in str(e.value) and "--transport ringbuf" in str(e.value)


def test_perf_buffer_range_per_cpu_kernel_limit_and_memory() -> None:
    assert buffer_mib_range(host(), True, "perf")[0] == 1024  # one ring: at most 1 GiB
    # Half of 1 GiB available over 2 CPUs: 256 MiB rings.
    assert buffer_mib_range(host(mem_available=GIB), True, "perf")[0] == 256
    # The cgroup's limit counts when smaller; MIB rounds up to a power of two.
    hi, why = buffer_mib_range(host(cgroup_limit=300 * MIB), True, "perf")
    assert hi == 64 and "cgroup" in why


def test_ringbuf_range_is_the_total_at_most_2_gib() -> None:
    assert buffer_mib_range(host(), True, "ringbuf")[0] == 1024
    assert buffer_mib_range(host(possible_cpus=8), True, "ringbuf")[0] == 256
    # 170 x 3 = 510 MiB rounds up to 512: half of 1 GiB.
    assert buffer_mib_range(host(possible_cpus=3, mem_available=GIB), True, "ringbuf")[0] == 170


def test_afpacket_receive_buffer_must_fit_a_c_int() -> None:
    assert buffer_mib_range(host(), False, "perf")[0] == 255  # 256 x 8 MiB = 2^31


@pytest.mark.parametrize(("mib", "ebpf", "transport", "allowed"), [
    (0, True, "perf", "1-1024"), (2047, True, "perf", "1-1024"),
    (100000, True, "perf", "1-1024"), (100000, True, "ringbuf", "1-1024"),
    (100000, False, "-", "1-255"), (-1, False, "-", "1-255")])
def test_out_of_range_buffer_says_the_range(mib: int, ebpf: bool, transport: str,
                                            allowed: str) -> None:
    with pytest.raises(SourceError) as e:
        check_buffer_mib(host(), mib, ebpf, transport)
    assert f"--buffer-mib {mib} is out of range: this host allows {allowed} (" in str(e.value)


def test_default_buffer_too_big_for_a_tiny_host_is_named_as_the_default() -> None:
    with pytest.raises(SourceError, match=r"the default --buffer-mib 16 .* allows 1-4 "):
        check_buffer_mib(host(mem_available=16 * MIB), 16, True, "perf", default=True)


def test_check_environment_checks_root_capabilities_then_memlock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: capabilities were checked only for euid != 0, memlock not at all."""
    def on(h: Host) -> None:
        monkeypatch.setattr(Host, "read", classmethod(lambda cls: h))

    on(host(caps=caps("CAP_PERFMON", "CAP_NET_ADMIN")))
    with pytest.raises(SourceError, match="lacks CAP_BPF"):
        check_environment()
    on(host(caps=caps(*EBPF)))
    with pytest.raises(SourceError, match="locked memory"):
        check_environment(buffer_mib=16)
    on(host(caps=0))
    with pytest.raises(SourceError, match="out of range"):
        check_environment(buffer_mib=4096)  # a usage error comes before privileges
    on(host(caps=caps("CAP_NET_RAW")))
    check_environment(ebpf=False, modules=Path("/nonexistent"), buffer_mib=255)


def _write_cgroup_v1(tmp_path: Path, limits: dict[str, int]) -> tuple[Path, Path]:
    mnt = tmp_path / "memory"
    for rel, limit in limits.items():
        (mnt / rel).mkdir(parents=True, exist_ok=True)
        (mnt / rel / "memory.limit_in_bytes").write_text(f"{limit}\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        f"35 31 0:31 / {mnt} rw,relatime shared:9 - cgroup cgroup rw,memory\n")
    return mnt, mountinfo


def test_cgroup_v1_limit_is_the_smallest_on_the_way_up(tmp_path: Path) -> None:
    unlimited = 9223372036854771712
    _mnt, mountinfo = _write_cgroup_v1(tmp_path, {
        "": unlimited, "kubepods": 8 * GIB, "kubepods/pod1": GIB, "kubepods/pod1/c1": unlimited})
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("9:name=systemd:/kubepods/pod1/c1\n4:memory:/kubepods/pod1/c1\n0::/\n")
    assert cgroup_memory_limit(cgroup, mountinfo) == GIB
    cgroup.write_text("4:memory:/\n")  # a cgroup namespace: the mount shows our own cgroup
    assert cgroup_memory_limit(cgroup, mountinfo) is None


def test_cgroup_v2_memory_max(tmp_path: Path) -> None:
    mnt = tmp_path / "unified"
    (mnt / "system.slice" / "mirror-agent.service").mkdir(parents=True)
    (mnt / "system.slice" / "memory.max").write_text("max\n")
    (mnt / "system.slice" / "mirror-agent.service" / "memory.max").write_text("536870912\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"30 23 0:27 / {mnt} rw - cgroup2 cgroup2 rw,nsdelegate\n")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/system.slice/mirror-agent.service\n")
    assert cgroup_memory_limit(cgroup, mountinfo) == 512 * MIB
    cgroup.write_text("0::/system.slice\n")
    assert cgroup_memory_limit(cgroup, mountinfo) is None
    assert cgroup_memory_limit(tmp_path / "nope", mountinfo) is None


@pytest.mark.parametrize("args", [["--buffer-mib", "100000"], ["--buffer-mib", "2047"],
                                  ["--buffer-mib", "100000", "--engine", "afpacket"],
                                  ["--buffer-mib", "0"]])
def test_cli_buffer_out_of_range_exits_2_with_one_line(args: list[str],
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """The reports: an empty MemoryError, ENOMEM after 12 s, a TypeError (afpacket). The
    interface does not exist, so nothing is ever attached even if the check were missing."""
    assert main(["run", "--iface", "nosuch0", "--port", "9000", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"--buffer-mib {args[1]} is out of range: this host allows 1-" in lines[0]


def test_a_memory_cgroup_whose_filesystem_is_hidden_is_reported(tmp_path: Path) -> None:
    """Under ``ip netns exec`` /sys is a fresh sysfs: the process is in a memory cgroup whose
    limit it cannot read; say which, so the budget can warn instead of guessing silently."""
    from agent.sources.ebpf.privileges import unseen_memory_cgroup

    cg = tmp_path / "cgroup"
    cg.write_text("5:memory:/bench/agent\n0::/\n")
    hidden = tmp_path / "mountinfo"
    hidden.write_text("30 1 0:26 / /sys rw - sysfs sysfs rw\n")
    seen = tmp_path / "mountinfo2"
    seen.write_text("40 30 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert unseen_memory_cgroup(cg, hidden) == "/bench/agent"
    assert unseen_memory_cgroup(cg, seen) is None
    root = tmp_path / "rootcg"
    root.write_text("5:memory:/\n")
    assert unseen_memory_cgroup(root, hidden) is None
