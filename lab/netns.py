"""Private network namespaces with real servers, clients and captures (the lab).

Every namespace gets a unique name, only loopback and veth pairs made here, and is deleted
(with every process started in it) on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType

HERE = LAB = Path(__file__).resolve().parent


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


class NetNS:
    """``with NetNS() as ns:``: a fresh namespace with ``lo`` up."""

    def __init__(self, prefix: str = "mirtest") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.peers: list[NetNS] = []

    def __enter__(self) -> NetNS:
        sh("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            for pipe in (p.stdin, p.stdout, p.stderr):  # our ends of its pipes
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self.procs.clear()
        # Anything else still running inside (e.g. nginx workers) goes with the namespace.
        pids = sh("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", self.name, check=False)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return sh(*self.cmd(*args), check=check, timeout=timeout)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        p: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.cmd(*args), **kw)
        self.procs.append(p)
        return p

    def veth_to(self, other: NetNS, mine: str, theirs: str) -> None:
        """A veth pair between two namespaces; addresses are ``ip/prefix`` (v4 or v6)."""
        a, b = f"va{uuid.uuid4().hex[:6]}", f"vb{uuid.uuid4().hex[:6]}"
        sh("ip", "link", "add", a, "netns", self.name, "type", "veth", "peer", "name", b,
           "netns", other.name)
        for ns, dev, addr in ((self, a, mine), (other, b, theirs)):
            fam = "-6" if ":" in addr else "-4"
            ns.run("ip", fam, "addr", "add", addr, "dev", dev, *(["nodad"] if fam == "-6" else []))
            ns.run("ip", "link", "set", dev, "up")
        self.veth = a
        other.veth = b


def wait_port(ns: NetNS, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
    code = (f"import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in {host!r} "
            f"else socket.AF_INET)\ns.settimeout(0.5)\nsys.exit(s.connect_ex(({host!r},{port})))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.run(sys.executable, "-c", code, check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} in {ns.name}")


def start_python_server(ns: NetNS, port: int, host: str = "127.0.0.1",
                        log: Path | None = None) -> subprocess.Popen[bytes]:
    """The keep-alive HTTP/1.1 server of lab/http_server.py."""
    args = [sys.executable, str(HERE / "http_server.py"), host, str(port)]
    if log is not None:
        args.append(str(log))
    p = ns.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(ns, port, host)
    return p


def start_nginx(ns: NetNS, port: int, workdir: Path, host: str = "127.0.0.1",
                max_conns: int = 4096, access_log: Path | None = None) -> None:
    """nginx (one worker) answering every request with a 17-byte body; ``access_log``: log
    each request there (``$request`` and ``$status`` a line, unbuffered), else none."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = "access_log off;" if access_log is None else (
        "log_format churn '$request $status $request_length';\n"
        f"  access_log {access_log} churn;")
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile {max_conns * 2 + 64};
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections {max_conns}; }}
http {{
  {log}
  client_body_temp_path {workdir}/body;
  client_max_body_size 0;
  keepalive_requests 100000;
  server {{
    listen {listen};
    location / {{ return 200 "hello from nginx\\n"; }}
  }}
}}
""")
    ns.popen(shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-e",
             str(workdir / "error.log"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(ns, port, host)


class Tcpdump:
    """``tcpdump -w`` in a namespace; stopped with SIGINT so the file is complete."""

    def __init__(self, ns: NetNS, iface: str, path: Path, expr: str,
                 options: tuple[str, ...] = ("-B", "262144", "--immediate-mode")) -> None:
        """The default ``options`` make a lossless ground truth for tests (a 256 MiB buffer,
        no batching); benchmarks pass ``()`` to run tcpdump as people do."""
        self.path = path
        self.proc = ns.popen("tcpdump", "-i", iface, "-s", "0", *options, "-w", str(path), expr,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait for "listening on" so no early packet is missed.
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        if "listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line}")

    def stop(self) -> str:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        _out, err = self.proc.communicate(timeout=20)
        return err.decode()


def run_clients(ns: NetNS, host: str, port: int, conns: int, requests: int,
                max_body: int = 2000) -> int:
    """Run ``conns`` parallel keep-alive clients in ``ns``; returns requests completed."""
    done = ns.run(sys.executable, str(HERE / "http_client.py"), host, str(port), str(conns),
                  str(requests), str(max_body))
    return int(done.stdout.strip())


AGENT = [sys.executable, "-m", "agent.cli", "--log-format", "json", "run"]


class LiveAgent:
    """``mirror-agent run ARGS`` in a namespace; returns once it logged "capture live"
    (unless ``wait`` is False: then at once, for a caller watching it start).

    Its stderr (JSON log lines and the summary) goes to ``workdir/agent.err``.
    """

    def __init__(self, ns: NetNS, workdir: Path, *args: str, timeout: float = 60,
                 wrap: tuple[str, ...] = (), wait: bool = True) -> None:
        """``wrap``: a command the agent runs under (e.g. ``unshare -p -f`` for a PID
        namespace of its own); signals then go to its child, the agent."""
        self.err = workdir / "agent.err"
        with self.err.open("w") as err:  # the child has its own copy of the descriptor
            self.proc = ns.popen(*wrap, *AGENT, *args, stderr=err, stdout=subprocess.DEVNULL)
        self._wrapped = bool(wrap)
        if wait:
            self.wait_live(timeout)

    def wait_live(self, timeout: float = 60) -> None:
        """Return once the agent logged "capture live"; RuntimeError (with its log) if it
        exits first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while "capture live" not in self.err.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start: {self.err.read_text()}")
            time.sleep(0.1)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the agent (not to a ``wrap`` command around it)."""
        pid = self.proc.pid
        if self._wrapped:
            pid = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
        os.kill(pid, signum)

    def stop(self, settle: float = 0.5) -> str:
        """SIGTERM after ``settle`` seconds (for the last events to drain); returns the log.

        Raises if the agent does not exit 0.
        """
        time.sleep(settle)
        self.signal(signal.SIGTERM)
        if self.proc.wait(60) != 0:
            raise RuntimeError(f"agent exited {self.proc.returncode}: {self.err.read_text()}")
        return self.err.read_text()
