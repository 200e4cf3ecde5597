"""Smoke tests of the real services the feature store runs on.

They prove the plumbing every other integration test relies on: a round trip
through a real Kafka topic and real Redis keys (including server-side Lua), and
that a dead endpoint fails within seconds instead of hanging a test run.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from redis.backoff import NoBackoff
from redis.retry import Retry

N_MESSAGES = 200


def test_kafka_produce_consume_roundtrip(kafka_bootstrap: str, kafka_topic: str) -> None:
    delivery_errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            delivery_errors.append(err)

    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "socket.connection.setup.timeout.ms": 3000,
            "message.timeout.ms": 10000,
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    for i in range(N_MESSAGES):
        producer.produce(
            kafka_topic,
            key=f"entity-{i % 7}".encode(),
            value=f"event-{i}".encode(),
            headers={"seq": str(i).encode()},
            on_delivery=on_delivery,
        )
        producer.poll(0)
    assert producer.flush(timeout=15) == 0, "messages still queued after 15 s"
    assert delivery_errors == []

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"tenx-test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "socket.connection.setup.timeout.ms": 3000,
            "session.timeout.ms": 6000,
        }
    )
    received: list[Message] = []
    try:
        consumer.subscribe([kafka_topic])
        deadline = time.monotonic() + 20
        while len(received) < N_MESSAGES and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=N_MESSAGES, timeout=1.0):
                err = msg.error()
                if err is not None:
                    raise KafkaException(err)
                received.append(msg)
    finally:
        consumer.close()

    assert len(received) == N_MESSAGES
    # One partition: Kafka must hand back exactly what was produced, in order.
    assert [m.value() for m in received] == [f"event-{i}".encode() for i in range(N_MESSAGES)]
    assert [m.key() for m in received] == [f"entity-{i % 7}".encode() for i in range(N_MESSAGES)]
    assert [dict(m.headers() or [])["seq"] for m in received] == [str(i).encode() for i in range(N_MESSAGES)]
    assert [m.offset() for m in received] == list(range(N_MESSAGES))
    assert {m.topic() for m in received} == {kafka_topic}


def test_kafka_topic_fixture_creates_a_real_topic(kafka_admin: AdminClient, kafka_topic: str) -> None:
    metadata = kafka_admin.list_topics(timeout=5)  # every topic: see _wait_topic_ready
    topic = metadata.topics[kafka_topic]
    assert topic.error is None
    assert len(topic.partitions) == 1


def test_redis_roundtrip(redis_client: redis.Redis, redis_prefix: str) -> None:
    k = redis_prefix
    assert redis_client.set(f"{k}str", "v1")
    assert redis_client.get(f"{k}str") == b"v1"

    redis_client.hset(f"{k}features:user-1", mapping={"clicks_1h": 3, "spend_1d": "12.5"})
    assert redis_client.hgetall(f"{k}features:user-1") == {
        b"clicks_1h": b"3",
        b"spend_1d": b"12.5",
    }

    with redis_client.pipeline(transaction=True) as pipe:
        pipe.incrby(f"{k}counter", 5)
        pipe.expire(f"{k}counter", 60)
        pipe.get(f"{k}counter")
        _, expired_set, value = pipe.execute()
    assert expired_set is True
    assert value == b"5"
    assert 0 < redis_client.ttl(f"{k}counter") <= 60

    keys = {key.decode() for key in redis_client.scan_iter(match=f"{k}*", count=100)}
    assert keys == {f"{k}str", f"{k}features:user-1", f"{k}counter"}


def test_redis_lua_script(redis_client: redis.Redis, redis_prefix: str) -> None:
    # Compare-and-set on a versioned feature value: the kind of atomic
    # read-modify-write the serving layer needs, done server-side.
    cas = redis_client.register_script(
        """
        local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
        if tonumber(ARGV[1]) <= current then
            return {0, current}
        end
        redis.call('HSET', KEYS[1], 'version', ARGV[1], 'value', ARGV[2])
        return {1, tonumber(ARGV[1])}
        """
    )
    key = f"{redis_prefix}feature:user-1"
    assert cas(keys=[key], args=[2, "a"]) == [1, 2]
    assert cas(keys=[key], args=[1, "stale"]) == [0, 2]
    assert cas(keys=[key], args=[3, "b"]) == [1, 3]
    assert redis_client.hgetall(key) == {b"version": b"3", b"value": b"b"}
    # Plain EVAL too, with the key passed properly (never built into the script).
    assert redis_client.eval("return redis.call('HGET', KEYS[1], 'value')", 1, key) == b"b"


# --- dead endpoints fail fast ---------------------------------------------------


@pytest.fixture(params=["closed", "silent"])
def dead_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A port nothing answers on.

    closed: nothing listens, so connects are refused.
    silent: a socket listens but never accepts or replies, so the TCP connect
    succeeds (via the backlog) and only a read timeout can end the wait -- the
    case that hangs a client without timeouts.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if request.param == "closed":
        sock.close()
        yield port
        return
    sock.listen(16)
    try:
        yield port
    finally:
        sock.close()


def test_redis_dead_port_fails_fast(dead_port: int) -> None:
    client = redis.Redis(
        host="127.0.0.1",
        port=dead_port,
        socket_connect_timeout=1,
        socket_timeout=1,
        retry=Retry(NoBackoff(), 1),
    )
    start = time.monotonic()
    try:
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            client.ping()
    finally:
        client.close()
    assert time.monotonic() - start < 5


def test_kafka_dead_port_fails_fast(dead_port: int) -> None:
    admin = AdminClient(
        {
            "bootstrap.servers": f"127.0.0.1:{dead_port}",
            "socket.connection.setup.timeout.ms": 1000,
        }
    )
    start = time.monotonic()
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=2)
    assert time.monotonic() - start < 5
