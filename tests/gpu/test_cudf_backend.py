"""The cuDF backend runs the same kernel on GPU and gives the pandas backend's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurestore.plan import compile_repo
from featurestore.semantics import changelog_differences
from pipelines.batch.backends import Backend, array_module, to_frame
from pipelines.batch.kernel import changelog_kernel
from tenx.demo_data import DemoConfig, generate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.cudf
@pytest.mark.parametrize("view_name", ["user_spend", "merchant_sales"])
def test_cudf_kernel_equals_pandas_kernel(view_name: str) -> None:
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    view = plan.view(view_name)
    table = next(generate(DemoConfig(events=200_000, users=2_000, days=7, chunk_rows=200_000)))
    expected = changelog_kernel(view, to_frame(table, Backend.PANDAS))
    got = changelog_kernel(view, to_frame(table, Backend.CUDF), xp=array_module(Backend.CUDF))
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, got, key=view.entity_key, kinds=kinds) == []


@pytest.mark.cudf
def test_cudf_backfill_end_to_end(tmp_path: Path) -> None:
    from featurestore.stores.offline import DeltaOfflineStore
    from pipelines.batch.engine import backfill, dask_client
    from pipelines.ingest import ingest_file
    from tenx.demo_data import write_demo_data

    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    raw = tmp_path / "tx.parquet"
    write_demo_data(raw, DemoConfig(events=50_000, users=500, days=3))
    store = DeltaOfflineStore(tmp_path / "offline")
    ingest_file(store, plan.source("transactions"), raw)
    with dask_client(None, workers=1) as client:
        gpu = backfill(plan, store, views=["user_spend"], backend=Backend.CUDF, client=client)[0]
        on_gpu = store.read_changelog(plan.view("user_spend"))
        backfill(plan, store, views=["user_spend"], backend=Backend.PANDAS, client=client)
        on_cpu = store.read_changelog(plan.view("user_spend"))
    assert gpu.rows_written == on_cpu.num_rows
    kinds = {f.name: f.kind for f in plan.view("user_spend").features}
    assert changelog_differences(on_cpu, on_gpu, key="user_id", kinds=kinds) == []
