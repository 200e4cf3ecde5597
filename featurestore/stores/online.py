"""Online stores: the latest feature vector per (view version, entity), behind one
small Protocol, with two implementations run through one contract suite.

- RedisOnlineStore: one key per view version + entity, MGET for many entities,
  ordered idempotent writes checked server side by a Lua script (a value is replaced
  only by one with a newer or equal as_of), pipelined batches, Redis Cluster aware.
- SqliteOnlineStore: the embedded default (no Redis URL): a real on-disk store with
  the same semantics (UPSERT ... WHERE excluded.as_of >= as_of).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from featurestore.config import REDIS_POOL_SIZE, REDIS_POOL_TIMEOUT_S
from featurestore.errors import TransientError
from featurestore.plan.model import ViewSpec
from featurestore.redact import redact_text, redact_url
from featurestore.stores.codec import encode_rows, online_keys

WRITE_CHUNK = 2_000
LEASED_CONNECTIONS = 8  # kept by `aread_many` beside redis-py's pool (at most pool_size)


@functools.cache
def _hiredis_pack() -> Any:
    """hiredis's command packer (one C call), or None: redis[hiredis] brings it, and
    without it redis-py packs. Looked up on first use: importing tenx loads no client."""
    try:
        from hiredis import pack_command
    except ImportError:
        return None
    return pack_command


@dataclass(frozen=True)
class WriteResult:
    written: int  # stored (newer or equal as_of)
    skipped: int  # older than what the store holds: ignored


class OnlineStore(Protocol):
    """Latest vectors per entity. `read` returns packed values (or None) in key order;
    decoding is the pure `codec.decode`, shared by every caller."""

    def write(self, view: ViewSpec, rows: pa.Table) -> WriteResult: ...

    def write_packed(
        self, view: ViewSpec, entities: Sequence[Any], as_of: Sequence[int], values: Sequence[bytes]
    ) -> WriteResult: ...

    def read(self, view: ViewSpec, entities: Sequence[Any]) -> list[bytes | None]: ...

    def close(self) -> None: ...


class ReadsMany(Protocol):
    """An online store that reads several views' values in one round trip (the model
    server's lookups): one list of packed values per (view, entities) asked, in order."""

    def read_many(self, requests: Sequence[tuple[ViewSpec, Sequence[Any]]]) -> list[list[bytes | None]]: ...


def _all_keys(requests: Sequence[tuple[ViewSpec, Sequence[Any]]], prefix: str) -> tuple[list[bytes], list[int]]:
    keys: list[bytes] = []
    sizes: list[int] = []
    for view, entities in requests:
        keys.extend(online_keys(view, entities, prefix=prefix))
        sizes.append(len(entities))
    return keys, sizes


def _cut(values: list[bytes | None], sizes: list[int]) -> list[list[bytes | None]]:
    if len(sizes) == 1:
        return [values]
    parts = []
    start = 0
    for size in sizes:
        parts.append(values[start : start + size])
        start += size
    return parts


# -- Redis --------------------------------------------------------------------------------

# KEYS: keys; ARGV[1]: expiry in ms (0: none); ARGV[2..]: values, one per key.
# Bytes 2-9 of a value are its as_of, big-endian: compared byte by byte (Lua's string
# `<=` uses strcoll, which depends on the server's locale).
_ORDERED_SET = """
local function not_newer(current, value)
  for i = 2, 9 do
    local a, b = string.byte(current, i), string.byte(value, i)
    if a ~= b then return a < b end
  end
  return true
end
local expiry = tonumber(ARGV[1])
local written = 0
for index, key in ipairs(KEYS) do
  local value = ARGV[index + 1]
  local current = redis.call('GET', key)
  if (not current) or not_newer(current, value) then
    if expiry > 0 then
      redis.call('SET', key, value, 'PX', expiry)
    else
      redis.call('SET', key, value)
    end
    written = written + 1
  end
end
return written
"""


class RedisOnlineStore:
    """Redis (or Redis Cluster) online store. Every call has a socket timeout; a
    connection failure raises TransientError naming the address.

    Each client (the sync one, and the async one opened by the first `aread`) holds at
    most `pool_size` connections (per node on a cluster). A call past that many at once
    waits up to `pool_timeout_s` for one to come free, then raises TransientError saying
    so: a burst queues briefly instead of being refused, and what to shed under overload
    is left to the caller (the feature API), not to the pool."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tenx",
        timeout_s: float = 2.0,
        key_ttl_s: float | None = None,
        cluster: bool | None = None,
        pool_size: int = REDIS_POOL_SIZE,
        pool_timeout_s: float = REDIS_POOL_TIMEOUT_S,
    ) -> None:
        import redis

        if pool_size < 1 or not 0 < pool_timeout_s < math.inf:
            raise ValueError(
                "RedisOnlineStore: pool_size must be at least 1 and pool_timeout_s above 0 and finite; "
                f"got pool_size={pool_size}, pool_timeout_s={pool_timeout_s}"
            )
        self.url = url
        self.prefix = prefix
        self.key_ttl_ms = int(key_ttl_s * 1000) if key_ttl_s else 0
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        self.pool_timeout_s = pool_timeout_s
        options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        self._options = options
        self._async: Any = None
        self.cluster = bool(cluster) if cluster is not None else url.startswith("redis+cluster://")
        # redis-py's cluster clients have no pool that waits: the async one refuses past
        # max_connections per node (MaxConnectionsError), the sync one takes a blocking
        # pool's timeout for a failed node and asks for a topology refresh. So on a cluster
        # the store bounds its own calls in flight; each uses at most one connection per node.
        self._sync_turns = threading.BoundedSemaphore(pool_size) if self.cluster else None
        self._sync_reads: concurrent.futures.ThreadPoolExecutor | None = None
        self._async_turns: asyncio.Semaphore | None = None
        self._leases: asyncio.LifoQueue[Any] | None = None
        self._leased = 0
        try:
            if self.cluster:
                from redis.cluster import RedisCluster

                self.client: Any = RedisCluster.from_url(
                    url.replace("redis+cluster://", "redis://"),
                    max_connections=pool_size,
                    retry=_no_retry(),
                    **options,
                )
            else:
                pool = redis.BlockingConnectionPool.from_url(
                    url, max_connections=pool_size, timeout=pool_timeout_s, retry_on_timeout=False, **options
                )
                self.client = redis.Redis.from_pool(pool)
        except redis.RedisError as error:
            raise TransientError(f"online store Redis at {redact_url(url)}: {redact_text(str(error))}") from error
        self._script = self.client.register_script(_ORDERED_SET)

    def __repr__(self) -> str:
        return f"RedisOnlineStore({redact_url(self.url)!r})"

    def _fail(self, error: Exception) -> TransientError:
        if _pool_exhausted(error):
            return self._pool_exhausted()
        return TransientError(
            f"online store Redis at {redact_url(self.url)}: {type(error).__name__}: {redact_text(str(error))}"
        )

    def _pool_exhausted(self) -> TransientError:
        per_node = " per node" if self.cluster else ""
        return TransientError(
            f"online store Redis at {redact_url(self.url)}: no connection free within {self.pool_timeout_s:g} s "
            f"(pool of {self.pool_size}{per_node}); raise online_store.pool_size (TENX_REDIS_POOL_SIZE) "
            "or send fewer lookups at once"
        )

    def _cluster_mget(self, keys: list[bytes]) -> Any:
        """MGET across the cluster, given up on after two timeouts (a connect and a read)
        once a turn is free. With a node that accepts connections and never answers,
        redis-py's sync cluster pipeline kept reconnecting and refreshing the topology
        (35 s with its retries off) or waited as long as the node did. A call given up on
        finishes on its thread and keeps its turn until then."""
        turns = self._sync_turns
        assert turns is not None  # a cluster store
        if self._sync_reads is None:
            self._sync_reads = concurrent.futures.ThreadPoolExecutor(self.pool_size, thread_name_prefix="redis-read")
        if not turns.acquire(timeout=self.pool_timeout_s):
            raise self._pool_exhausted()

        def mget() -> Any:
            try:
                return self.client.mget_nonatomic(keys)
            finally:
                turns.release()

        try:
            future = self._sync_reads.submit(mget)
        except RuntimeError:  # the store was closed
            turns.release()
            raise
        deadline = 2 * self.timeout_s
        try:
            return future.result(timeout=deadline)
        except concurrent.futures.TimeoutError:
            raise TransientError(
                f"online store Redis at {redact_url(self.url)}: the cluster did not answer within {deadline:g} s"
            ) from None

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """On a cluster, wait for one of `pool_size` turns (see __init__); else nothing."""
        if self._sync_turns is None:
            yield
            return
        if not self._sync_turns.acquire(timeout=self.pool_timeout_s):
            raise self._pool_exhausted()
        try:
            yield
        finally:
            self._sync_turns.release()

    @asynccontextmanager
    async def _async_turn(self) -> AsyncIterator[None]:
        if self._async_turns is None:
            yield
            return
        try:
            async with asyncio.timeout(self.pool_timeout_s):
                await self._async_turns.acquire()
        except TimeoutError:
            raise self._pool_exhausted() from None
        try:
            yield
        finally:
            self._async_turns.release()

    def write(self, view: ViewSpec, rows: pa.Table) -> WriteResult:
        return self.write_packed(view, *_split(encode_rows(view, rows)))

    def write_packed(
        self, view: ViewSpec, entities: Sequence[Any], as_of: Sequence[int], values: Sequence[bytes]
    ) -> WriteResult:
        """Packed values (`codec.encode`) for entities; `as_of` is inside each value."""
        import redis

        keys = online_keys(view, entities, prefix=self.prefix)
        encoded = list(zip(keys, values, strict=True))
        written = 0
        try:
            if self.cluster:
                with self._turn():
                    written = self._write_cluster(encoded)
            else:
                pipe = self.client.pipeline(transaction=False)
                for start in range(0, len(encoded), WRITE_CHUNK):
                    chunk = encoded[start : start + WRITE_CHUNK]
                    self._script(
                        keys=[k for k, _ in chunk], args=[self.key_ttl_ms, *(v for _, v in chunk)], client=pipe
                    )
                written = sum(int(n) for n in pipe.execute())
        except redis.RedisError as error:
            raise self._fail(error) from error
        return WriteResult(written, len(encoded) - written)

    def _write_cluster(self, encoded: list[tuple[bytes, bytes]]) -> int:
        # A script may only touch keys of one slot: group by slot.
        from redis.crc import key_slot

        by_slot: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in encoded:
            by_slot.setdefault(key_slot(key), []).append((key, value))
        written = 0
        for items in by_slot.values():
            written += int(self._script(keys=[k for k, _ in items], args=[self.key_ttl_ms, *(v for _, v in items)]))
        return written

    def read(self, view: ViewSpec, entities: Sequence[Any]) -> list[bytes | None]:
        import redis

        keys = online_keys(view, entities, prefix=self.prefix)
        try:
            if self.cluster:
                return list(self._cluster_mget(keys))
            return list(self.client.mget(keys))
        except redis.RedisError as error:
            raise self._fail(error) from error

    def read_many(self, requests: Sequence[tuple[ViewSpec, Sequence[Any]]]) -> list[list[bytes | None]]:
        """Every view's values in one MGET (per node on a cluster)."""
        import redis

        keys, sizes = _all_keys(requests, self.prefix)
        try:
            if self.cluster:
                return _cut(list(self._cluster_mget(keys)), sizes)
            return _cut(list(self.client.mget(keys)), sizes)
        except redis.RedisError as error:
            raise self._fail(error) from error

    async def aread_many(self, requests: Sequence[tuple[ViewSpec, Sequence[Any]]]) -> list[list[bytes | None]]:
        """`read_many` for asyncio callers (the model server's one read per batch).

        On a single Redis the MGET is packed by hiredis in one C call and sent on a
        connection this store keeps leased (`_lease`): redis-py's per-argument packing,
        retry wrapper and pool bookkeeping were a quarter of a 100-entity request's
        Python time. The connection is still redis-py's (auth, TLS, db, timeouts)."""
        import redis

        client = self._async_client()
        pack = _hiredis_pack()
        if self.cluster or pack is None:
            keys, sizes = _all_keys(requests, self.prefix)
            try:
                if self.cluster:
                    return _cut(list(await self._async_cluster_mget(client, keys)), sizes)
                return _cut(list(await client.mget(keys)), sizes)
            except redis.RedisError as error:
                raise self._fail(error) from error
        sizes = [len(entities) for _, entities in requests]
        command = ["MGET"]
        for view, entities in requests:
            base = f"{self.prefix}:{view.name}:{view.version}:"
            command.extend([f"{base}{entity}" for entity in entities])
        packed = pack(tuple(command))
        connection = await self._lease(client)
        leases = self._leases
        assert leases is not None  # made by _lease
        try:
            await connection.send_packed_command(packed, check_health=False)
            values = await connection.read_response()
        except redis.RedisError as error:
            await connection.disconnect()  # reopened on its next use
            raise self._fail(error) from error
        except BaseException:
            await connection.disconnect()  # cancelled mid-reply: the next read must not see it
            raise
        finally:
            leases.put_nowait(connection)
        if isinstance(values, redis.ResponseError):
            raise TransientError(f"online store Redis at {redact_url(self.url)}: {values}")
        return _cut(values, sizes)

    async def _lease(self, client: Any) -> Any:
        """One of up to LEASED_CONNECTIONS connections kept out of redis-py's pool for
        `aread_many`; waits up to the pool timeout when all are busy."""
        if self._leases is None:
            self._leases = asyncio.LifoQueue()
        if self._leases.empty() and self._leased < min(LEASED_CONNECTIONS, self.pool_size):
            self._leased += 1
            return client.connection_pool.make_connection()  # connects on first use
        try:
            async with asyncio.timeout(self.pool_timeout_s):
                return await self._leases.get()
        except TimeoutError:
            raise self._pool_exhausted() from None

    def ping(self) -> bool:
        import redis

        try:
            with self._turn():
                return bool(self.client.ping())
        except redis.RedisError as error:
            raise self._fail(error) from error

    async def aread(self, view: ViewSpec, entities: Sequence[Any]) -> list[bytes | None]:
        """`read` for asyncio callers, on redis.asyncio (one connection pool per loop)."""
        import redis

        client = self._async_client()
        keys = online_keys(view, entities, prefix=self.prefix)
        try:
            if self.cluster:
                return list(await self._async_cluster_mget(client, keys))
            return list(await client.mget(keys))
        except redis.RedisError as error:
            raise self._fail(error) from error

    async def _async_cluster_mget(self, client: Any, keys: list[bytes]) -> Any:
        """MGET across the cluster within two timeouts of getting a turn (as `_cluster_mget`)."""
        async with self._async_turn():
            deadline = 2 * self.timeout_s
            try:
                async with asyncio.timeout(deadline):
                    return await client.mget_nonatomic(keys)
            except TimeoutError:
                raise TransientError(
                    f"online store Redis at {redact_url(self.url)}: the cluster did not answer within {deadline:g} s"
                ) from None

    def _async_client(self) -> Any:
        if self._async is None:
            import redis.asyncio

            if self.cluster:
                from redis.asyncio.cluster import RedisCluster as AsyncCluster

                self._async_turns = asyncio.Semaphore(self.pool_size)
                self._async = AsyncCluster.from_url(
                    self.url.replace("redis+cluster://", "redis://"),
                    max_connections=self.pool_size,
                    retry=_no_retry(asynchronous=True),
                    **self._options,
                )
            else:
                pool = redis.asyncio.BlockingConnectionPool.from_url(
                    self.url, max_connections=self.pool_size, timeout=self.pool_timeout_s, **self._options
                )
                self._async = redis.asyncio.Redis.from_pool(pool)
        return self._async

    async def aclose(self) -> None:
        if self._leases is not None:
            while not self._leases.empty():
                await self._leases.get_nowait().disconnect()
            self._leases = None
            self._leased = 0
        if self._async is not None:
            await self._async.aclose()
            self._async = None
        self.close()

    def close(self) -> None:
        if self._sync_reads is not None:
            self._sync_reads.shutdown(wait=False, cancel_futures=True)
        self.client.close()


# -- SQLite ---------------------------------------------------------------------------------


class SqliteOnlineStore:
    """The embedded online store: one SQLite file, WAL mode, ordered UPSERTs."""

    def __init__(self, path: Path, *, prefix: str = "tenx", timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.prefix = prefix
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._timeout = timeout_s
        connection = self._connection()
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS online (key BLOB PRIMARY KEY, as_of INTEGER NOT NULL, value BLOB NOT NULL)"
            " WITHOUT ROWID"
        )
        connection.commit()

    def __repr__(self) -> str:
        return f"SqliteOnlineStore({str(self.path)!r})"

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
        return connection

    def write(self, view: ViewSpec, rows: pa.Table) -> WriteResult:
        return self.write_packed(view, *_split(encode_rows(view, rows)))

    def write_packed(
        self, view: ViewSpec, entities: Sequence[Any], as_of: Sequence[int], values: Sequence[bytes]
    ) -> WriteResult:
        connection = self._connection()
        keys = online_keys(view, entities, prefix=self.prefix)
        items = list(zip(keys, as_of, values, strict=True))
        before = connection.total_changes
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(
                "INSERT INTO online (key, as_of, value) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET as_of = excluded.as_of, value = excluded.value "
                "WHERE excluded.as_of >= online.as_of",
                items,
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        written = connection.total_changes - before
        return WriteResult(written, len(items) - written)

    def read(self, view: ViewSpec, entities: Sequence[Any]) -> list[bytes | None]:
        keys = online_keys(view, entities, prefix=self.prefix)
        found: dict[bytes, bytes] = {}
        connection = self._connection()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in connection.execute(f"SELECT key, value FROM online WHERE key IN ({marks})", chunk):  # noqa: S608
                found[bytes(key)] = bytes(value)
        return [found.get(key) for key in keys]

    def read_many(self, requests: Sequence[tuple[ViewSpec, Sequence[Any]]]) -> list[list[bytes | None]]:
        """Each view's values, read in one SQLite transaction (one consistent snapshot)."""
        connection = self._connection()
        connection.execute("BEGIN")
        try:
            return [self.read(view, entities) for view, entities in requests]
        finally:
            connection.execute("COMMIT")

    def ping(self) -> bool:
        self._connection().execute("SELECT 1").fetchone()
        return True

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


def open_online_store(
    *,
    redis_url: str | None,
    sqlite_path: Path,
    project: str | None = None,
    prefix: str | None = None,
    pool_size: int = REDIS_POOL_SIZE,
    pool_timeout_s: float = REDIS_POOL_TIMEOUT_S,
) -> OnlineStore:
    """Redis when a URL is configured, else the embedded SQLite store. Keys start with
    `tenx:<project>` so two feature repos sharing a Redis never read each other's values
    (identical views have identical versions). The pool settings are Redis's
    (`Settings.redis_pool_size`, `Settings.redis_pool_timeout_s`)."""
    if prefix is None:
        prefix = f"tenx:{project}" if project else "tenx"
    if redis_url:
        return RedisOnlineStore(redis_url, prefix=prefix, pool_size=pool_size, pool_timeout_s=pool_timeout_s)
    return SqliteOnlineStore(sqlite_path, prefix=prefix)


def follow_project(store: Any, before: str | None, after: str | None) -> bool:
    """Point a store opened for project `before` (keys `tenx:<before>`, as
    `open_online_store(project=...)` makes them) at project `after`, when a newly applied
    plan renamed the project; a store with any other prefix is left alone. A server that
    kept the old prefix answered the new plan from the old project's keys, frozen since
    the apply. Returns whether it moved."""
    if not before or not after or before == after or getattr(store, "prefix", None) != f"tenx:{before}":
        return False
    store.prefix = f"tenx:{after}"  # read on every call
    return True


def _pool_exhausted(error: Exception) -> bool:
    """Whether `error` is a pool running out of connections. redis-py's
    BlockingConnectionPool (sync and asyncio) raises a plain ConnectionError with this
    text when its wait times out, the same type as a refused connection; the integration
    tests pin it (tests/integration/test_redis_pool.py). MaxConnectionsError (redis-py 6
    and later) is a pool that refuses instead of waiting, such as a cluster node's."""
    from redis import exceptions

    if isinstance(error, getattr(exceptions, "MaxConnectionsError", ())):
        return True
    return isinstance(error, exceptions.ConnectionError) and str(error) == "No connection available."


def _split(triples: Iterable[tuple[Any, int, bytes]]) -> tuple[list[Any], list[int], list[bytes]]:
    entities: list[Any] = []
    times: list[int] = []
    values: list[bytes] = []
    for entity, as_of, value in triples:
        entities.append(entity)
        times.append(as_of)
        values.append(value)
    return entities, times, values


def write_all(store: OnlineStore, view: ViewSpec, tables: Iterable[pa.Table]) -> WriteResult:
    written = skipped = 0
    for table in tables:
        result = store.write(view, table)
        written += result.written
        skipped += result.skipped
    return WriteResult(written, skipped)


def _no_retry(*, asynchronous: bool = False) -> Any:
    """Two quick retries for a cluster client, not redis-py's ten with backoff and a
    topology refresh each: one node that stops answering held a read with a 2 s timeout
    for 27 s (async) or as long as the node stayed frozen (sync). Reads are also cut off
    after two timeouts (`_cluster_mget`), so the retries only serve errors that come
    back at once (CLUSTERDOWN while a failover settles, a reset connection); the caller
    (the API's 503 with Retry-After, the model server's breaker) decides about more."""
    from redis.backoff import NoBackoff

    if asynchronous:
        from redis.asyncio.retry import Retry as AsyncRetry

        return AsyncRetry(NoBackoff(), 2)
    from redis.retry import Retry

    return Retry(NoBackoff(), 2)
