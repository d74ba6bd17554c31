from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.service.runner import OffsetTracker

TP = ("in", 0)


def test_commit_stops_at_the_lowest_unfinished_offset() -> None:
    t = OffsetTracker()
    for off in range(10, 15):
        t.add(TP, off)
    assert t.committable() == {TP: 10}
    t.done(TP, 12)
    t.done(TP, 13)
    assert t.committable() == {TP: 10}  # 10 is still in flight
    t.done(TP, 10)
    t.done(TP, 11)
    assert t.committable() == {TP: 14}
    t.mark_committed({TP: 14})
    assert t.committable() == {}  # nothing new
    t.done(TP, 14)
    assert t.committable() == {TP: 15}


def test_partitions_are_independent_and_forget_unmark_work() -> None:
    t = OffsetTracker()
    a, b = ("in", 0), ("in", 1)
    t.add(a, 0)
    t.add(b, 5)
    t.done(b, 5)
    assert t.committable() == {a: 0, b: 6}
    assert t.committable(only={b}) == {b: 6}
    t.mark_committed({b: 6})
    t.unmark({b})
    assert t.committable(only={b}) == {b: 6}
    t.forget({a})
    assert a not in t.committable()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=30, unique=True), st.data())
def test_never_commits_past_an_unfinished_offset(offsets: list[int], data: st.DataObject) -> None:
    t = OffsetTracker()
    for off in sorted(offsets):
        t.add(TP, off)
    finished = data.draw(st.sets(st.sampled_from(offsets)))
    for off in finished:
        t.done(TP, off)
    committed = t.committable().get(TP)
    unfinished = set(offsets) - finished
    assert committed is not None
    if unfinished:
        assert committed == min(unfinished)
    else:
        assert committed == max(offsets) + 1
