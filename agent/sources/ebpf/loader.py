"""Compile and load ``bpf/mirror.bpf.c`` in a short-lived child process.

bcc compiles with LLVM at start-up, and a process that imported bcc keeps ~150 MiB of LLVM
mapped and partly resident for the rest of its life. So the agent never imports bcc: it runs
``python -m agent.sources.ebpf.loader`` once, which compiles, loads the programs, and hands their
file descriptors and the maps' back over a Unix socket, then exits. The kernel objects live
as long as any descriptor does, so they outlive the child; the agent works with them through
``bpfsys.py``, which asks the kernel for each map's sizes.

Protocol: one ``SOCK_SEQPACKET`` message each way. The parent sends a JSON request
(``source``, ``cflags``, ``functions`` as ``[name, prog_type]`` pairs, ``maps`` as names); the
child answers ``{"ok": true}`` with one descriptor per function and then per map, in the
request's order, as ``SCM_RIGHTS``, or ``{"ok": false, "error": "..."}``. The child's stderr
(compiler warnings, the verifier's log: easily more than a pipe holds) goes to a memfd, whose
first error line completes a failure's message.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from agent.sources.ebpf.bpfsys import BpfMap

__all__ = ["LoadError", "LoadedProgram", "load"]

_MAX_MSG = 1 << 16


class LoadError(Exception):
    """The program could not be compiled or loaded; the message is the cause, one line."""


@dataclass
class LoadedProgram:
    """Descriptors of the loaded programs (by function name) and maps (by map name)."""

    functions: dict[str, int] = field(default_factory=dict)
    maps: dict[str, BpfMap] = field(default_factory=dict)

    def close(self) -> None:
        """Close every descriptor; the kernel frees what nothing else holds."""
        for fd in [*self.functions.values(), *(m.fd for m in self.maps.values())]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.functions.clear()
        self.maps.clear()


def load(source: Path, cflags: list[str], functions: list[tuple[str, int]],
         maps: list[str], timeout: float = 120.0) -> LoadedProgram:
    """Compile ``source`` with ``cflags`` in a child and load ``functions``; the descriptors
    of those and of ``maps``. Raises LoadError, whatever went wrong, with nothing leaked."""
    request = {"source": str(source), "cflags": cflags, "functions": functions, "maps": maps}
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # In memory: a container's root (and /tmp) may be read-only.
    stderr_fd = os.memfd_create("mirror-agent-loader-stderr", os.MFD_CLOEXEC)
    with parent, open(stderr_fd, "w+b") as stderr:
        try:
            proc = subprocess.Popen(_command(child.fileno()), pass_fds=(child.fileno(),),
                                    env=_environment(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        except OSError as e:
            raise LoadError(f"cannot start the BPF loader: {e}") from None
        finally:
            child.close()
        fds: list[int] = []
        try:
            parent.settimeout(timeout)
            parent.send(json.dumps(request).encode())
            msg, fds, flags, _addr = socket.recv_fds(parent, _MAX_MSG, len(functions) + len(maps))
            for fd in fds:
                os.set_inheritable(fd, False)  # recv_fds takes no MSG_CMSG_CLOEXEC
            proc.wait(timeout)
            if flags & socket.MSG_CTRUNC:
                raise LoadError("the BPF loader's descriptors did not all arrive "
                                "(out of file descriptors?)")
            return _unpack(msg, fds, functions, maps, _first_error(stderr))
        except BaseException as e:
            for fd in fds:
                os.close(fd)
            proc.kill()
            proc.wait()
            if isinstance(e, LoadError):
                raise
            if isinstance(e, OSError | subprocess.TimeoutExpired):
                raise LoadError(f"the BPF loader did not answer ({e}): "
                                f"{_first_error(stderr) or 'no output'}") from None
            raise


def _command(fd: int) -> list[str]:
    # -P: the current directory is not put on sys.path (no stray agent/ package runs as root).
    return [sys.executable, "-P", "-m", "agent.sources.ebpf.loader", str(fd)]


def _environment() -> dict[str, str]:
    """This process's environment, with its import path, so the child finds the same
    ``agent`` package however this one was started (checkout, venv, wheel)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _first_error(stderr: IO[bytes]) -> str:
    """The first line of the child's stderr that names an error, else its last line."""
    stderr.seek(0)
    lines = [line.strip() for line in stderr.read().decode(errors="replace").splitlines()
             if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")


def _unpack(msg: bytes, fds: list[int], functions: list[tuple[str, int]], maps: list[str],
            detail: str) -> LoadedProgram:
    try:
        answer = json.loads(msg)
    except ValueError:
        raise LoadError(f"the BPF loader failed: {detail or 'no output'}") from None
    if not answer.get("ok"):
        # bcc says "Failed to compile"; the compiler's own first error is on stderr.
        message = str(answer.get("error", "unknown error"))
        raise LoadError(f"{message}: {detail}" if detail else message)
    if len(fds) != len(functions) + len(maps):
        raise LoadError(f"the BPF loader sent {len(fds)} descriptors, not "
                        f"{len(functions) + len(maps)}")
    prog = LoadedProgram()
    try:
        for (name, _type), fd in zip(functions, fds, strict=False):
            prog.functions[name] = fd
        for name, fd in zip(maps, fds[len(functions):], strict=True):
            prog.maps[name] = BpfMap.from_fd(fd)
    except OSError as e:
        raise LoadError(f"cannot read a loaded map: {e}") from None
    return prog


def _child(sock_fd: int) -> int:
    """The child: read the request, compile and load with bcc, send the descriptors."""
    with socket.socket(fileno=sock_fd) as sock:
        request = json.loads(sock.recv(_MAX_MSG))
        try:
            from bcc import BPF

            bpf = BPF(src_file=request["source"].encode(), cflags=request["cflags"])
            fds = [bpf.load_func(name.encode(), prog_type).fd
                   for name, prog_type in request["functions"]]
            fds += [int(bpf[name.encode()].map_fd) for name in request["maps"]]
            answer: dict[str, object] = {"ok": True}
        except Exception as e:  # every failure goes back to the parent as one message
            answer, fds = {"ok": False, "error": " ".join(str(e).split())}, []
        socket.send_fds(sock, [json.dumps(answer).encode()], fds)
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
