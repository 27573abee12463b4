"""The eBPF program as a kernel object: build flags, load (in a child), observed ports,
attachments, counters. No rings, no threads: :mod:`agent.sources.ebpf.source` wires this to them.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from agent.sources import MAX_PORTS, SourceError, check_port_count
from agent.sources.ebpf.attach import Attachment, XdpAttachment, attach_tc
from agent.sources.ebpf.bpfsys import SCHED_CLS, XDP, BpfError, BpfMap
from agent.sources.ebpf.decap import Decap
from agent.sources.ebpf.layout import BPF_DIR, COUNTERS
from agent.sources.ebpf.loader import LoadedProgram, LoadError, load

__all__ = ["SIDE_HOST", "SIDE_POD", "Build", "MirrorProgram"]

#: ``MIRROR_SIDE_*`` of ``bpf/mirror_event.h``: an interface with an address of its own, or
#: without (a pod's host-side veth).
SIDE_HOST, SIDE_POD = 1, 2

log = structlog.get_logger("agent.program")


@dataclass(frozen=True)
class Build:
    """What the program is compiled for; each field becomes a ``-D`` flag."""

    engine: str  # "tc" or "xdp"
    possible_cpus: int
    own_ports: tuple[int, int]  # skipped in the kernel: the forward source ports
    requests_only: bool = False  # service→client payload not copied
    ringbuf_pages: int = 0  # 0: perf buffer; else the BPF ring buffer's size in pages
    wakeup_bytes: int = 0  # ring buffer: bytes per CPU between forced wakeups
    decap: Decap | None = None  # tunnels looked inside (bpf/decap.h); None: none

    def cflags(self) -> list[str]:
        lo, hi = self.own_ports
        flags = [f"-I{BPF_DIR}", f"-DMAX_CPUS={self.possible_cpus}", "-Wno-macro-redefined",
                 f"-DMAX_PORTS={MAX_PORTS}",
                 f"-DMIRROR_OWN_PORT_LO={lo}", f"-DMIRROR_OWN_PORT_HI={hi}"]
        if self.requests_only:
            flags.append("-DMIRROR_REQUESTS_ONLY")
        if self.ringbuf_pages:
            flags += ["-DMIRROR_RINGBUF", f"-DMIRROR_RINGBUF_PAGES={self.ringbuf_pages}",
                      f"-DMIRROR_WAKEUP_BYTES={self.wakeup_bytes}"]
        if self.decap is not None:
            flags += self.decap.cflags()
        return flags

    def functions(self) -> list[tuple[str, int]]:
        if self.engine == "tc":
            return [("mirror_tc_ingress", SCHED_CLS), ("mirror_tc_egress", SCHED_CLS)]
        return [("mirror_xdp", XDP)]


class MirrorProgram:
    """``bpf/mirror.bpf.c`` loaded for ``build``; raises SourceError if it cannot be.

    ``events`` is the map the rings are installed in (perf event array) or are (ring
    buffer). :meth:`attach` hands out attachments, which the caller owns and detaches
    (``follow.py``); :meth:`close` releases the program and maps and is idempotent.
    """

    def __init__(self, build: Build) -> None:
        self.build = build
        try:
            self._loaded: LoadedProgram = load(BPF_DIR / "mirror.bpf.c", build.cflags(),
                                               build.functions(),
                                               ["ports", "counters", "events", "iface_side",
                                                "local_addrs"])
        except LoadError as e:
            hint = (" (the BPF ring buffer needs kernel 5.8+; try --transport perf)"
                    if build.ringbuf_pages else "")
            raise SourceError(f"cannot compile/load bpf/mirror.bpf.c: {e}{hint}") from None
        self.events: BpfMap = self._loaded.maps["events"]
        #: The ports in the kernel's map, always (see :meth:`set_ports`).
        self.ports: frozenset[int] = frozenset()
        self._ports_lock = threading.Lock()  # one change at a time (control API threads)

    def set_ports(self, ports: Iterable[int]) -> None:
        """Observe exactly ``ports`` from now on (the program reads the map per packet), or
        raise ValueError with the previous ports observed: PortLimitError (more than
        :data:`~agent.sources.MAX_PORTS`, checked before the map is touched), or the kernel
        refused a change, which is then undone. :attr:`ports` is what the map holds, even
        if undoing failed too (then it is read back from the kernel)."""
        new = frozenset(ports)
        check_port_count(new)
        bad = next((p for p in new if not 0 < p < 65536), None)
        if bad is not None:
            raise ValueError(f"not a port number (1-65535): {bad}")
        with self._ports_lock:
            old = self.ports
            done: list[tuple[int, bool]] = []  # (port, added) in the order applied
            try:
                # Removed ports go first, so the map never holds more than max(old, new)
                # ports and never fills up halfway (MAX_PORTS is its size).
                for p in sorted(old - new):
                    self._change(p, False)
                    done.append((p, False))
                for p in sorted(new - old):
                    self._change(p, True)
                    done.append((p, True))
            except BpfError as e:
                self.ports = self._undo(done)
                raise ValueError(f"the kernel refused the port map change ({e.strerror}); "
                                 f"the previous {len(self.ports)} ports are observed as "
                                 "before") from None
            self.ports = new

    def _change(self, port: int, add: bool) -> None:
        table = self._loaded.maps["ports"]
        if add:
            table.update(_key(port), b"\x01")
        else:
            table.delete(_key(port))

    def _undo(self, done: list[tuple[int, bool]]) -> frozenset[int]:
        """Undo a half-made change, newest step first; the ports in the map after that."""
        try:
            for port, added in reversed(done):
                self._change(port, not added)
        except BpfError as e:  # cannot be short of a bug: say what the kernel holds now
            held = self.kernel_ports()
            log.error("cannot undo a failed port change", error=str(e), ports=sorted(held))
            return held
        return self.ports

    def kernel_ports(self) -> frozenset[int]:
        """The ports in the kernel's map, read back (:attr:`ports` says the same)."""
        return frozenset(int.from_bytes(k, sys.byteorder)
                         for k in self._loaded.maps["ports"].dump_keys())

    def attach(self, ifindex: int, name: str, tc_mode: str = "auto") -> Attachment:
        """Attach to one interface; raises SourceError (or OSError: it vanished meanwhile)."""
        fn = self._loaded.functions
        if self.build.engine == "tc":
            return attach_tc(name, fn["mirror_tc_ingress"], fn["mirror_tc_egress"], tc_mode,
                             ifindex)
        x = XdpAttachment(name, fn["mirror_xdp"], ifindex=ifindex)
        x.attach()
        return x

    def set_side(self, ifindex: int, side: int | None) -> None:
        """Which side of the host an interface is (``SIDE_HOST``/``SIDE_POD``), or None:
        not classified, every packet kept (``bpf/mirror.bpf.c``: ``here``)."""
        key = ifindex.to_bytes(4, "little")
        if side is None:
            self._loaded.maps["iface_side"].delete(key)
        else:
            self._loaded.maps["iface_side"].update(key, bytes([side]))

    def set_local(self, addr: bytes, local: bool) -> None:
        """Add or remove one of the host's own addresses (a :func:`links.map_key`)."""
        if local:
            self._loaded.maps["local_addrs"].update(addr, b"\x01")
        else:
            self._loaded.maps["local_addrs"].delete(addr)

    def counters(self) -> dict[str, int]:
        """The program's per-CPU counters, summed over CPUs, named as in the header."""
        table = self._loaded.maps["counters"]
        if table.max_entries != len(COUNTERS):  # cannot be: both come from the header
            raise BpfError(0, f"{table.max_entries} kernel counters, {len(COUNTERS)} names")
        out = {}
        for i, (name, _help) in enumerate(COUNTERS):
            raw = table.lookup(i.to_bytes(4, "little"), self.build.possible_cpus) or b""
            # One u64 per possible CPU (per-CPU values are 8-byte aligned).
            out[name] = sum(int.from_bytes(raw[c:c + 8], "little")
                            for c in range(0, len(raw), 8))
        return out

    def close(self) -> None:
        """Release the program and maps (attachments are their owner's to detach first)."""
        self._loaded.close()


def _key(port: int) -> bytes:
    """The ``ports`` map's key: a u16 in host order (the program converts the packet's)."""
    return port.to_bytes(2, sys.byteorder)
