"""Training export with label times in a zone with daylight saving time: the same
instants give the same rows as in UTC, the autumn's repeated hour included."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from featurestore.plan import Plan, compile_repo
from featurestore.stores.offline import DeltaOfflineStore
from pipelines.batch.engine import backfill, dask_client
from pipelines.ingest import ingest_file
from tenx.demo_data import DemoConfig, write_demo_data
from training import export_training_set

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, DeltaOfflineStore]:
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    root = tmp_path_factory.mktemp("export-zones")
    start = pd.Timestamp("2026-10-24T12:00:00Z").to_pydatetime()  # a day around the fold
    write_demo_data(root / "tx.parquet", DemoConfig(events=600, users=5, merchants=3, days=1, seed=5, start=start))
    store = DeltaOfflineStore(root / "offline")
    ingest_file(store, plan.source("transactions"), root / "tx.parquet")
    with dask_client(None, workers=1) as client:
        backfill(plan, store, views=["user_spend"], client=client)
    return plan, store


def test_nanosecond_labels_in_the_autumn_fold_are_exported_as_their_utc_instants(
    world: tuple[Plan, DeltaOfflineStore],
) -> None:
    # pandas' default nanoseconds in Europe/Paris: flooring them to microseconds in local
    # time raised "Local time is ambiguous" for 02:30 on 2026-10-25, which happens twice.
    plan, store = world
    instants = pd.DatetimeIndex(
        ["2026-10-25 00:30:00.000000789", "2026-10-25 01:30:00.000000999", "2026-10-25 06:00:00"], tz="UTC"
    ).as_unit("ns")
    features = ["user_spend:count_1d", "user_spend:sum_amount_eur_1d"]
    got = {}
    for zone in ("UTC", "Europe/Paris"):
        labels = pd.DataFrame({"user_id": [1, 1, 2], "timestamp": instants.tz_convert(zone)})
        table, _ = export_training_set(plan, store, labels, features)
        assert table.column("timestamp").type == pa.timestamp("ns", tz=zone)  # returned as given
        got[zone] = table.drop_columns(["timestamp"]).to_pylist()
    assert got["Europe/Paris"] == got["UTC"]
    assert [row["user_spend__status"] for row in got["UTC"]] == ["found"] * 3
