"""Fixtures for tests against a real Redis and a real Kafka broker (a pytest plugin
loaded by tests/conftest.py, so integration and contract tests share it).

Where each service comes from, in order:

1. ``TENX_REDIS_URL`` / ``TENX_KAFKA_BOOTSTRAP`` -- normally from
   ``eval "$(scripts/services up)"``, which runs both as local processes.
2. testcontainers, if it is installed and a Docker engine answers.
3. Neither: the tests are skipped with a message saying how to start the
   services -- except under ``CI=true``, where a missing service is a failure,
   so that CI can never go green by silently skipping everything here.

Every network call here carries a short timeout: a stopped service must turn
into a quick skip/failure, never a hung test run.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # .admin re-exports it implicitly; strict mypy objects
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

INTEGRATION = Path(__file__).resolve().parent / "integration"
SERVICE_FIXTURES = {"redis_url", "kafka_bootstrap", "s3_endpoint", "s3_location"}
START_HINT = 'start them with: eval "$(scripts/services up)"  (from the repo root)'

log = logging.getLogger(__name__)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Integration: the tests under tests/integration, and any test using a real service.
    for item in items:
        if item.path.is_relative_to(INTEGRATION) or SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


# --- locating the services ------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(what: str) -> NoReturn:
    msg = f"{what}; {START_HINT}"
    if _in_ci():
        pytest.fail(f"CI=true and {msg}", pytrace=False)
    pytest.skip(msg)


def _docker_available() -> bool:
    """A Docker engine that answers, and testcontainers to drive it."""
    try:
        import testcontainers  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        proc = subprocess.run([docker, "info"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def redis_kwargs() -> dict[str, Any]:
    # redis-py 8 retries a failed connect 10 times by default (~4 s against a
    # closed port); two quick retries still ride out a blip.
    return {
        "socket_timeout": 5,
        "socket_connect_timeout": 2,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    }


def kafka_conf(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "socket.connection.setup.timeout.ms": 3000,
        "reconnect.backoff.max.ms": 1000,
    }


def _probe_redis(url: str) -> str | None:
    """None when Redis answers PING, else why not."""
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(ExponentialBackoff(), 0))
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def _probe_kafka(bootstrap: str) -> str | None:
    """None when the broker answers a metadata request, else why not."""
    # log_level 0: librdkafka would print "Connection refused" on every retry.
    admin = AdminClient({**kafka_conf(bootstrap), "log_level": 0})
    try:
        if not admin.list_topics(timeout=3).brokers:
            return "metadata response lists no brokers"
    except KafkaException as exc:
        return f"KafkaException: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("TENX_REDIS_URL")
    if url:
        problem = _probe_redis(url)
        if problem:
            _unavailable(f"Redis is not reachable at TENX_REDIS_URL={url} ({problem})")
        yield url
        return
    if _docker_available():
        from testcontainers.redis import (  # type: ignore[import-not-found, unused-ignore]
            RedisContainer,
        )

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(container.port)
            yield f"redis://{host}:{port}/0"
        return
    _unavailable("Redis is not available (TENX_REDIS_URL is unset and no Docker engine answers)")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    bootstrap = os.environ.get("TENX_KAFKA_BOOTSTRAP")
    if bootstrap:
        problem = _probe_kafka(bootstrap)
        if problem:
            _unavailable(f"Kafka is not reachable at TENX_KAFKA_BOOTSTRAP={bootstrap} ({problem})")
        yield bootstrap
        return
    if _docker_available():
        from testcontainers.kafka import (  # type: ignore[import-not-found, unused-ignore]
            KafkaContainer,
        )

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    _unavailable("Kafka is not available (TENX_KAFKA_BOOTSTRAP is unset and no Docker engine answers)")


# --- per-test isolation ---------------------------------------------------------


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, **redis_kwargs())
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix no other test uses; every ``prefix*`` key is deleted afterwards."""
    # uuid hex and ':' contain no glob metacharacters, so prefix* matches literally.
    prefix = f"tenx-test:{uuid.uuid4().hex}:"
    yield prefix
    # SCAN, not KEYS: KEYS blocks the whole server for the length of the keyspace.
    batch: list[bytes] = []
    for key in redis_client.scan_iter(match=f"{prefix}*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            redis_client.delete(*batch)
            batch.clear()
    if batch:
        redis_client.delete(*batch)


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({**kafka_conf(kafka_bootstrap), "log_level": 3})


def _wait_topic_ready(admin: AdminClient, topic: str, timeout_s: float) -> None:
    # CreateTopics returns once the controller committed the topic; the broker's
    # metadata can lag a moment behind (LEADER_NOT_AVAILABLE), so tests that
    # inspect metadata straight away would flake without this.
    deadline = time.monotonic() + timeout_s
    while True:
        # Every topic, not `list_topics(topic=...)`: that puts the topic in the session
        # client's cache, whose refresh every 5 minutes re-creates it once it is deleted
        # (the broker auto-creates topics a producer-capable client asks about).
        meta = admin.list_topics(timeout=5).topics.get(topic)
        if (
            meta is not None
            and meta.error is None
            and meta.partitions
            and all(p.leader >= 0 and p.error is None for p in meta.partitions.values())
        ):
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"topic {topic} not ready {timeout_s}s after creation: {meta and meta.error}")
        time.sleep(0.05)


@pytest.fixture
def kafka_topic(kafka_admin: AdminClient) -> Iterator[str]:
    """A freshly created, single-partition topic, deleted after the test."""
    topic = f"tenx-test-{uuid.uuid4().hex}"
    futures = kafka_admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)], operation_timeout=10)
    futures[topic].result(timeout=15)
    _wait_topic_ready(kafka_admin, topic, timeout_s=10)
    try:
        yield topic
    finally:
        try:
            kafka_admin.delete_topics([topic], operation_timeout=10)[topic].result(timeout=15)
        except Exception:  # best effort: a leftover uniquely named topic harms no one
            log.exception("could not delete test topic %s", topic)


@pytest.fixture(scope="session", autouse=True)
def no_topics_left_behind() -> Iterator[None]:
    """Tests delete the topics they create, the ones their stream jobs create too
    (`<topic>.late`, `<topic>.dead-letters`): a topic the run leaves on the broker fails
    the run. Only where a broker is configured; a broker that went away is not judged."""
    bootstrap = os.environ.get("TENX_KAFKA_BOOTSTRAP")
    if not bootstrap:
        yield
        return

    def topics() -> set[str] | None:
        try:
            admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 3000})
            return {t for t in admin.list_topics(timeout=5).topics if not t.startswith("__")}
        except KafkaException:
            return None

    before = topics()
    yield
    after = topics()
    if before is None or after is None:
        return
    deadline = time.monotonic() + 15  # deletions are asynchronous on the broker
    while (left := sorted(after - before)) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = topics() or after
    assert not left, f"the tests left these Kafka topics behind: {', '.join(left[:20])}"


# --- S3 (SeaweedFS from scripts/services) -------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """The S3 server's endpoint (TENX_S3_ENDPOINT from `scripts/services up`)."""
    endpoint = os.environ.get("TENX_S3_ENDPOINT")
    if not endpoint:
        _unavailable("the S3 server is not available (TENX_S3_ENDPOINT is unset)")
    return endpoint


@pytest.fixture
def s3_location(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`s3://<fresh bucket>/tenx` with the standard AWS_* variables set for it (as a
    user would), the bucket removed afterwards."""
    import pyarrow.fs as pafs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", os.environ.get("TENX_S3_ACCESS_KEY", ""))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", os.environ.get("TENX_S3_SECRET_KEY", ""))
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    host = s3_endpoint.removeprefix("http://")
    filesystem = pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key=os.environ.get("TENX_S3_ACCESS_KEY"),
        secret_key=os.environ.get("TENX_S3_SECRET_KEY"),
        region="us-east-1",
        connect_timeout=5,
        request_timeout=30,
        allow_bucket_creation=True,
        allow_bucket_deletion=True,
    )
    bucket = f"tenx-test-{uuid.uuid4().hex[:12]}"
    try:
        filesystem.create_dir(bucket)
    except OSError as error:
        _unavailable(f"the S3 server at {s3_endpoint} refused a new bucket ({error})")
    try:
        yield f"s3://{bucket}/tenx"
    finally:
        try:
            filesystem.delete_dir(bucket)
        except OSError as error:
            log.warning("could not remove test bucket %s: %s", bucket, error)
