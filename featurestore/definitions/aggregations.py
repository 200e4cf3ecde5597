"""Aggregations and windows as plain frozen data; engines build their own logic from them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import ClassVar

from schemas.source_location import SourceLocation, caller_location

DurationLike = str | timedelta | int


@dataclass(frozen=True)
class Window:
    """A sliding window of `length`, hopped every `every` (the tile size).

    `every` defaults by Chronon's rule (1d for windows >= 12d, 1h for >= 12h, else 5m).
    Values are checked when the repo is compiled, so all mistakes are reported at once.

    >>> Window("7d", every="1h")
    Window(length='7d', every='1h')
    """

    length: DurationLike
    every: DurationLike | None = None
    location: SourceLocation = field(default_factory=caller_location, compare=False, repr=False)


WindowLike = Window | str | timedelta


def _as_windows(windows: Iterable[WindowLike] | WindowLike) -> tuple[Window, ...]:
    if isinstance(windows, Window | str | timedelta):
        windows = [windows]
    location = caller_location()
    return tuple(w if isinstance(w, Window) else Window(w, location=location) for w in windows)


@dataclass(frozen=True, init=False)
class Aggregation:
    """Base of every aggregation: an input column (or none), windows, a name prefix and,
    for float features, the stored width (`dtype="float32"` halves the bytes each lookup
    reads; values are computed in float64 and rounded once when stored)."""

    kind: ClassVar[str] = ""
    windowed: ClassVar[bool] = True
    column: str | None
    windows: tuple[Window, ...]
    name: str | None
    dtype: str | None
    location: SourceLocation = field(compare=False, repr=False)

    def __init__(
        self,
        column: str | None,
        *,
        windows: Iterable[WindowLike] | WindowLike = (),
        name: str | None = None,
        dtype: str | None = None,
    ) -> None:
        object.__setattr__(self, "column", column)
        object.__setattr__(self, "windows", _as_windows(windows))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "location", caller_location())


class Count(Aggregation):
    """Number of events in the window; `Count("col")` counts events where col is not null."""

    kind = "count"

    def __init__(
        self,
        column: str | None = None,
        *,
        windows: Iterable[WindowLike] | WindowLike = (),
        name: str | None = None,
    ) -> None:
        super().__init__(column, windows=windows, name=name)


class Sum(Aggregation):
    """Sum of the non-null values (0 for an empty window)."""

    kind = "sum"


class Mean(Aggregation):
    """Arithmetic mean of the non-null values (null for an empty window)."""

    kind = "mean"


class Min(Aggregation):
    """Smallest non-null value (null for an empty window)."""

    kind = "min"


class Max(Aggregation):
    """Largest non-null value (null for an empty window)."""

    kind = "max"


class Last(Aggregation):
    """The latest non-null value; among events at the same time, the later one in the log."""

    kind = "last"


class Std(Aggregation):
    """Population standard deviation (ddof=0) of the non-null values (null when empty)."""

    kind = "std"


class Latest(Aggregation):
    """The column's value in the entity's newest event, with no window: what a table of
    precomputed features holds, one row per entity and time. As of time t it is the
    value of the newest event at or before t (same time: the later one in the log),
    null included: a null in the newest event is the value, unlike `Last`, which skips
    nulls inside a window. Named as the column (or `name=`); never expires, so give the
    view a `ttl` to have old values served as `stale`.

    >>> Latest("credit_limit", dtype="float32").kind
    'latest'
    """

    kind = "latest"
    windowed = False

    def __init__(self, column: str, *, name: str | None = None, dtype: str | None = None) -> None:
        super().__init__(column, name=name, dtype=dtype)


AGGREGATIONS: dict[str, type[Aggregation]] = {cls.kind: cls for cls in (Count, Sum, Mean, Min, Max, Last, Std, Latest)}
