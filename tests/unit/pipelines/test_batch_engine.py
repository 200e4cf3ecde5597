"""The Dask batch engine end to end on real Delta tables: ingest, backfill, parity with
the reference, idempotent range replaces, partition counts that do not change results."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet
import pytest

from featurestore.plan import Plan, compile_repo
from featurestore.semantics import changelog_differences
from featurestore.stores.offline import DeltaOfflineStore, datetime_to_micros
from pipelines.batch.engine import backfill, backfill_view, dask_client
from pipelines.ingest import ingest_file
from pipelines.reference import reference_changelog
from tenx.demo_data import DemoConfig, write_demo_data

ROOT = Path(__file__).resolve().parents[3]
DAY = 86_400_000_000


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with dask_client(None, workers=2) as active:
        yield active


@pytest.fixture(scope="module")
def plan() -> Plan:
    return compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])


@pytest.fixture
def store(tmp_path: Path, plan: Plan) -> DeltaOfflineStore:
    events = tmp_path / "events.parquet"
    config = DemoConfig(events=3_000, users=40, merchants=15, days=3, seed=7, out_of_order=0.05)
    write_demo_data(events, config)
    offline = DeltaOfflineStore(tmp_path / "offline")
    summary = ingest_file(offline, plan.source("transactions"), events)
    assert (summary.ingested, summary.rejected) == (3_000, 0)
    return offline


def reference_for(plan: Plan, store: DeltaOfflineStore, name: str, **kwargs: Any) -> pa.Table:
    view = plan.view(name)
    events = store.read_events(view.source).to_pandas()
    return reference_changelog(view, events, with_scale=True, **kwargs)


def differences(plan: Plan, name: str, expected: pa.Table, got: pa.Table) -> list[str]:
    view = plan.view(name)
    kinds = {f.name: f.kind for f in view.features}
    return changelog_differences(expected, got, key=view.entity_key, kinds=kinds)


@pytest.mark.parametrize("partitions", [1, 2, 7])
def test_backfill_equals_reference_for_any_partition_count(
    plan: Plan, store: DeltaOfflineStore, client: Any, partitions: int
) -> None:
    summaries = backfill(plan, store, partitions=partitions, client=client)
    assert [s.view for s in summaries] == ["merchant_sales", "user_spend"]
    for summary in summaries:
        assert summary.events_read == 3_000
        got = store.read_changelog(plan.view(summary.view))
        assert got.num_rows == summary.rows_written
        assert differences(plan, summary.view, reference_for(plan, store, summary.view), got) == []


def test_shards_above_the_partition_size_run_in_time_slices_with_the_same_result(
    plan: Plan, store: DeltaOfflineStore, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hot entity lands whole in one shard; such a shard is computed in time slices,
    # each reading the longest window before its start (workers are threads here, so
    # the patched sizes reach them).
    import pipelines.batch.engine as engine

    monkeypatch.setattr(engine, "PARTITION_EVENTS", 150)
    monkeypatch.setattr(engine, "SLICE_EVENTS", 300)
    calls: list[int] = []
    kernel = engine.changelog_kernel

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[1]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(engine, "changelog_kernel", counting)
    summary = backfill(plan, store, views=["user_spend"], partitions=2, client=client)[0]
    assert len(calls) >= 10  # 2 shards of about 1,500 events, cut into slices of about 150
    # Each slice reads its own events and the 7 days before it (here: all earlier ones).
    assert min(calls) < 300
    got = store.read_changelog(plan.view("user_spend"))
    assert got.num_rows == summary.rows_written
    assert differences(plan, "user_spend", reference_for(plan, store, "user_spend"), got) == []


def test_backfill_twice_replaces_and_never_duplicates(plan: Plan, store: DeltaOfflineStore, client: Any) -> None:
    view = plan.view("user_spend")
    first = backfill(plan, store, views=["user_spend"], client=client)[0]
    before = store.read_changelog(view)
    second = backfill(plan, store, views=["user_spend"], partitions=3, client=client)[0]
    after = store.read_changelog(view)
    assert first.rows_written == second.rows_written == after.num_rows
    assert after.equals(before)
    assert store.changelog_dataset(view).count_rows() == before.num_rows


def test_ranges_written_separately_equal_one_backfill(plan: Plan, store: DeltaOfflineStore, client: Any) -> None:
    view = plan.view("user_spend")
    whole = backfill(plan, store, views=["user_spend"], client=client)[0]
    expected = store.read_changelog(view)
    middle = whole.start + DAY + 7 * 3_600_000_000 + 123  # not on a day or tile boundary
    # Overwrite the two halves again, separately: the table must not change.
    backfill(plan, store, views=["user_spend"], start=whole.start, end=middle, client=client)
    backfill(plan, store, views=["user_spend"], start=middle, end=whole.end, client=client)
    got = store.read_changelog(view)
    # The second range adds a row at its start for each entity with events before it
    # (the state it carries in); every other row is the whole backfill's, and an added
    # row holds the value the whole backfill's rows give at that time.
    at_middle = pc.equal(pc.cast(got.column("as_of"), pa.int64()), middle)
    anchors = got.filter(at_middle)
    assert anchors.num_rows > 0
    assert differences(plan, "user_spend", expected, got.filter(pc.invert(at_middle))) == []
    events = store.read_events(view.source)
    earlier = events.filter(pc.less(pc.cast(events.column("event_time"), pa.int64()), middle))
    assert sorted(anchors.column("user_id").to_pylist()) == sorted(set(earlier.column("user_id").to_pylist()))
    history: dict[Any, list[dict[str, Any]]] = {}
    for row in expected.to_pylist():  # sorted by entity, then as_of
        history.setdefault(row["user_id"], []).append(row)
    carried = [
        {**[r for r in history[user] if datetime_to_micros(r["as_of"]) <= middle][-1], "as_of": as_of}
        for user, as_of in zip(anchors.column("user_id").to_pylist(), anchors.column("as_of").to_pylist(), strict=True)
    ]
    assert differences(plan, "user_spend", pa.Table.from_pylist(carried, schema=expected.schema), anchors) == []


def test_a_first_range_backfill_answers_lookups_from_its_start(tmp_path: Path, client: Any) -> None:
    """A range backfill wrote rows only at change points inside the range: with no
    earlier rows (the first backfill of a view version, `tenx backfill --start`), a label
    between the start and an entity's next change found nothing (`missing`, an empty
    window), and a Latest value none at all until the entity's next event."""
    from featurestore import Count, Last, Latest
    from tests.unit.pipelines.test_reference import BASE_US, MINUTE, make_view

    windowed = make_view(Count(), Last("label"))
    latest = make_view(Latest("label"), windows=())
    events = pa.table(
        {
            "user_id": [1, 1, 2],
            "value": [1.0] * 3,
            "amount": pa.array([None] * 3, pa.int64()),
            "label": ["first", "second", "late"],
            "event_time": pa.array([BASE_US, BASE_US + 3 * MINUTE, BASE_US + 8 * MINUTE], pa.timestamp("us", "UTC")),
        }
    )
    path = tmp_path / "events.parquet"
    pa.parquet.write_table(events, path)
    store = DeltaOfflineStore(tmp_path / "offline")
    assert ingest_file(store, windowed.source, path).ingested == 3
    start = BASE_US + 4 * MINUTE  # after user 1's events, before user 2's
    for view, column in ((windowed, "last_label_10m"), (latest, "label")):
        backfill_view(view, store, client, start=start, end=BASE_US + 60 * MINUTE)
        got = store.read_changelog(view).to_pylist()
        first_of_user_1 = next(r for r in got if r["user_id"] == 1)
        assert datetime_to_micros(first_of_user_1["as_of"]) == start
        assert first_of_user_1[column] == "second"
        if view is windowed:
            assert first_of_user_1["count_10m"] == 2
        # user 2's first event is after the start: its first row is that event's
        assert datetime_to_micros(next(r for r in got if r["user_id"] == 2)["as_of"]) == BASE_US + 8 * MINUTE


def test_a_range_backfill_reads_history_before_its_start(plan: Plan, store: DeltaOfflineStore, client: Any) -> None:
    view = plan.view("user_spend")
    first, _ = store.event_time_range(view.source)  # type: ignore[misc]
    start = first + DAY + 5 * 3_600_000_000
    end = start + 6 * 3_600_000_000
    summary = backfill(plan, store, views=["user_spend"], start=start, end=end, client=client)[0]
    got = store.read_changelog(view, start, end)
    assert got.num_rows == summary.rows_written > 0
    expected = reference_for(plan, store, "user_spend", start=start, end=end)
    assert differences(plan, "user_spend", expected, got) == []
    times = pc.cast(got.column("as_of"), pa.int64())
    assert pc.min(times).as_py() >= start
    assert pc.max(times).as_py() < end


def test_ingest_rejects_bad_rows_with_reasons_and_skips_repeats(tmp_path: Path, plan: Plan) -> None:
    source = plan.source("transactions")
    events = tmp_path / "bad.jsonl"
    write_demo_data(events, DemoConfig(events=500, users=10, days=1, malformed=6))
    store = DeltaOfflineStore(tmp_path / "offline")
    summary = ingest_file(store, source, events)
    assert (summary.rows_in, summary.ingested, summary.rejected) == (506, 500, 6)
    rejects = store.read_rejects(source)
    assert rejects.num_rows == 6
    reasons = rejects.column("reason").to_pylist()
    assert any(r.startswith("invalid JSON:") for r in reasons)
    assert "field `amount`: expected float64, got str '12,50'" in reasons
    # The record is kept as it was read, broken JSON included, so nothing is lost.
    assert all('"bad-' in record for record in rejects.column("record").to_pylist())
    again = ingest_file(store, source, events)
    assert again.skipped
    assert store.count_events(source) == 500
    assert store.read_rejects(source).num_rows == 6


def test_csv_ingest_parses_text_and_rejects_bad_cells(tmp_path: Path, plan: Plan) -> None:
    source = plan.source("transactions")
    path = tmp_path / "tx.csv"
    path.write_text(
        "transaction_id,user_id,merchant_id,amount,currency,category,country,event_time\n"
        "t1,1,2,10.5,EUR,grocery,FR,2026-01-01T10:00:00Z\n"
        "t2,oops,2,3,EUR,grocery,FR,2026-01-01T10:01:00.5+01:00\n"
        "t3,1,2,7,EUR,grocery,FR,2026-01-01T10:02:00\n"
    )
    store = DeltaOfflineStore(tmp_path / "offline")
    summary = ingest_file(store, source, path)
    assert (summary.ingested, summary.rejected) == (1, 2)
    assert store.read_rejects(source).column("reason").to_pylist() == [
        "field `user_id`: expected int64, got 'oops'",
        "field `event_time`: expected timestamp[us, UTC] (ISO-8601 with timezone), got '2026-01-01T10:02:00'",
    ]
    events = store.read_events(source)
    assert events.column("event_time").to_pylist() == [datetime(2026, 1, 1, 10, tzinfo=UTC)]
    assert events.column("_seq").to_pylist() == [0]


HEADER = "transaction_id,user_id,merchant_id,amount,currency,category,country,event_time\n"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_ingest_rejects_events_from_the_future_as_the_stream_does(tmp_path: Path, plan: Plan, suffix: str) -> None:
    # A producer's clock in 2099 is not an event: beyond the source's max_future (5m)
    # ahead of the ingest clock it is rejected with the stream's reason, row number kept.
    source = plan.source("transactions")
    rows = [
        ("t1", "oops", "2026-01-01T10:00:00Z"),
        ("t2", "1", "2026-01-01T10:04:59Z"),  # 4m59s ahead of the clock below: accepted
        ("t3", "1", "2099-12-31T00:00:00Z"),
        ("t4", "1", "2026-01-01T09:00:00Z"),
    ]
    path = tmp_path / f"tx{suffix}"
    if suffix == ".csv":
        path.write_text(HEADER + "".join(f"{t},{u},2,1.5,EUR,grocery,FR,{time}\n" for t, u, time in rows))
    else:
        fields = {"merchant_id": 2, "amount": 1.5, "currency": "EUR", "category": "grocery", "country": "FR"}
        records = [
            {"transaction_id": t, "user_id": int(u) if u.isdigit() else u, **fields, "event_time": time}
            for t, u, time in rows
        ]
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    store = DeltaOfflineStore(tmp_path / "offline")
    summary = ingest_file(store, source, path, clock=lambda: datetime(2026, 1, 1, 10, tzinfo=UTC))
    assert (summary.ingested, summary.rejected) == (2, 2)
    rejects = store.read_rejects(source).sort_by("row").to_pylist()
    assert [r["row"] for r in rejects] == [0, 2]
    assert rejects[1]["reason"] == (
        "field `event_time`: 2099-12-31T00:00:00+00:00 is more than 5m ahead of the processing clock "
        "(max_future of source `transactions`); check the producer's clock"
    )
    assert "t3" in rejects[1]["record"]
    assert sorted(store.read_events(source).column("transaction_id").to_pylist()) == ["t2", "t4"]


def test_events_already_in_the_table_are_refused_not_counted_twice(tmp_path: Path, plan: Plan) -> None:
    from pipelines.ingest import DuplicateEventsError

    source = plan.source("transactions")
    store = DeltaOfflineStore(tmp_path / "offline")
    first = tmp_path / "monday.csv"
    first.write_text(
        HEADER + "t1,1,2,10.5,EUR,grocery,FR,2026-01-01T10:00:00Z\nt2,1,2,3,USD,grocery,FR,2026-01-01T11:00:00Z\n"
    )
    ingest_file(store, source, first)
    # An overlapping export: one event already ingested, one new.
    overlap = tmp_path / "monday-again.csv"
    overlap.write_text(
        HEADER + "t2,1,2,3,USD,grocery,FR,2026-01-01T11:00:00Z\nt3,1,2,4,EUR,grocery,FR,2026-01-01T12:00:00Z\n"
    )
    with pytest.raises(DuplicateEventsError, match="1 of its 2 valid events are already in the events table"):
        ingest_file(store, source, overlap)
    with pytest.raises(DuplicateEventsError, match="2 of its 2 valid events"):
        ingest_file(store, source, first, force=True)
    assert store.count_events(source) == 2  # nothing written by the refused files
    assert ingest_file(store, source, overlap, allow_duplicates=True).ingested == 2
    assert store.count_events(source) == 4
    # Same times, one field different: a distinct event, ingested.
    other = tmp_path / "other.csv"
    other.write_text(HEADER + "t1,1,2,10.75,EUR,grocery,FR,2026-01-01T10:00:00Z\n")
    assert ingest_file(store, source, other).ingested == 1


def test_skip_duplicates_stores_only_the_new_events_and_counts_the_rest(tmp_path: Path, plan: Plan) -> None:
    # A corrected rejects file: most rows were ingested before, a few are new.
    source = plan.source("transactions")
    store = DeltaOfflineStore(tmp_path / "offline")
    first = tmp_path / "first.csv"
    rows = [f"t{n},1,2,{n}.5,EUR,grocery,FR,2026-01-01T10:{n:02d}:00Z\n" for n in range(40)]
    first.write_text(HEADER + "".join(rows[:30]))
    ingest_file(store, source, first)
    corrected = tmp_path / "corrected.csv"
    corrected.write_text(HEADER + "".join(rows[25:]) + "bad,oops,2,1,EUR,grocery,FR,2026-01-01T11:00:00Z\n")
    summary = ingest_file(store, source, corrected, skip_duplicates=True)
    assert (summary.rows_in, summary.ingested, summary.rejected, summary.duplicates) == (16, 10, 1, 5)
    assert sorted(store.read_events(source).column("transaction_id").to_pylist(), key=lambda t: int(t[1:])) == [
        f"t{n}" for n in range(40)
    ]
    assert store.read_events(source).column("_seq").to_pylist() == sorted(set(range(40)))


def test_a_csv_file_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path, plan: Plan) -> None:
    from featurestore.errors import TerminalError

    source = plan.source("transactions")
    store = DeltaOfflineStore(tmp_path / "offline")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes((HEADER + "t1,1,2,10.5,EUR,caf\xe9,FR,2026-01-01T10:00:00Z\n").encode("latin-1"))
    with pytest.raises(TerminalError) as refused:
        ingest_file(store, source, latin1)
    assert str(refused.value) == (
        f"{latin1}: not UTF-8 text (in the block from row 0, column `category`); tenx reads CSV files as UTF-8: "
        "convert it first, e.g. `iconv -f latin1 -t utf-8 latin1.csv > latin1.utf8.csv`; nothing was ingested"
    )
    assert not store.events_path(source).local_path().exists()  # nothing written


def test_a_json_line_that_is_not_utf8_is_rejected_with_its_reason_not_rewritten(tmp_path: Path, plan: Plan) -> None:
    # Replacing the bad bytes would ingest a record that was never sent, and two
    # different keys (caf\xe9, caf\xe8) would become one entity; the stream dead-letters
    # such a line, so ingest must reject it too.
    source = plan.source("transactions")
    store = DeltaOfflineStore(tmp_path / "offline")
    path = tmp_path / "mixed.jsonl"
    good = b'{"transaction_id":"t1","user_id":1,"merchant_id":2,"amount":1.5,"currency":"EUR",'
    tail = b'"category":"grocery","country":"FR","event_time":"2026-01-01T10:00:00Z"}\n'
    path.write_bytes(good + tail + good.replace(b"t1", b"caf\xe9") + tail)
    summary = ingest_file(store, source, path)
    assert (summary.rows_in, summary.ingested, summary.rejected) == (2, 1, 1)
    rejects = store.read_rejects(source).to_pylist()
    assert [(r["row"], r["reason"]) for r in rejects] == [(1, "not UTF-8 text: byte 0xe9 at position 22")]
    assert '"caf\ufffd"' in rejects[0]["record"]
    assert store.read_events(source).column("transaction_id").to_pylist() == ["t1"]


def test_files_that_cannot_be_ingested_are_refused_before_anything_is_written(tmp_path: Path, plan: Plan) -> None:
    from featurestore.errors import TerminalError

    source = plan.source("transactions")
    store = DeltaOfflineStore(tmp_path / "offline")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TerminalError, match=r"empty\.csv: the file is empty"):
        ingest_file(store, source, empty)
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(HEADER.replace("amount", "amt") + "t1,1,2,10.5,EUR,grocery,FR,2026-01-01T10:00:00Z\n")
    with pytest.raises(TerminalError, match=r"missing column\(s\) `amount` \(the file has `amt`\)"):
        ingest_file(store, source, renamed)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(TerminalError, match=r"garbage\.parquet: not a readable parquet file"):
        ingest_file(store, source, garbage)
    assert store.read_rejects(source).num_rows == 0
    assert store.ingests(source) == []


def test_a_missing_nullable_column_reads_as_nulls(tmp_path: Path) -> None:
    from featurestore import Count
    from tests.unit.pipelines.test_reference import make_view

    source = make_view(Count()).source  # value, amount and label are nullable
    path = tmp_path / "no-label.csv"
    path.write_text("user_id,value,amount,event_time\n1,2.5,3,2026-01-01T10:00:00Z\n")
    store = DeltaOfflineStore(tmp_path / "offline")
    assert ingest_file(store, source, path).ingested == 1
    assert store.read_events(source).column("label").to_pylist() == [None]


def test_stores_under_paths_with_spaces_work(tmp_path: Path, plan: Plan, client: Any) -> None:
    from pipelines.ingest import DuplicateEventsError

    source = plan.source("transactions")
    events = tmp_path / "events.parquet"
    write_demo_data(events, DemoConfig(events=400, users=8, days=2, seed=3))
    store = DeltaOfflineStore(tmp_path / "my store (v1)")  # deltalake itself refuses ? [ in paths
    assert ingest_file(store, source, events).ingested == 400
    with pytest.raises(DuplicateEventsError, match="400 of its 400 valid events"):
        ingest_file(store, source, events, force=True)
    summary = backfill(plan, store, views=["user_spend"], client=client)[0]
    assert summary.rows_written == store.read_changelog(plan.view("user_spend")).num_rows > 0


def test_the_duplicate_check_reads_paths_with_glob_characters_literally(
    tmp_path: Path, plan: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from pipelines.ingest import DuplicateEventsError

    scratch = tmp_path / "tmp [a-z]*"  # DuckDB would read this as a pattern
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    source = plan.source("transactions")
    events = tmp_path / "events.parquet"
    write_demo_data(events, DemoConfig(events=200, users=5, days=1, seed=4))
    store = DeltaOfflineStore(tmp_path / "offline")
    ingest_file(store, source, events)
    with pytest.raises(DuplicateEventsError, match="200 of its 200 valid events"):
        ingest_file(store, source, events, force=True)


def test_a_csv_with_a_broken_line_is_refused_whole(tmp_path: Path, plan: Plan) -> None:
    from featurestore.errors import TerminalError

    source = plan.source("transactions")
    path = tmp_path / "broken.csv"
    good = "t{i},1,2,1.5,EUR,grocery,FR,2026-01-01T10:00:00Z\n"
    path.write_text(HEADER + good.format(i=1) + "t2,1,2,oops,too,many,fields,here,2026\n" + good.format(i=3))
    store = DeltaOfflineStore(tmp_path / "offline")
    with pytest.raises(TerminalError, match=r"broken\.csv: not a readable csv file"):
        ingest_file(store, source, path)
    assert store.ingests(source) == []


def test_ingest_reports_its_most_frequent_reject_reasons(tmp_path: Path, plan: Plan) -> None:
    source = plan.source("transactions")
    path = tmp_path / "naive.csv"
    path.write_text(HEADER + "".join(f"t{i},1,2,1,EUR,grocery,FR,2026-01-01T10:0{i}:00\n" for i in range(3)))
    summary = ingest_file(DeltaOfflineStore(tmp_path / "offline"), source, path)
    assert (summary.ingested, summary.rejected) == (0, 3)
    # One kind of mistake, three different bad values: one line, counted three times.
    assert len(summary.reasons) == 1
    reason, count = summary.reasons[0]
    assert count == 3
    assert "ISO-8601 with timezone), got '2026-01-01T10:00:00'" in reason


def test_sequence_numbers_continue_across_ingests(tmp_path: Path, plan: Plan) -> None:
    source = plan.source("transactions")
    store = DeltaOfflineStore(tmp_path / "offline")
    for seed in (1, 2):
        path = tmp_path / f"e{seed}.parquet"
        write_demo_data(path, DemoConfig(events=100, users=5, days=1, seed=seed))
        ingest_file(store, source, path)
    assert sorted(store.read_events(source).column("_seq").to_pylist()) == list(range(200))


def test_time_helpers_refuse_naive_datetimes() -> None:
    from featurestore.errors import TerminalError

    with pytest.raises(TerminalError, match="has no timezone"):
        datetime_to_micros(datetime(2026, 1, 1))


def test_a_key_lands_in_one_bucket_whatever_its_column_type() -> None:
    # A nullable int key reads as float64 in a row group holding a null, int64 elsewhere.
    import pandas as pd

    from pipelines.batch.backends import Backend
    from pipelines.batch.engine import bucket_ids

    as_int = bucket_ids(pd.DataFrame({"k": pd.array([5, 6, 7], "int64")}), "k", 8, Backend.PANDAS)
    as_float = bucket_ids(pd.DataFrame({"k": [5.0, 6.0, 7.0, float("nan")]}), "k", 8, Backend.PANDAS)
    nullable = bucket_ids(pd.DataFrame({"k": pd.array([5, 6, 7, None], "Int64")}), "k", 8, Backend.PANDAS)
    assert as_int.tolist() == as_float.tolist()[:3] == nullable.tolist()[:3]


def test_shuffle_folders_of_dead_backfills_on_this_host_are_removed(tmp_path: Path) -> None:
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    from pipelines.batch.engine import OWNER, _remove_abandoned_scratch

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    host = socket.gethostname()
    old = time.time() - 2 * 86_400

    def folder(name: str, owner: dict[str, Any], *, idle: bool = True) -> Path:
        made = tmp_path / name
        (made / "00001").mkdir(parents=True)
        (made / "00001" / "part.parquet").write_bytes(b"x")
        (made / OWNER).write_text(json.dumps(owner))
        if idle:
            for path in [*made.rglob("*"), made]:
                os.utime(path, (old, old))
        return made

    try:
        dead = folder("shuffle-a-1", {"host": host, "pid": dead_pid})
        live = folder("shuffle-b-2", {"host": host, "pid": alive.pid})
        recent = folder("shuffle-c-3", {"host": host, "pid": dead_pid}, idle=False)
        other_host = folder("shuffle-d-4", {"host": "gpu-" + host, "pid": dead_pid})
        unowned = tmp_path / "shuffle-e-5"
        unowned.mkdir()
        _remove_abandoned_scratch(tmp_path)
        assert not dead.exists()
        assert live.exists()  # its process runs
        assert recent.exists()  # written lately: maybe a process id of another container
        assert other_host.exists()
        assert unowned.exists()
    finally:
        alive.kill()
        alive.wait()


def test_ints_past_float_precision_in_a_column_with_nulls_are_exact(tmp_path: Path, client: Any) -> None:
    """Dask read such a row group as float64: 2**53 + 1 came out 2**53 (64-bit ids, Last of one)."""
    from featurestore import Last, Max, Min, Sum
    from featurestore.transforms import events_frame
    from tests.unit.pipelines.test_reference import BASE_US, MINUTE, make_view

    view = make_view(Last("amount"), Max("amount"), Min("amount"), Sum("amount"))
    big = 2**53 + 1
    amounts = [big, None, big + 2, -big, None, 3]
    events = pa.table(
        {
            "user_id": [1, 2, 1, 2, 1, 2],
            "value": [1.0] * 6,
            "amount": pa.array(amounts, pa.int64()),
            "label": pa.array([None] * 6, pa.string()),
            "event_time": pa.array([BASE_US + i * MINUTE for i in range(6)], pa.timestamp("us", tz="UTC")),
        }
    )
    path = tmp_path / "events.parquet"
    pa.parquet.write_table(events, path)
    store = DeltaOfflineStore(tmp_path / "offline")
    assert ingest_file(store, view.source, path).ingested == 6
    backfill_view(view, store, client, partitions=2)
    got = store.read_changelog(view)
    first = got.filter(pc.equal(got.column("user_id"), 1)).slice(0, 2).to_pylist()
    assert [(r["last_amount_10m"], r["max_amount_10m"], r["min_amount_10m"], r["sum_amount_10m"]) for r in first] == [
        (big, big, big, big),
        (big + 2, big + 2, big, 2 * big + 2),
    ]
    expected = reference_changelog(view, events_frame(store.read_events(view.source)))
    assert got.to_pylist() == expected.to_pylist()  # exact, not within a tolerance


def test_a_nullable_bool_all_null_in_one_partitions_slice_is_backfilled(tmp_path: Path, client: Any) -> None:
    """Each shuffle file took its types from its own rows: a bool column all null in the
    first file was Arrow's null type there, the shard's dataset took that schema, and the
    next file's bools failed the whole backfill (`Unsupported cast from bool to null`)."""
    from featurestore import Count, Entity, Last, Source, Window, feature_view
    from featurestore.plan import compile_definitions
    from schemas import EventSchema, Field
    from tests.unit.pipelines.test_reference import BASE_US

    schema = EventSchema(
        "flags",
        [Field("user_id", "int64"), Field("flag", "bool", nullable=True), Field("event_time", "timestamp[us, UTC]")],
        event_time="event_time",
        entity_keys=["user_id"],
    )

    @feature_view(entity=Entity("user", key="user_id"), source=Source("flags", schema),
                  aggregations=[Count(), Count("flag"), Last("flag")], windows=[Window("2d", every="1h")])  # fmt: skip
    def flagged(events: Any) -> Any:
        return events[[]]

    view = compile_definitions("test", views=[flagged]).views[0]
    hour = 3_600_000_000
    day_one = pa.table(  # no flag set yet: the first partition's files hold only nulls there
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "flag": pa.array([None, None], pa.bool_()),
            "event_time": pa.array([BASE_US, BASE_US + hour], pa.timestamp("us", tz="UTC")),
        }
    )
    day_two = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "flag": pa.array([True, False], pa.bool_()),
            "event_time": pa.array([BASE_US + DAY, BASE_US + DAY + hour], pa.timestamp("us", tz="UTC")),
        }
    )
    store = DeltaOfflineStore(tmp_path / "offline")
    for number, table in enumerate((day_one, day_two)):
        path = tmp_path / f"day{number}.parquet"
        pyarrow.parquet.write_table(table, path)
        assert ingest_file(store, view.source, path).ingested == 2
    backfill_view(view, store, client, partitions=2)
    got = store.read_changelog(view)
    expected = reference_changelog(view, store.read_events(view.source).to_pandas())
    assert changelog_differences(expected, got, key="user_id") == []
    last = {row["user_id"]: row["last_flag_2d"] for row in got.to_pylist() if row["count_flag_2d"] == 1}
    assert last == {1: True, 2: False}


def test_a_range_backfill_anchors_only_entities_whose_events_reach_its_start(tmp_path: Path, client: Any) -> None:
    """The engine reads events from `start` minus the view's reach; the reference added a
    row at `start` for every entity with any earlier event, so the two disagreed for an
    entity idle for longer than the widest window (its earlier backfill's expiry row
    already says its windows are empty)."""
    from featurestore import Count
    from tests.unit.pipelines.test_reference import BASE_US, MINUTE, make_view

    view = make_view(Count())  # one 10-minute window
    start = BASE_US + DAY
    events = pa.table(
        {
            "user_id": [1, 2],
            "value": [1.0, 1.0],
            "amount": pa.array([None, None], pa.int64()),
            "label": pa.array([None, None], pa.string()),
            "event_time": pa.array([BASE_US, start - 5 * MINUTE], pa.timestamp("us", "UTC")),  # idle a day; recent
        }
    )
    path = tmp_path / "events.parquet"
    pyarrow.parquet.write_table(events, path)
    store = DeltaOfflineStore(tmp_path / "offline")
    assert ingest_file(store, view.source, path).ingested == 2
    backfill_view(view, store, client, start=start, end=start + DAY)
    got = store.read_changelog(view)
    expected = reference_changelog(view, store.read_events(view.source).to_pandas(), start=start, end=start + DAY)
    assert changelog_differences(expected, got, key="user_id") == []
    assert sorted({row["user_id"] for row in got.to_pylist()}) == [2]


def test_a_source_schema_changed_after_its_table_was_made_is_named_by_ingest_and_backfill(
    tmp_path: Path, client: Any
) -> None:
    """A field added to the schema after events were ingested failed the next ingest
    with Delta's SchemaMismatchError and the backfill of the new view version with a
    KeyError deep in Dask; neither said the events table lacks the field."""
    from featurestore import Count, Sum
    from featurestore.errors import TerminalError
    from tests.unit.pipelines.test_reference import BASE_US, EVENTS, MINUTE, make_view

    old = make_view(Count())
    events = pa.table(
        {
            "user_id": [1, 2],
            "value": [1.0, 2.0],
            "amount": pa.array([None, None], pa.int64()),
            "label": pa.array([None, None], pa.string()),
            "event_time": pa.array([BASE_US, BASE_US + MINUTE], pa.timestamp("us", "UTC")),
        }
    )
    path = tmp_path / "events.parquet"
    pyarrow.parquet.write_table(events, path)
    store = DeltaOfflineStore(tmp_path / "offline")
    assert ingest_file(store, old.source, path).ingested == 2
    from featurestore import Entity, Source, feature_view
    from featurestore.plan import compile_definitions
    from schemas import EventSchema, Field

    grown = EventSchema("events", [*EVENTS.fields, Field("extra", "float64", nullable=True)],
                        event_time="event_time", entity_keys=["user_id"])  # fmt: skip

    @feature_view(entity=Entity("user", key="user_id"), source=Source("events", grown),
                  aggregations=[Sum("extra")], windows=["10m"])  # fmt: skip
    def extra(frame: Any) -> Any:
        return frame[[]]

    new = compile_definitions("test", views=[extra]).views[0]
    message = r"the events table of source `events` at .* lacks field\(s\) `extra`: its schema changed"
    more = tmp_path / "more.parquet"
    pyarrow.parquet.write_table(events.append_column("extra", pa.array([1.5, 2.5])), more)
    with pytest.raises(TerminalError, match=message):
        ingest_file(store, new.source, more)
    with pytest.raises(TerminalError, match=message + r".*Source\(\.\.\., table=\"events_v2\"\)"):
        backfill_view(new, store, client)
    backfill_view(old, store, client)  # the old definition still runs
    # A field dropped from the schema: ingest refuses the table (an append must match
    # it), a backfill reads only the fields it needs and runs.
    fewer = EventSchema("events", [f for f in EVENTS.fields if f.name != "label"],
                        event_time="event_time", entity_keys=["user_id"])  # fmt: skip

    @feature_view(entity=Entity("user", key="user_id"), source=Source("events", fewer),
                  aggregations=[Sum("value")], windows=["10m"])  # fmt: skip
    def value(frame: Any) -> Any:
        return frame[[]]

    narrow = compile_definitions("test", views=[value]).views[0]
    with pytest.raises(TerminalError, match=r"has field\(s\) `label` the schema no longer has"):
        ingest_file(store, narrow.source, more)
    assert backfill_view(narrow, store, client).rows_written > 0
