"""The container image (``make image``) runs and mirrors real traffic, under two runtimes.

A private dockerd (no bridge, no iptables, its own data and exec roots under a temporary
directory, stopped by its PID afterwards) runs inside a network namespace made here ("node"),
so a container with ``--network host`` is in that namespace: what a DaemonSet's
``hostNetwork: true`` is on a node. The node has the observed service on its veth to a second
namespace ("client"), where the clients and the shadow run. The image is loaded from the
tarball ``make image`` saved.

- Docker 20.10 (the daemon): it refuses the names BPF and PERFMON, so the agent gets
  SYS_ADMIN, NET_ADMIN and IPC_LOCK (the kernel lets SYS_ADMIN stand in for BPF and PERFMON);
  a Docker that knows the names gets the deploy set. Read-only root, no new privileges.
- containerd 1.6 with runc 1.1 (the daemon's own containerd, driven by ``ctr``), what
  Kubernetes nodes run: exactly the DaemonSet's capability set, containerd's default seccomp
  profile (a pod's RuntimeDefault), read-only root, no new privileges, the DaemonSet's memory
  limit with the cgroup filesystem mounted as the CRI does.

Both mount the host's /lib/modules and /usr/src read-only (bcc compiles against the kernel
headers) and a writable directory for the recording. Each run drives 40 requests, stops the
agent with SIGTERM and checks exit status 0, that the shadow got exactly the service's
requests byte for byte, and that the recording (read by ``mirror-agent inspect``) holds them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.netns import NetNS, run_clients, start_python_server
from tests.unit.test_deploy_files import daemonset_capabilities

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"mirror-agent:{VERSION}"
TARBALL = Path(os.environ.get("MIRROR_AGENT_IMAGE_TAR",
                              ROOT / "build" / "image" / f"mirror-agent-{VERSION}.tar"))
DOCKER = "/usr/bin/docker"  # Debian's 20.10 client, whatever else is on PATH
DOCKERD = "/usr/sbin/dockerd"
CTR = "/usr/bin/ctr"
#: Docker 20.10's stand-in for the deploy set: SYS_ADMIN covers BPF and PERFMON.
OLD_DOCKER_CAPS = {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_IPC_LOCK"}
CAP_NUMBERS = {"CAP_NET_ADMIN": 12, "CAP_IPC_LOCK": 14, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38,
               "CAP_BPF": 39}
#: The capabilities containerd's default spec grants, which `ctr run` has no "ALL" to drop.
CTR_DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
MEMORY_LIMIT = 1 << 30  # the DaemonSet's limits.memory
NODE_IP, CLIENT_IP = "198.51.100.1", "198.51.100.2"
HEADER_MOUNTS = ("/lib/modules", "/usr/src")
REC_DIR = "/var/lib/mirror-agent"  # the image's working directory, the DaemonSet's state volume


def _reason() -> str | None:
    if os.geteuid() != 0:
        return "image tests need root (a private dockerd, network namespaces, BPF)"
    for tool in (DOCKER, DOCKERD, CTR):
        if not os.access(tool, os.X_OK):
            return f"image tests need {tool} (apt-get install docker.io; `make image` does)"
    if not TARBALL.is_file():
        return f"no image at {TARBALL}: run `make image` first"
    return None


@pytest.fixture(scope="module", autouse=True)
def _needs() -> None:
    reason = _reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"under CI the image tests must run, not skip: {reason}")
        pytest.skip(reason)


@dataclass
class Lab:
    node: NetNS
    client: NetNS
    work: Path
    sock: str  # the daemon's socket
    containerd: str  # its containerd's socket

    def docker(self, *args: str, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args], capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:2])}: {res.stderr.strip()}")
        return res

    def ctr(self, *args: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([CTR, "-a", self.containerd, "-n", "mirror-agent-test", *args],
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args[:2])}: {res.stderr.strip()}")
        return res


def _stop_daemon(pidfile: Path, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the daemon by its PID (it stops its containers and containerd), then wait."""
    pid = int(pidfile.read_text()) if pidfile.is_file() else proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _unmount_under(path: Path) -> None:
    """Whatever the daemon left mounted below ``path`` (nothing, after a clean stop)."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mnt in sorted((m for m in mounts if m.startswith(f"{path}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # Short paths: containerd's sockets live under the exec root (sun_path is 108 bytes).
    work = Path(tempfile.mkdtemp(prefix="mai-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        with NetNS("miri-node") as node, NetNS("miri-client") as client:
            node.veth_to(client, f"{NODE_IP}/24", f"{CLIENT_IP}/24")
            pidfile, sock = work / "dockerd.pid", str(work / "docker.sock")
            log = (work / "dockerd.log").open("wb")
            # nsenter --net only: the daemon (and with it every --network host container) is
            # in the node's network namespace, in the host's mount namespace.
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{node.name}", DOCKERD, "--bridge=none",
                 "--iptables=false", "--ip6tables=false", "--data-root", str(work / "data"),
                 "--exec-root", str(work / "exec"), "-H", f"unix://{sock}", "-p",
                 str(pidfile)], stdout=log, stderr=log)
            log.close()  # the daemon has its own descriptor
            lab = Lab(node, client, work, sock, str(work / "exec" / "containerd" /
                                                    "containerd.sock"))
            deadline = time.monotonic() + 60
            while lab.docker("version", check=False).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (work / "dockerd.log").read_text()
                    raise RuntimeError(f"dockerd did not start: {log_text}")
                time.sleep(0.2)
            lab.docker("load", "-q", "-i", str(TARBALL))
            yield lab
            if proc is not None:
                _stop_daemon(pidfile, proc)
                proc = None
    finally:
        if proc is not None:
            _stop_daemon(work / "dockerd.pid", proc)
        _unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Run:
    """One mirrored run's evidence."""

    service: list[str]  # the service's request log lines
    shadow: list[str]
    recording: Path
    log: str  # the agent's stderr


class Servers:
    """The observed service on the node's veth, the shadow in the client namespace."""

    def __init__(self, lab: Lab, name: str, port: int) -> None:
        self.lab, self.port, self.shadow_port = lab, port, port + 10000
        self.dir = lab.work / name
        self.rec = self.dir / "rec"
        self.rec.mkdir(parents=True)
        self.procs = [start_python_server(lab.node, port, NODE_IP, self.dir / "service.log"),
                      start_python_server(lab.client, self.shadow_port, CLIENT_IP,
                                          self.dir / "shadow.log")]

    def agent_args(self) -> list[str]:
        iface = self.lab.node.veth
        return ["--log-format", "json", "run", "--iface", iface, "--port", str(self.port),
                "--target", f"{CLIENT_IP}:{self.shadow_port}", "--record",
                f"{REC_DIR}/rec.bin"]

    def drive(self) -> None:
        assert run_clients(self.lab.client, NODE_IP, self.port, 4, 10) == 40

    def result(self, log: str) -> Run:
        time.sleep(0.3)  # the shadow's last log lines
        lines = {n: (self.dir / f"{n}.log").read_text().splitlines() for n in ("service", "shadow")}
        return Run(lines["service"], lines["shadow"], self.rec / "rec.bin", log)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(10)


def _wait_live(read_log: Callable[[], str], alive: Callable[[], bool],
               timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while "capture live" not in read_log():
        if not alive() or time.monotonic() > deadline:
            raise AssertionError(f"agent did not start: {read_log()}")
        time.sleep(0.2)


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1]
    raise AssertionError(f"no {field} for {pid}")


def _cap_eff(pid: int) -> int:
    return int(_status(pid, "CapEff"), 16)


def _seccomp(pid: int) -> int:
    return int(_status(pid, "Seccomp"))


def _mask(caps: set[str]) -> int:
    return sum(1 << CAP_NUMBERS[c] for c in caps)


def _requests(stream: bytes) -> list[tuple[str, str, int]]:
    """(method, path, body length) of each HTTP/1.1 request in a client's byte stream."""
    out = []
    while stream:
        head, sep, rest = stream.partition(b"\r\n\r\n")
        assert sep, f"unterminated request head: {stream[:80]!r}"
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ")
        length = next((int(v) for k, _, v in (h.partition(": ") for h in lines[1:])
                       if k.lower() == "content-length"), 0)
        out.append((method, path, length))
        stream = rest[length:]
    return out


def _check(run: Run) -> None:
    assert len(run.service) == 40, run.log
    # Byte for byte: each log line holds a hash of the request line, headers and body.
    assert sorted(run.shadow) == sorted(run.service), run.log
    res = subprocess.run([sys.executable, "-m", "agent.cli", "inspect", str(run.recording),
                          "--format", "jsonl"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    flows: dict[int, bytes] = {}
    for line in res.stdout.splitlines():
        rec = json.loads(line)
        assert rec["direction"] == "to_observed" and rec["gap_bytes"] == 0, rec
        flows[rec["flow"]] = flows.get(rec["flow"], b"") + base64.b64decode(rec["data"])
    recorded = Counter(r for stream in flows.values() for r in _requests(stream))
    served = Counter((m, p, int(n)) for m, p, n, *_ in (s.split(" ") for s in run.service))
    assert recorded == served
    assert len(flows) == 4
    assert '"decoder": "native"' in run.log, run.log  # prebuilt in the image, found
    # The budget is the container's memory limit less 1/8, read from its cgroup.
    budget = next(json.loads(line) for line in run.log.splitlines()
                  if '"memory budget"' in line)
    assert (budget["origin"], budget["limit_mib"]) == ("cgroup", 896.0), budget


def test_docker_20_10_runs_the_image(lab: Lab) -> None:
    """The old runtime: SYS_ADMIN for BPF and PERFMON unless the daemon knows their names."""
    deploy = daemonset_capabilities()
    probe = lab.docker("create", "--cap-drop", "ALL",
                       *[a for c in sorted(deploy) for a in ("--cap-add", c)], IMAGE,
                       check=False)
    if probe.returncode == 0:  # a Docker that knows CAP_BPF and CAP_PERFMON
        lab.docker("rm", probe.stdout.strip())
        caps = deploy
    else:
        assert "unknown capability" in probe.stderr, probe.stderr
        caps = OLD_DOCKER_CAPS
    servers = Servers(lab, "docker", 9000)
    name = f"mirror-agent-{uuid.uuid4().hex[:8]}"
    try:
        mounts = [a for m in HEADER_MOUNTS for a in ("-v", f"{m}:{m}:ro")]
        lab.docker("run", "-d", "--name", name, "--network", "host", "--read-only",
                   "--security-opt", "no-new-privileges", "--memory", str(MEMORY_LIMIT),
                   "--cap-drop", "ALL",
                   *[a for c in sorted(caps) for a in ("--cap-add", c.removeprefix("CAP_"))],
                   *mounts, "-v", f"{servers.rec}:{REC_DIR}", IMAGE, *servers.agent_args())

        def logs() -> str:
            return lab.docker("logs", name, check=False).stderr

        def alive() -> bool:
            return lab.docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"

        _wait_live(logs, alive)
        pid = int(lab.docker("inspect", "-f", "{{.State.Pid}}", name).stdout)
        assert _cap_eff(pid) == _mask(caps)
        servers.drive()
        time.sleep(0.5)  # the last events drain
        lab.docker("stop", "-t", "60", name)  # SIGTERM, then up to 60 s
        status = lab.docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        log = logs()
        assert status == "0", log
        _check(servers.result(log))
    finally:
        lab.docker("rm", "-f", name, check=False)
        servers.close()


def test_containerd_runs_the_image_with_the_deploy_set(lab: Lab) -> None:
    """What a Kubernetes node runs (containerd, runc): exactly the DaemonSet's capabilities."""
    lab.ctr("images", "import", str(TARBALL))
    caps = daemonset_capabilities()
    servers = Servers(lab, "containerd", 9001)
    cid = f"mirror-agent-{uuid.uuid4().hex[:8]}"
    err = servers.dir / "agent.err"
    proc: subprocess.Popen[bytes] | None = None
    try:
        mounts = [a for m in HEADER_MOUNTS
                  for a in ("--mount", f"type=bind,src={m},dst={m},options=rbind:ro")]
        with err.open("wb") as out:
            proc = subprocess.Popen(
                [CTR, "-a", lab.containerd, "-n", "mirror-agent-test", "run", "--rm",
                 "--read-only", "--with-ns", f"network:/run/netns/{lab.node.name}",
                 # containerd's default seccomp profile (a pod's RuntimeDefault), which lets
                 # bpf() and perf_event_open() through for CAP_BPF and CAP_PERFMON.
                 "--seccomp",
                 "--memory-limit", str(MEMORY_LIMIT),
                 # The cgroup filesystem, read-only, as Kubernetes' CRI mounts it.
                 "--mount", "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec",
                 *[a for c in CTR_DEFAULT_CAPS for a in ("--cap-drop", c)],
                 *[a for c in sorted(caps) for a in ("--cap-add", c)], *mounts,
                 "--mount", f"type=bind,src={servers.rec},dst={REC_DIR},options=rbind:rw",
                 f"docker.io/library/{IMAGE}", cid,
                 "/opt/mirror-agent/venv/bin/mirror-agent", *servers.agent_args()],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        _wait_live(err.read_text, lambda: proc is not None and proc.poll() is None)
        task = lab.ctr("tasks", "ls").stdout.splitlines()
        pid = int(next(line.split()[1] for line in task if line.startswith(cid)))
        assert _cap_eff(pid) == _mask(caps)
        assert _seccomp(pid) == 2  # filtering
        servers.drive()
        time.sleep(0.5)
        lab.ctr("tasks", "kill", "-s", "SIGTERM", cid)
        assert proc.wait(60) == 0, err.read_text()
        _check(servers.result(err.read_text()))
    finally:
        if proc is not None and proc.poll() is None:
            lab.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            proc.wait(30)
        lab.ctr("containers", "rm", cid, check=False)
        servers.close()


def test_image_is_small_and_carries_no_compiler(lab: Lab) -> None:
    """At most 400 MB; no C compiler (the native decoder is prebuilt), no headers, no docs."""
    size = int(lab.docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    assert size <= 400 * 1000 * 1000, f"{size / 1e6:.0f} MB"
    script = ("command -v cc gcc clang;"  # prints what it finds
              " find /usr/include /usr/src /usr/share/man /usr/share/locale /usr/share/doc"
              " -type f ! -name copyright ! -name locale.alias;"
              " find /opt/mirror-agent -name '_ring_native*.so'")
    found = lab.docker("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", IMAGE,
                       "-c", script, check=False).stdout.split()
    # Only the decoder the wheel's build compiled, inside the installed package.
    assert len(found) == 1 and re.search(
        r"/site-packages/agent/sources/ring/_ring_native\.cpython-\d+-[\w-]+\.so$",
        found[0]), found
