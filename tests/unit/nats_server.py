"""A NATS server with JetStream for tests (test helper): Debian's ``nats-server -js`` on
127.0.0.1 with a store directory of the test's own, started and stopped by PID (never by
name). ``prefix`` runs it inside a network namespace (``ip netns exec NAME``, which execs:
the PID is the server's)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)

#: Skip a test that needs the server where it is not installed ("make setup" installs it).
needs_server = pytest.mark.skipif(SERVER is None, reason="nats-server is not installed "
                                  "(run 'make setup')")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """``nats-server -js`` on 127.0.0.1:``port`` storing in ``store``; :meth:`start` waits
    until it is ready. :meth:`kill` (SIGKILL) and :meth:`stop` (SIGTERM) act on its PID."""

    def __init__(self, store: Path, port: int | None = None,
                 prefix: Sequence[str] = ()) -> None:
        assert SERVER is not None, "nats-server is not installed"
        self.store = store
        self.port = port or free_port()
        self.prefix = list(prefix)
        self.log = store.parent / f"{store.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> NatsServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.store.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, str(SERVER), "-js", "-a", "127.0.0.1", "-p", str(self.port),
                 "-sd", str(self.store)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while "Server is ready" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server did not start: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: the broker dies without a word."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; always safe to call."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
