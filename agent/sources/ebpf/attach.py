"""Attaching the eBPF program to interfaces, as a guest: it never replaces, blinds or removes
another program, and a second agent on the same interface works beside the first.

- **TC, kernels with TCX (6.6+)**: one BPF link per hook (``BPF_LINK_CREATE``,
  ``BPF_TCX_INGRESS``/``EGRESS``, placed before the programs already there). The program
  returns "next", so every program after it, and every legacy clsact filter (TCX runs before
  them), still sees every packet. A link is released by the kernel when its last descriptor
  closes, so a SIGKILLed agent leaves nothing behind.
- **TC, older kernels**: a clsact ``cls_bpf`` filter per hook, at a priority of its own
  (ahead of the filters already there where the numbers allow) and named
  ``mirror_agent-<pid>``, returning ``TC_ACT_UNSPEC`` so later filters still run. Filters
  named after a process that no longer exists (a killed agent) are removed at start; a
  clsact qdisc this agent created is deleted again, one that existed before is kept.
- **XDP**: a BPF link (native mode where the driver has it, else generic). An interface that
  already has an XDP program is refused (SourceError, exit 2) with the program's name: one
  interface has one XDP program, and it is not ours to replace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from dataclasses import dataclass, field

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.sources import SourceError
from agent.sources.ebpf.bpfsys import (
    BPF_F_BEFORE,
    BPF_TCX_EGRESS,
    BPF_TCX_INGRESS,
    BPF_XDP,
    BpfError,
    link_create,
    prog_name_by_id,
)
from agent.sources.ebpf.links import captured_route, resolve_ifaces

__all__ = ["TC_MODES", "Attachment", "ClsactAttachment", "TcxAttachment", "XdpAttachment",
           "attach_tc", "captured_route", "resolve_ifaces", "xdp_prog_id"]

log = structlog.get_logger("agent.attach")

TC_MODES = ("auto", "tcx", "clsact")
_INGRESS, _EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
_HOOK_NAMES = {_INGRESS: "ingress", _EGRESS: "egress"}
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
_FILTER_NAME = re.compile(r"mirror_agent(-[0-9a-f]+)?$")
#: Our filters' handle: distinctive, so a tool that replaces "prio 1 handle 1" misses it.
_HANDLE = 0x4D41


class Attachment:
    """Something attached to one interface; ``detach`` and ``forget`` are idempotent."""

    ifname: str
    ifindex: int

    @property
    def how(self) -> str:
        """How it is attached: ``tcx``, ``clsact``, ``xdp-native`` or ``xdp-generic``."""
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    def forget(self) -> None:
        """The interface is gone (the kernel removed what was on it): release our side
        (descriptors) without asking the kernel for anything."""
        self.detach()


def _hooks(ifname: str, ingress_fd: int, egress_fd: int | None) -> list[tuple[int, int]]:
    """(parent, program fd) per hook. On ``lo`` every packet passes egress and then
    ingress, so only ingress is used there."""
    hooks = [(_INGRESS, ingress_fd)]
    if egress_fd is not None and ifname != "lo":
        hooks.append((_EGRESS, egress_fd))
    return hooks


def attach_tc(ifname: str, ingress_fd: int, egress_fd: int | None,
              mode: str = "auto", ifindex: int = 0) -> Attachment:
    """Attach the TC programs to ``ifname`` (at ``ifindex``; 0: look the name up): TCX
    links (``tcx``), clsact filters (``clsact``), or TCX where the kernel has it, else
    clsact (``auto``)."""
    if mode not in TC_MODES:
        raise SourceError(f"unknown TC attach mode {mode!r}")
    if mode != "clsact":
        tcx = TcxAttachment(ifname, _hooks(ifname, ingress_fd, egress_fd), ifindex=ifindex)
        try:
            tcx.attach()
            return tcx
        except BpfError as e:
            tcx.detach()
            # EINVAL: the kernel does not know the TCX attach types (before 6.6).
            if mode == "tcx" or e.errno != errno.EINVAL:
                raise SourceError(f"cannot attach TCX to {ifname}: {e.strerror}") from None
            log.info("no TCX in this kernel; using clsact filters", iface=ifname)
    clsact = ClsactAttachment(ifname, _hooks(ifname, ingress_fd, egress_fd), ifindex=ifindex)
    try:
        clsact.attach()
    except BaseException:
        clsact.detach()
        raise
    return clsact


@dataclass
class TcxAttachment(Attachment):
    """BPF links on the TCX hooks of one interface; closing them detaches."""

    ifname: str
    hooks: list[tuple[int, int]]
    links: dict[int, int] = field(default_factory=dict)  # parent → link fd
    ifindex: int = 0

    @property
    def how(self) -> str:
        return "tcx"

    def attach(self) -> None:
        self.ifindex = self.ifindex or _ifindex(self.ifname)
        for parent, fd in self.hooks:
            kind = BPF_TCX_INGRESS if parent == _INGRESS else BPF_TCX_EGRESS
            self.links[parent] = link_create(fd, self.ifindex, kind, BPF_F_BEFORE)
        log.info("attached", iface=self.ifname, engine="tc", mode="tcx",
                 hooks=[_HOOK_NAMES[p] for p in self.links])

    def detach(self) -> None:
        if not self.links:
            return
        for fd in self.links.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.links.clear()
        log.info("detached", iface=self.ifname, engine="tc", mode="tcx")


@dataclass
class ClsactAttachment(Attachment):
    """``cls_bpf`` filters (direct action) on clsact hooks, at priorities of their own."""

    ifname: str
    hooks: list[tuple[int, int]]
    created_qdisc: bool = False
    placed: dict[int, int] = field(default_factory=dict)  # parent → priority
    ifindex: int = 0

    @property
    def how(self) -> str:
        return "clsact"

    def attach(self) -> None:
        try:
            with IPRoute() as ipr:
                self.ifindex = self.ifindex or _ifindex(self.ifname, ipr)
                self._ensure_clsact(ipr)
                for parent, fd in self.hooks:
                    _remove_stale(ipr, self.ifindex, parent)
                    self.placed[parent] = self._add(ipr, parent, fd)
        except NetlinkError as e:
            raise SourceError(f"cannot attach a clsact filter to {self.ifname}: "
                              f"{os.strerror(e.code)}") from None
        log.info("attached", iface=self.ifname, engine="tc", mode="clsact",
                 hooks={_HOOK_NAMES[p]: prio for p, prio in self.placed.items()})

    def _ensure_clsact(self, ipr: IPRoute) -> None:
        kinds = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(self.ifindex)]
        if "clsact" in kinds:
            return
        if "ingress" in kinds:  # both live at ffff:, so clsact cannot be added beside it
            raise SourceError(
                f"{self.ifname} has a legacy 'ingress' qdisc, and clsact cannot be added beside "
                "it: use --tc-attach tcx (kernel 6.6+), or move its filters to clsact")
        try:
            ipr.tc("add", "clsact", index=self.ifindex)
            self.created_qdisc = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:  # another agent added it just now: share it
                raise

    def _add(self, ipr: IPRoute, parent: int, fd: int) -> int:
        """Add our filter at a free priority; a race with another agent takes the next."""
        for _ in range(8):
            prio = _free_prio(ipr, self.ifindex, parent, self.ifname)
            try:
                ipr.tc("add-filter", "bpf", index=self.ifindex, handle=_HANDLE, fd=fd,
                       name=_presence().name, parent=parent, classid=1, direct_action=True,
                       prio=prio)
                return prio
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
        raise SourceError(f"no free clsact priority on {self.ifname} (other agents racing?)")

    def detach(self) -> None:
        if not self.placed and not self.created_qdisc:
            return
        with IPRoute() as ipr:
            for parent, prio in self.placed.items():
                _del_own_filter(ipr, self.ifindex, parent, prio, _presence().name)
            self.placed.clear()
            # Only the qdisc this very agent added, and only if nobody else's filter is on it.
            with contextlib.suppress(NetlinkError):
                if self.created_qdisc and not (_filters(ipr, self.ifindex, _INGRESS)
                                               or _filters(ipr, self.ifindex, _EGRESS)):
                    ipr.tc("del", "clsact", index=self.ifindex)
            self.created_qdisc = False
        log.info("detached", iface=self.ifname, engine="tc", mode="clsact")

    def forget(self) -> None:
        """The qdisc and its filters went with the interface; its index may already be
        another interface's, so nothing is deleted by it."""
        if self.placed or self.created_qdisc:
            self.placed.clear()
            self.created_qdisc = False
            log.info("interface gone", iface=self.ifname, engine="tc", mode="clsact")


class _Presence:
    """This agent's name on clsact filters, ``mirror_agent-<token>``, and the proof that it
    is alive: an abstract Unix socket of the same name. Abstract sockets belong to the
    network namespace, as the filters do, and vanish with the process however it dies, so
    another agent sees a filter as stale exactly when nobody answers at its name, whatever
    PID namespace either runs in."""

    def __init__(self) -> None:
        self.name = f"mirror_agent-{secrets.token_hex(6)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.name)
        self._sock.listen(8)

    @staticmethod
    def alive(name: str) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect("\0" + name)
            except ConnectionRefusedError:
                return False
            except OSError:  # busy backlog and the like: alive, to be safe
                return True
        return True


_PRESENCE: _Presence | None = None


def _presence() -> _Presence:
    global _PRESENCE
    if _PRESENCE is None:
        _PRESENCE = _Presence()
    return _PRESENCE


def _filters(ipr: IPRoute, idx: int, parent: int) -> list[tuple[int, int, str]]:
    """(priority, handle, bpf name) of the filters on one clsact hook."""
    out = []
    for f in ipr.get_filters(index=idx, parent=parent):
        if not f["handle"]:
            continue  # the chain's per-priority head, not a filter
        opts = f.get_attr("TCA_OPTIONS")
        name = (opts.get_attr("TCA_BPF_NAME") if opts is not None else None) or ""
        out.append((f["info"] >> 16, f["handle"], name))
    return out


def _free_prio(ipr: IPRoute, idx: int, parent: int, ifname: str) -> int:
    """Ahead of every filter on the hook if the numbers allow, else the first free one."""
    used = {prio for prio, _h, _n in _filters(ipr, idx, parent)}
    if not used:
        return 1
    if min(used) > 1:
        return min(used) - 1
    prio = next(p for p in range(1, 0xFFFF) if p not in used)
    log.warning("cannot go first on this hook: a filter with priority 1 runs before the "
                "agent and may hide packets from it", iface=ifname,
                hook=_HOOK_NAMES[parent], priority=prio)
    return prio


def _remove_stale(ipr: IPRoute, idx: int, parent: int) -> None:
    """Delete the filters of agents that no longer run (nobody answers at their name; an
    unnumbered ``mirror_agent`` is from a version before names had tokens)."""
    for prio, _handle, name in _filters(ipr, idx, parent):
        if _FILTER_NAME.match(name) and (name == "mirror_agent" or not _Presence.alive(name)):
            _del_own_filter(ipr, idx, parent, prio, name)
            log.info("removed a stale filter of a killed agent", filter=name, priority=prio)


def _del_own_filter(ipr: IPRoute, idx: int, parent: int, prio: int, name: str) -> None:
    """Delete the filter at ``prio`` only if it is still the one named ``name``: another
    program may have replaced it meanwhile, and that one is not ours to remove."""
    with contextlib.suppress(NetlinkError):
        for fprio, handle, fname in _filters(ipr, idx, parent):
            if fprio == prio and fname == name:
                ipr.tc("del-filter", "bpf", index=idx, handle=handle, parent=parent,
                       prio=prio)


@dataclass
class XdpAttachment(Attachment):
    """The XDP program on one interface through a BPF link: native mode where the driver
    has it, else generic."""

    ifname: str
    fd: int
    link: int = -1
    mode: str = ""
    ifindex: int = 0

    @property
    def how(self) -> str:
        return f"xdp-{self.mode}"

    def attach(self) -> None:
        with IPRoute() as ipr:
            idx = self.ifindex = self.ifindex or _ifindex(self.ifname, ipr)
            present = xdp_prog_id(ipr, idx)
        if present:
            # The name needs CAP_SYS_ADMIN (BPF_PROG_GET_FD_BY_ID); the id is always known.
            name = prog_name_by_id(present)
            what = f"{name}, id {present}" if name else f"id {present}"
            raise SourceError(
                f"{self.ifname} already has an XDP program ({what}); it is not ours to "
                "replace: use --engine tc, which shares the interface")
        errors = []
        for mode, flags in (("native", XDP_FLAGS_DRV_MODE), ("generic", XDP_FLAGS_SKB_MODE)):
            try:
                self.link = link_create(self.fd, idx, BPF_XDP, flags)
            except BpfError as e:
                errors.append(f"{mode}: {e.strerror}")
                continue
            self.mode = mode
            log.info("attached", iface=self.ifname, engine="xdp", mode=mode)
            return
        raise SourceError(f"cannot attach XDP to {self.ifname} ({'; '.join(errors)})")

    def detach(self) -> None:
        if self.link < 0:
            return
        with contextlib.suppress(OSError):
            os.close(self.link)
        self.link = -1
        log.info("detached", iface=self.ifname, engine="xdp")


def xdp_prog_id(ipr: IPRoute, idx: int) -> int:
    """The id of an XDP program on an interface (any mode), 0 if none. With programs in
    several modes the kernel reports only the per-mode ids."""
    xdp = ipr.get_links(idx)[0].get_attr("IFLA_XDP")
    if xdp is None:
        return 0
    ids = (xdp.get_attr(a) for a in ("IFLA_XDP_PROG_ID", "IFLA_XDP_DRV_PROG_ID",
                                     "IFLA_XDP_SKB_PROG_ID", "IFLA_XDP_HW_PROG_ID"))
    return next((int(i) for i in ids if i), 0)


def _ifindex(ifname: str, ipr: IPRoute | None = None) -> int:
    with contextlib.ExitStack() as stack:
        if ipr is None:
            ipr = stack.enter_context(IPRoute())
        found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise SourceError(f"interface {ifname!r} not found")
    return int(found[0])
