"""Materialize: the online value of every entity is the last changelog row (as of a time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from featurestore.plan import AS_OF, Plan, compile_repo
from featurestore.semantics import values_match
from featurestore.stores.codec import decode
from featurestore.stores.offline import DeltaOfflineStore
from featurestore.stores.online import SqliteOnlineStore
from pipelines.batch.engine import backfill, dask_client
from pipelines.ingest import ingest_file
from pipelines.materialize import latest_rows, materialize
from tenx.demo_data import DemoConfig, write_demo_data

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, DeltaOfflineStore]:
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    root = tmp_path_factory.mktemp("materialize")
    write_demo_data(root / "tx.parquet", DemoConfig(events=4_000, users=60, merchants=20, days=3))
    store = DeltaOfflineStore(root / "offline")
    ingest_file(store, plan.source("transactions"), root / "tx.parquet")
    with dask_client(None, workers=2) as client:
        backfill(plan, store, client=client)
    return plan, store


def last_rows(table: pa.Table, key: str, as_of: Any = None) -> dict[Any, dict[str, Any]]:
    if as_of is not None:
        table = table.filter(pc.less_equal(table.column(AS_OF), as_of))
    latest: dict[Any, dict[str, Any]] = {}
    for row in table.to_pylist():
        if row[key] not in latest or row[AS_OF] >= latest[row[key]][AS_OF]:
            latest[row[key]] = row
    return latest


@pytest.mark.parametrize("view_name", ["user_spend", "merchant_sales"])
def test_online_value_is_the_last_changelog_row(
    filled: tuple[Plan, DeltaOfflineStore], tmp_path: Path, view_name: str
) -> None:
    plan, offline = filled
    view = plan.view(view_name)
    online = SqliteOnlineStore(tmp_path / "online.sqlite")
    summary = materialize(view, offline, online)
    expected = last_rows(offline.read_changelog(view), view.entity_key)
    assert summary.entities == summary.written == len(expected)
    raws = online.read(view, list(expected))
    for (key, row), raw in zip(expected.items(), raws, strict=True):
        assert raw is not None
        as_of, values = decode(view, raw)
        assert as_of == int(pa.scalar(row[AS_OF]).cast(pa.int64()).as_py())
        for name, value in zip(view.feature_names, values, strict=True):
            assert values_match(row[name], value), (key, name, row[name], value)


def test_as_of_snapshot_never_moves_values_back(filled: tuple[Plan, DeltaOfflineStore], tmp_path: Path) -> None:
    plan, offline = filled
    view = plan.view("user_spend")
    changelog = offline.read_changelog(view)
    middle = pc.min(changelog.column(AS_OF)).value + 36 * 3_600_000_000
    online = SqliteOnlineStore(tmp_path / "online.sqlite")
    first = materialize(view, offline, online, as_of=middle)
    expected = last_rows(
        changelog, view.entity_key, pa.scalar(middle, pa.int64()).cast(changelog.schema.field(AS_OF).type)
    )
    assert first.entities == len(expected)
    latest = materialize(view, offline, online)
    assert latest.skipped == 0
    # Loading the older snapshot again changes nothing: every value there is newer.
    again = materialize(view, offline, online, as_of=middle)
    assert again.written == sum(
        1 for key, row in expected.items() if row[AS_OF] == last_rows(changelog, view.entity_key)[key][AS_OF]
    )
    assert again.skipped == again.entities - again.written


def rows_at_middle(view: Any, offline: DeltaOfflineStore) -> tuple[int, dict[Any, dict[str, Any]]]:
    """A time 36 h into the changelog, and each entity's last row at it."""
    changelog = offline.read_changelog(view)
    middle = pc.min(changelog.column(AS_OF)).value + 36 * 3_600_000_000
    at = pa.scalar(middle, pa.int64()).cast(changelog.schema.field(AS_OF).type)
    return middle, last_rows(changelog, view.entity_key, at)


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo"])
def test_the_as_of_cut_is_the_same_instant_in_any_machine_zone(
    filled: tuple[Plan, DeltaOfflineStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zone: str
) -> None:
    import time as clock

    plan, offline = filled
    view = plan.view("user_spend")
    middle, expected = rows_at_middle(view, offline)
    monkeypatch.setenv("TZ", zone)
    clock.tzset()
    try:
        got = pa.Table.from_batches(latest_rows(view, offline, as_of=middle))
    finally:
        monkeypatch.undo()
        clock.tzset()
    assert {key: row[AS_OF] for key, row in expected.items()} == dict(
        zip(got.column(view.entity_key).to_pylist(), got.column(AS_OF).to_pylist(), strict=True)
    )


def test_verify_reports_each_step_and_finds_a_changed_value(
    filled: tuple[Plan, DeltaOfflineStore], tmp_path: Path
) -> None:
    from featurestore.verify import STEPS, verify_view

    plan, offline = filled
    view = plan.view("user_spend")
    online = SqliteOnlineStore(tmp_path / "online.sqlite")
    materialize(view, offline, online)
    steps: list[str] = []
    report = verify_view(view, offline, online, sample=1_000, progress=steps.append)
    assert report.ok
    assert report.checked == 60
    assert len(steps) == STEPS
    assert steps[0].endswith("entities in the changelog")
    assert steps[-1] == "compared"
    # A value that differs from the changelog is found.
    latest = last_rows(offline.read_changelog(view), view.entity_key)
    row = next(iter(latest.values()))
    changed = pa.table(
        {**{name: [row[name]] for name in view.changelog_schema().names}, "count_7d": [row["count_7d"] + 1]},
        schema=view.changelog_schema(),
    )
    online.write(view, changed)
    assert [m.feature for m in verify_view(view, offline, online, sample=1_000).mismatches] == ["count_7d"]


def test_as_of_defaults_to_now_and_a_future_one_is_refused(
    filled: tuple[Plan, DeltaOfflineStore], tmp_path: Path
) -> None:
    # None loaded every row, a backfill's future expiry rows among them: served as if
    # already true, they also made the stream's writes (as of now) be refused as older.
    from datetime import timedelta

    from featurestore.errors import TerminalError
    from featurestore.stores.offline import micros_to_datetime

    plan, offline = filled
    view = plan.view("user_spend")
    middle, expected = rows_at_middle(view, offline)
    online = SqliteOnlineStore(tmp_path / "online.sqlite")
    clock = lambda: micros_to_datetime(middle)  # noqa: E731
    summary = materialize(view, offline, online, clock=clock)
    assert summary.entities == len(expected)
    raws = online.read(view, list(expected))
    assert [decode(view, raw)[0] for raw in raws if raw is not None] == [
        int(pa.scalar(row[AS_OF]).cast(pa.int64()).as_py()) for row in expected.values()
    ]
    with pytest.raises(TerminalError) as refused:
        materialize(view, offline, online, as_of=middle + 1, clock=clock)
    assert str(refused.value) == (
        f"view `user_spend`: as of {(micros_to_datetime(middle) + timedelta(microseconds=1)).isoformat()} is later "
        f"than now ({micros_to_datetime(middle).replace(microsecond=0).isoformat()}); the online store would get "
        "values from the future (a backfill's expiry rows) and refuse the stream job's writes as older until then: "
        "materialize as of now or an earlier time"
    )
    assert materialize(view, offline, online, as_of=middle, clock=clock).entities == len(expected)  # now itself
