"""The record layout and the counter names come from bpf/mirror_event.h, and a mismatch with
the struct format user space reads records with fails at import, not later."""

from __future__ import annotations

import re

import pytest

from agent.sources.ebpf.layout import (
    BPF_DIR,
    COUNTERS,
    EVENT,
    EVENT_SIZE,
    EVENT_TUNNEL,
    LayoutError,
    parse_header,
    tunnel_name,
)

HEADER = (BPF_DIR / "mirror_event.h").read_text()


def test_counters_follow_the_header_in_index_order() -> None:
    enum_order = re.findall(r"^\s*X\((\w+),", HEADER, re.MULTILINE)
    assert [name for name, _ in COUNTERS] == [n.lower() for n in enum_order]
    assert COUNTERS[0][0] == "packets" and ("own_forward" in dict(COUNTERS))
    assert all(help_ for _, help_ in COUNTERS)


def test_event_size_is_the_c_size() -> None:
    assert EVENT_SIZE == 88 and EVENT.size + EVENT_TUNNEL.size == 81


def test_a_field_added_on_one_side_only_fails() -> None:
    grown = HEADER.replace("#define MIRROR_EVENT_SIZE 88", "#define MIRROR_EVENT_SIZE 96")
    with pytest.raises(LayoutError, match="96 bytes in C"):
        parse_header(grown)


def test_a_header_without_the_list_fails() -> None:
    with pytest.raises(LayoutError):
        parse_header("#define MIRROR_EVENT_SIZE 80\n")


def test_tunnel_identities_are_named_as_the_offline_decoder_names_them() -> None:
    kinds = dict(re.findall(r"^#define MIRROR_TUNNEL_([A-Z]+) (\d+)", HEADER, re.MULTILINE))
    assert tunnel_name(int(kinds["VXLAN"]), 42) == "vxlan:42"
    assert tunnel_name(int(kinds["GENEVE"]), 5) == "geneve:5"
    assert tunnel_name(int(kinds["GRE"]), 0xFFFFFFFF) == "gre:4294967295"
    assert tunnel_name(int(kinds["ERSPAN"]), 3) == "erspan:3"
    assert tunnel_name(int(kinds["NONE"]), 7) == ""


def test_decap_counters_are_a_skip_reason_and_an_event_count() -> None:
    helps = dict(COUNTERS)
    assert helps["bad_tunnel"].startswith("packets skipped:")
    assert not helps["decap"].startswith("packets skipped")
