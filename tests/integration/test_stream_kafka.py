"""The stream job against a real Kafka topic and a real Redis: in-order parity with the
batch changelog, dead letters to a real topic, final online values, 1 and 2 workers."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from bytewax.testing import TestingSink, cluster_main
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from featurestore.plan import Plan, compile_repo
from featurestore.semantics import changelog_differences
from featurestore.stores.codec import decode
from featurestore.stores.online import RedisOnlineStore
from pipelines.reference import reference_changelog
from pipelines.stream.dataflow import (
    KafkaJsonSink,
    OnlineSink,
    Outputs,
    StoreFactory,
    build_dataflow,
    kafka_messages,
)
from tenx.demo_data import DemoConfig, generate
from tests.unit.pipelines.test_stream_state import as_changelog, last_per_entity, rows_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("workers", [1, 2])
def test_kafka_to_redis_stream(
    kafka_bootstrap: str, kafka_admin: AdminClient, redis_url: str, redis_prefix: str, workers: int
) -> None:
    plan: Plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    view = plan.view("user_spend")
    topic = f"tenx-stream-{uuid.uuid4().hex[:8]}"
    futures = kafka_admin.create_topics([NewTopic(topic, num_partitions=1), NewTopic(f"{topic}.dlq", num_partitions=1)])
    for future in futures.values():
        future.result(timeout=15)
    try:
        events = next(generate(DemoConfig(events=2_000, users=30, days=2, chunk_rows=2_000, seed=9))).sort_by(
            "event_time"
        )
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for index, row in enumerate(events.to_pylist()):
            row["event_time"] = row["event_time"].isoformat()
            producer.produce(topic, orjson.dumps(row))
            if index == 100:
                producer.produce(topic, b'{"broken": ')
        producer.flush(15)

        source = plan.source("transactions")
        bound = type(source)(**{**source.__dict__, "topic": topic})
        rows: list[Any] = []
        captured = TestingSink(rows)
        prefix = redis_prefix.rstrip(":")
        flow = build_dataflow(
            plan,
            lambda flow, _: kafka_messages(flow, bound, kafka_bootstrap, tail=False, batch_size=256),
            Outputs(
                [captured, OnlineSink(StoreFactory(redis_url, None, prefix=prefix), plan.views)],
                KafkaJsonSink(kafka_bootstrap, f"{topic}.dlq"),
                TestingSink([]),
            ),
            views=["user_spend"],
            shards=4,
        )
        cluster_main(flow, [], 0, worker_count_per_proc=workers)

        produced = as_changelog(view, rows_of(rows))
        expected = reference_changelog(view, events.to_pandas(), with_scale=True)
        kinds = {f.name: f.kind for f in view.features}
        assert changelog_differences(expected, produced, key="user_id", kinds=kinds) == []

        store = RedisOnlineStore(redis_url, prefix=prefix)
        final = last_per_entity(expected, view)
        users = final.column("user_id").to_pylist()
        for user, raw, as_of in zip(users, store.read(view, users), final.column("as_of").to_pylist(), strict=True):
            assert raw is not None
            assert decode(view, raw)[0] == int(pa.scalar(as_of).cast(pa.int64()).as_py()), user

        consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": topic, "auto.offset.reset": "earliest"})
        consumer.subscribe([f"{topic}.dlq"])
        message = None
        for _ in range(30):
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                break
        consumer.close()
        assert message is not None
        dead = orjson.loads(message.value())
        assert dead["offset"] == 101
        assert dead["reason"].startswith("invalid JSON")
    finally:
        kafka_admin.delete_topics([topic, f"{topic}.dlq"])


@pytest.mark.parametrize("start", ["time", "beginning", "future"])
def test_cold_start_reads_from_the_offset_for_a_time(kafka_bootstrap: str, kafka_topic: str, start: str) -> None:
    # Without a snapshot the job starts at the first message at or after a time (what
    # `tenx stream` passes: now minus the widest window and the lateness).
    from bytewax import operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import run_main

    # Recent message times: the broker deletes messages older than its retention (7 days),
    # by message time, on its own schedule.
    base_ms = int(time.time() * 1000) - 3_600_000
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for index in range(10):
        producer.produce(kafka_topic, orjson.dumps({"n": index}), timestamp=base_ms + index * 60_000)
    producer.flush(15)
    start_us = {"time": (base_ms + 5 * 60_000) * 1000, "beginning": None, "future": (base_ms + 3_600_000) * 1000}[start]
    plan: Plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    source = plan.source("transactions")
    bound = type(source)(**{**source.__dict__, "topic": kafka_topic})
    seen: list[Any] = []
    flow = Dataflow("cold_start")
    batches = kafka_messages(flow, bound, kafka_bootstrap, tail=False, start_time_us=start_us)
    op.output("out", op.flat_map("flat", batches, lambda batch: batch), TestingSink(seen))
    run_main(flow)
    offsets = [item[1] for item in seen if isinstance(item, tuple)]  # messages, not progress reports
    assert offsets == {"time": list(range(5, 10)), "beginning": list(range(10)), "future": []}[start]


def test_a_missing_topic_or_broker_is_a_clear_error_before_the_job_starts(kafka_bootstrap: str) -> None:
    from featurestore.errors import ConfigError, TransientError
    from pipelines.stream.dataflow import check_topics

    missing = f"tenx-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError, match=f"{missing} do not exist"):
        check_topics(kafka_bootstrap, [missing])
    with pytest.raises(TransientError, match=r"cannot reach Kafka at 127\.0\.0\.1:1"):
        check_topics("127.0.0.1:1", [missing], timeout_s=1.0)


def test_a_burst_larger_than_the_producer_queue_is_delivered_whole(
    kafka_bootstrap: str, kafka_admin: AdminClient
) -> None:
    # The late and dead-letter sinks produce a whole output batch at once: past
    # librdkafka's local queue that raised BufferError and crashed the job (compose).
    topic = f"tenx-burst-{uuid.uuid4().hex[:8]}"
    kafka_admin.create_topics([NewTopic(topic, num_partitions=1)])[topic].result(timeout=15)
    try:
        sink = KafkaJsonSink(kafka_bootstrap, topic, **{"queue.buffering.max.messages": 500})
        partition = sink.build("late", 0, 1)
        partition.write_batch([{"n": n, "pad": "x" * 100} for n in range(20_000)])
        partition.close()
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": topic})
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.close()
        assert high - low == 20_000
    finally:
        kafka_admin.delete_topics([topic])


def test_a_broker_that_takes_nothing_is_one_clear_error() -> None:
    from featurestore.errors import TransientError
    from pipelines.stream.producer import Delivery

    producer = Delivery("127.0.0.1:1", timeout_s=2, **{"queue.buffering.max.messages": 10})
    began = time.perf_counter()
    for _ in range(10):  # the queue's room
        producer.send("nowhere", b"{}")
    with pytest.raises(TransientError, match=r"Kafka at 127.0.0.1:1 took no message for 2 s \((\d+) waiting") as raised:
        producer.send("nowhere", b"{}")
    # librdkafka's count (len(producer)) is the queued messages plus its own requests
    # waiting for the broker: the 10 queued, and now and then a metadata request (11).
    waiting = re.search(r"\((\d+) waiting", str(raised.value))
    assert waiting is not None
    assert int(waiting.group(1)) >= 10
    assert time.perf_counter() - began < 10
