"""The feature client: look up precomputed vectors for many entities in one round trip.

No feature is computed here. Every entity comes back with a status: FOUND, MISSING (no
value in the online store) or STALE (older than the view's ttl); a missing or stale
value is never replaced by a silent default.

    store = open_online_store(redis_url=None, sqlite_path=path, project=plan.project)
    client = FeatureClient(store, plan)   # the store's keys start with tenx:<project>
    result = client.get("user_spend", [1, 2, 3], features=["count_1h", "sum_amount_eur_1d"])
    result.to_dicts()      # [{"user_id": 1, "status": "found", "as_of": ..., "count_1h": 4, ...}, ...]
    result.to_numpy()      # float matrix in the order asked, NaN where null

Entities are read as the HTTP API reads them (`lookup_keys`): a view keyed by int64
takes integers (numpy's too), strings of digits ("009" is 9) and whole floats (9.0, as
a pandas column with a null holds ids); a view keyed by strings takes strings and
integers (1 and "1" are one key). Anything else (True, None, 9.5) is a ValueError
naming the entity, never a silent MISSING. Results list the entities as they were given.
"""

from __future__ import annotations

import asyncio
import difflib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import numpy as np

from featurestore.plan.model import EntitySpec, Plan, ViewSpec
from featurestore.stores.codec import decode_many
from featurestore.stores.online import OnlineStore
from schemas.timestamps import from_micros
from serving.errors import FeatureReferenceError, UnknownFeatureError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT64_RANGE = f"[{INT64_MIN}, {INT64_MAX}]"
_DIGITS = re.compile(r"-?[0-9]+")
_EXACT_FLOATS = 1 << 53  # past it a float id may be another id rounded


class Status(Enum):
    FOUND = "found"
    MISSING = "missing"
    STALE = "stale"


@dataclass(frozen=True)
class FeatureResult:
    """Values for `entities` (in the order asked) and `names` (in the order asked)."""

    view: str
    entity_key: str
    names: tuple[str, ...]
    entities: tuple[Any, ...]
    values: tuple[tuple[Any, ...] | None, ...]  # None: MISSING
    as_of_us: tuple[int | None, ...]
    statuses: tuple[Status, ...]
    read_at_us: int

    def age_seconds(self, index: int) -> float | None:
        as_of = self.as_of_us[index]
        return None if as_of is None else (self.read_at_us - as_of) / 1e6

    def as_of(self, index: int) -> datetime | None:
        as_of = self.as_of_us[index]
        return None if as_of is None else from_micros(as_of)

    def to_dicts(self) -> list[dict[str, Any]]:
        rows = []
        for index, entity in enumerate(self.entities):
            row: dict[str, Any] = {
                self.entity_key: entity,
                "status": self.statuses[index].value,
                "as_of": self.as_of(index),
                "age_s": self.age_seconds(index),
            }
            values = self.values[index]
            row.update(zip(self.names, values if values is not None else [None] * len(self.names), strict=True))
            rows.append(row)
        return rows

    def to_numpy(self) -> np.ndarray:
        """(entities x features) float64, NaN where null or missing."""
        matrix = np.full((len(self.entities), len(self.names)), np.nan)
        for index, values in enumerate(self.values):
            if values is not None:
                matrix[index] = [np.nan if v is None else float(v) for v in values]
        return matrix

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.to_dicts())

    def to_polars(self) -> Any:
        import polars as pl

        return pl.DataFrame(self.to_dicts())


@dataclass(frozen=True)
class _Request:
    view: ViewSpec
    positions: tuple[int, ...]  # of the requested features within the view's vector
    names: tuple[str, ...]


def resolve(plan: Plan, view: str, features: Sequence[str] | None) -> _Request:
    """Check names against the plan (with close-match suggestions) once per request."""
    try:
        spec = plan.view(view)
    except KeyError as error:
        raise UnknownFeatureError(_unknown("feature view", view, [v.name for v in plan.views])) from error
    all_names = spec.feature_names
    if features is None:
        return _Request(spec, tuple(range(len(all_names))), all_names)
    positions = []
    for name in features:
        if name not in all_names:
            raise UnknownFeatureError(_unknown("feature", name, list(all_names), where=f" in view `{view}`"))
        positions.append(all_names.index(name))
    return _Request(spec, tuple(positions), tuple(features))


def split_references(references: Sequence[str]) -> tuple[str, list[str]]:
    """`["user_spend:count_1h", ...]` -> ("user_spend", ["count_1h", ...]); one view.

    A malformed reference or a second view is a FeatureReferenceError (a ValueError):
    the request is wrong whatever the plan holds."""
    views = set()
    names = []
    for reference in references:
        view, sep, name = reference.partition(":")
        if not sep or not view or not name:
            raise FeatureReferenceError(f"feature reference {reference!r} must look like `view:feature`")
        views.add(view)
        names.append(name)
    if len(views) != 1:
        raise FeatureReferenceError(
            f"feature references name {len(views)} views ({', '.join(sorted(views))}); ask one view per call"
        )
    return views.pop(), names


def _unknown(kind: str, name: str, known: list[str], *, where: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
    return f"unknown {kind} `{name}`{where}{hint} (known: {', '.join(known) or 'none'})"


def assemble(request: _Request, entities: Sequence[Any], raws: Sequence[bytes | None], now_us: int) -> FeatureResult:
    """Decode and judge freshness: the pure core of every read path."""
    view = request.view
    ttl = view.ttl
    everything = request.positions == tuple(range(len(view.features)))
    values: list[tuple[Any, ...] | None] = []
    times: list[int | None] = []
    statuses: list[Status] = []
    positions = request.positions
    for item in decode_many(view, raws):
        if item is None:
            values.append(None)
            times.append(None)
            statuses.append(Status.MISSING)
            continue
        as_of, vector = item
        values.append(vector if everything else tuple([vector[p] for p in positions]))
        times.append(as_of)
        statuses.append(Status.STALE if ttl is not None and now_us - as_of > ttl else Status.FOUND)
    return FeatureResult(
        view=view.name,
        entity_key=view.entity_key,
        names=request.names,
        entities=tuple(entities),
        values=tuple(values),
        as_of_us=tuple(times),
        statuses=tuple(statuses),
        read_at_us=now_us,
    )


def int64_from_digits(view: str, entity: EntitySpec, index: int, key: str) -> int:
    """A string key of an int64 view: digits, read as the integer ("007" is 7)."""
    if not _DIGITS.fullmatch(key):
        raise ValueError(
            f"entity {key!r} (entities[{index}]) is not an int64 `{entity.key}`: "
            f"view `{view}` takes integers or strings of digits"
        )
    return _in_int64_range(int(key), key, index, entity)


def _in_int64_range(number: int, key: Any, index: int, entity: EntitySpec) -> int:
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(
            f"entity {key!r} (entities[{index}]) is out of the int64 range {INT64_RANGE} of `{entity.key}`"
        )
    return number


def lookup_keys(view: ViewSpec, entities: Sequence[Any]) -> Sequence[Any]:
    """The keys to read for Python values, by the HTTP API's rule (see the module
    docstring); `entities` itself when every one is already a key of the view's type.
    For a view keyed by int64, [9, "009", 9.0, np.int64(9)] -> [9, 9, 9, 9]."""
    kinds = set(map(type, entities))
    if view.entity.dtype == "int64":
        if kinds <= {int} and (not len(entities) or (min(entities) >= INT64_MIN and max(entities) <= INT64_MAX)):
            return entities
        return [_int64_key(view.name, view.entity, index, key) for index, key in enumerate(entities)]
    if kinds <= {str}:
        return entities
    return [_string_key(view.name, view.entity, index, key) for index, key in enumerate(entities)]


def _is_integer(key: Any) -> bool:
    return isinstance(key, int | np.integer) and not isinstance(key, bool | np.bool_)


def _int64_key(view: str, entity: EntitySpec, index: int, key: Any) -> int:
    if isinstance(key, str):
        return int64_from_digits(view, entity, index, key)
    whole_float = isinstance(key, float | np.floating) and float(key).is_integer() and abs(float(key)) <= _EXACT_FLOATS
    if not (_is_integer(key) or whole_float):
        raise ValueError(
            f"entity {key!r} (entities[{index}]) is not an int64 `{entity.key}`: view `{view}` takes integers, "
            "strings of digits or whole floats up to 2**53"
        )
    return _in_int64_range(int(key), key, index, entity)


def _string_key(view: str, entity: EntitySpec, index: int, key: Any) -> str | int:
    if isinstance(key, str):
        return str(key)  # a numpy str_ too
    if _is_integer(key):
        return int(key)
    raise ValueError(
        f"entity {key!r} (entities[{index}]) is not a string `{entity.key}`: view `{view}` takes strings or integers"
    )


def _now_us(clock: Callable[[], float]) -> int:
    return int(clock() * 1_000_000)


class FeatureClient:
    """Synchronous lookups. The store's calls carry their own timeouts."""

    def __init__(self, store: OnlineStore, plan: Plan, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.plan = plan
        self._clock = clock

    def get(self, view: str, entities: Sequence[Any], *, features: Sequence[str] | None = None) -> FeatureResult:
        """One round trip for every entity of one view."""
        request = resolve(self.plan, view, features)
        raws = self.store.read(request.view, lookup_keys(request.view, entities))
        return assemble(request, entities, raws, _now_us(self._clock))

    def get_features(self, references: Sequence[str], entities: Sequence[Any]) -> FeatureResult:
        """By `view:feature` names (one view)."""
        view, names = split_references(references)
        return self.get(view, entities, features=names)

    def close(self) -> None:
        self.store.close()


class AsyncFeatureClient:
    """The same lookups for asyncio code: reads run on the store's async API when it
    has one (Redis), else in a worker thread (SQLite)."""

    def __init__(self, store: Any, plan: Plan, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.plan = plan
        self._clock = clock

    async def get(self, view: str, entities: Sequence[Any], *, features: Sequence[str] | None = None) -> FeatureResult:
        request = resolve(self.plan, view, features)
        keys = lookup_keys(request.view, entities)
        if hasattr(self.store, "aread"):
            raws = await self.store.aread(request.view, keys)
        else:
            raws = await asyncio.to_thread(self.store.read, request.view, keys)
        return assemble(request, entities, raws, _now_us(self._clock))

    async def get_features(self, references: Sequence[str], entities: Sequence[Any]) -> FeatureResult:
        view, names = split_references(references)
        return await self.get(view, entities, features=names)

    async def aclose(self) -> None:
        if hasattr(self.store, "aclose"):
            await self.store.aclose()
        else:
            self.store.close()
