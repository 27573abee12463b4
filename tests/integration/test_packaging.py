"""A built wheel, installed (not editable) into a fresh virtualenv, holds everything `offline`
and `run` need: the BPF sources, the native decoder's source, the bundled capture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from lab.netns import NetNS, run_clients, start_python_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The venv's bin directory, with the wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    # From a copy: setuptools builds in the source's build/, where files of an older tree
    # (a module since moved) would slip into the wheel.
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "bench", "*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(work / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((work / "dist").glob("mirror_agent-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("agent/bpf/mirror.bpf.c", "agent/bpf/mirror_event.h", "agent/bpf/parse.h",
                   "agent/sources/ring/ring_decode.c", "agent/data/demo.pcap"):
        assert needed in names, f"{needed} missing from {wheel.name}"
    # The native decoder is compiled into the wheel (setup.py), not on the running host.
    assert any(n.startswith("agent/sources/ring/_ring_native") and n.endswith(".so") for n in names)
    venv = work / "venv"
    # System site-packages for bcc (Debian's python3-bpfcc; PyPI's "bcc" is another thing).
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return venv / "bin"


def _env(tmp: Path) -> dict[str, str]:
    """No trace of the checkout: off the path; HOME does not exist (nothing is cached)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HOME"] = str(tmp / "no-home")
    return env


def test_offline_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    pcap = installed.parent / "lib"
    capture = next(pcap.glob("python3*/site-packages/agent/data/demo.pcap"))
    res = subprocess.run([str(installed / "mirror-agent"), "offline", str(capture), "--port",
                          "8080", "--record", str(out), "--record-format", "jsonl"],
                         cwd="/", env=_env(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.read_text().count("\n") > 0
    assert str(ROOT) not in res.stderr


def test_run_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    """Live capture with the installed package: the program compiles from the wheel's bpf/,
    the wheel's prebuilt native decoder is loaded, the shadow gets every request."""
    shadow = tmp_path / "shadow.log"
    err = tmp_path / "agent.err"
    with NetNS() as ns:
        start_python_server(ns, 9000)
        start_python_server(ns, 19000, log=shadow)
        with err.open("w") as log:  # the agent has its own copy of the descriptor
            agent = ns.popen(str(installed / "mirror-agent"), "--log-format", "json", "run",
                             "--iface", "lo", "--port", "9000", "--target", "127.0.0.1:19000",
                             "--decoder", "native", cwd="/", env=_env(tmp_path),
                             stderr=log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "capture live" not in err.read_text() and agent.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "capture live" in err.read_text(), err.read_text()
        assert run_clients(ns, "127.0.0.1", 9000, 2, 5) == 10
        time.sleep(0.5)
        agent.terminate()
        assert agent.wait(60) == 0, err.read_text()
    assert len(shadow.read_text().splitlines()) == 10
    assert '"decoder": "native"' in err.read_text()
    assert str(ROOT) not in err.read_text()
