"""The offline store on a real S3 server (SeaweedFS from `scripts/services up`) and on a
local folder, through the same tests: ingest with its duplicate check, backfill with
Dask equal to the brute-force reference, materialize, export, verify; racing ingests;
and the CLI's one-line errors for a location it cannot use."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from featurestore.plan import Plan, compile_repo
from featurestore.plan.model import SEQUENCE
from featurestore.semantics import changelog_differences
from featurestore.stores.offline import DeltaOfflineStore
from featurestore.stores.online import SqliteOnlineStore
from featurestore.verify import verify_view
from pipelines.batch.engine import backfill, dask_client
from pipelines.ingest import DuplicateEventsError, ingest_file
from pipelines.materialize import materialize
from pipelines.reference import reference_changelog
from tenx.demo_data import DemoConfig, write_demo_data
from tests.processes import clean_environment
from tests.unit.pipelines.test_concurrent_ingest import overlapping_backfills, race
from training import export_training_set

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan() -> Plan:
    return compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "offline")
    return str(request.getfixturevalue("s3_location"))


@pytest.fixture
def client(location: str) -> Iterator[Any]:
    # Started after `location` set the AWS_* variables: Dask's worker processes read
    # them from their environment, as workers on other hosts would from theirs.
    with dask_client(None, workers=2) as active:
        yield active


@pytest.fixture
def events(tmp_path: Path) -> Path:
    path = tmp_path / "events.parquet"
    write_demo_data(path, DemoConfig(events=2_000, users=30, merchants=10, days=3, seed=11, out_of_order=0.05))
    return path


def test_ingest_backfill_materialize_export_and_verify(
    location: str, events: Path, plan: Plan, client: Any, tmp_path: Path
) -> None:
    store = DeltaOfflineStore(location)
    source = plan.source("transactions")
    assert ingest_file(store, source, events).ingested == 2_000
    assert ingest_file(store, source, events).skipped  # the same file: recorded by its digest
    with pytest.raises(DuplicateEventsError, match="2,000 of its 2,000 valid events are already"):
        ingest_file(store, source, events, force=True)  # the duplicate check reads the stored files

    summaries = backfill(plan, store, partitions=3, client=client)
    stored = store.read_events(source)
    assert stored.column(SEQUENCE).to_pylist() == list(range(2_000))
    for summary in summaries:
        view = plan.view(summary.view)
        expected = reference_changelog(view, stored.to_pandas(), with_scale=True)
        got = store.read_changelog(view)
        kinds = {f.name: f.kind for f in view.features}
        assert got.num_rows == summary.rows_written
        assert changelog_differences(expected, got, key=view.entity_key, kinds=kinds) == []

    view = plan.view("user_spend")
    online = SqliteOnlineStore(tmp_path / "online.sqlite", prefix="tenx:demo")
    try:
        result = materialize(view, store, online)
        assert result.entities == 30
        report = verify_view(view, store, online, sample=30)
        assert (report.checked, report.mismatches) == (30, [])
    finally:
        online.close()

    last = stored.column("event_time").cast(pa.int64()).to_numpy().max()
    labels = pa.table(
        {
            "user_id": pa.array(np.arange(1, 31), pa.int64()),
            "timestamp": pa.array(np.full(30, last), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        }
    )
    table, _ = export_training_set(plan, store, labels, ["user_spend:count_1d", "user_spend:sum_amount_eur_7d"])
    assert table is not None
    exported = table.to_pandas()
    reference = reference_changelog(view, stored.to_pandas()).to_pandas()
    at_last = reference[reference["as_of"] <= pd.Timestamp(last, unit="us", tz="UTC")].groupby("user_id").last()
    for user, count in zip(exported["user_id"], exported["count_1d"], strict=True):
        assert count == (at_last.loc[user, "count_1d"] if user in at_last.index else 0), user


def test_racing_ingests_on_object_storage_never_share_sequence_numbers(
    s3_location: str, plan: Plan, tmp_path: Path
) -> None:
    # Four processes, two files each, one bucket: Delta's conditional PUT on S3 decides
    # which commit wins; the losers renumber and retry.
    files = []
    for index in range(8):
        path = tmp_path / f"events_{index}.parquet"
        write_demo_data(path, DemoConfig(events=500, users=20, merchants=5, days=2, seed=200 + index))
        files.append(path)
    lines = race(tmp_path, [files[i::4] for i in range(4)], store=s3_location)
    assert sorted(int(line.split()[1]) for line in lines) == [500] * 8
    stored = DeltaOfflineStore(s3_location).read_events(plan.source("transactions"))
    assert sorted(stored.column(SEQUENCE).to_pylist()) == list(range(4_000))


@pytest.mark.parametrize("first_backfill", [True, False])
def test_overlapping_backfills_on_object_storage_one_wins_and_the_other_says_why(
    s3_location: str, plan: Plan, tmp_path: Path, first_backfill: bool
) -> None:
    overlapping_backfills(DeltaOfflineStore(s3_location), plan, tmp_path, first_backfill)


def run_tenx(repo: Path, *args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenx", *args],
        cwd=repo,
        env=clean_environment(**environment),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_cli_ingests_into_s3_and_says_what_is_wrong_in_one_line(s3_location: str, tmp_path: Path) -> None:
    import os

    repo = tmp_path / "repo"
    assert run_tenx(tmp_path, "init", "repo").returncode == 0
    assert run_tenx(repo, "apply").returncode == 0
    data = repo / "tx.parquet"
    write_demo_data(data, DemoConfig(events=300, users=5, merchants=3, days=1, seed=3))
    aws = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}

    done = run_tenx(repo, "ingest", "tx.parquet", TENX_OFFLINE_PATH=s3_location, **aws)
    assert done.returncode == 0, done.stderr
    assert f"ingest into {s3_location}/events/transactions" in " ".join(done.stdout.split())
    assert not list(repo.glob("s3*"))  # nothing written locally
    assert (
        DeltaOfflineStore(s3_location).count_events(
            compile_repo(repo, project="repo", modules=["features"]).source("transactions")
        )
        == 300
    )

    missing = run_tenx(repo, "ingest", "tx.parquet", TENX_OFFLINE_PATH="s3://no-such-bucket-tenx/x", **aws)
    assert missing.returncode == 2
    assert "bucket `no-such-bucket-tenx` does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr

    wrong = dict(aws, AWS_SECRET_ACCESS_KEY="wrong")
    refused = run_tenx(repo, "ingest", "tx.parquet", TENX_OFFLINE_PATH=s3_location, **wrong)
    assert refused.returncode == 2
    assert "cannot reach the bucket" in refused.stderr
    assert "wrong" not in refused.stderr  # the secret is never printed
    assert "Traceback" not in refused.stderr


def test_a_cluster_of_worker_processes_sharing_only_the_bucket_backfills_the_same_changelog(
    s3_location: str, events: Path, plan: Plan, tmp_path: Path
) -> None:
    # Worker processes with their own folders; the events, the shuffle and the changelog
    # all go through the bucket (as workers on other hosts would share it), and the
    # result equals the brute-force reference, as the local backfill's does.
    import pyarrow.fs as pafs
    from distributed import Client, LocalCluster

    from featurestore.stores.location import Location

    store = DeltaOfflineStore(s3_location)
    source = plan.source("transactions")
    ingest_file(store, source, events)
    scratch = f"{s3_location}/shuffle"
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            local_directory=str(tmp_path / "workers"),
        ) as cluster,
        Client(cluster, timeout=60) as client,
    ):
        summaries = backfill(plan, store, partitions=3, client=client, scratch_dir=scratch)
    stored = store.read_events(source).to_pandas()
    for summary in summaries:
        view = plan.view(summary.view)
        kinds = {f.name: f.kind for f in view.features}
        expected = reference_changelog(view, stored, with_scale=True)
        got = store.read_changelog(view)
        assert changelog_differences(expected, got, key=view.entity_key, kinds=kinds) == []
    location = Location.parse(scratch)
    left = location.filesystem().get_file_info(pafs.FileSelector(location.path, allow_not_found=True, recursive=True))
    assert [f.path for f in left if f.type == pafs.FileType.File] == []  # the shuffle cleaned up after itself
    assert not (tmp_path / "offline").exists()


def test_shuffle_prefixes_left_by_killed_backfills_are_swept_by_age(s3_location: str, events: Path, plan: Plan) -> None:
    import json
    import time

    import pyarrow.fs as pafs

    from featurestore.stores.location import Location

    store = DeltaOfflineStore(s3_location)
    ingest_file(store, plan.source("transactions"), events)
    scratch = Location.parse(f"{s3_location}/shuffle")
    filesystem = scratch.filesystem()

    def leave(name: str, created: float | None) -> None:
        with filesystem.open_output_stream(scratch.join(name, "00001", "part-00000.parquet").path) as out:
            out.write(b"left behind")
        if created is not None:
            with filesystem.open_output_stream(scratch.join(name, "owner.json").path) as out:
                out.write(json.dumps({"host": "elsewhere", "pid": 1, "created": created}).encode())

    leave("shuffle-user_spend-old", time.time() - 3 * 86_400)  # a killed run, three days ago
    leave("shuffle-user_spend-young", time.time() - 60)  # maybe still running elsewhere
    leave("shuffle-user_spend-unknown", None)  # no owner file: not ours to judge
    with dask_client(None, workers=2) as client:
        backfill(plan, store, views=["merchant_sales"], client=client, scratch_dir=scratch.uri)
    listed = filesystem.get_file_info(pafs.FileSelector(scratch.path, recursive=True))
    left = sorted(
        {f.path.split("/")[-3] for f in listed if f.type == pafs.FileType.File and f.path.endswith(".parquet")}
    )
    assert left == ["shuffle-user_spend-unknown", "shuffle-user_spend-young"]
