"""What the kernel will let this process do, checked before anything is loaded or mapped.

Three start-up checks, each raising :class:`~agent.sources.SourceError` (exit 2) with one line
that says what is missing and exactly how to grant it: capabilities
(:func:`check_capabilities`), the ``--buffer-mib`` range (:func:`check_buffer_mib`) and locked
memory for the perf rings (:func:`check_memlock`). Facts are read once into :class:`Host`
(``Host.read()``); tests build their own.

Kernel rules they follow (6.18, x86-64; each checked on the lab machine, see
``tests/integration/test_deploy_privileges.py``):

- Capabilities count, not the uid: root in a container or under systemd's
  ``CapabilityBoundingSet=`` may lack them. The eBPF engines need CAP_BPF (maps, programs),
  CAP_PERFMON (the verifier's pointer rules for our program; CPU-wide perf events) and
  CAP_NET_ADMIN (TC/XDP programs, attaching them by netlink or BPF link); CAP_SYS_ADMIN
  stands in for the first two (and must, before 5.8). AF_PACKET needs CAP_NET_RAW.
- ``perf_mmap`` charges each ring (its data pages plus one header page) to the user's
  locked memory up to ``perf_event_mlock_kb`` x online CPUs (shared by every process of that
  uid), and the rest to this process's pinned memory, which must stay within RLIMIT_MEMLOCK
  unless the process has CAP_IPC_LOCK or ``perf_event_paranoid`` is -1. So rings that fit
  RLIMIT_MEMLOCK always map; beyond it, only if the uid's share is free.
- A perf ring's data area is a power of two of pages, at most 1 GiB (ENOMEM beyond: its page
  list is one kmalloc). The rings are not charged to the memory cgroup.
- The BPF ring buffer is charged to the memory cgroup, not to locked memory; its size is a
  power of two that fits a u32: at most 2 GiB.
"""

from __future__ import annotations

import mmap
import os
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.sources import SourceError
from agent.sources.ring.perfbuf import online_cpus, possible_cpus, ring_bytes

__all__ = ["AFPACKET_CAPS", "CAPS", "EBPF_CAPS", "MEMLOCK_CAP", "Host", "buffer_mib_range",
           "cgroup_memory_limit", "check_buffer_mib", "check_capabilities", "check_memlock",
           "effective_caps", "max_memlock_mib", "memlock_allowance", "perf_locked_bytes",
           "perf_ring_size", "ringbuf_size"]

#: Capability numbers (``include/uapi/linux/capability.h``) of those the agent may need.
CAPS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
        "CAP_IPC_LOCK": 14, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
EBPF_CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")
AFPACKET_CAPS = ("CAP_NET_RAW",)
#: Lifts the locked-memory limit for the perf rings (not needed for the BPF ring buffer).
MEMLOCK_CAP = "CAP_IPC_LOCK"
_SUBSUMED_BY_SYS_ADMIN = ("CAP_BPF", "CAP_PERFMON")
MIB = 1 << 20
#: Largest data area of one perf ring (power of two; 2 GiB gives ENOMEM).
PERF_RING_MAX = 1 << 30
#: Largest BPF ring buffer: ``max_entries`` is a u32 power of two.
RINGBUF_MAX = 1 << 31
#: The AF_PACKET receive buffer is ``--buffer-mib`` x this, passed as a C int.
AFPACKET_RCVBUF_FACTOR = 8
_INT_MAX = (1 << 31) - 1
#: Larger cgroup v1 limits mean "no limit" (the kernel's page-rounded LONG_MAX).
_NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class Host:
    """The facts the checks depend on. ``memlock_rlimit`` and ``cgroup_limit`` are bytes, None
    when unlimited; ``cpus`` are online (one perf ring each), ``possible_cpus`` size the BPF
    ring buffer (as :class:`~agent.sources.ebpf.source.EbpfSource` does)."""

    caps: int
    cap_last: int
    uid: int
    cpus: int
    possible_cpus: int
    perf_mlock_kb: int
    perf_paranoid: int
    memlock_rlimit: int | None
    mem_available: int
    cgroup_limit: int | None

    @classmethod
    def read(cls) -> Host:
        """This process and machine, from ``/proc`` and ``/sys``."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        cpu_dir = Path("/sys/devices/system/cpu")
        return cls(
            caps=effective_caps(),
            cap_last=_read_int(Path("/proc/sys/kernel/cap_last_cap"), CAPS["CAP_BPF"]),
            uid=os.geteuid(),
            cpus=len(online_cpus(cpu_dir / "online")),
            possible_cpus=possible_cpus(),
            perf_mlock_kb=_read_int(Path("/proc/sys/kernel/perf_event_mlock_kb"), 516),
            perf_paranoid=_read_int(Path("/proc/sys/kernel/perf_event_paranoid"), 2),
            memlock_rlimit=None if soft == resource.RLIM_INFINITY else soft,
            mem_available=_mem_available(),
            cgroup_limit=cgroup_memory_limit(),
        )

    def has(self, cap: str) -> bool:
        """Is ``cap`` effective (or stood in for by CAP_SYS_ADMIN)?"""
        if self.caps >> CAPS[cap] & 1:
            return True
        return cap in _SUBSUMED_BY_SYS_ADMIN and bool(self.caps >> CAPS["CAP_SYS_ADMIN"] & 1)

    @property
    def memory_budget(self) -> int:
        """Bytes the kernel buffers may take: half of the memory available, and of the
        memory cgroup's limit if one is set."""
        avail = self.mem_available
        if self.cgroup_limit is not None:
            avail = min(avail, self.cgroup_limit)
        return avail // 2


def effective_caps(status: Path = Path("/proc/self/status")) -> int:
    """The ``CapEff`` bit mask of this process (0 if it cannot be read)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable in bytes (MemTotal on kernels before 3.14, which lack it)."""
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    return int((fields.get("MemAvailable") or fields["MemTotal"]).split()[0]) * 1024


def _memory_hierarchies(cgroup: Path, mountinfo: Path
                        ) -> Iterator[tuple[str, tuple[str, Path] | None, str]]:
    """For each hierarchy with a memory controller this process is in: (its cgroup path,
    (root, mount point) where it is mounted or None if not visible here, the limit file)."""
    try:
        lines = cgroup.read_text().splitlines()
        mounts = mountinfo.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            yield path, _mount(mounts, "cgroup", "memory"), "memory.limit_in_bytes"
        elif hid == "0" and not controllers:
            yield path, _mount(mounts, "cgroup2", None), "memory.max"


def cgroup_memory_limit(cgroup: Path = Path("/proc/self/cgroup"),
                        mountinfo: Path = Path("/proc/self/mountinfo")) -> int | None:
    """The smallest memory limit on the way from this process's cgroup up to the root of the
    mounted hierarchy (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``), or None."""
    for path, found, name in _memory_hierarchies(cgroup, mountinfo):
        if found is not None:
            root, point = found
            limit = _smallest_limit(point, _relative(path, root), name)
            if limit is not None:
                return limit
    return None


def unseen_memory_cgroup(cgroup: Path = Path("/proc/self/cgroup"),
                         mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The v1 memory cgroup this process is in when its hierarchy is not mounted where it
    can read it (e.g. under ``ip netns exec``, which mounts a fresh /sys), so its limit is
    unknown; None when there is none or it is readable."""
    for path, found, name in _memory_hierarchies(cgroup, mountinfo):
        if name == "memory.limit_in_bytes" and found is None and path not in ("", "/"):
            return path
    return None


def _mount(mounts: list[str], fstype: str, option: str | None) -> tuple[str, Path] | None:
    """(root within the hierarchy, mount point) of a cgroup mount from ``mountinfo`` lines."""
    for m in mounts:
        fields = m.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if fields[sep + 1] != fstype:
            continue
        if option is None or option in fields[sep + 3].split(","):
            return fields[3], Path(fields[4])
    return None


def _relative(path: str, root: str) -> str:
    """``path`` (from /proc/self/cgroup) below the mount's ``root``; "" if outside it (the
    cgroup namespace or mount shows only our own cgroup)."""
    root = root.rstrip("/")
    if root and not (path == root or path.startswith(root + "/")):
        return ""
    return path[len(root):].strip("/")


def _smallest_limit(point: Path, rel: str, name: str) -> int | None:
    best: int | None = None
    d = point / rel
    while True:
        try:
            text = (d / name).read_text().strip()
            value = None if text == "max" else int(text)
        except (OSError, ValueError):
            value = None
        if value is not None and value < _NO_LIMIT:
            best = value if best is None else min(best, value)
        if d == point or point not in d.parents:
            return best
        d = d.parent


# ------------------------------------------------------------------ capabilities


def check_capabilities(host: Host, ebpf: bool, mib: int | None = None,
                       transport: str = "perf") -> None:
    """SourceError naming the missing capabilities and how to grant them, if any is missing.

    Given the ``--buffer-mib`` (``mib``) and ``transport``, CAP_IPC_LOCK is named with the
    others when the perf rings would need it too (:func:`check_memlock` would refuse them), so
    one grant is enough. When only CAP_IPC_LOCK is missing, :func:`check_memlock` says so."""
    if not ebpf:
        missing = [c for c in AFPACKET_CAPS if not host.has(c)]
        if missing:
            raise SourceError(f"AF_PACKET capture needs root or CAP_NET_RAW; {_lacks(host)} "
                              f"{_grant(missing)}")
        return
    if host.cap_last < CAPS["CAP_BPF"]:  # before 5.8: CAP_SYS_ADMIN does what BPF+PERFMON do
        missing = [c for c in ("CAP_SYS_ADMIN", "CAP_NET_ADMIN") if not host.has(c)]
    else:
        missing = [c for c in EBPF_CAPS if not host.has(c)]
    if not missing:
        return
    needed = ", ".join(EBPF_CAPS)
    if mib is not None and transport == "perf" and _memlock_short(host, mib):
        missing.append(MEMLOCK_CAP)
        needed += f" ({MEMLOCK_CAP} too for perf rings of --buffer-mib {mib})"
    raise SourceError(f"live eBPF capture needs root or {needed}; {_lacks(host)} "
                      f"{_grant(missing)}")


def _memlock_short(host: Host, mib: int) -> bool:
    """Would the perf rings for ``mib`` exceed what may be locked without CAP_IPC_LOCK?"""
    allowed = memlock_allowance(host)
    return allowed is not None and perf_locked_bytes(mib, host.cpus) > allowed


def _lacks(host: Host) -> str:
    who = "root" if host.uid == 0 else f"uid {host.uid}"
    return f"this process ({who}) lacks"


def _grant(missing: list[str]) -> str:
    names = " ".join(missing)
    k8s = ", ".join(c.removeprefix("CAP_") for c in missing)
    return (f"{', '.join(missing)}: grant them (Kubernetes: securityContext.capabilities.add "
            f"[{k8s}]; systemd: AmbientCapabilities={names} and the same in "
            f"CapabilityBoundingSet=)")


# ------------------------------------------------------------------ buffer sizes


def perf_ring_size(mib: int) -> int:
    """Data bytes of one perf ring for ``--buffer-mib`` (rounded up to a power of two)."""
    return ring_bytes(max(1, mib * MIB // mmap.PAGESIZE))


def ringbuf_size(mib: int, possible_cpus: int) -> int:
    """Bytes of the BPF ring buffer: ``mib`` per possible CPU, rounded up to a power of two."""
    return ring_bytes(max(1, mib * MIB * possible_cpus // mmap.PAGESIZE))


def perf_locked_bytes(mib: int, cpus: int) -> int:
    """Bytes the perf rings mmap, and so lock: a ring plus its header page per online CPU."""
    return cpus * (perf_ring_size(mib) + mmap.PAGESIZE)


def _largest(fits: Callable[[int], bool], hi: int = 1 << 24) -> int:
    """The largest MIB in 1..hi for which the monotone ``fits`` holds; 0 if none."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def buffer_mib_range(host: Host, ebpf: bool, transport: str) -> tuple[int, str]:
    """The largest ``--buffer-mib`` this host allows (0: none), and what sets the bound."""
    if not ebpf:
        hi = _INT_MAX // (AFPACKET_RCVBUF_FACTOR * MIB)
        return hi, (f"the AF_PACKET receive buffer, MIB x {AFPACKET_RCVBUF_FACTOR} MiB, must "
                    "fit a C int")
    budget = host.memory_budget
    share = (f"at most half of the {_mib(budget * 2)} of memory available"
             + (" (memory cgroup limit included)" if host.cgroup_limit else ""))
    if transport == "ringbuf":
        def fits(m: int) -> bool:
            size = ringbuf_size(m, host.possible_cpus)
            return size <= RINGBUF_MAX and size <= budget

        return _largest(fits), (f"one BPF ring buffer of MIB x {host.possible_cpus} CPUs, "
                                f"rounded up to a power of two: at most 2 GiB and {share}")

    def fits_perf(m: int) -> bool:
        return perf_ring_size(m) <= PERF_RING_MAX and host.cpus * perf_ring_size(m) <= budget

    return _largest(fits_perf), (f"a perf ring of MIB per CPU, rounded up to a power of "
                                 f"two: each at most 1 GiB, the {host.cpus} together {share}")


def check_buffer_mib(host: Host, mib: int, ebpf: bool, transport: str,
                     default: bool = False) -> None:
    """SourceError with the allowed range if ``mib`` is out of it (``default``: it was not
    given, so the message suggests giving a smaller one)."""
    hi, why = buffer_mib_range(host, ebpf, transport)
    if 1 <= mib <= hi:
        return
    what = f"the default --buffer-mib {mib}" if default else f"--buffer-mib {mib}"
    allowed = f"1-{hi}" if hi >= 1 else "none (not even 1)"
    raise SourceError(f"{what} is out of range: this host allows {allowed} ({why})")


# ------------------------------------------------------------------ locked memory


def memlock_allowance(host: Host) -> int | None:
    """Bytes of perf rings this process can surely map, or None when there is no limit.

    Only RLIMIT_MEMLOCK counts: the kernel's ``perf_event_mlock_kb`` per CPU comes first, but
    it is shared by every process of the uid (on a busy host other root processes hold it),
    and whatever it does not cover is charged to the rlimit.
    """
    if host.has(MEMLOCK_CAP) or host.perf_paranoid < 0 or host.memlock_rlimit is None:
        return None
    return host.memlock_rlimit // mmap.PAGESIZE * mmap.PAGESIZE


def max_memlock_mib(host: Host) -> int:
    """The largest ``--buffer-mib`` whose perf rings fit the locked-memory allowance."""
    allowed = memlock_allowance(host)
    if allowed is None:
        return 1 << 24
    return _largest(lambda m: perf_locked_bytes(m, host.cpus) <= allowed)


def check_memlock(host: Host, mib: int, transport: str) -> None:
    """SourceError if the perf rings for ``mib`` may not be mappable: what they need, the
    limit, and what to grant (the BPF ring buffer is not locked memory: it always passes)."""
    allowed = memlock_allowance(host)
    need = perf_locked_bytes(mib, host.cpus)
    if transport != "perf" or allowed is None or need <= allowed:
        return
    fit = max_memlock_mib(host)
    instead = [f"--buffer-mib {fit} or less"] if fit >= 1 else []
    instead.append("--transport ringbuf (not locked memory)")
    raise SourceError(
        f"the perf rings need {_mib(need)} of locked memory ({host.cpus} CPUs x "
        f"({_mib(perf_ring_size(mib))} + a header page)) but without {MEMLOCK_CAP} only "
        f"RLIMIT_MEMLOCK, {_mib(allowed)}, is sure (the kernel's perf_event_mlock_kb, "
        f"{host.perf_mlock_kb} KiB per CPU, is shared by every process of this uid): grant "
        f"{MEMLOCK_CAP} (Kubernetes: securityContext.capabilities.add [IPC_LOCK]; systemd: "
        f"AmbientCapabilities={MEMLOCK_CAP}), or raise the limit (systemd LimitMEMLOCK=, "
        f"ulimit -l), or use {' or '.join(instead)}")


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.1f} GiB"
