"""The real Bytewax dataflow, in process, on bounded inputs: dead letters, parity with
the batch engine's reference, 1 and 2 workers, rows into a real embedded store."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pytest
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from featurestore.plan import Plan, compile_repo
from featurestore.semantics import changelog_differences, values_match
from featurestore.stores.codec import decode
from featurestore.stores.online import SqliteOnlineStore
from pipelines.reference import reference_changelog
from pipelines.stream.dataflow import OnlineSink, Outputs, StoreFactory, build_dataflow
from pipelines.stream.state import Emit
from schemas.timestamps import to_micros
from tenx.demo_data import DemoConfig, generate
from tests.unit.pipelines.test_stream_state import as_changelog, last_per_entity, rows_of

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def plan() -> Plan:
    return compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])


def demo_events(count: int, *, in_order: bool) -> pa.Table:
    table = next(generate(DemoConfig(events=count, users=25, merchants=8, days=2, chunk_rows=count, seed=5)))
    return table.sort_by("event_time") if in_order else table


def messages(table: pa.Table, bad: dict[int, bytes | None] | None = None) -> list[tuple[int, int, bytes | None]]:
    out = []
    for offset, row in enumerate(table.to_pylist()):
        row["event_time"] = row["event_time"].isoformat()
        out.append((0, offset, (bad or {}).get(offset, orjson.dumps(row))))
    return out


def run(
    plan: Plan,
    items: list[tuple[int, int, bytes]],
    workers: int,
    views: list[str],
    *,
    emit: Emit = Emit.CHANGELOG,
    drain: bool = True,
) -> tuple[list[Any], ...]:
    rows: list[Any] = []
    dlq: list[Any] = []
    late: list[Any] = []
    flow = build_dataflow(
        plan,
        lambda flow, source: __import__("bytewax.operators", fromlist=["input"]).input(
            "in", flow, TestingSource(items, batch_size=37)
        ),
        Outputs(TestingSink(rows), TestingSink(dlq), TestingSink(late)),
        views=views,
        shards=5,
        emit=emit,
        drain=drain,
    )
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return rows, dlq, late


@pytest.mark.parametrize("workers", [1, 2])
def test_in_order_log_gives_the_batch_changelog_row_for_row(plan: Plan, workers: int) -> None:
    events = demo_events(1_500, in_order=True)
    rows, dlq, late = run(plan, messages(events), workers, ["user_spend", "merchant_sales"])
    assert dlq == []
    assert late == []
    for name in ("user_spend", "merchant_sales"):
        view = plan.view(name)
        produced = as_changelog(view, rows_of(rows, name))
        frame = events.to_pandas()
        expected = reference_changelog(view, frame, with_scale=True)
        kinds = {f.name: f.kind for f in view.features}
        assert changelog_differences(expected, produced, key=view.entity_key, kinds=kinds) == []


def test_bad_records_go_to_the_dead_letter_output_and_the_job_continues(plan: Plan) -> None:
    events = demo_events(300, in_order=True)
    bad = {
        3: b"{not json",
        10: orjson.dumps({"user_id": "abc"}),
        20: orjson.dumps({**events.slice(20, 1).to_pylist()[0], "event_time": 1_700_000_000}, default=str),
        30: None,  # a Kafka tombstone (no value)
    }
    rows, dlq, _ = run(plan, messages(events, bad), 1, ["user_spend"])
    assert [(d["offset"], d["reason"].split(":")[0]) for d in dlq] == [
        (3, "invalid JSON"),
        (10, "field `transaction_id`"),
        (20, "field `event_time`"),
        (30, "invalid JSON"),
    ]
    assert "absurd timestamp" in dlq[2]["reason"]
    kept = events.filter(pa.array([i not in bad for i in range(events.num_rows)]))
    view = plan.view("user_spend")
    expected = reference_changelog(view, kept.to_pandas(), with_scale=True)
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, as_changelog(view, rows_of(rows)), key="user_id", kinds=kinds) == []


def test_out_of_order_log_converges_and_reports_late_events(plan: Plan) -> None:
    events = demo_events(1_000, in_order=False)  # 1% delayed by up to 2 minutes: within lateness
    order = list(range(events.num_rows))
    order.append(order.pop(5))  # an event 2 days too late at the end of the log
    shuffled = events.take(pa.array(order))
    rows, _, late = run(plan, messages(shuffled), 2, ["user_spend"])
    assert len(late) == 1
    assert late[0]["sequence"] >> 10 == events.num_rows - 1
    view = plan.view("user_spend")
    accepted = shuffled.slice(0, events.num_rows - 1).to_pandas()
    expected = last_per_entity(reference_changelog(view, accepted, with_scale=True), view)
    got = last_per_entity(as_changelog(view, rows_of(rows)), view)
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, got, key="user_id", kinds=kinds) == []


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("drain", [False, True])
def test_online_rows_are_exact_and_as_new_as_each_entity(plan: Plan, workers: int, drain: bool) -> None:
    # What `tenx stream` runs (Emit.LATEST): per entity the value served (newest as_of
    # wins, as the stores write) is the reference value as of its as_of, never older
    # than the entity's newest event; drained, it is the reference's last row.
    events = demo_events(1_500, in_order=False)
    order = list(range(events.num_rows))
    order.append(order.pop(7))  # one event 2 days late: reported, not applied
    shuffled = events.take(pa.array(order))
    rows, dlq, late = run(plan, messages(shuffled), workers, ["user_spend"], emit=Emit.LATEST, drain=drain)
    assert dlq == []
    assert len(late) == 1
    view = plan.view("user_spend")
    accepted = shuffled.slice(0, events.num_rows - 1)
    reference = reference_changelog(view, accepted.to_pandas(), with_scale=True).to_pylist()
    history: dict[Any, list[dict[str, Any]]] = {}
    for row in reference:  # sorted by entity, then as_of
        history.setdefault(row["user_id"], []).append(row)
    newest: dict[Any, Any] = {}
    users, moments = accepted.column("user_id").to_pylist(), accepted.column("event_time").to_pylist()
    for user, moment in zip(users, moments, strict=True):
        newest[user] = max(newest.get(user, moment), moment)
    served: dict[Any, tuple[int, tuple[Any, ...]]] = {}
    for entity, as_of, values in rows_of(rows):
        if entity not in served or as_of >= served[entity][0]:
            served[entity] = (as_of, values)
    assert sorted(served) == sorted(history)
    kinds = {f.name: f.kind for f in view.features}
    for user, (as_of, values) in served.items():
        assert as_of >= to_micros(newest[user])
        if drain:
            assert as_of == to_micros(history[user][-1]["as_of"])
        expected = [r for r in history[user] if to_micros(r["as_of"]) <= as_of][-1]
        for name, value in zip(view.feature_names, values, strict=True):
            scale = expected.get(f"_scale_{name}") or 0.0
            assert values_match(expected[name], value, kind=kinds[name], scale=scale), (user, as_of, name)


def test_rows_reach_a_real_online_store(plan: Plan, tmp_path: Path) -> None:
    events = demo_events(400, in_order=True)
    view = plan.view("user_spend")
    store_path = tmp_path / "online.sqlite"
    flow = build_dataflow(
        plan,
        lambda flow, source: __import__("bytewax.operators", fromlist=["input"]).input(
            "in", flow, TestingSource(messages(events), batch_size=50)
        ),
        Outputs(OnlineSink(StoreFactory(None, store_path), plan.views), TestingSink([]), TestingSink([])),
        views=["user_spend"],
    )
    run_main(flow)
    expected = last_per_entity(reference_changelog(view, events.to_pandas()), view)
    store = SqliteOnlineStore(store_path)
    users = expected.column("user_id").to_pylist()
    for user, raw, as_of in zip(users, store.read(view, users), expected.column("as_of").to_pylist(), strict=True):
        assert raw is not None, user
        assert decode(view, raw)[0] == int(pa.scalar(as_of).cast(pa.int64()).as_py())


@pytest.mark.parametrize("emit", [Emit.LATEST, Emit.CHANGELOG])
def test_a_snapshot_is_the_state_of_its_epoch_not_of_later_ones(emit: Emit) -> None:
    """Bytewax keeps a shard's snapshot and pickles it later, possibly after the shard
    applied the next epoch's events. A restart resumes from the snapshot with the
    offsets of its epoch and reads those events again: they must not be in it already,
    or every count and sum they touch is doubled until its window moves on."""
    from datetime import timedelta

    from featurestore.transforms import prepare_events
    from pipelines.stream.dataflow import _ShardLogic
    from pipelines.stream.tiles import batch_from_frame
    from tests.unit.pipelines.test_kernel_parity import VIEWS
    from tests.unit.pipelines.test_reference import BASE
    from tests.unit.pipelines.test_stream_state import batch_progress

    view = VIEWS[1]
    frame = pd.DataFrame(
        {
            "user_id": pd.array([1, 1, 2, 1, 2], dtype="int64"),
            "value": [1.0, 2.0, 3.0, 4.0, 5.0],
            "amount": pd.array([10, None, 30, 40, 50], dtype="Int64"),
            "label": ["a", "b", None, "c", "a"],
            "event_time": pd.to_datetime([BASE + timedelta(seconds=s) for s in (0, 30, 60, 90, 120)], utc=True),
        }
    ).assign(_seq=range(5))
    frame["event_time"] = frame["event_time"].dt.as_unit("us")

    def epoch(low: int, high: int) -> list[Any]:
        part = frame.iloc[low:high]
        return [batch_from_frame(view, prepare_events(view, part), view.input_columns), *batch_progress(part)]

    def outputs(logic: Any, values: list[Any]) -> list[tuple[Any, ...]]:
        emitted, _ = logic.on_batch(values)
        return sorted(
            (entity, as_of, repr(values_))
            for kind, batch in emitted
            if kind == "row"
            for entity, as_of, values_ in batch.rows()
        )

    running = _ShardLogic(view, False, emit, None)
    outputs(running, epoch(0, 3))
    snapshot = running.snapshot()  # the end of epoch 1, kept by Bytewax ...
    first_run = outputs(running, epoch(3, 5))  # ... while epoch 2 runs, then the process dies
    resumed = _ShardLogic(view, False, emit, pickle.loads(pickle.dumps(snapshot)))  # what recovery hands back
    assert outputs(resumed, epoch(3, 5)) == first_run  # epoch 2 again: the same rows, nothing doubled


def test_dead_letters_and_late_events_go_to_their_own_sources_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    """With two sources, every dead letter went to the first source's `.dead-letters`."""
    import pipelines.stream.dataflow as dataflow

    sent: list[tuple[str, dict[str, Any]]] = []

    class Recording:
        def __init__(self, bootstrap: str, **config: Any) -> None:
            pass

        def send(self, topic: str, value: bytes) -> None:
            sent.append((topic, orjson.loads(value)))

        def flush(self) -> None:
            pass

    monkeypatch.setattr(dataflow, "Delivery", Recording)
    dead = dataflow.KafkaJsonSink("kafka:9092", suffix=".dead-letters").build("dlq", 0, 1)
    dead.write_batch([{"source": "payments", "topic": "payments", "reason": "x"},
                      {"source": "clicks", "topic": "web.clicks", "reason": "y"}])  # fmt: skip
    fixed = dataflow.KafkaJsonSink("kafka:9092", "one.topic").build("dlq", 0, 1)
    fixed.write_batch([{"topic": "payments"}])
    assert [topic for topic, _ in sent] == ["payments.dead-letters", "web.clicks.dead-letters", "one.topic"]


def test_ints_past_float_precision_in_a_micro_batch_with_a_null_are_exact() -> None:
    """A micro-batch whose int column held a null went through float64: 2**53 + 1 came out 2**53."""
    from featurestore import Last, Max, Min, Sum, feature_view
    from featurestore.plan import compile_definitions
    from featurestore.transforms import events_frame
    from tests.unit.pipelines.test_reference import BASE, SOURCE, USER, W10

    aggregations = [Last("amount"), Max("amount"), Min("amount"), Sum("amount")]

    @feature_view(entity=USER, source=SOURCE, aggregations=aggregations, windows=[W10])
    def ids(events: pd.DataFrame) -> pd.DataFrame:
        return events[[]]

    small_plan = compile_definitions("test", views=[ids])
    view = small_plan.views[0]
    big = 2**53 + 1
    events = pa.table(
        {
            "user_id": [1, 2, 1, 2, 1, 2],
            "value": [1.0] * 6,
            "amount": pa.array([big, None, big + 2, -big, None, 3], pa.int64()),
            "label": pa.array([None] * 6, pa.string()),
            "event_time": pa.array([BASE + i * pd.Timedelta(minutes=1) for i in range(6)], pa.timestamp("us", "UTC")),
        }
    )
    rows, dlq, late = run(small_plan, messages(events), 1, [view.name])
    assert (dlq, late) == ([], [])
    produced = as_changelog(view, rows_of(rows, view.name))
    assert produced.slice(0, 1).to_pylist()[0]["last_amount_10m"] == big
    expected = reference_changelog(view, events_frame(events))
    assert produced.to_pylist() == expected.to_pylist()  # exact, not within a tolerance


@pytest.mark.parametrize("emit", [Emit.LATEST, Emit.CHANGELOG])
def test_a_snapshot_of_another_version_of_the_view_is_refused_not_resumed(emit: Emit) -> None:
    """After `tenx apply` changed a view, a job resumed from the same recovery store
    computed the snapshot's definition and wrote it under the new version's keys."""
    from featurestore.errors import ConfigError
    from pipelines.stream.dataflow import _ShardLogic
    from tests.unit.pipelines.test_kernel_parity import VIEWS

    old, new = VIEWS[0], VIEWS[1]  # the same view name, other windows
    assert old.name == new.name
    assert old.version != new.version
    snapshot = _ShardLogic(old, False, emit, None).snapshot()
    assert _ShardLogic(old, False, emit, snapshot).state.view.version == old.version
    with pytest.raises(
        ConfigError, match=f"holds view `view` version {old.version}, the plan runs version {new.version}"
    ):
        _ShardLogic(new, False, emit, snapshot)


def test_std_of_ints_whose_micro_batch_sum_passes_int64_matches_the_reference() -> None:
    """One tile's sum of a micro-batch (2**62 + 2**62) wrapped in int64 before the
    moments were merged: Std came out 7.5e18 instead of 4.3e18."""
    from featurestore import Mean, Std
    from featurestore.transforms import events_frame
    from tests.unit.pipelines.test_reference import make_view

    view = make_view(Mean("amount"), Std("amount"))
    small_plan = Plan(project="test", entities=(), sources=(view.source,), views=(view,))
    big = 2**62
    events = pa.table(
        {
            "user_id": [1, 1, 1],
            "value": [1.0] * 3,
            "amount": pa.array([big, big, -big], pa.int64()),
            "label": pa.array([None] * 3, pa.string()),
            "event_time": pa.array(
                [pd.Timestamp("2026-01-01T00:00:00Z") + pd.Timedelta(minutes=m) for m in (0, 1, 6)],  # 2 tiles
                pa.timestamp("us", "UTC"),
            ),
        }
    )
    # What `tenx stream` runs (Emit.LATEST, the tiles), all events in one micro-batch.
    rows, dlq, _ = run(small_plan, messages(events), 1, [view.name], emit=Emit.LATEST, drain=False)
    assert dlq == []
    reference = reference_changelog(view, events_frame(events), with_scale=True).to_pylist()
    served = rows_of(rows, view.name)
    assert served
    for _, as_of, values in served:
        expected = [r for r in reference if to_micros(r["as_of"]) <= as_of][-1]
        for feature, value in zip(view.features, values, strict=True):
            scale = expected.get(f"_scale_{feature.name}") or 0.0
            assert values_match(expected[feature.name], value, kind=feature.kind, scale=scale), (as_of, feature.name)
