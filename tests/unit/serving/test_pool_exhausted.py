"""A Redis connection pool that stays full: a lookup waits `pool_timeout_s`, then fails
with one clear line (a TransientError; a 503 with Retry-After from the feature API), not
a traceback. The server here accepts connections and never answers, so the first lookup
holds the pool's only connection until its socket timeout."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from featurestore.errors import TransientError
from featurestore.stores.online import RedisOnlineStore
from serving import FeatureClient
from serving.api import create_app
from tests.unit.serving.test_client import PLAN, VIEW


def exhausted(port: int) -> str:
    return (
        f"online store Redis at redis://127.0.0.1:{port}/0: no connection free within 0.05 s (pool of 1); "
        "raise online_store.pool_size (TENX_REDIS_POOL_SIZE) or send fewer lookups at once"
    )


def test_a_full_pool_is_a_503_with_retry_after_once_the_wait_runs_out() -> None:
    async def scenario() -> tuple[int, httpx.Response, httpx.Response, float]:
        accepted = asyncio.Event()
        writers: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            accepted.set()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = RedisOnlineStore(f"redis://127.0.0.1:{port}/0", timeout_s=5, pool_size=1, pool_timeout_s=0.05)
        app = create_app(store, PLAN)
        body = {"view": "spend", "entities": [1]}
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
                holder = asyncio.create_task(api.post("/features", json=body))
                await asyncio.wait_for(accepted.wait(), 5)  # the pool's one connection is taken
                began = time.perf_counter()
                waiter = await api.post("/features", json=body)
                waited = time.perf_counter() - began
                for writer in writers:  # the holder's lookup fails now, not after 5 s
                    writer.close()
                return port, await holder, waiter, waited
        finally:
            await store.aclose()
            server.close()
            await server.wait_closed()

    port, holder, waiter, waited = asyncio.run(scenario())
    assert waiter.status_code == 503
    assert waiter.json() == {"error": exhausted(port)}
    assert waiter.headers["retry-after"] == "1"
    assert 0.05 <= waited < 2
    assert holder.status_code == 503  # the server hung up on it
    assert holder.headers["retry-after"] == "1"


def test_a_full_pool_fails_a_sync_lookup_in_one_clear_line() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(5)
        port = listener.getsockname()[1]
        store = RedisOnlineStore(f"redis://127.0.0.1:{port}/0", timeout_s=5, pool_size=1, pool_timeout_s=0.05)
        client = FeatureClient(store, PLAN)
        failed: list[BaseException] = []

        def hold() -> None:
            try:
                client.get("spend", [1])
            except TransientError as error:
                failed.append(error)

        holder = threading.Thread(target=hold)
        holder.start()
        connection, _ = listener.accept()  # the pool's one connection is taken, and never answered
        try:
            with pytest.raises(TransientError) as raised:
                store.read(VIEW, [1])
            assert str(raised.value) == exhausted(port)
        finally:
            connection.close()
            holder.join(timeout=10)
        store.close()
    assert not holder.is_alive()
    assert len(failed) == 1  # the server hung up on the holder
