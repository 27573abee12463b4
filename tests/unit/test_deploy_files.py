"""The shipped deployment: the systemd unit passes ``systemd-analyze verify``, the manifest is
valid Kubernetes, both grant exactly the capability set the agent needs (the set
``tests/integration/test_deploy_privileges.py`` starts it with), and the native decoder is
found where systemd and the image put it.

The helpers that read the capability sets are used by that integration test too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.capture import native
from agent.capture.ebpf import default_buffer_mib
from agent.capture.privileges import EBPF_CAPS, MEMLOCK_CAP, Host, check_buffer_mib
from agent.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "mirror-agent.service"
MANIFEST = DEPLOY / "daemonset.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
#: What the agent needs with eBPF and the perf rings, and nothing else (proven live).
NEEDED = {*EBPF_CAPS, MEMLOCK_CAP}


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (continuations joined), values in order per key."""
    out: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def unit_capabilities(path: Path = UNIT) -> set[str]:
    """The unit's AmbientCapabilities= (``CAP_...`` names)."""
    return {c for v in unit_settings(path)["AmbientCapabilities"] for c in v.split()}


def manifest_documents(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def agent_container(path: Path = MANIFEST) -> dict[str, Any]:
    ds = next(d for d in manifest_documents(path) if d["kind"] == "DaemonSet")
    containers: list[dict[str, Any]] = ds["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "agent")


def daemonset_capabilities(path: Path = MANIFEST) -> set[str]:
    """The agent container's added capabilities, as ``CAP_...`` names."""
    caps = agent_container(path)["securityContext"]["capabilities"]
    return {f"CAP_{c}" for c in caps["add"]}


def test_unit_grants_exactly_the_needed_capabilities() -> None:
    s = unit_settings()
    assert unit_capabilities() == NEEDED
    assert set(s["CapabilityBoundingSet"][0].split()) == NEEDED
    assert "CAP_SYS_ADMIN" not in s["AmbientCapabilities"][0]


def test_unit_gives_the_native_decoder_a_cache_and_keeps_home_hidden() -> None:
    s = unit_settings()
    assert s["CacheDirectory"] == ["mirror-agent"]
    assert s["ProtectHome"] == ["yes"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify checks that ExecStart's program exists, and /opt/mirror-agent is where the
    unit is installed, not here: the copy points at this venv's mirror-agent, all else equal.
    Warnings (unknown keys, bad values) print but still exit 0, so any output fails too."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing under CI: make setup installs systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    agent = Path(sys.executable).parent / "mirror-agent"
    assert agent.exists(), "the venv has no mirror-agent script (pip install -e .)"
    text = UNIT.read_text()
    assert text.count("/opt/mirror-agent/.venv/bin/mirror-agent") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/mirror-agent/.venv/bin/mirror-agent", str(agent)))
    res = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res


def test_manifest_creates_its_namespace_first() -> None:
    docs = manifest_documents()
    assert [d["kind"] for d in docs] == ["Namespace", "DaemonSet"]
    assert docs[0]["metadata"]["name"] == docs[1]["metadata"]["namespace"] == "mirror-agent"


def test_manifest_grants_exactly_the_needed_capabilities_and_nothing_else() -> None:
    sc = agent_container()["securityContext"]
    assert daemonset_capabilities() == NEEDED == unit_capabilities()
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert not sc.get("privileged", False)


def test_manifest_args_are_valid_agent_flags() -> None:
    args = build_parser().parse_args(agent_container()["args"])
    assert args.command == "run" and args.iface == "any"


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[:-2]) * factor
    return int(quantity)


@pytest.mark.parametrize("cpus", [1, 2, 8, 16, 64, 128])
def test_manifest_memory_limit_fits_the_default_rings(cpus: int) -> None:
    """The agent refuses rings over half the cgroup's limit: the default must pass."""
    limit = _bytes(agent_container()["resources"]["limits"]["memory"])
    host = Host(caps=0, cap_last=40, uid=0, cpus=cpus, possible_cpus=cpus, perf_mlock_kb=516,
                perf_paranoid=2, memlock_rlimit=8 << 20, mem_available=1 << 40,
                cgroup_limit=limit)
    check_buffer_mib(host, default_buffer_mib(cpus), True, "perf", default=True)


def test_manifest_is_valid_kubernetes_strictly() -> None:
    """kubernetes-validate checks against the API schemas it ships (no cluster, offline);
    --strict rejects unknown fields, e.g. a misspelt securityContext key."""
    res = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(MANIFEST)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == 2, res.stdout


def test_image_builds_the_native_decoder_where_the_agent_looks() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    env = next(i for i, ln in enumerate(lines) if ln.startswith("ENV MIRROR_AGENT_CACHE_DIR="))
    build = next(i for i, ln in enumerate(lines) if "-m agent.capture.native" in ln)
    assert env < build  # built with the variable set, so into that directory
    assert lines[env].partition("=")[2].startswith("/opt/mirror-agent/")  # in the image


def test_native_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("MIRROR_AGENT_CACHE_DIR", "CACHE_DIRECTORY", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert native.cache_dir() == tmp_path / "home" / ".cache" / "mirror-agent"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "mirror-agent"
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path}/systemd:{tmp_path}/other")
    assert native.cache_dir() == tmp_path / "systemd"  # the first of CacheDirectory='s
    monkeypatch.setenv("MIRROR_AGENT_CACHE_DIR", str(tmp_path / "image"))
    assert native.cache_dir() == tmp_path / "image"


def test_native_decoder_builds_under_systemd_with_home_hidden(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ProtectHome=yes: ~ cannot be written (here: HOME is a file), CACHE_DIRECTORY can."""
    for var in ("MIRROR_AGENT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "cache"))
    built = native.build()
    assert built.parent == tmp_path / "cache" and built.exists()
