"""The one bounded hand-off between threads (agent/mirror/handoff.py): budget arithmetic, the
pause and drop policies, counters that lose nothing across threads, and shutdown."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import pytest

from agent.mirror.config import ForwardConfig
from agent.mirror.handoff import Handoff, Policy
from agent.sinks.forward import ForwardSink
from tests.unit.shadow import wait_until


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


# ------------------------------------------------------------------ budget arithmetic


def test_drop_refuses_what_does_not_fit_and_counts_it_by_reason() -> None:
    h: Handoff[str] = Handoff("t", 10, Policy.DROP)
    assert h.put("a", 4) and h.put("b", 4)
    assert not h.put("c", 3, "total_buffer")  # 8 + 3 > 10
    assert h.put("d", 2)  # exactly the budget
    assert not h.put("e", 1)
    assert h.put("ctl", 0)  # size 0 always fits
    st = h.stats()
    assert (st.items, st.bytes, st.queued_bytes, st.peak_queued_bytes) == (4, 10, 10, 10)
    assert st.dropped_items == {"total_buffer": 1, "full": 1}
    assert st.dropped_bytes == {"total_buffer": 3, "full": 1}
    assert h.take_all(0) == ["a", "b", "d", "ctl"]  # order kept; taken = given back
    assert h.queued_bytes == 0 and h.put("f", 10)
    assert h.stats().as_dict() == {
        "items": 5, "bytes": 20, "taken_items": 4, "taken_bytes": 10, "queued_items": 1,
        "queued_bytes": 10, "peak_queued_bytes": 10, "budget_bytes": 10, "pauses": 0,
        "discarded_items": 0, "discarded_bytes": 0, "dropped_items_total_buffer": 1,
        "dropped_items_full": 1, "dropped_bytes_total_buffer": 3, "dropped_bytes_full": 1}


def test_bytes_count_until_released_when_not_released_on_take() -> None:
    h: Handoff[int] = Handoff("t", 10, Policy.DROP, release_on_take=False)
    assert h.put(1, 6)
    assert h.take() == 1 and h.queued_bytes == 6  # taken but still held by the consumer
    assert not h.put(2, 5)
    h.release(4)
    assert h.queued_bytes == 2 and h.put(2, 5)
    st = h.stats()
    assert (st.taken_bytes, st.released_bytes, st.queued_bytes) == (6, 4, 7)


def test_budget_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="budget"):
        Handoff("t", -1, Policy.DROP)


# ------------------------------------------------------------------ pause


def test_pause_waits_for_room_and_counts_each_pause_once() -> None:
    h: Handoff[int] = Handoff("t", 5, Policy.PAUSE)
    assert h.wait_for_room(0) and h.put(1, 6)  # the producer could not know: over by one item
    assert not h.wait_for_room(0.01) and not h.wait_for_room(0.01)
    assert h.stats().pauses == 1  # one pause, however many looks
    threading.Timer(0.05, h.take_all).start()
    assert h.wait_for_room(5)
    assert h.put(2, 6)  # room: not over budget before it
    put_done = threading.Event()

    def put_then_tell() -> None:
        h.put(3, 1)
        put_done.set()

    in_thread(put_then_tell)
    assert not put_done.wait(0.05)  # over budget: put waits
    assert h.take_all(0) == [2]
    assert put_done.wait(5) and h.take_all(0) == [3]
    st = h.stats()
    assert st.pauses == 2 and not st.dropped_items


# ------------------------------------------------------------------ threads


@pytest.mark.parametrize("policy", [Policy.DROP, Policy.PAUSE])
def test_a_producer_and_a_consumer_thread_lose_no_count(policy: Policy) -> None:
    """Whatever the interleaving, every item offered is either taken once, in order, or
    counted as dropped; and the bytes held come back to zero."""
    h: Handoff[int] = Handoff("t", 2000, policy, release_on_take=False)
    rng = random.Random(7)
    sizes = [rng.randint(0, 300) for _ in range(20_000)]
    accepted: list[int] = []
    got: list[int] = []

    def produce() -> None:
        for i, size in enumerate(sizes):
            if h.put(i, size):
                accepted.append(i)
        h.close()

    def consume() -> None:
        while batch := h.take_all(1):
            got.extend(batch)
            for i in batch:
                h.release(sizes[i])

    threads = [in_thread(produce), in_thread(consume)]
    for t in threads:
        t.join(30)
    st = h.stats()
    assert got == accepted
    assert st.items == st.taken_items == len(accepted)
    assert st.bytes == st.taken_bytes == st.released_bytes == sum(sizes[i] for i in got)
    assert st.items + sum(st.dropped_items.values()) == len(sizes)
    assert st.bytes + sum(st.dropped_bytes.values()) == sum(sizes)
    assert st.queued_bytes == 0 and st.queued_items == 0
    if policy is Policy.PAUSE:
        assert len(got) == len(sizes) and st.pauses > 0 and st.peak_queued_bytes <= 2000 + 300
    else:
        assert st.dropped_items and st.peak_queued_bytes <= 2000


# ------------------------------------------------------------------ shutdown


def test_close_wakes_a_waiting_consumer_and_leaves_the_queue_to_it() -> None:
    h: Handoff[str] = Handoff("t", 100, Policy.DROP)
    got: list[list[str]] = []
    t = in_thread(lambda: got.append(h.take_all()))
    time.sleep(0.05)
    h.close()
    t.join(5)
    assert got == [[]] and h.closed
    h2: Handoff[str] = Handoff("t", 100, Policy.DROP)
    h2.put("queued", 3)
    h2.close()
    assert not h2.put("late", 1)  # refused cleanly, counted
    assert h2.take_all() == ["queued"]  # the consumer drains what was queued
    assert h2.take_all() == [] and h2.take() is None  # then returns at once
    assert h2.stats().dropped_items == {"closed": 1}


def test_close_wakes_a_paused_producer() -> None:
    h: Handoff[int] = Handoff("t", 0, Policy.PAUSE)
    h.put(1, 1)
    result: list[bool] = []
    t = in_thread(lambda: result.append(h.put(2, 1)))
    time.sleep(0.05)
    h.close()
    t.join(5)
    assert result == [False] and h.stats().dropped_bytes == {"closed": 1}
    assert not h.wait_for_room()


def test_discard_counts_what_was_queued() -> None:
    h: Handoff[int] = Handoff("t", 100, Policy.DROP, release_on_take=False)
    for i in range(3):
        h.put(i, 10)
    h.close()
    assert h.discard() == 3
    st = h.stats()
    assert (st.discarded_items, st.discarded_bytes, st.queued_bytes) == (3, 30, 0)
    assert h.take_all() == []


def test_fail_raises_to_the_consumer_and_keeps_the_leftovers() -> None:
    h: Handoff[int] = Handoff("t", 100, Policy.PAUSE)
    h.put(1, 1)
    raised: list[BaseException] = []

    def consume() -> None:
        try:
            h.take_all(5)
            h.take_all(5)
        except OSError as e:
            raised.append(e)

    h.take_all(0)
    t = in_thread(consume)
    time.sleep(0.05)
    h.put(2, 1)
    h.fail(OSError("producer died"))
    t.join(5)
    assert [str(e) for e in raised] == ["producer died"]
    with pytest.raises(OSError, match="producer died"):
        h.take(0)
    assert h.leftovers() in ([2], [])  # taken by consume() or still there, never lost
    assert not h.put(3, 1)


def test_reopen_accepts_puts_again_and_counts_go_on() -> None:
    h: Handoff[int] = Handoff("t", 100, Policy.DROP)
    h.put(1, 5)
    h.close()
    assert h.take_all() == [1]
    h.reopen()
    assert h.put(2, 5) and h.take(0) == 2
    st = h.stats()
    assert (st.items, st.bytes, st.taken_items) == (2, 10, 2) and not h.closed


# ------------------------------------------------------------------ at the forward hand-over


def test_forward_hand_over_drops_whole_flows_as_total_buffer() -> None:
    sink = ForwardSink("127.0.0.1:9", config=ForwardConfig(max_total_buffer=5))
    sink.send(1, b"abc")  # fits: handed over
    sink.send(2, b"defgh")  # 3 + 5 > 5: the whole flow is dropped
    sink.send(2, b"i")  # and stays dropped, though it would fit
    sink.commit()
    st = sink.handoff_stats()
    assert (st.name, st.policy, st.budget_bytes) == ("forward", "drop", 5)
    assert st.dropped_bytes == {"total_buffer": 5} and st.bytes == 3
    wait_until(lambda: sink.queued_bytes == 0)  # nothing listens on port 9: given back
    sink.close()
    assert sink.stats["bytes_dropped"] == 3 + 5 + 1
    sink.send(3, b"x")  # after close: refused cleanly, counted
    assert sink.handoff_stats().dropped_bytes["closed"] == 1


def test_what_came_before_a_failure_is_delivered_before_the_error() -> None:
    """A drain thread that fails after handing over data: the data is taken first, then the
    error; nothing drained is lost uncounted."""
    h: Handoff[int] = Handoff("t", 100, Policy.PAUSE)
    h.put(1, 1)
    h.put(2, 1)
    h.fail(OSError("ring gone"))
    assert h.take_all(0) == [1, 2]
    with pytest.raises(OSError, match="ring gone"):
        h.take_all(0)
