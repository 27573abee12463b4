"""``--decap`` without privileges: the spec, the kernel build flags, the AF_PACKET filter
(checked against the corpus's frames with libpcap), and records that carry a tunnel's
identity through both ring decoders, tenants kept apart."""

from __future__ import annotations

import contextlib

import pytest

from agent.cli.layers import parse_options
from agent.cli.parser import UsageError
from agent.model import Segment
from agent.sources.afpacket import capture_expression
from agent.sources.ebpf.decap import Decap
from agent.sources.ebpf.layout import EVENT, EVENT_TUNNEL
from agent.sources.ebpf.program import Build
from agent.sources.filter import BpfFilter
from agent.sources.ring.events import EventDecoder
from agent.sources.ring.native import NativeDecoder, NativeUnavailable
from tests.integration import encap_corpus as corpus
from tests.unit.rings import PerfRing, event

ALL = "vxlan,vxlan:8472,geneve,gre,erspan,ipip"


def test_the_spec_and_its_canonical_text() -> None:
    d = Decap.parse(" VXLAN , vxlan:8472,geneve:7000, gre,vxlan:4789 ")
    assert d == Decap((4789, 8472), (7000,), gre=True)
    assert str(d) == "vxlan:4789,vxlan:8472,geneve:7000,gre"
    assert Decap.parse(str(d)) == d
    assert Decap.parse("ipip,erspan") == Decap(erspan=True, ipip=True)


@pytest.mark.parametrize(("text", "message"), [
    ("", "no tunnel named"), ("mpls", "unknown tunnel 'mpls'"), ("gre:47", "takes no port"),
    ("vxlan:0", "1-65535"), ("vxlan:x", "not a number"),
    ("vxlan:6081,geneve", "both VXLAN and Geneve"),
])
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Decap.parse(text)


def test_the_command_line_keeps_the_canonical_text() -> None:
    run = ["run", "--iface", "lo", "--port", "80"]
    opts = parse_options([*run, "--decap", "gre,VXLAN:8472"], {})
    assert opts.live.decap == "vxlan:8472,gre"
    assert parse_options(run, {"MIRROR_AGENT_DECAP": "geneve"}).live.decap == "geneve:6081"
    assert parse_options(run, {}).live.decap is None
    with pytest.raises(UsageError, match="unknown tunnel 'mpls'"):
        parse_options([*run, "--decap", "mpls"], {})


def test_build_flags() -> None:
    flags = Build("tc", 4, (1, 0), decap=Decap.parse(ALL)).cflags()
    assert {"-DMIRROR_DECAP", "-DMIRROR_DECAP_VXLAN(p)=((p)==4789||(p)==8472)",
            "-DMIRROR_DECAP_GENEVE(p)=((p)==6081)", "-DMIRROR_DECAP_GRE",
            "-DMIRROR_DECAP_ERSPAN", "-DMIRROR_DECAP_IPIP"} <= set(flags)
    assert not [f for f in Build("tc", 4, (1, 0)).cflags() if "DECAP" in f]
    only = Build("xdp", 4, (1, 0), decap=Decap.parse("erspan")).cflags()
    assert [f for f in only if "DECAP" in f] == ["-DMIRROR_DECAP", "-DMIRROR_DECAP_ERSPAN"]


#: Corpus case → the --decap kinds whose AF_PACKET filter must pass its frames.
PASSES = {"vxlan": "vxlan", "vxlan_vlans": "", "geneve": "geneve", "gre_key_seq_csum": "gre",
          "gre_plain_v6": "gre", "gre_teb": "gre", "erspan2": "erspan", "erspan3": "erspan",
          "ip4in4": "ipip", "ip6in4": "ipip", "ip4in6": "ipip", "ip6in6": "ipip"}


@pytest.mark.parametrize("kind", ["vxlan", "geneve", "gre", "erspan", "ipip"])
def test_the_afpacket_filter_passes_exactly_the_named_tunnels(kind: str) -> None:
    """Each kind's filter passes that kind's frames (all of a conversation's, pure ACKs
    too: the ports are checked after decoding) and no other kind's. VLAN-tagged outer
    frames are not passed (the eBPF engines take them)."""
    flt = BpfFilter(capture_expression([corpus.PORT], None, (61000, 61999),
                                       Decap.parse(kind)))
    for name, wanted in PASSES.items():
        _lt, frames = corpus.frames(name)
        assert all(flt.matches(f) == (wanted == kind) for f in frames), name
    # Plain TCP on the port still passes; an unrelated UDP datagram does not.
    _lt, plain = corpus.frames("ip4in4")
    assert flt.matches(bytes(corpus.eth(corpus.conversation()[3][0])))
    assert not flt.matches(plain[0][:23] + b"\x11" + plain[0][24:])  # proto 17, no ports


def _tunnelled(kind: int, ident: int, *args: object, **kw: object) -> bytes:
    rec = bytearray(event(*args, **kw))  # type: ignore[arg-type]
    EVENT_TUNNEL.pack_into(rec, EVENT.size, ident, kind)
    return bytes(rec)


def _decoders() -> list[EventDecoder | NativeDecoder]:
    out: list[EventDecoder | NativeDecoder] = [EventDecoder(0.0)]
    with contextlib.suppress(NativeUnavailable):
        out.append(NativeDecoder(0.0))
    return out


@pytest.mark.parametrize("which", ["python", "native"])
def test_records_carry_the_tunnel_and_tenants_stay_apart(which: str) -> None:
    """Two tenants' records with the same 4-tuple and continuing sequence numbers: joined
    per tenant only, each Segment named like the offline decoder names it."""
    decs = _decoders()
    if which == "native" and len(decs) < 2:
        pytest.skip("no C compiler for the native decoder")
    dec = decs[0] if which == "python" else decs[1]
    c, s = ("192.0.2.1", 40000), ("198.51.100.2", 8080)
    recs = [_tunnelled(1, 42, c, s, 100, b"a" * 10), _tunnelled(1, 43, c, s, 110, b"B" * 10),
            _tunnelled(1, 42, c, s, 110, b"c" * 10), _tunnelled(3, 0xFFFFFFFF, c, s, 1, b"g"),
            event(c, s, 5000, b"plain")]
    dec.drain_perf(*PerfRing(recs).args())
    segs: list[Segment] = dec.take()
    got = sorted((seg.tunnel, seg.seq, seg.payload) for seg in segs)
    assert got == [("", 5000, b"plain"), ("gre:4294967295", 1, b"g"),
                   ("vxlan:42", 100, b"a" * 10 + b"c" * 10), ("vxlan:43", 110, b"B" * 10)]
    dec.close()
