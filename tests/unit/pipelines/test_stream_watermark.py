"""Watermarks per input partition: the rule on its own, then the stream job's decode ->
shard path over random partition interleavings (no event within the lateness of its own
partition is ever late), then the real Bytewax dataflow on a 3-partition log."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from bytewax import operators as op
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.plan import Plan, compile_repo
from featurestore.semantics import changelog_differences
from pipelines.reference import reference_changelog
from pipelines.stream.dataflow import Outputs, _decoder, _events_for, _ShardLogic, build_dataflow
from pipelines.stream.state import Emit
from pipelines.stream.tiles import RowBatch
from pipelines.stream.watermark import PartitionStatus, Progress, Watermarks
from tenx.demo_data import DemoConfig, generate
from tests.unit.pipelines.test_stream_state import as_changelog, last_per_entity, rows_of

ROOT = Path(__file__).resolve().parents[3]
MINUTE = 60_000_000
IDLE, ENDED = PartitionStatus.IDLE, PartitionStatus.ENDED


# -- the rule ---------------------------------------------------------------------------------


def test_the_slowest_partition_sets_the_watermark() -> None:
    marks = Watermarks(lateness=5 * MINUTE)
    marks.observe([Progress(p, partitions=3) for p in range(3)])
    marks.observe([Progress(0, event_time=100 * MINUTE), Progress(1, event_time=40 * MINUTE)])
    assert marks.value is None  # partition 2 may still deliver anything
    marks.observe([Progress(2, event_time=70 * MINUTE)])
    assert marks.value == 35 * MINUTE
    assert marks.is_late(35 * MINUTE - 1)
    assert not marks.is_late(35 * MINUTE)
    marks.observe([Progress(1, event_time=90 * MINUTE)])
    assert marks.value == 65 * MINUTE  # now partition 2 is the slowest


def test_the_watermark_never_moves_back() -> None:
    marks = Watermarks(lateness=0)
    marks.observe([Progress(0, event_time=50)])
    marks.observe([Progress(1, event_time=10)])  # a partition first heard of later
    assert marks.value == 50


def test_an_idle_partition_follows_the_clock() -> None:
    marks = Watermarks(lateness=5 * MINUTE)
    marks.observe([Progress(0, partitions=2), Progress(1, partitions=2), Progress(0, event_time=60 * MINUTE)])
    assert marks.value is None
    marks.observe([Progress(1, status=IDLE, clock=30 * MINUTE)])
    assert marks.value == 25 * MINUTE  # idle: counts as the clock when found caught up
    marks.observe([Progress(0, status=IDLE, clock=80 * MINUTE), Progress(1, status=IDLE, clock=80 * MINUTE)])
    assert marks.value == 75 * MINUTE  # a quiet stream: the watermark follows the clock
    marks.observe([Progress(1, event_time=81 * MINUTE)])  # partition 1 delivers again: no longer idle
    assert marks.status(1) is PartitionStatus.ACTIVE
    assert marks.value == 75 * MINUTE


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_at_the_end_of_a_replay_the_watermark_does_not_depend_on_the_reading_order(order: tuple[int, ...]) -> None:
    # Partitions end with their last progress kept (an empty one counts no more): the
    # slowest partition's last event minus the lateness, whichever partition ends last.
    marks = Watermarks(lateness=5)
    marks.observe([Progress(p, partitions=4) for p in range(4)])
    newest = {0: 100, 1: 70, 2: 90}
    for partition in order:
        marks.observe([Progress(partition, event_time=newest[partition]), Progress(partition, status=ENDED)])
    marks.observe([Progress(3, status=ENDED)])  # partition 3 was empty
    assert marks.value == 65


def test_the_last_progress_of_a_partition_counts_before_its_end() -> None:
    # A bounded input's last batch reports its newest event and then the end, in one go:
    # the watermark must move to that event first (it stayed an earlier batch behind,
    # so the replay's last expiries were never emitted).
    marks = Watermarks(lateness=5)
    marks.observe([Progress(0, partitions=1), Progress(0, event_time=50)])
    marks.observe([Progress(0, event_time=100), Progress(0, status=ENDED)])
    assert marks.value == 95


def test_a_snapshot_keeps_progress_but_not_statuses() -> None:
    marks = Watermarks(lateness=0)
    marks.observe([Progress(0, partitions=2), Progress(0, event_time=100), Progress(1, status=ENDED)])  # 1: empty
    assert marks.value == 100
    restored = pickle.loads(pickle.dumps(marks))
    assert restored.value == 100
    assert restored.newest == {0: 100}
    assert restored.status(1) is PartitionStatus.ACTIVE  # a restarted job waits for partition 1 again
    restored.observe([Progress(0, event_time=500)])
    assert restored.value == 100


# -- decode -> shards, over random interleavings ---------------------------------------------


@pytest.fixture(scope="module")
def plan() -> Plan:
    return compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])


def partition_logs(rng: random.Random, events: pa.Table, partitions: int, lateness: int) -> list[list[dict[str, Any]]]:
    """Events spread over partitions, each partition's log out of order only within the
    lateness (an event is delivered up to half the lateness after later ones)."""
    logs: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in range(partitions)]
    for row in events.to_pylist():
        moment = int(pa.scalar(row["event_time"]).cast(pa.int64()).as_py())
        delay = rng.randrange(lateness // 2) if rng.random() < 0.3 else 0
        row["event_time"] = row["event_time"].isoformat()
        logs[rng.randrange(partitions)].append((moment + delay, row))
    return [[row for _, row in sorted(log, key=lambda pair: pair[0])] for log in logs]


def interleave(rng: random.Random, logs: list[list[dict[str, Any]]], skew: bool) -> list[list[Any]]:
    """Source batches, one partition each (as Kafka sources yield them), each partition
    in its own order, partitions interleaved at random; with `skew`, one partition is
    read entirely before the others."""
    batches: list[list[Any]] = [[Progress(p, partitions=len(logs))] for p in range(len(logs))]
    cursors = [0] * len(logs)
    order = list(range(len(logs)))
    if skew:
        rng.shuffle(order)
    while any(cursor < len(log) for cursor, log in zip(cursors, logs, strict=True)):
        waiting = [p for p in order if cursors[p] < len(logs[p])]
        partition = waiting[0] if skew else rng.choice(waiting)
        size = rng.randint(1, 60)
        chunk = logs[partition][cursors[partition] : cursors[partition] + size]
        batches.append([(partition, cursors[partition] + i, orjson.dumps(row)) for i, row in enumerate(chunk)])
        cursors[partition] += len(chunk)
    for partition in range(len(logs)):
        batches.append([Progress(partition, status=ENDED)])
    return batches


def run_shards(plan: Plan, view_name: str, batches: list[list[Any]], shards: int, rng: random.Random) -> Any:
    """The dataflow's steps without Bytewax: decode a few source batches at a time, split
    by shard, each shard's logic called on what arrived for it (in order, in random
    groups, as Bytewax activations deliver them). Returns (rows, late items)."""
    view = plan.view(view_name)
    decode = _decoder(view.source, clock=lambda: 4_000_000_000.0)
    to_events = _events_for(view, shards, view.input_columns)
    logics = {str(s): _ShardLogic(view, True, Emit.LATEST, None) for s in range(shards)}
    inboxes: dict[str, list[Any]] = {key: [] for key in logics}
    rows: list[Any] = []
    late: list[Any] = []

    def deliver(key: str, values: list[Any]) -> None:
        out, _ = logics[key].on_batch(values)
        for kind, item in out:
            (rows if kind == "row" else late).append((view_name, item) if kind == "row" else item)

    position = 0
    while position < len(batches):
        take = rng.randint(1, 4)
        for kind, item in decode(batches[position : position + take]):
            assert kind != "dlq", item
            for key, value in to_events(item):
                inboxes[key].append(value)
        position += take
        for key, inbox in inboxes.items():
            if inbox and rng.random() < 0.7:
                deliver(key, inbox[:])
                inbox.clear()
    for key, inbox in inboxes.items():
        if inbox:
            deliver(key, inbox)
    for logic in logics.values():
        out, _ = logic.on_eof()
        rows.extend((view_name, item) for kind, item in out if kind == "row")
    return rows, late


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    partitions=st.integers(1, 4),
    shards=st.integers(1, 3),
    skew=st.booleans(),
    view_name=st.sampled_from(["user_spend", "merchant_sales"]),
)
def test_no_event_within_its_partitions_lateness_is_late_whatever_the_interleaving(
    plan: Plan, seed: int, partitions: int, shards: int, skew: bool, view_name: str
) -> None:
    rng = random.Random(seed)
    events = next(generate(DemoConfig(events=400, users=12, merchants=5, days=2, chunk_rows=400, seed=seed % 1000)))
    view = plan.view(view_name)
    logs = partition_logs(rng, events.sort_by("event_time"), partitions, view.source.allowed_lateness)
    rows, late = run_shards(plan, view_name, interleave(rng, logs, skew), shards, rng)
    assert late == []
    expected = last_per_entity(reference_changelog(view, events.to_pandas(), with_scale=True), view)
    got = last_per_entity(as_changelog(view, rows_of(rows)), view)
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, got, key=view.entity_key, kinds=kinds) == []


def json_events(count: int, *, seed: int) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Demo events in time order, and as records ready for JSON (ISO event times)."""
    events = next(generate(DemoConfig(events=count, users=5, days=1, chunk_rows=count, seed=seed)))
    events = events.sort_by("event_time")
    rows = events.to_pylist()
    for row in rows:
        row["event_time"] = row["event_time"].isoformat()
    return events, rows


def test_an_event_later_than_the_lateness_of_the_slowest_partition_is_late(plan: Plan) -> None:
    view = plan.view("user_spend")
    events, rows = json_events(200, seed=3)
    stale = dict(rows[0])  # the first event again, after both partitions moved past it
    batches: list[list[Any]] = [[Progress(0, partitions=2), Progress(1, partitions=2)]]
    batches.append([(0, i, orjson.dumps(r)) for i, r in enumerate(rows[:100])])
    batches.append([(1, i, orjson.dumps(r)) for i, r in enumerate(rows[100:])])
    batches.append([(0, 100, orjson.dumps(stale))])
    _, late = run_shards(plan, "user_spend", batches, 2, random.Random(1))
    assert [item["sequence"] for item in late] == [(100 << 10) | 0]
    newest_of_slowest = int(pa.scalar(events.column("event_time")[99]).cast(pa.int64()).as_py())
    assert late[0]["watermark_us"] == newest_of_slowest - view.source.allowed_lateness


def test_a_future_event_is_dead_lettered_and_moves_no_watermark(plan: Plan) -> None:
    view = plan.view("user_spend")
    events, rows = json_events(50, seed=4)
    now = pa.scalar(events.column("event_time")[-1]).cast(pa.int64()).as_py() / 1e6 + 60
    poison = {**rows[0], "transaction_id": "poison", "event_time": "2099-12-31T00:00:00+00:00"}
    messages = [(0, i, orjson.dumps(r)) for i, r in enumerate(rows[:10])]
    messages.append((0, 10, orjson.dumps(poison)))
    messages += [(0, 11 + i, orjson.dumps(r)) for i, r in enumerate(rows[10:])]
    out = _decoder(view.source, clock=lambda: now)([[Progress(0, partitions=1), *messages]])
    dead = [item for kind, item in out if kind == "dlq"]
    assert [d["offset"] for d in dead] == [10]
    assert dead[0]["reason"] == (
        "field `event_time`: 2099-12-31T00:00:00+00:00 is more than 5m ahead of the processing clock "
        "(max_future of source `transactions`); check the producer's clock"
    )
    (table,) = [item for kind, item in out if kind == "ok"]
    assert table.num_rows == 50  # every event but the poison
    progress = [item for kind, item in out if kind == "progress"]
    newest = int(pa.scalar(events.column("event_time")[-1]).cast(pa.int64()).as_py())
    assert progress == [Progress(0, partitions=1), Progress(0, event_time=newest)]


# -- the real dataflow --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_skewed_three_partition_log_in_bytewax_loses_nothing(plan: Plan, workers: int) -> None:
    # Partition 2 is read entirely after 0 and 1 (a day behind them): the old rule (the
    # newest event of any partition) sent most of it to the late output.
    rng = random.Random(7)
    events = next(generate(DemoConfig(events=1_500, users=40, merchants=8, days=2, chunk_rows=1_500, seed=8)))
    view = plan.view("merchant_sales")
    logs = partition_logs(rng, events.sort_by("event_time"), 3, view.source.allowed_lateness)
    items = [entry for batch in interleave(rng, logs, skew=True) for entry in batch]
    rows: list[Any] = []
    late: list[Any] = []
    flow = build_dataflow(
        plan,
        lambda flow, source: op.input("in", flow, TestingSource(items, batch_size=37)),
        Outputs(TestingSink(rows), TestingSink([]), TestingSink(late)),
        views=["user_spend", "merchant_sales"],
        shards=3,
        emit=Emit.LATEST,
    )
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    assert late == []
    kinds = {name: {f.name: f.kind for f in plan.view(name).features} for name in ("user_spend", "merchant_sales")}
    for name in ("user_spend", "merchant_sales"):
        view = plan.view(name)
        expected = last_per_entity(reference_changelog(view, events.to_pandas(), with_scale=True), view)
        got = last_per_entity(as_changelog(view, rows_of(rows, name)), view)
        assert changelog_differences(expected, got, key=view.entity_key, kinds=kinds[name]) == []


def test_row_batches_only_reach_row_sinks(plan: Plan) -> None:
    # Progress reports travel with the events to every shard and never leave the state.
    items: list[Any] = [Progress(0, partitions=1), Progress(0, status=IDLE, clock=10**15)]
    rows: list[Any] = []
    flow = build_dataflow(
        plan,
        lambda flow, source: op.input("in", flow, TestingSource(items)),
        Outputs(TestingSink(rows), TestingSink([]), TestingSink([])),
        views=["user_spend"],
        emit=Emit.LATEST,
    )
    run_main(flow)
    assert all(isinstance(batch, RowBatch) for _, batch in rows)
