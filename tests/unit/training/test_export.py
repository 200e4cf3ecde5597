"""Training export: the value at each label time equals the reference engine's, every
label row comes back once and in order, and mistakes get clear errors."""

from __future__ import annotations

import bisect
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings

from featurestore.plan import AS_OF, Plan, compile_repo
from featurestore.semantics import values_match
from featurestore.stores.offline import DeltaOfflineStore
from pipelines.batch.engine import backfill, dask_client
from pipelines.ingest import ingest_file
from pipelines.reference import reference_changelog
from tenx.demo_data import DemoConfig, write_demo_data
from training import LabelError, export_training_set

ROOT = Path(__file__).resolve().parents[3]
FEATURES = [
    "user_spend:count_1h",
    "user_spend:sum_amount_eur_1d",
    "user_spend:mean_amount_eur_7d",
    "user_spend:last_amount_eur_1d",
    "user_spend:std_amount_eur_1h",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, DeltaOfflineStore, pa.Table, pa.Table]:
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    root = tmp_path_factory.mktemp("export")
    write_demo_data(root / "tx.parquet", DemoConfig(events=2_500, users=30, merchants=10, days=3, seed=3))
    store = DeltaOfflineStore(root / "offline")
    ingest_file(store, plan.source("transactions"), root / "tx.parquet")
    with dask_client(None, workers=2) as client:
        backfill(plan, store, client=client)
    events = store.read_events(plan.source("transactions"))
    reference = reference_changelog(plan.view("user_spend"), events.to_pandas())
    return plan, store, events, reference


_BY_USER: dict[int, dict[int, list[dict[str, Any]]]] = {}


def value_at(reference: pa.Table, user: int, moment: datetime, name: str, kind: str) -> Any:
    """The reference's value as of `moment`: its last changelog row at or before it."""
    by_user = _BY_USER.setdefault(id(reference), {})
    if not by_user:
        for row in reference.to_pylist():  # sorted by user, then as_of
            by_user.setdefault(row["user_id"], []).append(row)
    rows = by_user.get(user, [])
    position = bisect.bisect_right([r[AS_OF] for r in rows], moment)
    if position == 0:
        return 0 if kind == "count" else (0.0 if kind == "sum" else None)
    return rows[position - 1][name]


@st.composite
def label_sets(draw: Any, events: pa.Table, reference: pa.Table) -> pd.DataFrame:
    times = events.column("event_time").to_pylist()
    expiries = reference.column(AS_OF).to_pylist()
    first = min(times)
    moments = st.one_of(
        st.sampled_from(times),  # exactly at an event
        st.sampled_from(expiries),  # exactly at a change point (expiry)
        st.sampled_from(times).map(lambda t: t - timedelta(microseconds=1)),
        st.just(first - timedelta(days=1)),  # before any history
        st.just(max(expiries) + timedelta(days=3)),  # after everything expired
        st.integers(0, 4 * 86_400).map(lambda s: first + timedelta(seconds=s)),
    )
    size = draw(st.integers(1, 25))
    return pd.DataFrame(
        {
            "user_id": draw(st.lists(st.integers(1, 32), min_size=size, max_size=size)),  # 31, 32: no history
            "timestamp": pd.to_datetime(draw(st.lists(moments, min_size=size, max_size=size)), utc=True),
            "label": draw(st.lists(st.booleans(), min_size=size, max_size=size)),
        }
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_export_equals_reference_at_every_label_time(world: Any, data: Any) -> None:
    plan, store, events, reference = world
    labels = data.draw(label_sets(events, reference))
    table, summary = export_training_set(plan, store, labels, FEATURES, chunk_rows=7)
    assert summary.rows_in == summary.rows_out == len(labels) == table.num_rows
    assert table.column("label").to_pylist() == labels["label"].tolist()  # order and extra columns kept
    view = plan.view("user_spend")
    for index, row in enumerate(table.to_pylist()):
        user, moment = labels["user_id"][index], labels["timestamp"][index].to_pydatetime()
        for reference_name in FEATURES:
            name = reference_name.split(":")[1]
            expected = value_at(reference, user, moment, name, view.feature(name).kind)
            assert values_match(expected, row[name], kind=view.feature(name).kind), (user, moment, name)


def test_duplicates_order_and_manifest(world: Any, tmp_path: Path) -> None:
    plan, store, events, _ = world
    moment = events.column("event_time")[100].as_py()
    labels = pa.table(
        {
            "user_id": pa.array([5, 5, 31, 5], pa.int64()),
            "merchant_id": pa.array([1, 2, 3, 4], pa.int64()),
            "timestamp": pa.array([moment, moment, moment, moment - timedelta(days=9)], pa.timestamp("us", tz="UTC")),
            "target": [1, 0, 1, 1],
        }
    )
    out = tmp_path / "train.parquet"
    table, _ = export_training_set(plan, store, labels, ["user_spend:count_1d", "merchant_sales:*"], out=out)
    assert table is None
    written = pq.read_table(out)
    assert written.column("target").to_pylist() == [1, 0, 1, 1]
    assert written.column("user_spend__count_1d").to_pylist()[2:] == [0, 0]  # no history yet: Count 0
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["label_rows_in"] == manifest["label_rows_out"] == 4
    assert manifest["plan_version"] == plan.version
    assert "merchant_sales:count_1h" in manifest["features"]


def test_max_age_blanks_old_values_explicitly(world: Any) -> None:
    plan, store, events, _ = world
    last = max(events.column("event_time").to_pylist())
    labels = pa.table({"user_id": pa.array([1], pa.int64()), "timestamp": pa.array([last + timedelta(days=30)])})
    table, _ = export_training_set(plan, store, labels, ["user_spend:count_7d"], max_age=86_400_000_000)
    assert table.to_pylist()[0]["user_spend__stale"] is True
    assert table.to_pylist()[0]["count_7d"] is None
    fresh, _ = export_training_set(plan, store, labels, ["user_spend:count_7d"])
    assert fresh.to_pylist()[0]["count_7d"] == 0  # the window emptied long ago


@pytest.mark.parametrize(
    ("labels", "features", "message"),
    [
        (
            pa.table({"user_id": pa.array([], pa.int64()), "timestamp": pa.array([], pa.timestamp("us", "UTC"))}),
            ["user_spend:count_1h"],
            "the label table is empty; nothing to export",
        ),
        (
            pa.table({"user_id": [1], "timestamp": pa.array([datetime(2026, 1, 1)])}),
            ["user_spend:count_1h"],
            "label column `timestamp` has timestamps without a timezone; localize them to UTC",
        ),
        (
            pa.table({"user_id": [1], "timestamp": ["2026-01-01"]}),
            ["user_spend:count_1h"],
            "label column `timestamp` is string, expected a timestamp with a timezone",
        ),
        (
            pa.table({"uid": [1], "timestamp": pa.array([datetime(2026, 1, 1, tzinfo=UTC)])}),
            ["user_spend:count_1h"],
            "label table has no entity column `user_id` for view `user_spend`",
        ),
        (
            pa.table({"user_id": [1], "timestamp": pa.array([datetime(2026, 1, 1, tzinfo=UTC)])}),
            ["user_spend:count_1hr"],
            "unknown feature 'user_spend:count_1hr'; did you mean user_spend:count_1h",
        ),
    ],
)
def test_clear_errors(world: Any, labels: pa.Table, features: list[str], message: str) -> None:
    plan, store, _, _ = world
    with pytest.raises(LabelError) as raised:
        export_training_set(plan, store, labels, features)
    assert str(raised.value).startswith(message)


def test_a_view_without_changelog_files_gives_empty_windows(tmp_path: Path) -> None:
    # A backfill over a range without events commits a table with no files.
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    view = plan.view("user_spend")
    store = DeltaOfflineStore(tmp_path / "offline")
    store.write_changelog(view, [], start=1_767_225_600_000_000, end=1_767_312_000_000_000)
    labels = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "timestamp": pa.array([1_767_225_600_000_001] * 2, pa.timestamp("us", tz="UTC")),
        }
    )
    table, summary = export_training_set(plan, store, labels, ["user_spend:count_1d", "user_spend:mean_amount_eur_1d"])
    assert table is not None
    assert summary.rows_out == 2
    assert table.column("count_1d").to_pylist() == [0, 0]
    assert table.column("mean_amount_eur_1d").to_pylist() == [None, None]


def test_chunked_export_equals_one_chunk_in_any_machine_zone(world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chunks go through scratch Parquet files, one chunk straight from DuckDB:
    the same table either way (values and types), and times in UTC on a machine that
    is not."""
    import time as clock

    plan, store, events, _ = world
    monkeypatch.setenv("TZ", "America/New_York")
    clock.tzset()
    try:
        times = events.column("event_time").take(pa.array(range(0, events.num_rows, max(1, events.num_rows // 50))))
        users = pa.array(([5, 31, 7] * len(times))[: len(times)], pa.int64())
        merchants = pa.array([1] * len(times), pa.int64())
        labels = pa.table({"user_id": users, "merchant_id": merchants, "timestamp": times})
        features = ["user_spend:count_1d", "user_spend:last_amount_eur_1d", "merchant_sales:count_1h"]
        whole, _ = export_training_set(plan, store, labels, features, max_age=3_600_000_000)
        chunked, _ = export_training_set(plan, store, labels, features, max_age=3_600_000_000, chunk_rows=7)
    finally:
        monkeypatch.undo()
        clock.tzset()
    assert whole is not None
    assert chunked is not None
    assert chunked.schema == whole.schema
    assert chunked.equals(whole)
    assert whole.schema.field("user_spend__as_of").type == pa.timestamp("us", tz="UTC")


def test_scratch_files_go_when_the_export_fails(world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    plan, store, events, _ = world
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    times = events.column("event_time").slice(0, 20)
    labels = pa.table({"user_id": pa.array([5] * 20, pa.int64()), "timestamp": times})

    def fail(rows: int) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "out" / "train.parquet"
    with pytest.raises(KeyboardInterrupt) as caught:
        export_training_set(plan, store, labels, ["user_spend:count_1d"], chunk_rows=5, progress=fail, out=out)
    # The traceback (kept here, as a notebook keeps the last one) holds the export's frames.
    assert caught.traceback
    assert not list(tmp_path.glob("tenx-export-*"))
    # No file that looks like a training set but holds 5 of the 20 rows.
    assert list(out.parent.iterdir()) == []
    export_training_set(plan, store, labels, ["user_spend:count_1d"], chunk_rows=5, out=out)
    assert pq.read_table(out).num_rows == 20
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.parquet", "train.parquet.manifest.json"]


def test_each_view_says_found_missing_or_stale_as_the_online_client_does(world: Any) -> None:
    # A training set must tell "no history yet" (empty-window values) from real zeros.
    plan, store, events, _ = world
    view = plan.view("user_spend")  # ttl 2d
    first = min(events.column("event_time").to_pylist())
    user = events.column("user_id")[0].as_py()
    last_of_user = max(
        t
        for u, t in zip(events.column("user_id").to_pylist(), events.column("event_time").to_pylist(), strict=True)
        if u == user
    )
    moments = [
        first - timedelta(days=1),  # before any history: missing
        last_of_user + timedelta(minutes=1),  # just after its last event: found
        last_of_user + timedelta(days=30),  # the 7d window emptied at +7d, a row then: older than the ttl
    ]
    labels = pa.table(
        {"user_id": pa.array([user] * 3, pa.int64()), "timestamp": pa.array(moments, pa.timestamp("us", tz="UTC"))}
    )
    table, _ = export_training_set(plan, store, labels, ["user_spend:count_7d"])
    assert table.column("user_spend__status").to_pylist() == ["missing", "found", "stale"]
    assert table.column("count_7d").to_pylist()[0] == 0  # the empty-window value, marked missing
    assert view.ttl == 2 * 86_400_000_000
    # With --max-age: before the first row is still `missing` (nothing blanked: __stale False, zeros).
    aged, _ = export_training_set(plan, store, labels, ["user_spend:count_7d"], max_age=86_400_000_000)
    assert aged.column("user_spend__status").to_pylist() == ["missing", "found", "stale"]
    assert aged.column("user_spend__stale").to_pylist() == [False, False, True]
    assert aged.column("count_7d").to_pylist() == [0, table.column("count_7d")[1].as_py(), None]


def test_the_label_time_column_keeps_its_type_and_time_zone(world: Any) -> None:
    plan, store, events, _ = world
    moment = events.column("event_time")[50].as_py()
    paris = pa.array([moment, moment + timedelta(hours=1)], pa.timestamp("ns", tz="Europe/Paris"))
    labels = pa.table({"user_id": pa.array([1, 2], pa.int64()), "timestamp": paris})
    table, _ = export_training_set(plan, store, labels, ["user_spend:count_1d"])
    assert table.schema.field("timestamp").type == pa.timestamp("ns", tz="Europe/Paris")
    assert table.column("timestamp").equals(labels.column("timestamp"))
    utc = labels.set_column(1, "timestamp", paris.cast(pa.timestamp("us", tz="UTC")))
    same, _ = export_training_set(plan, store, utc, ["user_spend:count_1d"])
    assert same.column("count_1d").equals(table.column("count_1d"))  # joined on the same instants


def test_labels_with_narrower_int_keys_and_nanosecond_times_are_joined_not_refused(world: Any) -> None:
    """A DataFrame's int32 ids and pandas' nanosecond times used to be refused (a type
    error, a raw ArrowInvalid): ids widen, and a label time is floored to its
    microsecond (it sees what was known then)."""
    plan, store, events, _ = world
    moment = pd.Timestamp(events.column("event_time")[100].as_py())
    frame = pd.DataFrame(
        {
            "user_id": pd.array([5, 7], dtype="int32"),
            "timestamp": pd.to_datetime([moment + pd.Timedelta(nanoseconds=789)] * 2, utc=True).as_unit("ns"),
        }
    )
    got, _ = export_training_set(plan, store, frame, ["user_spend:count_1d"])
    floored = pa.table(
        {"user_id": pa.array([5, 7], pa.int64()), "timestamp": pa.array([moment] * 2, pa.timestamp("us", tz="UTC"))}
    )
    expected, _ = export_training_set(plan, store, floored, ["user_spend:count_1d"])
    assert got.column("count_1d").to_pylist() == expected.column("count_1d").to_pylist()
    assert got.column("timestamp").type == pa.timestamp("ns", tz="UTC")  # returned as given


def test_string_keys_from_pandas_3_and_polars_are_joined_as_strings() -> None:
    """pandas 3 and polars hand strings to Arrow as large_string / string_view; a
    string-keyed view refused them ("is large_string, expected string")."""
    from featurestore import Count, Entity, Source, Window, feature_view
    from featurestore.plan import compile_definitions
    from schemas import EventSchema, Field
    from training.export import _check_labels, _with_key_types, parse_features

    schema = EventSchema(
        "clicks",
        [Field("page", "string"), Field("event_time", "timestamp[us, UTC]")],
        event_time="event_time",
        entity_keys=["page"],
    )

    page = Entity("page", key="page", dtype="string")

    @feature_view(entity=page, source=Source("clicks", schema), aggregations=[Count()], windows=[Window("1h")])
    def pages(events: pd.DataFrame) -> pd.DataFrame:
        return events[[]]

    plan = compile_definitions("test", views=[pages])
    requests = parse_features(plan, ["pages:count_1h"])
    for string_type in (pa.large_string(), pa.string_view()):
        labels = pa.table(
            {"page": pa.array(["a", "b"], string_type), "timestamp": pa.array([0, 1], pa.timestamp("us", "UTC"))}
        )
        normalized = _with_key_types(labels, requests)
        assert normalized.schema.field("page").type == pa.string()
        _check_labels(normalized, requests, "timestamp")  # refused before


def test_digit_only_string_keys_in_a_csv_are_read_as_strings(tmp_path: Path) -> None:
    """pyarrow infers int64 for a CSV column of digits: labels of a string-keyed view
    (account numbers, zip codes) were refused ("is int64, expected string"), and
    leading zeros would have been lost."""
    from featurestore import Count, Entity, Source, Window, feature_view
    from featurestore.plan import compile_definitions
    from schemas import EventSchema, Field

    schema = EventSchema(
        "clicks",
        [Field("page", "string"), Field("event_time", "timestamp[us, UTC]")],
        event_time="event_time",
        entity_keys=["page"],
    )

    @feature_view(entity=Entity("page", key="page", dtype="string"), source=Source("clicks", schema),
                  aggregations=[Count()], windows=[Window("1h")])  # fmt: skip
    def pages(events: pd.DataFrame) -> pd.DataFrame:
        return events[[]]

    plan = compile_definitions("test", views=[pages])
    store = DeltaOfflineStore(tmp_path / "offline")
    store.write_changelog(plan.view("pages"), [], start=1_767_225_600_000_000, end=1_767_312_000_000_000)
    path = tmp_path / "labels.csv"
    path.write_text("page,timestamp,target\n007,2026-01-01T00:00:01Z,1\n42,2026-01-01T00:00:02Z,0\n")
    table, _ = export_training_set(plan, store, path, ["pages:count_1h"])
    assert table is not None
    assert table.column("page").to_pylist() == ["007", "42"]
    assert table.column("count_1h").to_pylist() == [0, 0]
    # A CSV pyarrow cannot read is a LabelError that names the file, not an ArrowInvalid.
    broken = tmp_path / "broken.csv"
    broken.write_text("page,timestamp\n1,2026-01-01T00:00:01Z,extra\n")
    with pytest.raises(LabelError, match=r"label file .*broken\.csv: .*Expected 2 columns, got 3"):
        export_training_set(plan, store, broken, ["pages:count_1h"])


def test_label_columns_named_like_a_column_the_export_adds_are_refused(world: Any, tmp_path: Path) -> None:
    """Re-exporting an earlier training set wrote a second `user_spend__status` (or a
    second feature column): the Parquet file could not be read back by name, and pandas
    kept only one of the two."""
    plan, store, events, _ = world
    moment = events.column("event_time")[100].as_py()
    base = {"user_id": pa.array([5], pa.int64()), "timestamp": pa.array([moment], pa.timestamp("us", tz="UTC"))}
    for extra, features in (
        ("user_spend__status", ["user_spend:count_1d"]),
        ("user_spend__as_of", ["user_spend:count_1d"]),
        ("user_spend__count_1d", ["user_spend:count_1d", "merchant_sales:count_1h"]),
    ):
        labels = pa.table({**base, "merchant_id": pa.array([1], pa.int64()), extra: ["x"]})
        with pytest.raises(LabelError, match=rf"label column\(s\) `{extra}` have the name of a column the export adds"):
            export_training_set(plan, store, labels, features, out=tmp_path / "out.parquet")
        assert not (tmp_path / "out.parquet").exists()
    # `count_1d` in the labels and `user_spend__count_1d` too: the feature has no free name.
    labels = pa.table({**base, "count_1d": [7], "user_spend__count_1d": [8]})
    with pytest.raises(LabelError, match=r"`user_spend__count_1d` have the name of a column the export adds"):
        export_training_set(plan, store, labels, ["user_spend:count_1d"])


def test_train_reads_the_column_the_manifest_names_not_a_label_column_of_a_feature_like_name(
    world: Any, tmp_path: Path
) -> None:
    """A one-view export writes `count_1d`; a label column `user_spend__count_1d` (from an
    earlier multi-view export) won the lookup, so the model trained on it."""
    from training.train import feature_columns, read_manifest

    plan, store, events, _ = world
    moment = events.column("event_time")[100].as_py()
    labels = pa.table(
        {
            "user_id": pa.array([5, 6], pa.int64()),
            "timestamp": pa.array([moment, moment], pa.timestamp("us", tz="UTC")),
            "user_spend__count_1d": [-1, -1],
        }
    )
    out = tmp_path / "train.parquet"
    export_training_set(plan, store, labels, ["user_spend:count_1d"], out=out)
    manifest = read_manifest(out)
    assert manifest["feature_columns"] == {"user_spend:count_1d": "count_1d"}
    columns = pq.read_table(out).column_names
    assert feature_columns(manifest["features"], columns, manifest["feature_columns"]) == ["count_1d"]
