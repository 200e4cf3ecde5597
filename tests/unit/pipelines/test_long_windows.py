"""Windows of years over many entities: the batch kernel's (entity, time) int64 keys
would overflow, so it runs over groups of entities itself, with the same result."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings

import pipelines.batch.kernel as kernel
from featurestore import Count, Entity, Last, Mean, Source, Sum, Window, feature_view
from featurestore.errors import CompileError
from featurestore.plan import compile_definitions
from featurestore.semantics import changelog_differences
from featurestore.stores.offline import DeltaOfflineStore
from pipelines.batch.engine import backfill, dask_client
from pipelines.ingest import ingest_file
from pipelines.reference import reference_changelog
from schemas import EventSchema, Field
from tests.unit.pipelines.test_kernel_parity import VIEWS, logs

DAY = 86_400_000_000
TEN_YEARS = "3650d"

SCORES = EventSchema(
    "scores",
    [Field("user_id", "int64"), Field("f0", "float64", nullable=True), Field("ts", "timestamp[us, UTC]")],
    event_time="ts",
    entity_keys=["user_id"],
)


def long_view() -> Any:
    @feature_view(
        entity=Entity("user", key="user_id"),
        source=Source("scores", SCORES),
        aggregations=[Last("f0"), Sum("f0"), Count()],
        windows=[Window(TEN_YEARS)],
    )
    def scores(events: pd.DataFrame) -> pd.DataFrame:
        return events[[]]

    return compile_definitions("long", views=[scores])


@given(frame=logs(), view_index=st.integers(min_value=0, max_value=len(VIEWS) - 1))
@settings(max_examples=60, deadline=None)
def test_entity_groups_give_the_reference_changelog(frame: pd.DataFrame, view_index: int) -> None:
    # A key limit this small puts one or two entities in each group.
    view = VIEWS[view_index]
    original = kernel._KEY_LIMIT
    kernel._KEY_LIMIT = 25_000_000_000
    try:
        got = kernel.changelog_kernel(view, frame)
    finally:
        kernel._KEY_LIMIT = original
    expected = reference_changelog(view, frame, with_scale=True)
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, got, key="user_id", kinds=kinds) == []


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with dask_client(None, workers=2) as active:
        yield active


def test_a_ten_year_window_over_100k_entities_backfills(tmp_path: Path, client: Any) -> None:
    # The case: one row per entity, a 3,650-day window; it crashed with
    # "50002 entities ... do not fit one int64 search key".
    plan = long_view()
    view = plan.views[0]
    users = 100_000
    rng = np.random.default_rng(3)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    frame = pd.DataFrame(
        {
            "user_id": np.arange(users, dtype=np.int64),
            "f0": rng.normal(size=users).round(3),
            "ts": pd.Timestamp(start) + pd.to_timedelta(rng.integers(0, 20 * 86_400, users), unit="s"),
        }
    )
    frame["ts"] = frame["ts"].dt.as_unit("us")
    path = tmp_path / "scores.parquet"
    frame.to_parquet(path)
    store = DeltaOfflineStore(tmp_path / "offline")
    assert ingest_file(store, plan.source("scores"), path).ingested == users

    summary = backfill(plan, store, client=client)[0]

    got = store.read_changelog(view)
    assert summary.rows_written == got.num_rows == 2 * users  # the event, then its expiry ten years on
    rows = got.to_pandas().sort_values(["user_id", "as_of"]).reset_index(drop=True)
    at_event, at_expiry = rows.iloc[0::2].reset_index(drop=True), rows.iloc[1::2].reset_index(drop=True)
    assert (at_event["user_id"].to_numpy() == frame["user_id"].to_numpy()).all()
    assert (at_event["as_of"] == frame["ts"]).all()
    assert (at_event["last_f0_3650d"].to_numpy() == frame["f0"].to_numpy()).all()
    assert (at_event["count_3650d"] == 1).all()
    tile = frame["ts"].dt.floor("D")
    assert (at_expiry["as_of"] == tile + pd.Timedelta(days=3650)).all()
    assert at_expiry["last_f0_3650d"].isna().all()
    assert (at_expiry["count_3650d"] == 0).all()
    # and a sample of entities against the brute-force reference
    sample = frame[frame["user_id"] % 1_000 == 0]
    expected = reference_changelog(view, sample, with_scale=True)
    chosen = pa.Table.from_pandas(rows[rows["user_id"] % 1_000 == 0], preserve_index=False).cast(
        view.changelog_schema()
    )
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, chosen, key="user_id", kinds=kinds) == []


def test_windows_beyond_a_hundred_years_are_refused_at_compile_with_the_alternative() -> None:
    @feature_view(
        entity=Entity("user", key="user_id"),
        source=Source("scores", SCORES),
        aggregations=[Mean("f0")],
        windows=[Window("40000d")],
    )
    def forever(events: pd.DataFrame) -> pd.DataFrame:
        return events[[]]

    with pytest.raises(CompileError, match=r"window 40000d is longer than 36500d; .*Latest\(column\)"):
        compile_definitions("long", views=[forever])
