"""Overload in virtual time: the real admission, queue, batcher and quota objects under
seeded load at 1x, 3x, 5x and 10x (see virtual.py for the model of the server).

1x is 40% of the capacity the lane reaches under a standing backlog: with 20% critical
traffic, critical work alone at 10x is then 80% of capacity, so it can all be served;
3x is past capacity, so shedding has to start there.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.models.admission import (
    FAIR_SHARE,
    OVERLOAD,
    QUOTA,
    AdmissionSettings,
    BatchLimit,
    Lane,
    LoopPressure,
    Rejected,
    TenantPolicy,
    Tenants,
    TokenBucket,
)
from serving.models.batcher import Pending, Priority
from tests.unit.serving.virtual import Run, Service, Stream, simulate

SERVICE = Service()  # 1 ms per batch + 10 us per row, +-10% jitter, one executor
SETTINGS = AdmissionSettings()
BASE_SHARE = 0.4
STEPS = (1, 3, 5, 10)
CRITICAL, SHEDDABLE = Priority.CRITICAL, Priority.SHEDDABLE


@functools.cache
def capacity(shedding: bool = True) -> float:
    settings = AdmissionSettings(shedding=shedding)
    backlog = simulate(
        [Stream(rate=1 / SERVICE.per_row_s, deadline_s=60.0)],
        settings=settings,
        service=SERVICE,
        duration_s=1.5,
        warmup_s=0.5,
    )
    return backlog.goodput_rows()


def mixed(load: float, settings: AdmissionSettings = SETTINGS, *, seed: int = 1) -> Run:
    rate = load * BASE_SHARE * capacity()
    streams = [Stream(0.2 * rate, CRITICAL, deadline_s=0.5), Stream(0.8 * rate, SHEDDABLE, deadline_s=0.5)]
    return simulate(streams, settings=settings, service=SERVICE, duration_s=2.5, warmup_s=0.5, seed=seed)


@functools.cache
def steps() -> dict[int, Run]:
    return {load: mixed(load, seed=load) for load in STEPS}


def test_every_step_keeps_the_instant_invariants() -> None:
    """No request started after its deadline, the queue within its bound, and no
    critical request refused for overload while lower-class work waits: at every step."""
    for load, run in steps().items():
        assert run.violations == [], (load, run.violations[:3])


def test_critical_success_stays_at_three_nines_up_to_10x() -> None:
    for load, run in steps().items():
        assert run.success(CRITICAL) >= 0.999, (load, run.success(CRITICAL))


def test_critical_p99_grows_at_most_1_5x_at_3x_and_3x_at_10x() -> None:
    runs = steps()
    base = runs[1].p99(CRITICAL)
    assert runs[3].p99(CRITICAL) <= 1.5 * base, (runs[3].p99(CRITICAL), base)
    assert runs[5].p99(CRITICAL) <= 3 * base, (runs[5].p99(CRITICAL), base)
    assert runs[10].p99(CRITICAL) <= 3 * base, (runs[10].p99(CRITICAL), base)


def test_goodput_at_10x_is_at_least_90_percent_of_capacity() -> None:
    run = steps()[10]
    assert run.goodput_rows() >= 0.9 * capacity(), (run.goodput_rows(), capacity())
    assert run.refused(OVERLOAD, SHEDDABLE) > 0  # it got there by shedding, not by luck
    assert run.refused(OVERLOAD, CRITICAL) == 0


def test_at_1x_nothing_is_shed() -> None:
    run = steps()[1]
    assert run.success() == 1.0


def test_requests_bigger_than_a_batch_limit_are_neither_shed_at_1x_nor_refused_when_critical() -> None:
    """100-entity requests against a batch limit of 64 rows: every batch is one request,
    so batch sizes never vary and the cost model is never fitted. The queue's bound must
    still hold several requests (it once held 128 rows: one 100-row request, so a
    sheddable one got in only to an empty queue, and 11% were shed at 1x)."""
    rows = 100
    for load in (1, 3):
        rate = load * BASE_SHARE * capacity() / rows
        streams = [
            Stream(0.2 * rate, CRITICAL, rows=rows, deadline_s=0.5),
            Stream(0.8 * rate, SHEDDABLE, rows=rows, deadline_s=0.5),
        ]
        run = simulate(streams, settings=SETTINGS, service=SERVICE, duration_s=2.5, warmup_s=0.5, seed=load)
        assert run.violations == [], run.violations[:3]
        assert run.success(CRITICAL) >= 0.999, (load, run.success(CRITICAL))
        if load == 1:
            assert run.success() >= 0.999, run.success(SHEDDABLE)


def test_without_shedding_critical_work_collapses_at_10x() -> None:
    """The same load against the baseline (one FIFO queue, fixed bound and batch size):
    what the invariants above protect against really happens without them."""
    baseline = AdmissionSettings(shedding=False, max_batch_rows=SETTINGS.max_batch_rows)
    protected, unprotected = steps()[1].p99(CRITICAL), mixed(10, baseline, seed=10)
    collapsed = unprotected.success(CRITICAL) < 0.999 or unprotected.p99(CRITICAL) > 3 * protected
    assert collapsed, (unprotected.success(CRITICAL), unprotected.p99(CRITICAL), protected)


def test_deadlines_are_dropped_before_work_and_counted() -> None:
    """Deadlines shorter than the queue's wait at 10x: requests are dropped at dequeue,
    none is started late."""
    rate = 10 * BASE_SHARE * capacity()
    streams = [Stream(0.2 * rate, CRITICAL, deadline_s=0.004), Stream(0.8 * rate, SHEDDABLE, deadline_s=0.004)]
    run = simulate(streams, settings=SETTINGS, service=SERVICE, duration_s=1.5, warmup_s=0.5, seed=3)
    assert run.violations == []
    assert run.refused("deadline") > 0
    late = [o for o in run.counted() if o.started is not None and o.started >= o.deadline]
    assert late == []


def test_a_tenant_at_20x_its_quota_leaves_another_tenants_critical_p99_alone() -> None:
    cap = capacity()
    quota = 0.1 * cap
    tenants = {"flood": TenantPolicy(rate=quota, burst=quota / 10), "calm": TenantPolicy(rate=cap)}

    def run(flood_rate: float) -> Run:
        streams = [
            Stream(0.2 * flood_rate, CRITICAL, tenant="flood", deadline_s=0.5),
            Stream(0.8 * flood_rate, SHEDDABLE, tenant="flood", deadline_s=0.5),
            Stream(0.06 * cap, CRITICAL, tenant="calm", deadline_s=0.5),
            Stream(0.24 * cap, SHEDDABLE, tenant="calm", deadline_s=0.5),
        ]
        return simulate(streams, settings=SETTINGS, service=SERVICE, duration_s=2.0, warmup_s=0.5, tenants=tenants)

    at_quota, flooded = run(quota), run(20 * quota)
    assert flooded.violations == []
    assert flooded.refused(QUOTA) > 0
    assert flooded.success(CRITICAL, "calm") >= 0.999
    assert flooded.p99(CRITICAL, "calm") <= 1.5 * at_quota.p99(CRITICAL, "calm")


def test_without_quotas_a_flood_gets_only_its_fair_share_of_the_queue() -> None:
    cap = capacity()
    calm = [Stream(0.05 * cap, CRITICAL, tenant="calm"), Stream(0.15 * cap, SHEDDABLE, tenant="calm")]
    alone = simulate(calm, settings=SETTINGS, service=SERVICE, duration_s=2.0, warmup_s=0.5, seed=5)
    flood = [Stream(2.0 * cap, SHEDDABLE, tenant="flood")]
    shared = simulate(calm + flood, settings=SETTINGS, service=SERVICE, duration_s=2.0, warmup_s=0.5, seed=5)
    assert shared.violations == []
    assert shared.refused(FAIR_SHARE) > 0
    assert shared.success(CRITICAL, "calm") >= 0.999
    assert shared.success(SHEDDABLE, "calm") >= 0.99
    assert shared.p99(CRITICAL, "calm") <= 3 * alone.p99(CRITICAL, "calm")


# -- the pieces -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pending(
    rows: int = 1,
    priority: Priority = Priority.DEFAULT,
    tenant: str = "t",
    deadline: float = 10.0,
    enqueued: float = 0.0,
) -> Pending:
    return Pending(deadline=deadline, rows=rows, priority=priority, tenant=tenant, payload=None, enqueued=enqueued)


def test_critical_evicts_the_latest_deadline_sheddable_work_when_the_queue_is_full() -> None:
    clock = Clock()
    lane = Lane(AdmissionSettings(queue_rows=10), clock=clock)
    for _ in range(lane.threshold(SHEDDABLE)):  # sheddable up to its headroom
        lane.admit(pending(priority=SHEDDABLE, deadline=1.0 + lane.queue.rows()))
    with pytest.raises(Rejected, match="sheddable requests are admitted below") as refused:
        lane.admit(pending(priority=SHEDDABLE))
    assert (refused.value.reason, refused.value.status) == (OVERLOAD, 503)
    bound = lane.bound()
    sheddable = lane.queue.rows(SHEDDABLE)
    assert sheddable == int(bound * 0.5)
    for _ in range(bound - sheddable):
        assert lane.admit(pending(priority=CRITICAL)) == []
    evicted = lane.admit(pending(priority=CRITICAL))
    assert [item.deadline for item in evicted] == [float(sheddable)]  # the latest deadline went
    assert lane.queue.rows() == bound


def test_a_refused_critical_request_puts_back_what_it_evicted() -> None:
    lane = Lane(AdmissionSettings(queue_rows=10), clock=Clock())
    bound = lane.bound()
    lane.admit(pending(rows=2, priority=SHEDDABLE))
    lane.admit(pending(rows=bound - 4, priority=CRITICAL))
    with pytest.raises(Rejected, match="critical requests are admitted below"):
        lane.admit(pending(rows=7, priority=CRITICAL))  # evicting the 2 sheddable rows is not enough
    assert (lane.queue.rows(CRITICAL), lane.queue.rows(SHEDDABLE)) == (bound - 4, 2)


def test_token_bucket_refills_at_its_rate_and_says_how_long_to_wait() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert all(bucket.take(1) for _ in range(5))
    assert not bucket.take(1)
    assert bucket.wait_s(2) == pytest.approx(0.2)
    clock.now = 0.1
    assert (bucket.take(1), bucket.take(1)) == (True, False)
    clock.now = 100.0
    assert (bucket.take(5), bucket.take(1)) == (True, False)  # never more than the burst


def test_quota_rejection_is_429_with_the_wait() -> None:
    clock = Clock()
    tenants = Tenants({"shop": TenantPolicy(rate=100, burst=10)}, clock=clock)
    tenants.charge("shop", 10)
    with pytest.raises(Rejected) as refused:
        tenants.charge("shop", 5)
    assert (refused.value.status, refused.value.reason) == (429, QUOTA)
    assert refused.value.retry_after_s == pytest.approx(0.05)
    assert "over its quota of 100 predictions/s" in str(refused.value)
    tenants.charge("someone-else", 10_000)  # no `*` entry: no quota


def test_a_flood_of_made_up_tenant_names_never_resets_a_named_tenants_quota() -> None:
    clock = Clock()
    tenants = Tenants({"shop": TenantPolicy(rate=1, burst=1), "*": TenantPolicy(rate=10, burst=10)}, clock=clock)
    tenants.charge("shop", 1)
    for index in range(100_002):  # the unnamed buckets are forgotten past 100,000
        tenants.charge(f"made-up-{index}", 1)
    with pytest.raises(Rejected):
        tenants.charge("shop", 1)  # at the same instant: still spent


def test_batch_limit_finds_the_size_where_a_batch_costs_tolerance_times_its_fixed_part() -> None:
    limit = BatchLimit(initial=32, minimum=8, maximum=1024, tolerance=1.5)
    rng = np.random.default_rng(0)
    for _ in range(300):
        rows = int(rng.integers(1, 200))
        limit.observe(rows, (0.001 + 0.00001 * rows) * rng.uniform(0.95, 1.05))
    assert limit.fixed_s == pytest.approx(0.001, rel=0.1)
    assert limit.per_row_s == pytest.approx(0.00001, rel=0.1)
    assert 40 <= limit.rows <= 60  # (1.5 - 1) * 1 ms / 10 us = 50


def test_a_busier_event_loop_grows_the_batches_instead_of_shrinking_them() -> None:
    """Contention adds the same wait to every batch: the fixed part grows, and with it
    the size worth batching (a ratio to an idle baseline would shrink batches here)."""
    limit = BatchLimit(initial=32, minimum=8, maximum=1024, tolerance=1.5)
    rng = np.random.default_rng(1)
    for fixed in (0.001, 0.004):
        for _ in range(400):
            rows = int(rng.integers(1, 400))
            limit.observe(rows, fixed + 0.00001 * rows)
        if fixed == 0.001:
            idle = limit.rows
    assert limit.rows > 3 * idle


def test_batch_limit_holds_when_every_batch_is_the_same_size() -> None:
    """A standing overload makes every batch the limit: no information, no drift."""
    limit = BatchLimit(initial=32, minimum=8, maximum=1024, tolerance=1.5)
    for rows in (5, 50, 10, 80, 20, 60) * 5:
        limit.observe(rows, 0.001 + 0.00001 * rows)
    settled = limit.rows
    for _ in range(5000):
        limit.observe(limit.rows, 0.02)  # slow, but all alike
    frozen = limit.rows
    for _ in range(1000):
        limit.observe(limit.rows, 0.05)
    assert limit.rows == frozen  # once the varied batches have faded, nothing moves it
    assert 0.75 * settled <= frozen <= 1.25 * settled


def test_a_critical_backlog_takes_bigger_batches_and_a_sheddable_one_does_not() -> None:
    clock = Clock()
    lane = Lane(AdmissionSettings(queue_rows=8192, min_batch_rows=64, max_batch_rows=1024), clock=clock)
    for rows in (5, 50, 10, 80, 20, 60) * 5:  # a fitted cost: 1 ms + 10 us a row, a bound of ~2,000 rows
        lane.take()
        lane.finished(rows, 0.001 + 0.00001 * rows)
    limit = lane.limit.rows
    for _ in range(90):
        lane.admit(pending(rows=10, priority=SHEDDABLE, deadline=100.0))
    assert lane.queue.rows(SHEDDABLE) > 2 * limit
    assert lane.next_batch_rows() == limit  # sheddable rows waiting: the limit protects critical latency
    clock.now = 1.0  # the sheddable rows are old now: still no reason to grow
    assert lane.next_batch_rows() == limit
    for _ in range(30):
        lane.admit(pending(rows=10, priority=CRITICAL, deadline=100.0, enqueued=clock.now))
    assert lane.next_batch_rows() == limit  # 300 critical rows, just queued: the limit holds
    clock.now += 0.049
    assert lane.next_batch_rows() == limit
    clock.now += 0.002  # past queue_delay_ms (50 ms): a backlog, shared by the two batches in flight
    assert lane.next_batch_rows() == 150
    assert lane.take().rows == 150
    for _ in range(300):
        lane.admit(pending(rows=10, priority=CRITICAL, deadline=100.0, enqueued=clock.now))
    assert lane.next_batch_rows() == 1024  # never past max_batch_rows
    fitted = lane.limit.rows
    while len(lane.queue):
        lane.take()
    assert lane.next_batch_rows() == fitted  # the backlog is gone
    for rows in (150, 10, 1024, 30) * 10:  # ... but for 10 s no batch, however sized or slow, moves the fit
        lane.finished(rows, 0.5 + rows * 0.000001)
    assert lane.limit.rows == fitted
    clock.now += 10.0
    for rows in (150, 10, 1024, 30) * 10:
        lane.finished(rows, 0.5 + rows * 0.000001)
    assert lane.limit.rows > fitted  # then it learns again


def test_critical_work_past_what_small_batches_serve_is_all_answered_by_bigger_ones() -> None:
    """2 ms a batch and 20 us a row (a loop short of CPU): the batch limit settles at its
    64-row floor, two such batches at a time serve 39,000 rows/s, and critical work
    arrives at 50,000. Once it has waited 50 ms, the batches take the backlog instead of
    64 rows, and all of it is answered within its deadline (with the limit alone, a
    quarter of it is not)."""
    service = Service(fixed_s=0.002, per_row_s=0.00002, executors=2)
    run = simulate(
        [Stream(rate=5000, priority=CRITICAL, rows=10, deadline_s=1.0)],
        settings=AdmissionSettings(),
        service=service,
        duration_s=2.5,
        warmup_s=0.5,
        seed=3,
    )
    assert not run.violations, run.violations[:3]
    assert run.success(CRITICAL) >= 0.999
    assert run.p99(CRITICAL) < 0.1


def test_baseline_mode_is_one_fifo_queue() -> None:
    lane = Lane(AdmissionSettings(shedding=False, queue_rows=4, max_batch_rows=2, min_batch_rows=1), clock=Clock())
    lane.admit(pending(priority=SHEDDABLE, deadline=1.0))
    lane.admit(pending(priority=CRITICAL, deadline=2.0))
    assert [item.deadline for item in lane.take().items] == [1.0, 2.0]  # arrival order, not class
    for _ in range(4):
        lane.admit(pending(priority=SHEDDABLE))
    with pytest.raises(Rejected):
        lane.admit(pending(priority=CRITICAL))  # no eviction, no headroom


_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"),
            st.sampled_from(list(Priority)),
            st.sampled_from(["a", "b", "c"]),
            st.integers(1, 40),
            st.floats(0.0, 2.0),
        ),
        st.tuples(st.just("take")),
        st.tuples(st.just("finish"), st.floats(0.0005, 0.02)),
        st.tuples(st.just("tick"), st.floats(0.0, 0.5)),
    ),
    max_size=120,
)


@given(ops=_OPS, queue_rows=st.integers(8, 400))
def test_admission_invariants_hold_for_any_sequence(ops: list[tuple[Any, ...]], queue_rows: int) -> None:
    """Random admits (classes, tenants, sizes, deadlines), takes, finishes and clock
    ticks: rows are accounted exactly, an admitted request leaves the queue within its
    bound, evictions only push out lower classes, and critical work is refused for
    overload only when pushing out every queued lower-class row would not make room."""
    clock = Clock()
    lane = Lane(AdmissionSettings(queue_rows=queue_rows, max_batch_rows=64, min_batch_rows=4), clock=clock)
    queued: dict[int, Pending] = {}
    in_flight: list[int] = []
    for op in ops:
        if op[0] == "admit":
            _, priority, tenant, rows, deadline = op
            item = pending(rows=rows, priority=priority, tenant=tenant, deadline=clock.now + deadline)
            try:
                evicted = lane.admit(item)
            except Rejected as refused:
                if refused.reason == OVERLOAD and priority is CRITICAL:  # evicting every lower row would not do
                    lower = lane.queue.rows(SHEDDABLE) + lane.queue.rows(Priority.DEFAULT)
                    assert lane.queue.rows() - lower + rows > lane.room(item)
                continue
            assert all(e.priority > priority for e in evicted)
            for gone in evicted:
                del queued[id(gone)]
            queued[id(item)] = item
            assert lane.queue.rows() <= max(lane.room(item), rows)
        elif op[0] == "take":
            batch = lane.take()
            for taken in [*batch.items, *batch.expired]:
                del queued[id(taken)]
            assert all(taken.deadline > clock.now for taken in batch.items)
            in_flight.append(batch.rows)
        elif op[0] == "finish" and in_flight:
            lane.finished(in_flight.pop(0), op[1])
        elif op[0] == "tick":
            clock.now += op[1]
        assert lane.queue.rows() == sum(item.rows for item in queued.values())
        for tenant in ("a", "b", "c"):
            assert lane.queue.tenant_rows(tenant) == sum(i.rows for i in queued.values() if i.tenant == tenant)
        assert lane.in_flight_rows == sum(in_flight)
        assert lane.limit.minimum <= lane.limit.rows <= lane.limit.maximum


def test_loop_pressure_cuts_lower_class_headroom_while_the_loop_lags_and_restores_it() -> None:
    pressure = LoopPressure(target_s=0.003)
    for _ in range(20):
        pressure.observe(0.0005)
    assert pressure.share == 1.0
    for _ in range(10):
        pressure.observe(0.02)  # the loop is 20 ms late
    assert pressure.share < 0.1
    lane = Lane(AdmissionSettings(queue_rows=100_000, min_batch_rows=16, max_batch_rows=16), clock=Clock())
    lane.limit.fixed_s, lane.limit.per_row_s = 0.001, 0.00001  # as fitted: the bound is 689 rows
    full = lane.threshold(SHEDDABLE)
    lane.admit_share = pressure.share
    assert lane.threshold(SHEDDABLE) < 0.1 * full  # sheddable work may lose all of it
    assert lane.threshold(Priority.DEFAULT) >= lane.limit.rows  # default work never below one batch
    assert lane.threshold(CRITICAL) == lane.bound()  # critical headroom is never cut
    for _ in range(100):
        pressure.observe(0.0005)
    assert 0.1 < pressure.share < 1.0  # back by small steps: a burst of admissions would lag it again
    for _ in range(200):
        pressure.observe(0.0005)
    assert pressure.share == 1.0


def test_critical_work_queues_past_the_bound_while_its_deadline_leaves_time_and_no_further() -> None:
    """The bound is sized for the lower classes' latency; a critical request is refused
    only when the critical rows ahead of it would take more than half its deadline."""
    clock = Clock()
    lane = Lane(AdmissionSettings(queue_rows=100_000, min_batch_rows=16, max_batch_rows=16), clock=clock)
    lane.limit.fixed_s, lane.limit.per_row_s = 0.001, 0.00001  # as fitted: 16 rows in 1.16 ms
    rows_per_s = 16 / 0.00116

    def fill(deadline_s: float) -> int:
        admitted = 0
        while lane.queue.rows() + 10 <= lane.room(pending(rows=10, priority=CRITICAL, deadline=clock.now + deadline_s)):
            lane.admit(pending(rows=10, priority=CRITICAL, deadline=clock.now + deadline_s))
            admitted += 10
        with pytest.raises(Rejected) as refused:
            lane.admit(pending(rows=10, priority=CRITICAL, deadline=clock.now + deadline_s))
        assert refused.value.reason == OVERLOAD
        return admitted

    patient = fill(1.0)
    assert patient > 5 * lane.bound()  # far past the lower classes' bound
    assert patient == pytest.approx(rows_per_s * 0.5, abs=10)  # what the model serves in half the deadline
    lane.take()
    while lane.queue.rows():
        lane.take()
    hurried = fill(0.02)  # half of 20 ms is less than the bound's worth: the bound holds
    assert hurried == pytest.approx(lane.bound(), abs=10)


def test_sheddable_headroom_goes_to_nothing_under_loop_pressure_while_queued_work_waits() -> None:
    lane = Lane(AdmissionSettings(queue_rows=100_000, min_batch_rows=16, max_batch_rows=16), clock=Clock())
    lane.limit.fixed_s, lane.limit.per_row_s = 0.001, 0.00001
    lane.admit_share = 0.02
    lane.admit(pending(rows=8, priority=Priority.DEFAULT))
    with pytest.raises(Rejected):
        lane.admit(pending(rows=1, priority=SHEDDABLE))
    lane.admit(pending(rows=8, priority=Priority.DEFAULT))  # default work keeps one batch of room
    fresh = Lane(AdmissionSettings(queue_rows=100_000, min_batch_rows=16, max_batch_rows=16), clock=Clock())
    fresh.admit_share = 0.02
    fresh.admit(pending(rows=1, priority=SHEDDABLE))  # an empty queue admits anything: a lag alone sheds nothing


def test_a_loop_busy_past_its_target_cuts_the_share_before_its_timers_run_late() -> None:
    pressure = LoopPressure(target_s=0.001, busy_target=0.8)
    for _ in range(50):
        pressure.observe(0.0002, busy=0.6)  # on time, 60% busy: all headroom
    assert pressure.share == 1.0
    for _ in range(30):
        pressure.observe(0.0002, busy=0.97)  # still on time, but working all the time
    assert pressure.busy > 0.8
    assert pressure.share < 0.1
    for _ in range(400):
        pressure.observe(0.0002, busy=0.5)
    assert pressure.share == 1.0
    assert pressure.busy < 0.8


def test_past_its_busy_target_only_a_fraction_of_sheddable_requests_pass_evenly_spaced() -> None:
    pressure = LoopPressure(target_s=0.001, busy_target=0.8)
    assert all(pressure.let_through() for _ in range(100))  # no pressure: every one
    for _ in range(60):
        pressure.observe(0.0002, busy=0.95)
    assert pressure.floor < pressure.passing < 0.5
    passing = pressure.passing
    passed = [pressure.let_through() for _ in range(1000)]
    assert abs(sum(passed) - passing * 1000) <= 1  # its fraction exactly, not a coin's
    gaps = np.diff(np.flatnonzero(passed))
    assert gaps.max() - gaps.min() <= 1  # evenly spaced: no burst after a run of refusals
    for _ in range(300):
        pressure.observe(0.0002, busy=0.4)
    assert pressure.passing == 1.0
    assert all(pressure.let_through() for _ in range(100))


def test_a_lagging_loop_that_is_not_busy_shortens_queues_but_lets_every_sheddable_request_in() -> None:
    """A lag alone is a GC pause or a model warming on a thread, not too much work."""
    pressure = LoopPressure(target_s=0.001, busy_target=0.8)
    for _ in range(30):
        pressure.observe(0.02, busy=0.3)
    assert pressure.share < 0.1
    assert pressure.passing == 1.0
    assert all(pressure.let_through() for _ in range(100))


def test_the_passing_fraction_settles_where_the_loop_is_as_busy_as_its_target() -> None:
    """A loop whose busy share grows with the sheddable work it takes in (offered 3x: all
    of it would need 1.6 loops): the fraction settles, the loop at its target, instead
    of swinging between everything and nothing as AIMD on a lagged signal does."""
    rng = np.random.default_rng(3)
    pressure = LoopPressure(target_s=0.001, busy_target=0.8)
    seen = []
    for _ in range(3000):  # 30 s of 10 ms samples
        busy = 0.4 + 1.2 * pressure.passing + rng.normal(0, 0.05)
        pressure.observe(0.0002, busy=busy)
        seen.append((pressure.busy, pressure.passing))
    late = np.array(seen[1000:])
    assert abs(late[:, 0].mean() - 0.8) < 0.02
    assert 0.25 < late[:, 1].mean() < 0.42  # (0.8 - 0.4) / 1.2 = 0.33
    assert late[:, 1].max() < 2 * late[:, 1].min()
