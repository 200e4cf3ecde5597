"""The issue's new user, end to end through the CLI: features computed elsewhere (one
row per user and time, 20 float columns) served as they are with `Latest` features in
float32, a ttl that turns old rows into `stale`, point-in-time exports, and a windowed
view beside it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from featurestore.config import load_settings
from featurestore.registry import FileRegistry
from featurestore.stores.online import open_online_store
from serving.client import FeatureClient, Status
from tests.processes import clean_environment

ROOT = Path(__file__).resolve().parents[2]
USERS = 600


def tenx(repo: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tenx", *args],
        cwd=repo,
        env=clean_environment("TENX_REDIS_URL", "TENX_KAFKA_BOOTSTRAP"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"tenx {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example repo with two upstream runs loaded: every user three days ago, even
    users again an hour ago (user 0's newest row has a null f3)."""
    root = tmp_path_factory.mktemp("precomputed") / "repo"
    shutil.copytree(ROOT / "examples" / "precomputed", root, ignore=shutil.ignore_patterns(".tenx", "data"))
    now = datetime.now(UTC).replace(microsecond=0)
    rng = np.random.default_rng(11)
    old = pd.DataFrame({"user_id": np.arange(USERS), "computed_at": now - timedelta(days=3)})
    new = pd.DataFrame({"user_id": np.arange(0, USERS, 2), "computed_at": now - timedelta(hours=1)})
    for frame in (old, new):
        for i in range(20):
            frame[f"f{i}"] = rng.normal(size=len(frame)) * 10 ** (i % 5)
    new.loc[0, "f3"] = None
    rows = pd.concat([old, new], ignore_index=True)
    rows["computed_at"] = rows["computed_at"].astype("datetime64[us, UTC]")
    (root / "data").mkdir()
    rows.to_parquet(root / "data" / "scores.parquet")
    tenx(root, "apply")
    tenx(root, "ingest", "data/scores.parquet")
    tenx(root, "backfill")
    tenx(root, "materialize")
    return root


def rows_of(repo: Path) -> pd.DataFrame:
    return pd.read_parquet(repo / "data" / "scores.parquet")


def test_lookups_serve_the_newest_row_in_float32_and_old_rows_as_stale(repo: Path) -> None:
    settings = load_settings(repo / "tenx.yaml", environ={})
    plan = FileRegistry(settings.registry_dir).current()
    assert plan is not None
    store = open_online_store(redis_url=None, sqlite_path=settings.online_path, project=plan.project)
    client = FeatureClient(store, plan)
    try:
        result = client.get("user_scores", [*range(USERS), USERS + 5])
    finally:
        client.close()
    rows = rows_of(repo)
    newest = rows.sort_values("computed_at").groupby("user_id").last(skipna=False)
    names = [f"f{i}" for i in range(20)]
    assert plan.view("user_scores").feature_names == tuple(names)
    for index, user in enumerate(range(USERS)):
        expected = [None if pd.isna(v) else float(np.float32(v)) for v in newest.loc[user, names]]
        assert list(result.values[index]) == expected, user  # bit for bit after a float32 cast
        assert result.statuses[index] is (Status.FOUND if user % 2 == 0 else Status.STALE), user
    assert result.values[0][3] is None  # the null in user 0's newest row is the value
    assert result.statuses[-1] is Status.MISSING


def test_verify_finds_online_equal_to_offline(repo: Path) -> None:
    out = tenx(repo, "verify", "--sample", "200")
    assert "user_scores: ok 200 checked, 0 mismatching values" in out, out
    assert "score_trend: ok 200 checked, 0 mismatching values" in out, out


def test_export_is_point_in_time_for_latest_values(repo: Path) -> None:
    rows = rows_of(repo)
    first = rows["computed_at"].min()
    labels = pd.DataFrame(
        {
            "user_id": [2, 2, 3, 4],
            "timestamp": [
                first - timedelta(seconds=1),  # before any row: missing, null
                first + timedelta(days=1),  # between the two rows: the older one
                datetime.now(UTC),  # an odd user: only the old row, now beyond the ttl
                datetime.now(UTC),  # an even user: the newest row
            ],
            "label": [0, 1, 0, 1],
        }
    )
    labels["timestamp"] = labels["timestamp"].astype("datetime64[us, UTC]")
    labels.to_parquet(repo / "labels.parquet")
    tenx(
        repo,
        "export",
        "--labels",
        "labels.parquet",
        "--features",
        "user_scores:f0,user_scores:f3",
        "--out",
        "t.parquet",
    )
    out = pq.read_table(repo / "t.parquet").to_pandas()
    by_time = rows.sort_values("computed_at")
    older = by_time[by_time["user_id"] == 2].iloc[0]
    newest_4 = by_time[by_time["user_id"] == 4].iloc[-1]
    assert out["user_scores__status"].tolist() == ["missing", "found", "stale", "found"]
    assert pd.isna(out.loc[0, "f0"])
    assert out.loc[1, "f0"] == np.float32(older["f0"])
    assert out.loc[3, "f3"] == np.float32(newest_4["f3"])


def test_the_stream_job_serves_a_new_row_at_once_and_keeps_the_others(repo: Path) -> None:
    # A fresh row for user 1 (stale until now) through the real Bytewax job, the file
    # source standing in for Kafka; user 3's row, older than the online one, is ignored.
    now = datetime.now(UTC).replace(microsecond=0)
    fresh = {"user_id": 1, "computed_at": now.isoformat(), **{f"f{i}": i + 0.1 for i in range(20)}}
    fresh["f7"] = None
    (repo / "stream.jsonl").write_text(json.dumps(fresh) + "\n")
    tenx(repo, "stream", "--from-file", "stream.jsonl", "--view", "user_scores")
    settings = load_settings(repo / "tenx.yaml", environ={})
    plan = FileRegistry(settings.registry_dir).current()
    assert plan is not None
    client = FeatureClient(
        open_online_store(redis_url=None, sqlite_path=settings.online_path, project=plan.project), plan
    )
    try:
        result = client.get("user_scores", [1, 3])
    finally:
        client.close()
    expected = [None if i == 7 else float(np.float32(i + 0.1)) for i in range(20)]
    assert list(result.values[0]) == expected
    assert result.statuses == (Status.FOUND, Status.STALE)
    older = rows_of(repo).query("user_id == 3").iloc[-1]
    assert result.values[1][0] == float(np.float32(older["f0"]))
