"""Crash test: `tenx stream` killed with SIGKILL at a random point and restarted from its
recovery directory ends with exactly the online state of an uninterrupted run, and
every event counted once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from featurestore.plan import AS_OF, compile_repo
from featurestore.registry import FileRegistry
from featurestore.semantics import values_match
from featurestore.stores.codec import decode
from featurestore.stores.online import RedisOnlineStore
from pipelines.batch.kernel import changelog_kernel
from tenx.demo_data import DemoConfig, generate
from tenx.scaffold import init_repo

TENX = str(Path(sys.executable).parent / "tenx")


def with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


def stream(repo: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    with (repo / "stream.log").open("ab") as log:
        return subprocess.Popen(
            [TENX, "stream", "--bounded", "-w", "1", "--shards", "4", *extra],
            cwd=repo,
            env=env,
            stdout=log,
            stderr=log,
        )


def expected_online(view: Any, events: pa.Table, partitions: list[int]) -> dict[int, tuple[int, list[Any]]]:
    """What a live stream serves after these events: per entity the changelog row at
    the latest of its event times and the expiries the final watermark has passed (the
    slowest partition's newest event minus the lateness)."""
    changelog = changelog_kernel(view, events.to_pandas())
    times = events.column("event_time").cast(pa.int64()).to_pylist()
    newest: dict[int, int] = {}
    for partition, moment in zip(partitions, times, strict=True):
        newest[partition] = max(newest.get(partition, moment), moment)
    watermark = min(newest.values()) - view.source.allowed_lateness
    event_times: dict[int, set[int]] = {}
    for user, moment in zip(events.column("user_id").to_pylist(), times, strict=True):
        event_times.setdefault(user, set()).add(moment)
    best: dict[int, tuple[int, list[Any]]] = {}
    as_of = changelog.column(AS_OF).cast(pa.int64()).to_pylist()
    users = changelog.column("user_id").to_pylist()
    values = [changelog.column(name).to_pylist() for name in view.feature_names]
    for index, (user, moment) in enumerate(zip(users, as_of, strict=True)):
        visible = moment <= watermark or moment in event_times[user]
        if visible and (user not in best or moment > best[user][0]):
            best[user] = (moment, [column[index] for column in values])
    return best


def online_state(url: str, view: Any, users: list[int]) -> dict[int, tuple[int, list[Any]]]:
    store = RedisOnlineStore(url, prefix="tenx:crash")  # the CLI keys values by project
    try:
        return {user: decode(view, raw) for user, raw in zip(users, store.read(view, users), strict=True) if raw}
    finally:
        store.close()


def same(view: Any, expected: dict[int, Any], got: dict[int, Any]) -> list[str]:
    problems = [f"entity sets differ: {sorted(set(expected) ^ set(got))[:10]}"] if set(expected) != set(got) else []
    for user in sorted(set(expected) & set(got)):
        (time_a, values_a), (time_b, values_b) = expected[user], got[user]
        if time_a != time_b:
            problems.append(f"user {user}: as_of {time_a} != {time_b}")
        for feature, a, b in zip(view.features, values_a, values_b, strict=True):
            if not values_match(a, b, kind=feature.kind, scale=abs(a or 0) + abs(b or 0)):
                problems.append(f"user {user}: {feature.name} {a} != {b}")
    return problems[:20]


def test_sigkill_and_restart_loses_and_duplicates_nothing(
    tmp_path: Path, kafka_bootstrap: str, kafka_admin: AdminClient, redis_url: str
) -> None:
    topic = f"tenx-crash-{uuid.uuid4().hex[:8]}"
    kafka_admin.create_topics([NewTopic(topic, num_partitions=2)])[topic].result(timeout=15)
    repo = tmp_path / "repo"
    init_repo(repo, project="crash")
    features = repo / "features.py"
    features.write_text(
        features.read_text().replace(
            'Source("transactions", TRANSACTIONS,', f'Source("transactions", TRANSACTIONS, topic="{topic}",'
        )
    )
    plan = compile_repo(repo, project="crash", modules=["features"])
    FileRegistry(repo / ".tenx" / "registry").apply(plan)
    view = plan.view("user_spend")
    try:
        events = next(generate(DemoConfig(events=30_000, users=300, merchants=50, days=3, chunk_rows=30_000, seed=11)))
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        partitions = [-1] * events.num_rows
        for index, row in enumerate(events.to_pylist()):
            row["event_time"] = row["event_time"].isoformat()

            def delivered(error: Any, message: Any, index: int = index) -> None:
                partitions[index] = message.partition()

            producer.produce(topic, orjson.dumps(row), key=str(row["user_id"]).encode(), on_delivery=delivered)
            producer.poll(0)
        assert producer.flush(30) == 0
        assert min(partitions) >= 0

        base = {**os.environ, "TENX_KAFKA_BOOTSTRAP": kafka_bootstrap}
        clean_url, crash_url = with_db(redis_url, 8), with_db(redis_url, 7)
        for url in (clean_url, crash_url):
            redis.Redis.from_url(url, socket_timeout=5).flushdb()

        clean = stream(repo, {**base, "TENX_REDIS_URL": clean_url})
        assert clean.wait(timeout=300) == 0, (repo / "stream.log").read_text()

        recovery = tmp_path / "recovery"
        crashing_env = {**base, "TENX_REDIS_URL": crash_url}
        first = stream(repo, crashing_env, "--recovery-dir", str(recovery), "--snapshot-interval", "0.3")
        client = redis.Redis.from_url(crash_url, socket_timeout=5)
        deadline = time.monotonic() + 120
        while client.dbsize() == 0 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        time.sleep(random.uniform(0.2, 1.5))
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        second = stream(repo, crashing_env, "--recovery-dir", str(recovery), "--snapshot-interval", "0.3")
        assert second.wait(timeout=300) == 0, (repo / "stream.log").read_text()

        # Kafka partitions interleave the log differently than the file order; compare
        # what each run serves, and the uninterrupted run with the batch kernel.
        users = sorted(set(events.column("user_id").to_pylist()))
        uninterrupted = online_state(clean_url, view, users)
        restarted = online_state(crash_url, view, users)
        assert same(view, uninterrupted, restarted) == []
        assert len(uninterrupted) == len(users)
        expected = expected_online(view, events, partitions)
        assert {u: v[0] for u, v in uninterrupted.items()} == {u: v[0] for u, v in expected.items()}
    finally:
        kafka_admin.delete_topics([topic, f"{topic}.late", f"{topic}.dead-letters"])  # what the job created too
