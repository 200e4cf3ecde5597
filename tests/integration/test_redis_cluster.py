"""The Redis online store against a real 3-node Redis Cluster (started here from the
redis-server binary scripts/services installs): slot-grouped ordered writes, reads."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from featurestore.stores.codec import decode
from featurestore.stores.online import RedisOnlineStore
from tests.contract.test_online_stores import T0, VIEW, micros, rows

PORTS = (7101, 7102, 7103)


@pytest.fixture(scope="module")
def cluster_servers() -> list[subprocess.Popen[bytes]]:
    return []


@pytest.fixture(scope="module")
def cluster_url(
    tmp_path_factory: pytest.TempPathFactory, cluster_servers: list[subprocess.Popen[bytes]]
) -> Iterator[str]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip('redis-server is not installed; run: eval "$(scripts/services up)"')
    root = tmp_path_factory.mktemp("cluster")
    servers = cluster_servers
    try:
        for port in PORTS:
            folder = root / str(port)
            folder.mkdir()
            servers.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(folder / "nodes.conf"),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(folder),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 10
        while any(
            subprocess.run(["redis-cli", "-p", str(p), "ping"], capture_output=True, text=True).stdout.strip() != "PONG"
            for p in PORTS
        ):
            if time.monotonic() > deadline:
                pytest.fail("cluster nodes did not start")
            time.sleep(0.1)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in PORTS],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while (
            "cluster_state:ok"
            not in subprocess.run(
                ["redis-cli", "-p", str(PORTS[0]), "cluster", "info"], capture_output=True, text=True
            ).stdout
        ):
            if time.monotonic() > deadline:
                pytest.fail("cluster did not become ok")
            time.sleep(0.2)
        yield f"redis+cluster://127.0.0.1:{PORTS[0]}"
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)


def test_cluster_writes_route_by_slot_and_keep_order(cluster_url: str) -> None:
    store = RedisOnlineStore(cluster_url)
    assert store.cluster
    items = [(k, T0 + timedelta(seconds=k), [k, float(k), float(k), float(k), "EUR"]) for k in range(500)]
    assert store.write(VIEW, rows(VIEW, items)).written == 500
    older = store.write(VIEW, rows(VIEW, [(k, T0, [0, 0.0, 0.0, 0.0, "X"]) for k in range(1, 500)]))
    assert (older.written, older.skipped) == (0, 499)
    values = [decode(VIEW, raw) for raw in store.read(VIEW, list(range(500)))]  # type: ignore[arg-type]
    assert [v[1][0] for v in values] == list(range(500))
    assert values[7][0] == micros(T0 + timedelta(seconds=7))
    store.close()


def test_a_node_that_stops_answering_fails_reads_within_the_timeout_not_after_retries(
    cluster_url: str, cluster_servers: list[subprocess.Popen[bytes]]
) -> None:
    """redis-py's cluster clients retried ten times with backoff and topology refreshes:
    with one node frozen (connections accepted, nothing answered) a read with a 2 s
    timeout took 27 s through the API, and the sync read waited as long as the node did."""
    import asyncio
    import os
    import signal

    from featurestore.errors import TransientError

    store = RedisOnlineStore(cluster_url, timeout_s=0.5)
    keys = list(range(200))  # keys on every node
    store.write(VIEW, rows(VIEW, [(k, T0, [k, float(k), float(k), float(k), "EUR"]) for k in keys]))
    assert len(store.read(VIEW, keys)) == 200
    frozen = cluster_servers[1]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(TransientError):
            store.read(VIEW, keys)
        sync_s = time.monotonic() - began

        async def aread() -> float:
            began = time.monotonic()
            try:
                with pytest.raises(TransientError):
                    await store.aread(VIEW, keys)
                return time.monotonic() - began
            finally:
                await store.aclose()  # the async client's connections belong to this loop

        async_s = asyncio.run(aread())
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # Bounded by a few timeouts (the connect and the read), not by retries: was 27 s and more.
    assert sync_s < 4.0, sync_s
    assert async_s < 4.0, async_s
    store.close()
