"""The record layout and the counter names come from bpf/mirror_event.h, and a mismatch with
the struct format user space reads records with fails at import, not later."""

from __future__ import annotations

import re

import pytest

from agent.capture.layout import BPF_DIR, COUNTERS, EVENT, EVENT_SIZE, LayoutError, parse_header

HEADER = (BPF_DIR / "mirror_event.h").read_text()


def test_counters_follow_the_header_in_index_order() -> None:
    enum_order = re.findall(r"^\s*X\((\w+),", HEADER, re.MULTILINE)
    assert [name for name, _ in COUNTERS] == [n.lower() for n in enum_order]
    assert COUNTERS[0][0] == "packets" and ("own_forward" in dict(COUNTERS))
    assert all(help_ for _, help_ in COUNTERS)


def test_event_size_is_the_c_size() -> None:
    assert EVENT_SIZE == 80 and EVENT.size == 76


def test_a_field_added_on_one_side_only_fails() -> None:
    grown = HEADER.replace("#define MIRROR_EVENT_SIZE 80", "#define MIRROR_EVENT_SIZE 88")
    with pytest.raises(LayoutError, match="88 bytes in C"):
        parse_header(grown)


def test_a_header_without_the_list_fails() -> None:
    with pytest.raises(LayoutError):
        parse_header("#define MIRROR_EVENT_SIZE 80\n")
