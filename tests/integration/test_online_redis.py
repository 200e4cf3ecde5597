"""Serving from a real Redis: materialize, client lookups, and a clear error when Redis
is gone."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featurestore.errors import TransientError
from featurestore.plan import compile_repo
from featurestore.stores.offline import DeltaOfflineStore
from featurestore.stores.online import RedisOnlineStore, SqliteOnlineStore
from pipelines.batch.engine import backfill, dask_client
from pipelines.ingest import ingest_file
from pipelines.materialize import materialize
from serving import FeatureClient, Status
from tenx.demo_data import DemoConfig, write_demo_data
from tests.services import _unavailable

ROOT = Path(__file__).resolve().parents[2]


def test_redis_and_embedded_store_serve_the_same_values(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    write_demo_data(tmp_path / "tx.parquet", DemoConfig(events=3_000, users=40, days=2))
    offline = DeltaOfflineStore(tmp_path / "offline")
    ingest_file(offline, plan.source("transactions"), tmp_path / "tx.parquet")
    with dask_client(None, workers=2) as client:
        backfill(plan, offline, views=["user_spend"], client=client)
    view = plan.view("user_spend")
    redis_store = RedisOnlineStore(redis_url, prefix=redis_prefix.rstrip(":"))
    sqlite_store = SqliteOnlineStore(tmp_path / "online.sqlite")
    assert materialize(view, offline, redis_store).written == materialize(view, offline, sqlite_store).written == 40
    users = list(range(1, 45))
    from_redis = FeatureClient(redis_store, plan).get("user_spend", users)
    from_sqlite = FeatureClient(sqlite_store, plan).get("user_spend", users)
    assert from_redis.values == from_sqlite.values
    assert from_redis.as_of_us == from_sqlite.as_of_us
    assert Status.MISSING in from_redis.statuses
    redis_store.close()


def test_killed_redis_gives_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    # Its own redis-server (it kills it), on a free port; without one installed it is
    # skipped with the services hint, like every test that needs Redis.
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
    )
    try:
        plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
        store = RedisOnlineStore(f"redis://127.0.0.1:{port}/0", timeout_s=1.0)
        deadline = time.monotonic() + 10
        while True:
            try:
                store.ping()
                break
            except TransientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client = FeatureClient(store, plan)
        assert client.get("user_spend", [1]).statuses == (Status.MISSING,)
        server.kill()
        server.wait(timeout=10)
        began = time.perf_counter()
        with pytest.raises(TransientError, match=rf"online store Redis at redis://127.0.0.1:{port}/0"):
            client.get("user_spend", [1])
        assert time.perf_counter() - began < 5
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)


def test_the_cli_materializes_into_redis(tmp_path: Path, redis_url: str) -> None:
    tenx = Path(sys.executable).parent / "tenx"
    env = {"TENX_REDIS_URL": redis_url, "PATH": str(Path(sys.executable).parent), "COLUMNS": "200"}
    subprocess.run([tenx, "init", "demo"], cwd=tmp_path, check=True, capture_output=True, env=env)
    repo = tmp_path / "demo"
    for args in (
        ["apply"],
        ["demo-data", "data/tx.parquet", "--events", "2000", "--users", "30", "--days", "2"],
        ["ingest", "data/tx.parquet"],
        ["backfill", "--view", "merchant_sales"],
        ["materialize", "--view", "merchant_sales"],
    ):
        done = subprocess.run([tenx, *args], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
    assert f"materialize into Redis at {redis_url}" in done.stdout


def test_unreachable_kafka_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    from tenx.demo_data import produce_to_kafka

    path = tmp_path / "tx.jsonl"
    write_demo_data(path, DemoConfig(events=50, users=5, days=1))
    began = time.perf_counter()
    with pytest.raises(
        TransientError, match=r"50 message\(s\) not delivered to Kafka at 127.0.0.1:1 within 3 s: is the broker up"
    ):
        produce_to_kafka(path, "127.0.0.1:1", "nowhere", timeout_s=3)
    assert time.perf_counter() - began < 15
