"""`tenx stream` on 3-partition topics of a real Kafka, into a real Redis, as a user runs
it: a week of backlog replayed (events keyed by user, or one partition hours behind the
others) loses nothing at 1 and 2 workers and ends equal to the batch engine on every
entity; a poison event from the future is dead-lettered and changes nothing else; a
quiet stream still expires its windows; SIGKILL + restart (on another worker count) in
the middle of each of these loses and duplicates nothing."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from featurestore.plan import AS_OF, Plan, compile_repo
from featurestore.semantics import values_match
from featurestore.stores.codec import decode
from featurestore.stores.online import RedisOnlineStore
from pipelines.reference import reference_changelog
from tenx.demo_data import DemoConfig, generate
from tenx.scaffold import init_repo
from tests.integration.test_stream_recovery import expected_online

TENX = str(Path(sys.executable).parent / "tenx")
PARTITIONS = 3


@dataclass
class Stack:
    """A feature repo bound to its own 3-partition topic, with the events in Kafka and in
    the offline store (ingested and backfilled), and the environment to run tenx in."""

    repo: Path
    project: str
    topic: str
    events: pa.Table
    partitions: list[int]
    env: dict[str, str]
    redis_url: str
    bootstrap: str

    def plan(self) -> Plan:
        return compile_repo(self.repo, project=self.project, modules=["features"])

    def tenx(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TENX, *args], cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start_stream(self, *args: str) -> subprocess.Popen[bytes]:
        with (self.repo / "stream.log").open("ab") as log:
            return subprocess.Popen([TENX, "stream", *args], cwd=self.repo, env=self.env, stdout=log, stderr=log)

    def log(self) -> str:
        path = self.repo / "stream.log"
        return path.read_text() if path.exists() else ""

    def clear_online(self) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        keys = list(client.scan_iter(match=f"tenx:{self.project}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])

    def online(self, view_name: str, keys: list[Any]) -> dict[Any, tuple[int, list[Any]]]:
        view = self.plan().view(view_name)
        store = RedisOnlineStore(self.redis_url, prefix=f"tenx:{self.project}")
        try:
            return {key: decode(view, raw) for key, raw in zip(keys, store.read(view, keys), strict=True) if raw}
        finally:
            store.close()

    def messages(self, topic: str) -> list[dict[str, Any]]:
        return read_topic(self.bootstrap, topic)


def read_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every message of a topic (none if it does not exist)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        out = []
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            while True:
                message = consumer.poll(5)
                assert message is not None, f"{topic}[{partition}]: no message before offset {high}"
                if message.error() is None:
                    out.append(orjson.loads(message.value()))
                    if message.offset() >= high - 1:
                        break
        return out
    finally:
        consumer.close()


def make_repo(tmp_path: Path, project: str, topic: str, source_options: str, features: str | None = None) -> Path:
    repo = tmp_path / project
    init_repo(repo, project=project)
    path = repo / "features.py"
    text = features if features is not None else path.read_text()
    text = text.replace(
        'Source("transactions", TRANSACTIONS,', f'Source("transactions", TRANSACTIONS, topic="{topic}",'
    )
    options = source_options if "allowed_lateness" in source_options else f'allowed_lateness="5m", {source_options}'
    path.write_text(text.replace('allowed_lateness="5m"', options))
    return repo


def produce(bootstrap: str, topic: str, rows: list[tuple[int | None, dict[str, Any]]]) -> list[int]:
    """(partition or None for keyed by user, record) in order; returns the partition
    each record went to."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    placed = [-1] * len(rows)
    for index, (partition, row) in enumerate(rows):
        value = orjson.dumps({**row, "event_time": row["event_time"].isoformat()})

        def delivered(error: Any, message: Any, index: int = index) -> None:
            placed[index] = message.partition()

        if partition is None:
            producer.produce(topic, value, key=str(row["user_id"]).encode(), on_delivery=delivered)
        else:
            producer.produce(topic, value, partition=partition, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert min(placed, default=0) >= 0
    return placed


@pytest.fixture
def stack_factory(
    tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, kafka_admin: AdminClient, redis_url: str
) -> Iterator[Any]:
    topics: list[str] = []
    stacks: list[Stack] = []

    def build(
        layout: str,
        *,
        events: int = 40_000,
        features: str | None = None,
        options: str = "",
        first: list[tuple[int | None, dict[str, Any]]] | None = None,
    ) -> Stack:
        name = f"p{uuid.uuid4().hex[:8]}"
        topic = f"tenx-{name}"
        topics.extend([topic, f"{topic}.late", f"{topic}.dead-letters"])
        for future in kafka_admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS)]).values():
            future.result(timeout=15)
        repo = make_repo(tmp_path_factory.mktemp(name), name, topic, options or 'idle_timeout="2s"', features)
        env = {**os.environ, "TENX_KAFKA_BOOTSTRAP": kafka_bootstrap, "TENX_REDIS_URL": redis_url, "COLUMNS": "200"}
        stack = Stack(repo, name, topic, pa.table({}), [], env, redis_url, kafka_bootstrap)
        stacks.append(stack)
        assert stack.tenx("apply").returncode == 0
        if layout == "none":
            return stack
        # A week of demo events ending at today's midnight (so none is from the future).
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        config = DemoConfig(
            events=events,
            users=1_500,
            merchants=120,
            days=7,
            start=midnight - timedelta(days=7),
            chunk_rows=events,
            seed=21,
        )
        table = next(generate(config))
        rows = table.to_pylist()
        if layout == "keyed":  # as `tenx demo-data --to-kafka` sends them
            placed: list[tuple[int | None, dict[str, Any]]] = [(None, row) for row in rows]
        else:  # "skewed": partition 0 carries events 3 hours older than the other two
            placed = []
            for index, row in enumerate(rows):
                partition = index % PARTITIONS
                if partition == 0:
                    row["event_time"] -= timedelta(hours=3)
                placed.append((partition, row))
            table = pa.Table.from_pylist(rows, schema=table.schema)
        if first:  # records ahead of the events (not among them: the offline store never sees them)
            produce(kafka_bootstrap, topic, first)
        stack.partitions = produce(kafka_bootstrap, topic, placed)
        pq.write_table(table, repo / "events.parquet")
        stack.events = table
        for command in (("ingest", "events.parquet"), ("backfill",)):
            done = stack.tenx(*command)
            assert done.returncode == 0, done.stderr
        return stack

    yield build
    for stack in stacks:
        stack.clear_online()
    if topics:
        kafka_admin.delete_topics(topics)


def assert_verified(stack: Stack) -> None:
    """`tenx verify` on every entity of every view: all online, all equal to the batch."""
    done = stack.tenx("verify", "--sample", "1000000")
    assert done.returncode == 0, done.stdout + done.stderr
    entities = {
        "user_spend": len(set(stack.events.column("user_id").to_pylist())),
        "merchant_sales": len(set(stack.events.filter(pa.compute.greater(stack.events["amount"], 0))["merchant_id"])),
    }
    for view, count in entities.items():
        assert f"{view}: ok {count} checked, 0 mismatching values, 0 not online, 0 without an offline row" in (
            done.stdout
        ), done.stdout


def assert_equals_reference(stack: Stack, sample: int = 40) -> None:
    """Online values of sampled users equal the brute-force reference at their as_of."""
    view = stack.plan().view("user_spend")
    users = random.Random(5).sample(sorted(set(stack.events.column("user_id").to_pylist())), sample)
    mine = stack.events.filter(pa.compute.is_in(stack.events["user_id"], pa.array(users)))
    reference = reference_changelog(view, mine.to_pandas(), with_scale=True).to_pylist()
    online = stack.online("user_spend", users)
    assert sorted(online) == sorted(users)
    for user, (as_of, values) in online.items():
        rows = [
            r for r in reference if r["user_id"] == user and int(pa.scalar(r[AS_OF]).cast(pa.int64()).as_py()) <= as_of
        ]
        expected = rows[-1]
        for feature, value in zip(view.features, values, strict=True):
            scale = expected.get(f"_scale_{feature.name}") or 0.0
            assert values_match(expected[feature.name], value, kind=feature.kind, scale=scale), (user, feature.name)


def final_counts(output: str) -> tuple[int, int, int]:
    found = re.search(r"done: ([\d,]+) events in .* ([\d,]+) late, ([\d,]+) dead letters", output)
    assert found is not None, output
    return tuple(int(group.replace(",", "")) for group in found.groups())  # type: ignore[return-value]


@pytest.mark.parametrize("layout", ["keyed", "skewed"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_three_partition_replay_loses_nothing_and_equals_the_batch_engine(
    stack_factory: Any, layout: str, workers: int
) -> None:
    stack = stack_factory(layout)
    done = stack.tenx("stream", "--bounded", "--from-beginning", "-w", str(workers))
    assert done.returncode == 0, done.stderr
    assert final_counts(done.stdout) == (stack.events.num_rows, 0, 0)
    assert stack.messages(f"{stack.topic}.late") == []
    assert_verified(stack)
    assert_equals_reference(stack)
    # Exactly the rows a stream serves at the end of a replay: each user's newest event,
    # or an expiry after it up to the slowest partition's last event minus the lateness.
    view = stack.plan().view("user_spend")
    expected = expected_online(view, stack.events, stack.partitions)
    online = stack.online("user_spend", sorted(expected))
    assert {user: as_of for user, (as_of, _) in online.items()} == {user: row[0] for user, row in expected.items()}


def wait_for_rows(url: str, project: str, process: subprocess.Popen[bytes], cap_s: float = 120) -> None:
    client = redis.Redis.from_url(url, socket_timeout=5)
    deadline = time.monotonic() + cap_s
    while not any(True for _ in client.scan_iter(match=f"tenx:{project}:*", count=100)):
        assert process.poll() is None, "the stream job ended before writing anything"
        assert time.monotonic() < deadline, "no online row within the cap"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("layout", "poison", "workers"),
    [("keyed", False, ("1", "2")), ("keyed", True, ("2", "1")), ("skewed", False, ("1", "2"))],
)
def test_sigkill_mid_replay_and_a_restart_on_other_workers_lose_and_duplicate_nothing(
    stack_factory: Any, tmp_path: Path, layout: str, poison: bool, workers: tuple[str, str]
) -> None:
    # Poison: one valid event dated 2099 at the head of partition 1, ahead of all its real
    # events (the old watermark jumped to 2099 and every later event was late, also after
    # a restart, through the snapshot).
    future = datetime(2099, 12, 31, tzinfo=UTC)
    template = next(generate(DemoConfig(events=1, users=1, days=1, chunk_rows=1, seed=2))).to_pylist()[0]
    first = [(1, {**template, "transaction_id": "poison", "event_time": future})] if poison else None
    stack = stack_factory(layout, events=60_000, first=first)
    recovery = tmp_path / "recovery"
    job = stack.start_stream(
        "--bounded", "--from-beginning", "-w", workers[0], "--recovery-dir", str(recovery), "--snapshot-interval", "0.2"
    )
    wait_for_rows(stack.redis_url, stack.project, job)
    time.sleep(random.uniform(0.05, 0.6))
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    second = stack.tenx(
        "stream",
        "--bounded",
        "--from-beginning",
        "-w",
        workers[1],
        "--recovery-dir",
        str(recovery),
        "--snapshot-interval",
        "0.2",
    )
    assert second.returncode == 0, stack.log() + second.stderr
    _, late, _ = final_counts(second.stdout)
    assert late == 0
    assert stack.messages(f"{stack.topic}.late") == []
    dead = stack.messages(f"{stack.topic}.dead-letters")
    if poison:  # at least once: the first run may have sent it before its last snapshot
        assert dead, stack.log()
        assert {(d["partition"], d["value"].count("poison")) for d in dead} == {(1, 1)}
        assert {d["offset"] for d in dead} == {0}
        assert all("more than 5m ahead of the processing clock" in d["reason"] for d in dead)
    else:
        assert dead == []
    assert_verified(stack)
    view = stack.plan().view("user_spend")
    expected = expected_online(view, stack.events, stack.partitions)
    online = stack.online("user_spend", sorted(expected))
    assert {user: as_of for user, (as_of, _) in online.items()} == {user: row[0] for user, row in expected.items()}


QUIET = '''"""A short window, to watch it expire on a quiet stream."""

from featurestore import Count, Entity, Source, Sum, Window, feature_view
from schemas import TRANSACTIONS

user = Entity("user", key="user_id", dtype="int64")
transactions = Source("transactions", TRANSACTIONS, allowed_lateness="5m")


@feature_view(entity=user, source=transactions, aggregations=[Count(windows=[Window("20s", every="5s")])])
def recent(tx):
    return tx[[]]
'''


@pytest.mark.parametrize("restart", [False, True])
def test_a_quiet_stream_still_expires_its_windows(stack_factory: Any, restart: bool) -> None:
    # Events reach partition 0 only; partitions 1 and 2 never see one. Once every
    # partition is caught up and quiet for the idle timeout, the watermark follows the
    # clock: the 20-second count drops back to 0 without another event.
    stack = stack_factory("none", features=QUIET, options='allowed_lateness="1s", idle_timeout="1s"')
    stream = stack.start_stream("--status-interval", "1")
    try:
        now = datetime.now(UTC)
        row = {**next(generate(DemoConfig(events=1, users=1, days=1, chunk_rows=1, seed=1))).to_pylist()[0]}
        produce(
            stack.bootstrap,
            stack.topic,
            [(0, {**row, "user_id": 7, "transaction_id": f"q{i}", "event_time": now}) for i in range(3)],
        )
        deadline = time.monotonic() + 60
        while stack.online("recent", [7]).get(7, (0, [0]))[1][0] != 3:
            assert stream.poll() is None, stack.log()
            assert time.monotonic() < deadline, stack.log()
            time.sleep(0.1)
        if restart:
            stream.send_signal(signal.SIGKILL)
            stream.wait(timeout=30)
            stream = stack.start_stream("--status-interval", "1")
        deadline = time.monotonic() + 90
        while (value := stack.online("recent", [7])[7])[1][0] != 0:
            assert stream.poll() is None, stack.log()
            assert time.monotonic() < deadline, f"count still {value} after 90 s: " + stack.log()
            time.sleep(0.2)
        as_of, _ = value
        tile = int(now.timestamp() * 1e6) // 5_000_000 * 5_000_000
        assert as_of == tile + 20_000_000  # the expiry of the event's 5-second tile
    finally:
        stream.send_signal(signal.SIGINT)
        assert stream.wait(timeout=60) == 130, stack.log()
    log = stack.log()
    assert "stopping after the current batch" in log
    assert "Traceback" not in log
    assert "panicked" not in log
