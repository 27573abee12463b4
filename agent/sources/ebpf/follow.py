"""Interfaces as they come and go: the eBPF program attached to every interface an
:class:`~agent.sources.ebpf.links.IfaceSpec` matches, kept in step with rtnetlink.

The program and maps are loaded once; an interface that appears is one more attachment
(TCX links, clsact filters or an XDP link), made within milliseconds of RTM_NEWLINK by a
thread of its own; one that vanishes (RTM_DELLINK: deleted, or moved to another namespace)
is *forgotten*: our descriptors are closed, nothing is asked of the kernel, which already
removed what was on it, and nothing is logged as an error. Everything is keyed by ifindex.

**One capture per connection** (following specs only). A connection routed through the
host, such as a client's to a pod, passes two captured interfaces (the uplink, then the
pod's host-side veth), with different addresses when it is NATed. Each attached interface
gets a side in the program's ``iface_side`` map, and the host's own addresses (every
interface's, from address events) are kept in ``local_addrs``:

- *host side*: the interface has an address of its own (IPv6 link-local aside): an uplink,
  a bridge, ``lo``. A packet is kept only if its service address (the destination of a
  packet to the observed port, the source of one from it) is the host's own.
- *pod side*: no address of its own: a pod's veth, a bridge port. A packet is also kept if
  the service lies beyond the interface: to the service on egress, from it on ingress.

So a pod's service is captured on its veth only (after NAT, both directions, exactly once),
the host's own services on whichever interface their traffic uses, and a connection the
host only routes nowhere else. Fixed-name specs get no side: every packet, as before.
"""

from __future__ import annotations

import contextlib
import select
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from agent.sources import SourceError
from agent.sources.ebpf.attach import Attachment
from agent.sources.ebpf.links import (
    Event,
    IfaceSpec,
    LinkEvent,
    LinkWatcher,
    check_names,
    dump,
    link_local,
)
from agent.sources.ebpf.program import SIDE_HOST, SIDE_POD

__all__ = ["STATS", "AttachedIface", "Follower", "Program"]

log = structlog.get_logger("agent.follow")

#: Seconds the thread waits for an event before looking at its stop flag.
POLL = 0.2
_SIDES = {SIDE_HOST: "host", SIDE_POD: "pod", None: "all"}
_COUNTS = ("iface_attaches", "iface_detaches", "iface_attach_failures", "link_resyncs",
           "link_errors")
#: The keys of :meth:`Follower.stats` (each declared in ``agent/metrics.py``).
STATS = ("ifaces_attached", *_COUNTS)


class Program(Protocol):
    """What the follower needs of :class:`agent.sources.ebpf.program.MirrorProgram`."""

    def attach(self, ifindex: int, name: str, tc_mode: str = "auto") -> Attachment: ...

    def set_side(self, ifindex: int, side: int | None) -> None: ...

    def set_local(self, addr: bytes, local: bool) -> None: ...


@dataclass(frozen=True)
class AttachedIface:
    """One attached interface, for ``/status``: ``how`` (``tcx``, ``clsact``,
    ``xdp-native``, ``xdp-generic``) and ``side`` (``host``, ``pod``, or ``all``: fixed
    names, every packet)."""

    name: str
    ifindex: int
    how: str
    side: str

    def as_dict(self) -> dict[str, str | int]:
        return {"name": self.name, "ifindex": self.ifindex, "how": self.how, "side": self.side}


class Follower:
    """Attaches ``prog`` to what ``spec`` matches now; with a following spec, also to what
    appears later (:meth:`start`), until :meth:`close`, which detaches everything.

    At start a fixed name that does not exist, or any attachment that fails, raises
    SourceError (exit 2), and nothing stays attached. Later failures (an interface that
    vanished at once, someone else's XDP program) are logged and counted, never raised.
    """

    def __init__(self, spec: IfaceSpec, prog: Program, tc_mode: str = "auto") -> None:
        self.spec = spec
        self._prog = prog
        self._tc_mode = tc_mode
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._links: dict[int, LinkEvent] = {}
        self._addrs: dict[int, set[bytes]] = {}
        self._attached: dict[int, Attachment] = {}
        self._sides: dict[int, int] = {}
        self._local: set[bytes] = set()
        self._counts = dict.fromkeys(_COUNTS, 0)
        self._watcher = LinkWatcher() if spec.follows else None
        try:
            events = dump()
            check_names(spec, events)
            self._resync(events, strict=True)
        except BaseException:
            self.close()
            raise
        if not self._attached:
            log.info("no interface matches yet; waiting for one", iface=str(spec))

    def start(self) -> None:
        """Follow link events on a thread of its own (a following spec; else nothing)."""
        if self._watcher is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="link-follower",
                                            daemon=True)
            self._thread.start()

    def interfaces(self) -> list[AttachedIface]:
        """The interfaces attached now, by name."""
        with self._lock:
            return sorted((AttachedIface(a.ifname, i, a.how, _SIDES[self._sides.get(i)])
                           for i, a in self._attached.items()), key=lambda x: x.name)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"ifaces_attached": len(self._attached), **self._counts}

    def apply(self, events: list[Event] | None) -> None:
        """Take link and address events in order (None: some were lost, read everything
        again). The follower's thread calls this; so may a test."""
        if events is None:
            self._counts["link_resyncs"] += 1
            log.warning("netlink events were lost; re-reading every interface")
            events = dump()
            with self._lock:
                self._resync(events)
        else:
            with self._lock:
                self._apply(events)

    def tracked(self) -> dict[str, int]:
        """How much is held (links, sides, host addresses in the map): for leak checks."""
        with self._lock:
            return {"links": len(self._links), "sides": len(self._sides),
                    "local_addrs": len(self._local), "attached": len(self._attached)}

    def close(self) -> None:
        """Stop following, then detach every attachment (each is tried)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for idx in list(self._attached):
                self._drop(idx, gone=False)
        if self._watcher is not None:
            self._watcher.close()

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        assert self._watcher is not None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._watcher], [], [], POLL)
                if not ready:
                    continue
                self.apply(self._watcher.read())
            except Exception as e:  # keep following; say so
                self._counts["link_errors"] += 1
                log.error("following interfaces failed", error=f"{type(e).__name__}: {e}")
                self._stop.wait(POLL)

    # ---------------------------------------------------------------- state

    def _resync(self, events: list[Event], strict: bool = False) -> None:
        """Replace what is known with a full dump."""
        before = set(self._links) | set(self._attached)
        self._links.clear()
        self._addrs.clear()
        self._apply(events, before, strict)

    def _apply(self, events: Iterable[Event], dirty: set[int] | None = None,
               strict: bool = False) -> None:
        dirty = set() if dirty is None else dirty
        for ev in events:
            if isinstance(ev, LinkEvent):
                if ev.gone:
                    self._links.pop(ev.ifindex, None)
                    self._addrs.pop(ev.ifindex, None)
                    self._reconcile(ev.ifindex, strict)  # before the index can be reused
                    dirty.discard(ev.ifindex)
                    continue
                self._links[ev.ifindex] = ev
            else:
                have = self._addrs.setdefault(ev.ifindex, set())
                (have.discard if ev.gone else have.add)(ev.addr)
            dirty.add(ev.ifindex)
        self._update_local(strict)
        for idx in sorted(dirty):
            self._reconcile(idx, strict)

    def _update_local(self, strict: bool) -> None:
        if not self.spec.follows:
            return
        now = set().union(*self._addrs.values()) if self._addrs else set()
        for addr in sorted(now - self._local):
            try:
                self._prog.set_local(addr, True)
            except OSError as e:  # the map is full: this address's services go unseen
                if strict:
                    raise SourceError(f"cannot track the host's addresses: {e}") from None
                log.warning("cannot track one of the host's addresses", error=str(e))
                continue
            self._local.add(addr)
        for addr in self._local - now:
            self._prog.set_local(addr, False)
        self._local &= now

    def _reconcile(self, idx: int, strict: bool) -> None:
        """Make ``idx``'s attachment and side what its link and addresses call for."""
        link = self._links.get(idx)
        att = self._attached.get(idx)
        if link is None:
            if att is not None:
                self._drop(idx, gone=True)
            return
        want = self.spec.matches(link.name, link.up or att is not None)
        if att is not None and not want:
            self._drop(idx, gone=False)  # renamed away from the spec
            return
        if not want:
            return
        if self.spec.follows:
            self._set_side(idx)
        if att is None:
            self._attach(idx, link.name, strict)
        elif att.ifname != link.name:
            att.ifname = link.name

    def _set_side(self, idx: int) -> None:
        own = any(not link_local(a) for a in self._addrs.get(idx, ()))
        side = SIDE_HOST if own else SIDE_POD
        if self._sides.get(idx) != side:
            self._prog.set_side(idx, side)
            self._sides[idx] = side

    def _attach(self, idx: int, name: str, strict: bool) -> None:
        try:
            self._attached[idx] = self._prog.attach(idx, name, self._tc_mode)
        except (SourceError, OSError) as e:
            self._unside(idx)
            if strict:
                raise
            self._counts["iface_attach_failures"] += 1
            log.warning("cannot attach to a new interface", iface=name, ifindex=idx,
                        error=str(e))
            return
        self._counts["iface_attaches"] += 1

    def _drop(self, idx: int, gone: bool) -> None:
        att = self._attached.pop(idx)
        self._counts["iface_detaches"] += 1
        try:
            att.forget() if gone else att.detach()
        except Exception as e:  # keep going: every attachment must be tried
            log.error("detach failed", iface=att.ifname, error=str(e))
        self._unside(idx)

    def _unside(self, idx: int) -> None:
        if self._sides.pop(idx, None) is not None:
            with contextlib.suppress(OSError):
                self._prog.set_side(idx, None)
