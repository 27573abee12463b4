"""Asking a running agent's control API, from a test or a demo: curl inside the namespace
the agent listens in (its loopback is not this one's)."""

from __future__ import annotations

import json
import subprocess
import time

from lab.netns import NetNS

__all__ = ["ask", "wait_for"]


def ask(url: str, method: str = "GET", body: str | None = None,
        ns: NetNS | None = None) -> tuple[int, dict[str, object] | str]:
    """curl ``url`` (inside ``ns`` if given): (status, JSON body or text); status 0 when
    nothing answered."""
    cmd = ["curl", "-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data", body]
    if ns is not None:
        cmd = ns.cmd(*cmd)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    text, _, code = out.rpartition("\n")
    try:
        return int(code), json.loads(text)
    except ValueError:
        return int(code or 0), text


def wait_for(url: str, status: int, ns: NetNS | None = None, timeout: float = 60) -> object:
    """The body of the first answer ``status`` to GET ``url``; TimeoutError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = ask(url, ns=ns)
        if code == status:
            return body
        time.sleep(0.1)
    raise TimeoutError(f"{url} never answered {status}")
