"""One contract for every online store: the embedded SQLite store and Redis (real)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from featurestore import Count, Entity, Last, Max, Mean, Source, Sum, feature_view
from featurestore.errors import TransientError
from featurestore.plan import AS_OF, ViewSpec, compile_definitions
from featurestore.stores.codec import decode
from featurestore.stores.online import OnlineStore, RedisOnlineStore, SqliteOnlineStore
from schemas import TRANSACTIONS

USER = Entity("user", key="user_id")
TX = Source("transactions", TRANSACTIONS)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _view(extra: bool = False) -> ViewSpec:
    aggregations = [Count(), Sum("amount"), Mean("amount"), Max("amount"), Last("currency")]
    if extra:
        aggregations.append(Count("country"))

    @feature_view(entity=USER, source=TX, aggregations=aggregations, windows=["1h"])
    def spend(tx: Any) -> Any:
        return tx[[]]

    return compile_definitions("contract", views=[spend]).views[0]


VIEW = _view()


def rows(view: ViewSpec, items: list[tuple[int, datetime, list[Any]]]) -> pa.Table:
    schema = view.changelog_schema()
    data: dict[str, list[Any]] = {name: [] for name in schema.names}
    for key, as_of, values in items:
        data[view.entity_key].append(key)
        data[AS_OF].append(as_of)
        for name, value in zip(view.feature_names, values, strict=True):
            data[name].append(value)
    return pa.table(data, schema=schema)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OnlineStore]:
    if request.param == "sqlite":
        opened: Any = SqliteOnlineStore(tmp_path / "online.sqlite")
    else:
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix").rstrip(":")
        opened = RedisOnlineStore(url, prefix=prefix)
    yield opened
    opened.close()


def read_back(store: OnlineStore, view: ViewSpec, keys: list[Any]) -> list[tuple[int, list[Any]] | None]:
    return [None if raw is None else decode(view, raw) for raw in store.read(view, keys)]


def micros(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


def test_write_then_read_many_in_key_order(store: OnlineStore) -> None:
    result = store.write(VIEW, rows(VIEW, [(1, T0, [3, 30.0, 10.0, 20.0, "EUR"]), (2, T0, [0, 0.0, None, None, None])]))
    assert (result.written, result.skipped) == (2, 0)
    assert read_back(store, VIEW, [2, 99, 1]) == [
        (micros(T0), [0, 0.0, None, None, None]),
        None,
        (micros(T0), [3, 30.0, 10.0, 20.0, "EUR"]),
    ]


def test_older_values_never_replace_newer_ones(store: OnlineStore) -> None:
    later = T0 + timedelta(minutes=5)
    store.write(VIEW, rows(VIEW, [(1, later, [2, 5.0, 2.5, 3.0, "USD"])]))
    result = store.write(VIEW, rows(VIEW, [(1, T0, [1, 1.0, 1.0, 1.0, "EUR"])]))
    assert (result.written, result.skipped) == (0, 1)
    assert read_back(store, VIEW, [1]) == [(micros(later), [2, 5.0, 2.5, 3.0, "USD"])]


def test_equal_as_of_replaces_and_replays_are_idempotent(store: OnlineStore) -> None:
    batch = rows(VIEW, [(1, T0, [1, 1.0, 1.0, 1.0, "EUR"])])
    store.write(VIEW, batch)
    store.write(VIEW, rows(VIEW, [(1, T0, [1, 2.0, 2.0, 2.0, "GBP"])]))
    assert read_back(store, VIEW, [1]) == [(micros(T0), [1, 2.0, 2.0, 2.0, "GBP"])]
    for _ in range(3):
        store.write(VIEW, rows(VIEW, [(1, T0, [1, 2.0, 2.0, 2.0, "GBP"])]))
    assert read_back(store, VIEW, [1]) == [(micros(T0), [1, 2.0, 2.0, 2.0, "GBP"])]


def test_a_new_view_version_is_stored_beside_the_old(store: OnlineStore) -> None:
    other = _view(extra=True)
    assert other.version != VIEW.version
    store.write(VIEW, rows(VIEW, [(1, T0, [1, 1.0, 1.0, 1.0, "EUR"])]))
    assert store.read(other, [1]) == [None]
    store.write(other, rows(other, [(1, T0, [1, 1.0, 1.0, 1.0, "EUR", 1])]))
    assert read_back(store, VIEW, [1]) == [(micros(T0), [1, 1.0, 1.0, 1.0, "EUR"])]


def test_large_batches(store: OnlineStore) -> None:
    items = [(k, T0 + timedelta(seconds=k), [k, float(k), float(k), float(k), "EUR"]) for k in range(5_000)]
    assert store.write(VIEW, rows(VIEW, items)).written == 5_000
    keys = list(range(0, 5_000, 7))
    assert [r[1][0] if r else None for r in read_back(store, VIEW, keys)] == keys


def test_decode_refuses_another_versions_bytes(store: OnlineStore) -> None:
    store.write(VIEW, rows(VIEW, [(1, T0, [1, 1.0, 1.0, 1.0, "EUR"])]))
    raw = store.read(VIEW, [1])[0]
    assert raw is not None
    with pytest.raises(ValueError, match="expected 1 / "):
        decode(_view(extra=True), raw)


def test_unreachable_redis_is_a_fast_clear_error() -> None:
    began = time.perf_counter()
    store = RedisOnlineStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(TransientError, match=r"online store Redis at redis://127.0.0.1:1/0: ConnectionError"):
        store.read(VIEW, [1])
    assert time.perf_counter() - began < 5


def test_several_views_read_in_one_call_equal_one_read_each(store: OnlineStore) -> None:
    import asyncio

    other = _view(extra=True)
    store.write(VIEW, rows(VIEW, [(1, T0, [1, 1.0, 1.0, 1.0, "EUR"]), (2, T0, [2, 2.0, 2.0, 2.0, "USD"])]))
    store.write(other, rows(other, [(2, T0, [5, 5.0, 5.0, 5.0, "GBP", 3])]))
    requests = [(VIEW, [2, 7, 1]), (other, [1, 2])]
    expected = [store.read(view, keys) for view, keys in requests]
    assert expected[1][0] is None
    assert store.read_many(requests) == expected  # type: ignore[attr-defined]
    if hasattr(store, "aread_many"):

        async def twice() -> list[Any]:
            # The second call reuses the connection the first one leased.
            first = await store.aread_many(requests)
            second = await store.aread_many(requests)
            await store.aclose()
            return [first, second]

        assert asyncio.run(twice()) == [expected, expected]
