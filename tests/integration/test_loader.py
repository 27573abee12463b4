"""The BPF program is compiled and loaded in a child: the running agent holds descriptors,
not LLVM; compile errors come back as one clear message; maps work through bpfsys."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sources.ebpf.bpfsys import SCHED_CLS
from agent.sources.ebpf.loader import LoadError, load
from agent.sources.ebpf.source import BPF_DIR
from lab.netns import LiveAgent, NetNS

_FLAGS = [f"-I{BPF_DIR}", "-DMAX_CPUS=2", "-DMAX_PORTS=64", "-DMIRROR_OWN_PORT_LO=61000",
          "-DMIRROR_OWN_PORT_HI=65535"]


def test_compile_error_is_one_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("int f(struct __sk_buff *skb) { return undefined_name; }\n")
    with pytest.raises(LoadError) as e:
        load(bad, [], [("f", SCHED_CLS)], [])
    assert "\n" not in str(e.value) and str(e.value)


def test_a_compiler_flood_on_stderr_does_not_stall_the_loader(tmp_path: Path) -> None:
    """Far more than a pipe holds: the error still comes back, at once."""
    noisy = tmp_path / "noisy.c"
    noisy.write_text("".join(f"#warning warning number {i}\n" for i in range(3000))
                     + "int f(struct __sk_buff *skb) { return nope; }\n")
    with pytest.raises(LoadError, match="undeclared identifier 'nope'"):
        load(noisy, [], [("f", SCHED_CLS)], [], timeout=30)


def test_maps_and_programs_outlive_the_child() -> None:
    prog = load(BPF_DIR / "mirror.bpf.c", _FLAGS, [("mirror_tc_ingress", SCHED_CLS)],
                ["ports", "counters"])
    try:
        ports, counters = prog.maps["ports"], prog.maps["counters"]
        assert (ports.key_size, ports.value_size) == (2, 1)
        assert ports.lookup((8080).to_bytes(2, "little")) is None
        ports.update((8080).to_bytes(2, "little"), b"\x01")
        assert ports.lookup((8080).to_bytes(2, "little")) == b"\x01"
        with pytest.raises(ValueError):  # a wrong size never reaches the kernel
            ports.update((8080).to_bytes(4, "little"), b"\x01")
        # A per-CPU array: one 8-byte value per possible CPU, not one in all.
        assert (counters.key_size, counters.value_size) == (4, 8)
        assert len(counters.lookup((0).to_bytes(4, "little"), 3) or b"") == 24
        assert prog.functions["mirror_tc_ingress"] > 2
    finally:
        prog.close()


def test_running_agent_does_not_map_llvm(tmp_path: Path) -> None:
    with NetNS() as ns:
        agent = LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000")
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        agent.stop(settle=0)
    assert "LLVM" not in maps and "libbcc" not in maps


def test_ports_change_without_reloading() -> None:
    """set_ports adds and removes map entries; the ports that stay are untouched."""
    from agent.sources.ebpf.program import Build, MirrorProgram
    from agent.sources.ring.perfbuf import possible_cpus

    prog = MirrorProgram(Build("tc", possible_cpus(), (61000, 65535)))
    try:
        table = prog._loaded.maps["ports"]

        def present() -> set[int]:
            return {p for p in (80, 8080, 9090)
                    if table.lookup(p.to_bytes(2, "little")) is not None}

        prog.set_ports([8080, 9090])
        assert present() == {8080, 9090}
        prog.set_ports([9090, 80])
        assert present() == {80, 9090} and prog.ports == {80, 9090}
    finally:
        prog.close()
