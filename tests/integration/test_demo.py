"""``make demo`` (the live namespace demo) works end to end and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys

from lab.netns import sh


def test_live_demo_is_byte_exact_and_leaves_nothing() -> None:
    before = sh("ip", "netns", "list").stdout
    res = subprocess.run([sys.executable, "-m", "lab.demo"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "requests the service got:  402" in res.stdout
    assert "requests the shadow got:   402" in res.stdout
    assert "byte-exact:                yes" in res.stdout
    assert sh("ip", "netns", "list").stdout == before
