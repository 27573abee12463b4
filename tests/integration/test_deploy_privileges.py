"""The agent starts and mirrors under exactly the privileges the deploy files grant.

Each deployment is emulated as uid 0 with ``setpriv``: only the capability set read from
``deploy/mirror-agent.service`` (AmbientCapabilities=) or ``deploy/daemonset.yaml``
(capabilities.add, after drop ALL) in the inheritable, ambient and bounding sets, no new
privileges, and the RLIMIT_MEMLOCK the process would have (the unit's LimitMEMLOCK=, else the
8 MiB default). The unit's home is hidden (ProtectHome=); the container has a read-only root.
The native decoder was built when the package was installed, so neither writes a cache. Only
the CLI is used.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.sources.ebpf.privileges import CAPS, MEMLOCK_CAP
from lab import netns
from lab.netns import NetNS, run_clients, start_python_server
from tests.unit.test_deploy_files import daemonset_capabilities, unit_capabilities, unit_settings

#: RLIMIT_MEMLOCK when nothing sets it: the kernel's default since 5.16 (systemd's since 253);
#: a container runtime may set less (the agent's check covers that too).
DEFAULT_MEMLOCK = 8 << 20
READ_ONLY_ROOT = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount -o remount,bind,ro / && exec "$@"', "sh"]
CAPSETS = {"systemd": unit_capabilities, "kubernetes": daemonset_capabilities}


def _memlock(limit: str | None) -> str:
    if limit is None:
        return str(DEFAULT_MEMLOCK)
    return "unlimited" if limit == "infinity" else limit


def _setpriv(caps: set[str], memlock: str) -> list[str]:
    """Run as uid 0 holding exactly ``caps`` (``CAP_...`` names) with this memlock limit."""
    names = ",".join(["-all", *sorted("+" + c.removeprefix("CAP_").lower() for c in caps)])
    return ["prlimit", f"--memlock={memlock}", "setpriv", "--no-new-privs",
            f"--inh-caps={names}", f"--ambient-caps={names}", f"--bounding-set={names}"]


def _deployment(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[set[str], list[str]]:
    """(capability set, command prefix up to the capability drop) of a deployment."""
    if kind == "systemd":
        home = tmp_path / "home"  # ProtectHome=yes: ~ cannot be written
        home.write_text("")
        env = ["env", f"HOME={home}"]
        limit = unit_settings().get("LimitMEMLOCK", [None])[-1]
        return unit_capabilities(), [*env, *_setpriv(unit_capabilities(), _memlock(limit))]
    caps = daemonset_capabilities()
    return caps, [*READ_ONLY_ROOT, *_setpriv(caps, _memlock(None))]


def _cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff for {pid}")


@pytest.mark.parametrize("kind", ["systemd", "kubernetes"])
def test_mirrors_with_exactly_the_deploy_capabilities(tmp_path: Path, kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    caps, prefix = _deployment(kind, tmp_path, monkeypatch)
    monkeypatch.setattr(netns, "AGENT", [*prefix, *netns.AGENT])  # LiveAgent runs this
    shadow = tmp_path / "shadow.log"
    with NetNS() as ns:
        start_python_server(ns, 9000)
        start_python_server(ns, 19000, log=shadow)
        agent = netns.LiveAgent(ns, tmp_path, "--iface", "lo", "--port", "9000",
                                "--target", "127.0.0.1:19000")
        assert _cap_eff(agent.proc.pid) == sum(1 << CAPS[c] for c in caps)
        assert run_clients(ns, "127.0.0.1", 9000, 4, 10) == 40
        err = agent.stop()  # raises unless it exits 0
    assert len(shadow.read_text().splitlines()) == 40, err
    assert '"decoder": "native"' in err, err  # the installed library was loaded


@pytest.mark.parametrize("kind", ["systemd", "kubernetes"])
def test_without_ipc_lock_exits_2_with_one_line_and_its_advice_works(
        tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default rings need more than 8 MiB of locked memory: exit 2 before loading anything,
    one line; the ``--buffer-mib`` it suggests then runs under the same privileges."""
    prefix = _setpriv(CAPSETS[kind]() - {MEMLOCK_CAP}, str(DEFAULT_MEMLOCK))
    args = ["--iface", "lo", "--port", "9000", "--target", "127.0.0.1:19000"]
    shadow = tmp_path / "shadow.log"
    with NetNS() as ns:
        res = ns.run(*prefix, *netns.AGENT, *args, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "the perf rings need" in lines[0] and "grant CAP_IPC_LOCK" in lines[0]
        assert "only RLIMIT_MEMLOCK, 8.0 MiB, is sure" in lines[0], lines[0]
        fit = re.search(r"--buffer-mib (\d+) or less", lines[0])
        assert fit is not None, lines[0]
        start_python_server(ns, 9000)
        start_python_server(ns, 19000, log=shadow)
        monkeypatch.setattr(netns, "AGENT", [*prefix, *netns.AGENT])
        agent = netns.LiveAgent(ns, tmp_path, *args, "--buffer-mib", fit[1])
        assert run_clients(ns, "127.0.0.1", 9000, 2, 5) == 10
        agent.stop()
    assert len(shadow.read_text().splitlines()) == 10
