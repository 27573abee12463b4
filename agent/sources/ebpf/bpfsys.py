"""The few ``bpf(2)`` commands the running agent needs, without bcc.

bcc (and its ~150 MiB of LLVM) only compiles and loads the program, in a short-lived child
(``loader.py``); the long-running process holds plain file descriptors and uses these calls:
map updates and lookups, BPF links (TCX and XDP) and program names for error messages. The
``union bpf_attr`` layouts are from ``include/uapi/linux/bpf.h`` (a stable ABI); unused
trailing bytes are zero, which the kernel requires.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

__all__ = [
    "BPF_F_BEFORE",
    "BPF_TCX_EGRESS",
    "BPF_TCX_INGRESS",
    "BPF_XDP",
    "SCHED_CLS",
    "XDP",
    "BpfError",
    "BpfMap",
    "link_create",
    "prog_ids",
    "prog_name_by_id",
]

_NR_BPF = {"x86_64": 321, "aarch64": 280}
_MAP_LOOKUP_ELEM, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _MAP_GET_NEXT_KEY = 1, 2, 3, 4
_MAP_GET_FD_BY_ID = 14
_PROG_GET_FD_BY_ID, _OBJ_GET_INFO_BY_FD, _PROG_QUERY, _LINK_CREATE = 13, 15, 16, 28
#: enum bpf_prog_type values used here.
SCHED_CLS, XDP = 3, 6
#: enum bpf_attach_type values (6.6+ for TCX).
BPF_XDP, BPF_TCX_INGRESS, BPF_TCX_EGRESS = 37, 46, 47
#: enum bpf_map_type values whose lookups return one value per possible CPU.
_PER_CPU_MAPS = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
_MAP_INFO = struct.Struct("<IIIII")  # type, id, key_size, value_size, max_entries
#: link_create.flags for TCX: go before every program already on the hook.
BPF_F_BEFORE = 1 << 3
_ATTR_SIZE = 128  # larger than every command used here; the tail stays zero
_PROG_INFO_SIZE = 96  # through ``name`` (offset 64, 16 bytes)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A ``bpf(2)`` command failed; ``errno`` says why."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2): unknown syscall number on {platform.machine()}")
    ret = int(_syscall(ctypes.c_long(nr), ctypes.c_long(cmd), attr,
                       ctypes.c_uint(len(attr))))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _bpf_unless_absent(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> bool:
    """:func:`_bpf` for a map element; False if the key is absent (ENOENT)."""
    try:
        _bpf(cmd, attr, what)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


@dataclass(frozen=True)
class BpfMap:
    """A map descriptor with its sizes, as the kernel reports them; lookups and updates are
    checked against them, so a wrong size can never make the kernel write past a buffer."""

    fd: int
    map_type: int
    key_size: int
    value_size: int
    max_entries: int

    @classmethod
    def from_fd(cls, fd: int) -> BpfMap:
        """``BPF_OBJ_GET_INFO_BY_FD`` on a map."""
        info = ctypes.create_string_buffer(_MAP_INFO.size)
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<IIQ", attr, 0, fd, _MAP_INFO.size, _addr(info))
        _bpf(_OBJ_GET_INFO_BY_FD, attr, "map info")
        map_type, _id, key_size, value_size, max_entries = _MAP_INFO.unpack(info.raw)
        return cls(fd, map_type, key_size, value_size, max_entries)

    @classmethod
    def from_id(cls, map_id: int) -> BpfMap:
        """A new descriptor (the caller closes ``fd``) for the map with this id
        (``BPF_MAP_GET_FD_BY_ID``: CAP_SYS_ADMIN), e.g. to read another process's map."""
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<I", attr, 0, map_id)
        fd = _bpf(_MAP_GET_FD_BY_ID, attr, "map get fd by id")
        try:
            return cls.from_fd(fd)
        except BaseException:
            os.close(fd)
            raise

    def dump_keys(self) -> list[bytes]:
        """Every key in the map now (``BPF_MAP_GET_NEXT_KEY`` from the start), at most
        ``max_entries``: a hash map changed meanwhile may restart the walk, never loop it."""
        out: list[bytes] = []
        prev: ctypes.Array[ctypes.c_char] | None = None
        for _ in range(self.max_entries):
            nxt = ctypes.create_string_buffer(self.key_size)
            attr = ctypes.create_string_buffer(_ATTR_SIZE)
            struct.pack_into("<I4xQQ", attr, 0, self.fd, _addr(prev) if prev is not None
                             else 0, _addr(nxt))
            if not _bpf_unless_absent(_MAP_GET_NEXT_KEY, attr, "map next key"):
                break
            out.append(nxt.raw)
            prev = nxt
        return out

    def lookup_size(self, possible_cpus: int) -> int:
        """Bytes a lookup returns: per-CPU maps give each possible CPU's value, 8-aligned."""
        if self.map_type in _PER_CPU_MAPS:
            return (self.value_size + 7) // 8 * 8 * possible_cpus
        return self.value_size

    def update(self, key: bytes, value: bytes) -> None:
        """``BPF_MAP_UPDATE_ELEM`` with ``BPF_ANY``: insert or replace."""
        self._check(key, value, self.value_size)
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<I4xQQQ", attr, 0, self.fd, _addr(k), _addr(v), 0)
        _bpf(_MAP_UPDATE_ELEM, attr, "map update")

    def lookup(self, key: bytes, possible_cpus: int = 1) -> bytes | None:
        """``BPF_MAP_LOOKUP_ELEM``: the value (:meth:`lookup_size` bytes), None if absent."""
        self._check(key, b"", 0)
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(self.lookup_size(possible_cpus))
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<I4xQQ", attr, 0, self.fd, _addr(k), _addr(v))
        return v.raw if _bpf_unless_absent(_MAP_LOOKUP_ELEM, attr, "map lookup") else None

    def delete(self, key: bytes) -> bool:
        """``BPF_MAP_DELETE_ELEM``; False if the key was absent."""
        self._check(key, b"", 0)
        k = ctypes.create_string_buffer(key, len(key))
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<I4xQ", attr, 0, self.fd, _addr(k))
        return _bpf_unless_absent(_MAP_DELETE_ELEM, attr, "map delete")

    def _check(self, key: bytes, value: bytes, value_size: int) -> None:
        if len(key) != self.key_size or len(value) != value_size:
            raise ValueError(f"map key/value of {len(key)}/{len(value)} bytes, the map has "
                             f"{self.key_size}/{self.value_size}")


def link_create(prog_fd: int, ifindex: int, attach_type: int, flags: int = 0) -> int:
    """``BPF_LINK_CREATE`` on an interface; returns the link fd. The attachment lives as long
    as the fd (or a pin): it goes away when the process dies, however it dies."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # prog_fd, target_ifindex, attach_type, flags; tcx.relative_fd (0) and
    # tcx.expected_revision (0) follow and stay zero.
    struct.pack_into("<IIII", attr, 0, prog_fd, ifindex, attach_type, flags)
    return _bpf(_LINK_CREATE, attr, "link create")


def prog_name_by_id(prog_id: int) -> str:
    """The name of a loaded program (for "XDP program X is attached" messages); ``""`` if it
    cannot be read."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<I", attr, 0, prog_id)
    try:
        fd = _bpf(_PROG_GET_FD_BY_ID, attr, "prog get fd")
    except BpfError:
        return ""
    try:
        info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<IIQ", attr, 0, fd, _PROG_INFO_SIZE, _addr(info))
        _bpf(_OBJ_GET_INFO_BY_FD, attr, "prog info")
        return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    except BpfError:
        return ""
    finally:
        os.close(fd)


def prog_ids(ifindex: int, attach_type: int, most: int = 256) -> list[int]:
    """``BPF_PROG_QUERY``: ids of the programs on an interface's TCX hook, in run order."""
    ids = (ctypes.c_uint32 * most)()
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # target_ifindex, attach_type, query_flags, attach_flags, prog_ids, prog_cnt
    struct.pack_into("<IIIIQI", attr, 0, ifindex, attach_type, 0, 0, ctypes.addressof(ids),
                     most)
    _bpf(_PROG_QUERY, attr, "prog query")
    count = struct.unpack_from("<I", attr, 24)[0]
    return list(ids[:count])
