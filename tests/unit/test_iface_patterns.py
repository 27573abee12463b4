"""``--iface`` specs (names, patterns, ``any``), the rtnetlink parser, and the follower's
bookkeeping (attach, side, forget, rename, reused indexes) over a stand-in program: no root,
no netlink."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

import pytest

from agent.sources import SourceError
from agent.sources.ebpf import follow
from agent.sources.ebpf.links import AddrEvent, Event, IfaceSpec, LinkEvent, map_key, parse
from agent.sources.ebpf.program import SIDE_HOST, SIDE_POD

# ------------------------------------------------------------------ the spec


def test_spec_parts() -> None:
    spec = IfaceSpec.parse(" veth*, eth0,any,eth0,cali?x ")
    assert spec.names == ("eth0",)
    assert spec.patterns == ("veth*", "cali?x")
    assert spec.any and spec.follows
    assert str(spec) == "eth0,veth*,cali?x,any"
    fixed = IfaceSpec.parse(["lo", "eth1"])
    assert fixed.names == ("lo", "eth1") and not fixed.follows


@pytest.mark.parametrize("text", ["", " , ,"])
def test_empty_spec_is_an_error(text: str) -> None:
    with pytest.raises(SourceError, match="no interface named"):
        IfaceSpec.parse(text)


@pytest.mark.parametrize(("spec", "name", "up", "want"), [
    ("veth*", "veth1a2b", False, True),  # patterns: whatever the state
    ("veth*", "eth0", True, False),
    ("eth[01]", "eth1", False, True),
    ("eth0", "eth0", False, True),
    ("eth0", "eth00", True, False),
    ("any", "eth0", True, True),
    ("any", "eth0", False, False),  # any: up only
    ("any", "lo", True, False),  # never loopback ...
    ("any,lo", "lo", True, True),  # ... unless named
    ("*", "lo", True, True),  # a pattern is a pattern
    ("Veth*", "veth0", True, False),  # case matters, as in names
])
def test_matching(spec: str, name: str, up: bool, want: bool) -> None:
    assert IfaceSpec.parse(spec).matches(name, up) is want


# ------------------------------------------------------------------ rtnetlink messages


def _msg(mtype: int, body: bytes, attrs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    payload = body
    for kind, value in attrs:
        rta = struct.pack("=HH", 4 + len(value), kind) + value
        payload += rta + bytes(-len(rta) % 4)
    return struct.pack("=IHHII", 16 + len(payload), mtype, 0, 0, 0) + payload


def _link(mtype: int, idx: int, name: str, flags: int) -> bytes:
    return _msg(mtype, struct.pack("=BxHiII", 0, 1, idx, flags, 0), [(3, name.encode() + b"\0")])


def _addr(mtype: int, idx: int, addr: str, local: bool = True) -> bytes:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    raw = socket.inet_pton(fam, addr)
    attrs = [(1, b"\x0a\x00\x00\x63" if local and fam == socket.AF_INET else raw)]
    if local and fam == socket.AF_INET:
        attrs.append((2, raw))  # IFA_LOCAL wins over IFA_ADDRESS (the peer on ptp links)
    return _msg(mtype, struct.pack("=BBBBI", fam, 24, 0, 0, idx), attrs)


def test_parse_links_addresses_and_done() -> None:
    data = (_link(16, 7, "veth1", 1) + _link(17, 5, "veth0", 0)
            + _addr(20, 7, "10.1.2.3") + _addr(21, 7, "fe80::1") + _msg(3, b"\0" * 4))
    events, done = parse(data)
    assert done
    assert events == [LinkEvent(7, "veth1", True), LinkEvent(5, "veth0", False, gone=True),
                      AddrEvent(7, map_key(bytes([10, 1, 2, 3]))),
                      AddrEvent(7, socket.inet_pton(socket.AF_INET6, "fe80::1"), gone=True)]
    assert events[2].addr == bytes(10) + b"\xff\xff\x0a\x01\x02\x03"  # type: ignore[union-attr]
    assert events[3].link_local and not events[2].link_local  # type: ignore[union-attr]


def test_parse_error_and_garbage() -> None:
    with pytest.raises(OSError) as e:
        parse(_msg(2, struct.pack("=i", -19) + bytes(16)))
    assert e.value.errno == 19
    assert parse(b"\x01\x02")[0] == []  # too short: nothing, no exception
    assert parse(struct.pack("=IHHII", 8, 16, 0, 0, 0))[0] == []  # length below a header


# ------------------------------------------------------------------ the follower


class FakeAttachment:
    def __init__(self, idx: int, name: str, log: list[str]) -> None:
        self.ifindex, self.ifname, self._log = idx, name, log
        self.how = "tcx"

    def detach(self) -> None:
        self._log.append(f"detach {self.ifname}")

    def forget(self) -> None:
        self._log.append(f"forget {self.ifname}")


class FakeProgram:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.log: list[str] = []
        self.sides: dict[int, int] = {}
        self.local: set[bytes] = set()
        self.fail = fail or set()

    def attach(self, ifindex: int, name: str, tc_mode: str = "auto") -> Any:
        if name in self.fail:
            raise SourceError(f"cannot attach to {name}")
        self.log.append(f"attach {name}")
        return FakeAttachment(ifindex, name, self.log)

    def set_side(self, ifindex: int, side: int | None) -> None:
        if side is None:
            del self.sides[ifindex]
        else:
            self.sides[ifindex] = side

    def set_local(self, addr: bytes, local: bool) -> None:
        (self.local.add if local else self.local.discard)(addr)


class FakeWatcher:
    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


V4 = map_key(bytes([10, 0, 0, 1]))
LL = socket.inet_pton(socket.AF_INET6, "fe80::1")
START: list[Event] = [LinkEvent(1, "lo", True), LinkEvent(2, "eth0", True),
                      AddrEvent(2, V4), LinkEvent(3, "veth0", True), AddrEvent(3, LL)]


def _follower(monkeypatch: pytest.MonkeyPatch, spec: str, prog: FakeProgram,
              start: list[Event] = START) -> follow.Follower:
    monkeypatch.setattr(follow, "dump", lambda: list(start))
    monkeypatch.setattr(follow, "LinkWatcher", FakeWatcher)
    return follow.Follower(IfaceSpec.parse(spec), prog)


def test_sides_and_host_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    prog = FakeProgram()
    f = _follower(monkeypatch, "veth*,eth0", prog)
    assert prog.log == ["attach eth0", "attach veth0"]
    assert prog.sides == {2: SIDE_HOST, 3: SIDE_POD}  # a link-local address makes no host
    assert prog.local == {V4, LL}
    assert [(i.name, i.ifindex, i.how, i.side) for i in f.interfaces()] == [
        ("eth0", 2, "tcx", "host"), ("veth0", 3, "tcx", "pod")]
    f.apply([AddrEvent(3, map_key(bytes([10, 9, 9, 9])))])  # the veth got an address
    assert prog.sides[3] == SIDE_HOST
    f.apply([AddrEvent(2, V4, gone=True)])
    assert prog.sides[2] == SIDE_POD and V4 not in prog.local
    f.close()
    assert prog.log[-2:] == ["detach eth0", "detach veth0"] and prog.sides == {}


def test_pods_come_and_go(monkeypatch: pytest.MonkeyPatch) -> None:
    prog = FakeProgram()
    f = _follower(monkeypatch, "veth*", prog, START[:3])
    assert prog.log == [] and f.interfaces() == []  # nothing yet: fine, it waits
    f.apply([LinkEvent(9, "veth9", False)])  # created down: attached at once
    assert prog.log == ["attach veth9"] and prog.sides == {9: SIDE_POD}
    # Deleted, and its index reused by the next pod in the same batch.
    f.apply([LinkEvent(9, gone=True), LinkEvent(9, "vethA", True)])
    assert prog.log[1:] == ["forget veth9", "attach vethA"]
    f.apply([LinkEvent(9, "eth5", True)])  # renamed out of the spec: detached for real
    assert prog.log[3:] == ["detach vethA"] and prog.sides == {}
    f.apply([LinkEvent(9, "eth5", gone=True)])  # not ours: nothing to do
    assert len(prog.log) == 4
    assert f.stats() == {"ifaces_attached": 0, "iface_attaches": 2, "iface_detaches": 2,
                         "iface_attach_failures": 0, "link_resyncs": 0, "link_errors": 0}
    assert f.tracked() == {"links": 2, "sides": 0, "local_addrs": 1, "attached": 0}
    f.close()


def test_any_waits_for_up_and_keeps_a_link_that_goes_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    prog = FakeProgram()
    f = _follower(monkeypatch, "any", prog, [LinkEvent(1, "lo", True)])
    f.apply([LinkEvent(4, "eth1", False)])
    assert prog.log == []
    f.apply([LinkEvent(4, "eth1", True)])
    f.apply([LinkEvent(4, "eth1", False)])
    assert prog.log == ["attach eth1"]
    f.close()


def test_failures_at_start_raise_later_ones_are_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SourceError, match="interface 'eth7' not found"):
        _follower(monkeypatch, "veth*,eth7", FakeProgram())
    prog = FakeProgram(fail={"veth0"})
    with pytest.raises(SourceError, match="cannot attach to veth0"):
        _follower(monkeypatch, "eth0,veth*", prog)
    assert prog.log == ["attach eth0", "detach eth0"] and prog.sides == {}  # nothing stays
    prog = FakeProgram(fail={"veth5"})
    f = _follower(monkeypatch, "veth*", prog, START[:3])
    f.apply([LinkEvent(5, "veth5", True)])
    assert f.stats()["iface_attach_failures"] == 1 and prog.sides == {}
    f.close()


def test_resync_after_lost_events_forgets_what_vanished(
        monkeypatch: pytest.MonkeyPatch) -> None:
    prog = FakeProgram()
    f = _follower(monkeypatch, "veth*", prog)
    monkeypatch.setattr(follow, "dump", lambda: [*START[:3], LinkEvent(8, "veth8", True)])
    f.apply(None)
    assert prog.log == ["attach veth0", "forget veth0", "attach veth8"]
    assert f.stats()["link_resyncs"] == 1 and LL not in prog.local
    f.close()


def test_fixed_names_get_no_side_and_no_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    prog = FakeProgram()
    f = _follower(monkeypatch, "eth0,veth0", prog)
    assert prog.log == ["attach eth0", "attach veth0"]
    assert prog.sides == {} and prog.local == set()
    assert {i.side for i in f.interfaces()} == {"all"}
    f.start()  # nothing to follow: no thread
    f.close()


def test_afpacket_takes_no_patterns() -> None:
    """Only the eBPF source follows interfaces; AF_PACKET is told so before any netlink."""
    from agent.sources.afpacket import AfPacketSource
    from agent.sources.ebpf.links import resolve_ifaces

    with pytest.raises(SourceError, match="patterns are followed by --engine tc or xdp"):
        resolve_ifaces("eth0,veth*")
    with pytest.raises(SourceError, match="veth\\*"):
        AfPacketSource("veth*", [8080])
