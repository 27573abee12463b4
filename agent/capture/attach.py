"""Attaching the eBPF program to interfaces (TC clsact or XDP) and removing it again.

Idempotent: a filter left at our priority by a crashed earlier run is replaced. On detach
everything this process attached is removed; a clsact qdisc that existed before is left alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.capture import SourceError

__all__ = ["Attachment", "TcAttachment", "XdpAttachment", "resolve_ifaces"]

log = structlog.get_logger("agent.attach")

#: Our TC filter priority: fixed, so a later run finds (and replaces) what an earlier one left.
TC_PRIO = 49
_INGRESS, _EGRESS = "ffff:fff2", "ffff:fff3"
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


def resolve_ifaces(spec: str) -> list[str]:
    """``lo``, ``eth0,eth1`` or ``any`` (every non-loopback interface that is up)."""
    with IPRoute() as ipr:
        links = {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}
    if spec == "any":
        names = [n for n, link in links.items() if n != "lo" and link["flags"] & 1]
        if not names:
            raise SourceError("--iface any: no non-loopback interface is up")
        return sorted(names)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in links:
            raise SourceError(f"interface {n!r} not found (have: {', '.join(sorted(links))})")
    return names


class Attachment:
    """Something attached to one interface; ``detach`` is idempotent."""

    ifname: str

    def detach(self) -> None:
        raise NotImplementedError


@dataclass
class TcAttachment(Attachment):
    """A direct-action classifier on clsact ingress and/or egress of one interface.

    On ``lo`` every packet passes egress and then ingress, so only ingress is used there.
    """

    ifname: str
    ingress_fd: int
    egress_fd: int | None
    created_qdisc: bool = False
    parents: list[str] = field(default_factory=list)

    def attach(self) -> None:
        with IPRoute() as ipr:
            idx = _index(ipr, self.ifname)
            kinds = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(idx)]
            if "clsact" not in kinds:
                ipr.tc("add", "clsact", index=idx)
                self.created_qdisc = True
            hooks = [(_INGRESS, self.ingress_fd)]
            if self.egress_fd is not None and self.ifname != "lo":
                hooks.append((_EGRESS, self.egress_fd))
            for parent, fd in hooks:
                _del_filter(ipr, idx, parent)  # a leftover from a crashed run
                ipr.tc("add-filter", "bpf", index=idx, handle=":1", fd=fd, name="mirror_agent",
                       parent=parent, classid=1, direct_action=True, prio=TC_PRIO)
                self.parents.append(parent)
        log.info("attached", iface=self.ifname, engine="tc",
                 hooks=["ingress" if p == _INGRESS else "egress" for p in self.parents])

    def detach(self) -> None:
        if not self.parents and not self.created_qdisc:
            return
        with IPRoute() as ipr:
            try:
                idx = _index(ipr, self.ifname)
            except SourceError:
                return  # the interface went away, and our filters with it
            for parent in self.parents:
                _del_filter(ipr, idx, parent)
            self.parents = []
            if self.created_qdisc:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", index=idx)
                self.created_qdisc = False
        log.info("detached", iface=self.ifname, engine="tc")


@dataclass
class XdpAttachment(Attachment):
    """The XDP program on one interface: native mode where the driver has it, else generic."""

    ifname: str
    fd: int
    mode: str = ""

    def attach(self) -> None:
        with IPRoute() as ipr:
            idx = _index(ipr, self.ifname)
            for mode, flags in (("native", XDP_FLAGS_DRV_MODE), ("generic", XDP_FLAGS_SKB_MODE)):
                try:
                    ipr.link("set", index=idx, xdp_fd=self.fd, xdp_flags=flags)
                except NetlinkError:
                    continue
                self.mode = mode
                log.info("attached", iface=self.ifname, engine="xdp", mode=mode)
                return
        raise SourceError(f"cannot attach XDP to {self.ifname}")

    def detach(self) -> None:
        if not self.mode:
            return
        flags = XDP_FLAGS_DRV_MODE if self.mode == "native" else XDP_FLAGS_SKB_MODE
        with IPRoute() as ipr, contextlib.suppress(NetlinkError, SourceError):
            ipr.link("set", index=_index(ipr, self.ifname), xdp_fd=-1, xdp_flags=flags)
        self.mode = ""
        log.info("detached", iface=self.ifname, engine="xdp")


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise SourceError(f"interface {ifname!r} not found")
    return int(found[0])


def _del_filter(ipr: IPRoute, idx: int, parent: str) -> None:
    with contextlib.suppress(NetlinkError):
        ipr.tc("del-filter", "bpf", index=idx, handle=":1", parent=parent, prio=TC_PRIO)
