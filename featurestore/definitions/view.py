"""Feature views: a row transform over events plus windowed aggregations, per entity."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pyarrow as pa

from featurestore.definitions.aggregations import Aggregation, WindowLike, _as_windows
from featurestore.definitions.entity import Entity
from featurestore.definitions.source import Source
from schemas.source_location import SourceLocation

# A row transform takes a pandas-API DataFrame of events (pandas or cuDF) and returns a
# DataFrame holding exactly the declared derived columns, row for row.
RowTransform = Callable[[Any], Any]
RowFilter = Callable[[Any], Any]


@dataclass(frozen=True, eq=False)
class FeatureView:
    """The frozen description of a feature view; `@feature_view` builds it.

    Calling the view runs its row transform, which makes features easy to unit-test:
    ``user_spend(events)`` returns the derived columns.
    """

    name: str
    entity: Entity
    source: Source
    transform: RowTransform
    columns: Mapping[str, str | pa.DataType | type]
    aggregations: tuple[Aggregation, ...]
    where: RowFilter | None = None
    ttl: str | timedelta | None = None
    online: bool = True
    offline: bool = True
    float_dtype: str | None = None
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    location: SourceLocation = field(default_factory=SourceLocation.unknown, repr=False)

    def __call__(self, events: Any) -> Any:
        return self.transform(events)


def feature_view(
    *,
    entity: Entity,
    source: Source,
    aggregations: Iterable[Aggregation],
    columns: Mapping[str, str | pa.DataType | type] | None = None,
    windows: Iterable[WindowLike] = (),
    where: RowFilter | None = None,
    name: str | None = None,
    ttl: str | timedelta | None = None,
    online: bool = True,
    offline: bool = True,
    float_dtype: str | None = None,
    description: str | None = None,
    owner: str = "",
    tags: Mapping[str, str] | None = None,
) -> Callable[[RowTransform], FeatureView]:
    """Describe a feature view over `source` events, keyed by `entity`.

    The decorated function is the row transform: it gets a DataFrame of events and
    returns the derived columns named in `columns` (name -> type). Aggregations may use
    any source field or derived column; `windows` applies to aggregations given none
    (`Latest` has no window). `where` keeps only the rows for which it returns True.
    `ttl`: values older than this are served as `stale`. `float_dtype="float32"` stores
    every float feature in 4 bytes (an aggregation's own `dtype=` wins). Nothing is
    registered: the decorator returns a frozen FeatureView that a repo compile collects.

    >>> from featurestore.definitions import Entity, Source, Sum
    >>> from schemas import TRANSACTIONS
    >>> user = Entity("user", key="user_id")
    >>> tx = Source("transactions", TRANSACTIONS)
    >>> @feature_view(entity=user, source=tx, aggregations=[Sum("amount")], windows=["1d"])
    ... def user_spend(events):
    ...     return events[[]]
    >>> user_spend.name
    'user_spend'
    """
    default_windows = _as_windows(windows)
    aggregation_list = tuple(
        agg
        if agg.windows or not default_windows or not isinstance(agg, Aggregation) or not agg.windowed
        else _with_windows(agg, default_windows)
        for agg in aggregations
    )

    def decorate(function: RowTransform) -> FeatureView:
        code = getattr(function, "__code__", None)
        location = (
            SourceLocation(code.co_filename, code.co_firstlineno) if code is not None else SourceLocation.unknown()
        )
        return FeatureView(
            name=name or str(getattr(function, "__name__", "<unnamed>")),
            entity=entity,
            source=source,
            transform=function,
            columns=dict(columns or {}),
            aggregations=aggregation_list,
            where=where,
            ttl=ttl,
            online=online,
            offline=offline,
            float_dtype=float_dtype,
            description=description if description is not None else (function.__doc__ or "").strip(),
            owner=owner,
            tags=dict(tags or {}),
            location=location,
        )

    return decorate


def _with_windows(aggregation: Aggregation, windows: tuple[Any, ...]) -> Aggregation:
    copy = object.__new__(type(aggregation))
    for attribute in ("column", "name", "dtype", "location"):
        object.__setattr__(copy, attribute, getattr(aggregation, attribute))
    object.__setattr__(copy, "windows", windows)
    return copy
