"""The defragmenter (agent/decode/defrag.py): any order, duplicates and overlaps reassemble
exactly (first copy wins); memory and time are bounded; what is given up is counted, and
with its first fragment becomes a datagram with its missing bytes known."""

from __future__ import annotations

import random

import pytest

from agent.decode.defrag import (
    DATAGRAM_COST,
    PIECE_COST,
    Datagram,
    Defragmenter,
    FragmentKey,
)

KEY: FragmentKey = ("", 4, b"\xc0\x00\x02\x01", b"\xc6\x33\x64\x02", 7, 6)


def _pieces(data: bytes, size: int) -> list[tuple[int, bytes, bool]]:
    return [(o, data[o : o + size], o + size < len(data)) for o in range(0, len(data), size)]


@pytest.mark.parametrize("seed", range(40))
def test_any_order_duplicates_and_overlaps_reassemble_exactly(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randint(1, 9000))
    size = rng.choice([8, 64, 576, 1480])
    pieces = _pieces(data, size)
    for _ in range(rng.randint(0, 4)):  # repeats and overlapping re-cuts, same bytes
        a = rng.randrange(0, len(data), 8) if len(data) > 8 else 0
        b = min(len(data), a + rng.randint(1, 3000))
        pieces.append((a, data[a:b], b < len(data)))
    rng.shuffle(pieces)
    d = Defragmenter()
    done = [got for off, chunk, more in pieces
            if (got := d.add(KEY, off, len(chunk), chunk, more, 6, 0.0)) is not None]
    assert isinstance(done[0], Datagram)  # pieces after it start a datagram of their own
    assert done[0].data == data and done[0].complete and done[0].length == len(data)
    assert d.stats.conflict_bytes == 0


def test_the_first_copy_wins_and_conflicts_are_counted() -> None:
    d = Defragmenter()
    assert d.add(KEY, 0, 16, b"A" * 16, True, 6, 0) is None
    assert d.add(KEY, 8, 16, b"B" * 16, True, 6, 0) is None  # 8 overlap, all differ
    done = d.add(KEY, 24, 8, b"C" * 8, False, 6, 0)
    assert isinstance(done, Datagram)
    assert done.data == b"A" * 16 + b"B" * 8 + b"C" * 8
    assert (d.stats.overlap_bytes, d.stats.conflict_bytes) == (8, 8)
    assert d.stats.held_bytes == 0


def test_a_length_disagreement_is_a_conflict_and_the_first_length_stays() -> None:
    d = Defragmenter()
    assert d.add(KEY, 16, 8, b"x" * 8, False, 6, 0) is None  # length 24
    assert d.add(KEY, 16, 16, b"y" * 16, False, 6, 0) is None  # says 32: 8 past the end
    assert d.stats.overlap_bytes == 8 and d.stats.conflict_bytes == 16  # and "y" != "x"
    done = d.add(KEY, 0, 16, b"z" * 16, True, 6, 0)
    assert isinstance(done, Datagram) and done.data == b"z" * 16 + b"x" * 8


def test_tenants_and_ids_do_not_mix() -> None:
    d = Defragmenter()
    other: FragmentKey = ("vxlan:2", *KEY[1:])
    assert d.add(KEY, 0, 8, b"a" * 8, True, 6, 0) is None
    assert d.add(other, 8, 8, b"b" * 8, False, 6, 0) is None
    assert d.pending == 2


def test_memory_is_bounded_and_the_oldest_given_up_first() -> None:
    limit = 200_000
    d = Defragmenter(max_bytes=limit)
    for i in range(100):  # 100 datagrams of 4 KiB first fragments
        key: FragmentKey = ("", 4, b"\x01" * 4, b"\x02" * 4, i, 6)
        d.add(key, 0, 4096, bytes(4096), True, 6, float(i))
        assert d.stats.held_bytes <= limit
    assert d.stats.incomplete["memory"] == 100 - d.pending
    assert d.stats.held_bytes == d.pending * (DATAGRAM_COST + PIECE_COST + 4096)
    oldest = [dg.key[4] for dg in d.given_up]
    assert oldest == list(range(len(oldest)))  # first in, first out
    assert all(dg.length == 4096 and not dg.complete for dg in d.given_up)


def test_timeout_gives_up_with_what_is_known() -> None:
    d = Defragmenter(timeout=30.0)
    d.add(KEY, 0, 800, bytes(range(256)) * 3 + bytes(32), True, 6, 100.0)
    d.add(KEY, 1600, 400, bytes(400), False, 6, 101.0)  # the last; 800..1600 missing
    assert d.deadline == 130.0
    d.expire(129.9)
    assert d.pending == 1
    d.expire(130.0)
    assert d.pending == 0 and d.deadline == float("inf")
    (dg,) = d.given_up
    assert (len(dg.data), dg.length, dg.complete, dg.ts) == (800, 2000, False, 101.0)
    assert d.stats.incomplete["timeout"] == 1
    assert d.stats.discarded_bytes["after_hole"] == 400


def test_without_the_first_fragment_nothing_can_be_named() -> None:
    d = Defragmenter()
    d.add(KEY, 800, 400, bytes(400), False, 6, 0)
    d.finish()
    assert d.given_up == []
    assert d.stats.incomplete["end_of_input"] == 1
    assert d.stats.discarded_bytes["no_first_fragment"] == 400


def test_a_fragment_cut_by_the_snap_length_completes_with_its_bytes_lost() -> None:
    d = Defragmenter()
    assert d.add(KEY, 0, 1000, bytes(100), True, 6, 0) is None  # 900 bytes not captured
    done = d.add(KEY, 1000, 500, bytes(500), False, 6, 0)
    assert isinstance(done, Datagram)
    assert (len(done.data), done.length, done.complete) == (100, 1500, False)


def test_absurd_fragments_are_refused() -> None:
    d = Defragmenter()
    assert d.add(KEY, 65528, 16, bytes(16), False, 6, 0) == "bad_fragment"
    assert d.pending == 0 and d.stats.fragments == 0
    with pytest.raises(ValueError):
        Defragmenter(max_bytes=1000)
