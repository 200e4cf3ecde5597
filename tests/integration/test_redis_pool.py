"""Bursts past the Redis connection pool against a real Redis: 500 lookups at once wait
for a free connection (a blocking pool, `online_store.pool_size`) and all succeed, with
the right values, through the async client, the feature API and `tenx serve`; on a
cluster the store bounds its calls in flight the same way. (An exhausted pool that stays
full is a clear 503: tests/unit/serving/test_pool_exhausted.py.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pyarrow as pa
import pytest
import redis

from featurestore.plan import AS_OF
from featurestore.registry import FileRegistry
from featurestore.stores.online import RedisOnlineStore
from serving import AsyncFeatureClient, Status
from serving.api import create_app
from tests.integration.test_redis_cluster import cluster_servers, cluster_url  # noqa: F401 (the fixtures)
from tests.processes import clean_environment, free_port, wait_until_serving
from tests.services import redis_kwargs
from tests.unit.serving.test_client import PLAN, VIEW

BURST = 500
USERS = 100


def write_users(store: RedisOnlineStore, view: Any = VIEW) -> None:
    """Users 0..99: count_1h = k, sum_amount_1h = k, mean_amount_1h = k / 2, EUR; fresh."""
    now = datetime.now(UTC) - timedelta(minutes=1)
    users = list(range(USERS))
    table = {
        "user_id": users,
        AS_OF: [now] * USERS,
        "count_1h": users,
        "sum_amount_1h": [float(k) for k in users],
        "mean_amount_1h": [k / 2 for k in users],
        "last_currency_1h": ["EUR"] * USERS,
    }
    assert store.write(view, pa.table(table, schema=view.changelog_schema())).written == USERS


def expected(user: int) -> list[Any]:
    return [user, float(user), user / 2, "EUR"]


def entities_of(request: int) -> list[int]:
    """Two known users and one that has no value, different for every request."""
    return [request % USERS, (request * 7 + 3) % USERS, 10_000 + request]


async def burst_of_lookups(store: RedisOnlineStore) -> list[str]:
    """BURST lookups at once through the async client; what went wrong with each, if anything."""
    client = AsyncFeatureClient(store, PLAN)

    async def one(request: int) -> str:
        entities = entities_of(request)
        try:
            result = await client.get("spend", entities)
        except Exception as error:  # counted and shown by the assertion
            return f"{type(error).__name__}: {error}"
        if result.statuses != (Status.FOUND, Status.FOUND, Status.MISSING):
            return f"request {request}: statuses {result.statuses}"
        if [list(v) if v is not None else None for v in result.values] != [*map(expected, entities[:2]), None]:
            return f"request {request}: values {result.values}"
        return "ok"

    try:
        return list(await asyncio.gather(*(one(request) for request in range(BURST))))
    finally:
        await client.aclose()


def failures(outcomes: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if outcome != "ok":
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def test_500_lookups_at_once_on_the_default_pool_all_succeed(redis_url: str, redis_prefix: str) -> None:
    # redis-py's default pool refused the 101st lookup in flight ("Too many connections"):
    # 400 of these 500 failed before the pool waited.
    store = RedisOnlineStore(redis_url, prefix=redis_prefix.rstrip(":"))
    write_users(store)
    assert failures(asyncio.run(burst_of_lookups(store))) == {}


def test_500_lookups_at_once_share_a_pool_of_8(redis_url: str, redis_prefix: str) -> None:
    store = RedisOnlineStore(redis_url, prefix=redis_prefix.rstrip(":"), pool_size=8)
    write_users(store)
    assert failures(asyncio.run(burst_of_lookups(store))) == {}
    # Reads from threads wait on the sync client's pool the same way.
    assert store.read(VIEW, [1])[0] is not None


def test_500_feature_api_requests_at_once_share_a_pool_of_8(redis_url: str, redis_prefix: str) -> None:
    store = RedisOnlineStore(redis_url, prefix=redis_prefix.rstrip(":"), pool_size=8)
    write_users(store)
    app = create_app(store, PLAN)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30) as api:
                requests = (
                    api.post("/features", json={"view": "spend", "entities": entities_of(r)}) for r in range(BURST)
                )
                return list(await asyncio.gather(*requests))
        finally:
            await store.aclose()  # on the loop its connections belong to

    assert_all_answered(asyncio.run(burst()))


def assert_all_answered(responses: list[httpx.Response]) -> None:
    codes: dict[int, int] = {}
    for response in responses:
        codes[response.status_code] = codes.get(response.status_code, 0) + 1
    problems = {r.json().get("error") for r in responses if r.status_code != 200}
    assert codes == {200: BURST}, problems
    for request, response in enumerate(responses):
        entities = entities_of(request)
        results = response.json()["results"]
        assert [row["entity"] for row in results] == entities
        assert [row["status"] for row in results] == ["found", "found", "missing"]
        assert [row["values"] for row in results] == [*map(expected, entities[:2]), None]


@pytest.fixture
def served_repo(tmp_path: Path, redis_url: str) -> Iterator[tuple[Path, str]]:
    """A feature repo with an applied plan and its user_spend values in Redis (under
    its own project, deleted afterwards)."""
    project = f"pool{uuid.uuid4().hex[:12]}"
    tenx = Path(sys.executable).parent / "tenx"
    environment = clean_environment(TENX_REDIS_URL=redis_url)
    for args, cwd in ((["init", project], tmp_path), (["apply"], tmp_path / project)):
        done = subprocess.run([tenx, *args], cwd=cwd, capture_output=True, text=True, env=environment, timeout=120)
        assert done.returncode == 0, done.stderr
    repo = tmp_path / project
    plan = FileRegistry(repo / ".tenx" / "registry").current()
    assert plan is not None
    store = RedisOnlineStore(redis_url, prefix=f"tenx:{project}")
    view = plan.view("user_spend")
    now = datetime.now(UTC) - timedelta(minutes=1)
    table = {name: [None] * USERS for name in view.changelog_schema().names}
    table.update({"user_id": list(range(USERS)), AS_OF: [now] * USERS, view.feature_names[0]: list(range(USERS))})
    assert store.write(view, pa.table(table, schema=view.changelog_schema())).written == USERS
    store.close()
    yield repo, view.feature_names[0]
    cleanup = redis.Redis.from_url(redis_url, **redis_kwargs())
    try:
        keys = list(cleanup.scan_iter(match=f"tenx:{project}:*", count=500))
        if keys:
            cleanup.delete(*keys)
    finally:
        cleanup.close()


def test_tenx_serve_takes_the_pool_size_from_the_environment(served_repo: tuple[Path, str], redis_url: str) -> None:
    repo, feature = served_repo
    port = free_port()
    tenx = Path(sys.executable).parent / "tenx"
    environment = clean_environment(TENX_REDIS_URL=redis_url, TENX_REDIS_POOL_SIZE="8", TENX_REDIS_POOL_TIMEOUT="10")
    server = subprocess.Popen(
        [tenx, "serve", "--port", str(port)], cwd=repo, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/health/live", server)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=BURST)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as api:
                requests = (
                    api.post("/features", json={"features": [f"user_spend:{feature}"], "entities": entities_of(r)})
                    for r in range(BURST)
                )
                return list(await asyncio.gather(*requests))

        responses = asyncio.run(burst())
        problems = {r.text for r in responses if r.status_code != 200}
        assert [r.status_code for r in responses] == [200] * BURST, problems
        for request, response in enumerate(responses):
            known = entities_of(request)[:2]
            assert [row["values"] for row in response.json()["results"]] == [[known[0]], [known[1]], None]
        # Seen from outside: the API process holds 8 connections to Redis, not 64 (the
        # default) nor one per request.
        assert 1 <= connections_to(server.pid, urlsplit(redis_url).port or 6379) <= 8
    finally:
        server.terminate()
        server.communicate(timeout=30)


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` to `port` (Linux: /proc)."""
    if not Path(f"/proc/{pid}/net/tcp").exists():
        pytest.skip("counting a process's connections needs Linux /proc")
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            established = fields[3] == "01"
            if remote_port == port and established and fields[9] in inodes:
                count += 1
    return count


def test_500_lookups_at_once_on_a_cluster_share_a_pool_of_8(cluster_url: str) -> None:  # noqa: F811
    # The cluster clients of redis-py refuse past max_connections per node instead of
    # waiting; the store bounds its calls in flight to the pool size instead.
    store = RedisOnlineStore(cluster_url, prefix=f"tenx-test:{uuid.uuid4().hex}", pool_size=8)
    write_users(store)
    assert failures(asyncio.run(burst_of_lookups(store))) == {}
    store.close()
