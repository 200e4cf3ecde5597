"""The batcher's queue in virtual time: class order, deadline order, expiry before any
work, bounds per class, requests never split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.models.batcher import BatchQueue, Pending, Priority, QueueFull


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def queue(bound: int = 100) -> tuple[BatchQueue, Clock]:
    clock = Clock()
    return BatchQueue(bounds=dict.fromkeys(Priority, bound), clock=clock), clock


def item(name: str, *, rows: int = 1, priority: Priority = Priority.DEFAULT, deadline: float = 10.0) -> Pending:
    return Pending(deadline=deadline, rows=rows, priority=priority, payload=name)


def test_critical_first_then_earliest_deadline_within_a_class() -> None:
    q, _ = queue()
    q.offer(item("sheddable", priority=Priority.SHEDDABLE, deadline=1))
    q.offer(item("default-late", deadline=9))
    q.offer(item("default-early", deadline=2))
    q.offer(item("critical", priority=Priority.CRITICAL, deadline=20))
    batch = q.take(max_rows=10)
    assert [i.payload for i in batch.items] == ["critical", "default-early", "default-late", "sheddable"]
    assert batch.expired == []
    assert q.rows() == 0


def test_expired_requests_are_dropped_before_any_work() -> None:
    q, clock = queue()
    q.offer(item("old", deadline=1))
    q.offer(item("fresh", deadline=5))
    clock.now = 2
    batch = q.take(max_rows=10)
    assert [i.payload for i in batch.items] == ["fresh"]
    assert [i.payload for i in batch.expired] == ["old"]


def test_a_batch_stops_at_max_rows_and_a_request_is_never_split() -> None:
    q, _ = queue()
    q.offer(item("a", rows=3, deadline=1))
    q.offer(item("b", rows=3, deadline=2))
    q.offer(item("c", rows=1, deadline=3))
    assert [i.payload for i in q.take(max_rows=4).items] == ["a"]
    assert [i.payload for i in q.take(max_rows=4).items] == ["b", "c"]


def test_a_request_larger_than_max_rows_goes_alone() -> None:
    q, _ = queue()
    q.offer(item("big", rows=500, priority=Priority.CRITICAL))
    q.offer(item("small"))
    assert [i.payload for i in q.take(max_rows=128).items] == ["big"]
    assert [i.payload for i in q.take(max_rows=128).items] == ["small"]


def test_a_lower_class_waits_while_a_higher_one_does_not_fit() -> None:
    q, _ = queue()
    q.offer(item("c1", rows=3, priority=Priority.CRITICAL))
    q.offer(item("c2", rows=3, priority=Priority.CRITICAL))
    q.offer(item("s", rows=1, priority=Priority.SHEDDABLE))
    assert [i.payload for i in q.take(max_rows=4).items] == ["c1"]


def test_bounds_count_rows_per_class() -> None:
    q, _ = queue(bound=4)
    q.offer(item("a", rows=3))
    with pytest.raises(QueueFull, match="default queue holds 3 of 4 rows"):
        q.offer(item("b", rows=2))
    q.offer(item("c", rows=2, priority=Priority.CRITICAL))  # another class has its own room
    q.offer(item("d", rows=1))
    assert q.rows(Priority.DEFAULT) == 4


def test_one_request_larger_than_the_bound_runs_when_its_queue_is_empty() -> None:
    q, _ = queue(bound=4)
    q.offer(item("huge", rows=10))
    with pytest.raises(QueueFull):
        q.offer(item("next"))


@given(
    st.lists(
        st.tuples(st.integers(1, 5), st.sampled_from(list(Priority)), st.floats(0, 10), st.booleans()),
        max_size=60,
    ),
    st.integers(1, 12),
    st.floats(0, 10),
)
def test_every_request_comes_out_once_in_class_then_deadline_order(
    offers: list[tuple[int, Priority, float, bool]], max_rows: int, now: float
) -> None:
    q, clock = queue(bound=40)
    accepted = []
    for index, (rows, priority, deadline, _) in enumerate(offers):
        try:
            q.offer(Pending(deadline=deadline, rows=rows, priority=priority, payload=index))
            accepted.append(index)
        except QueueFull:
            assert q.rows(priority) + rows > 40
    clock.now = now
    taken: list[Pending] = []
    expired: list[Pending] = []
    while len(q):
        batch = q.take(max_rows)
        assert batch.items or batch.expired
        assert len(batch.items) == 1 or batch.rows <= max_rows
        assert all(i.deadline > now for i in batch.items)
        keys = [(i.priority, i.deadline) for i in batch.items]
        assert keys == sorted(keys)
        taken.extend(batch.items)
        expired.extend(batch.expired)
    assert sorted(i.payload for i in taken + expired) == accepted
    assert all(i.deadline <= now for i in expired)
    assert q.rows() == 0
