"""The batch changelog kernel: one vectorised pass over a partition of events.

Input: the events of a set of entities (every event of each entity in the time range
needed). Output: the changelog rows of those entities, identical in meaning to
`pipelines.reference` (the contract), computed with sorts, cumulative sums and binary
searches only, no Python loop over rows:

1. sort events by (entity, time, log order) and encode each (entity, time) pair as one
   int64 "composite" so that one `searchsorted` finds per-entity positions;
2. change points = unique(event times, tile starts + W for every window), per entity;
3. for each change point p and window, the events in the window are the contiguous run
   [lo, hi) of the sorted events: hi = events with (entity, time <= p),
   lo = events with (entity, time < tile(p) - W + g);
4. each aggregation is read off prefix arrays over the sorted events: counts and
   compensated (TwoSum) prefix sums, shifted sums of squares for Std (all of a view's
   float prefixes in a per-entity layout with a zero before each entity, so a window
   is two plain gathers with no special case at an entity's start), sparse tables for
   Min/Max, a running "last non-null index" for Last; Latest (no window) is the value
   of event hi - 1, the entity's newest at or before the point.

Arrays go through `xp` (numpy here, cupy for the cuDF backend), frames through the
pandas API that cuDF also implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from featurestore.plan.model import AS_OF, SEQUENCE, FeatureSpec, ViewSpec
from featurestore.transforms import prepare_events
from pipelines.batch.backends import is_device_frame
from schemas.dtypes import parse_dtype


def changelog_kernel(
    view: ViewSpec,
    events: Any,
    *,
    start: int | None = None,
    end: int | None = None,
    xp: Any = np,
    prepared: bool = False,
    anchored: bool = True,
) -> pa.Table:
    """The changelog rows of `view` for change points in [start, end) (microseconds),
    as an Arrow table with `view.changelog_schema()`, sorted by entity then time.
    `prepared`: the events already went through `prepare_events` (transform, where).

    With `start`, an entity with events before it also gets a row at `start` (its state
    carried into the range), as in `pipelines.reference`: a range's rows answer an as-of
    lookup anywhere in it on their own. `anchored=False` leaves that row out (a time
    slice that continues the slice before it)."""
    frame = events if prepared else prepare_events(view, events)
    schema = view.changelog_schema()
    if len(frame) == 0:
        return schema.empty_table()
    anchor = start if anchored else None
    try:
        sorted_events = _SortedEvents.build(view, frame, xp, anchor=anchor)
    except _KeyTooWide as wide:
        return _in_entity_groups(view, frame, wide.entities_per_group, start=start, end=end, xp=xp, anchored=anchored)
    points = _change_points(view, sorted_events, start, end, xp, anchor=anchor)
    if points.size == 0:
        return schema.empty_table()
    columns: dict[str, pa.Array] = {
        view.entity_key: sorted_events.keys_at(points.codes),
        AS_OF: pa.array(xp_to_numpy(points.times), pa.int64()).cast(schema.field(AS_OF).type),
    }
    prefixes = _Prefixes(sorted_events, xp)
    sums = _EntityPrefixes.build(view, prefixes, xp)
    hi = xp.searchsorted(sorted_events.composite, points.composite, side="right")
    by_window: dict[tuple[int, int], list[FeatureSpec]] = {}
    for feature in view.windowed:
        by_window.setdefault((feature.span.length, feature.span.every), []).append(feature)
    for features in by_window.values():  # one window's arrays at a time
        lo = _lower_bounds(sorted_events, points, features[0], xp)
        window = _Window(prefixes, lo, hi, sums.read(lo, hi, points.codes), xp)
        for feature in features:
            columns[feature.name] = _aggregate(feature, window)
    if view.latest:
        # Latest: the newest event at or before the point, hi - 1, if the entity has one.
        first = xp.searchsorted(sorted_events.composite, points.codes * sorted_events.span, side="left")
        valid = xp_to_numpy(hi > first)
        picked = pa.array(xp_to_numpy(xp.maximum(hi - 1, 0)), pa.int64())
        for feature in view.latest:
            columns[feature.name] = _masked(prefixes.arrow(feature.column or "").take(picked), ~valid, feature.dtype)
    return pa.table([_stored(columns[name], schema.field(name).type) for name in schema.names], schema=schema)


def _stored(column: pa.Array, target: pa.DataType) -> pa.Array:
    """A feature column as its changelog type: float32 features are computed in float64
    and rounded once here."""
    return column if column.type.equals(target) else column.cast(target)


class _KeyTooWide(Exception):
    """The (entity, time) search key of a partition would not fit an int64: the kernel
    runs over groups of `entities_per_group` entities instead."""

    def __init__(self, entities_per_group: int) -> None:
        super().__init__(entities_per_group)
        self.entities_per_group = entities_per_group


_KEY_LIMIT = 2**62  # composite keys stay below this (headroom for the searches' arithmetic)


def _in_entity_groups(
    view: ViewSpec,
    frame: Any,
    entities_per_group: int,
    *,
    start: int | None,
    end: int | None,
    xp: Any,
    anchored: bool,
) -> pa.Table:
    """The changelog computed over consecutive groups of entities (in key order, so the
    concatenation stays sorted by entity then time): each group's key fits an int64.
    Long windows (years) over many entities need this; every group is still one
    vectorised pass."""
    codes, _ = _factorize(frame[view.entity_key])
    order = np.argsort(codes, kind="stable")
    entities = int(codes.max()) + 1
    bounds = np.searchsorted(codes[order], np.arange(0, entities + entities_per_group, entities_per_group))
    tables = [
        changelog_kernel(
            view,
            frame.take(order[lo:hi]).reset_index(drop=True),
            start=start,
            end=end,
            xp=xp,
            prepared=True,
            anchored=anchored,
        )
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        if hi > lo
    ]
    return pa.concat_tables(tables)


def xp_to_numpy(array: Any) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.asarray(array)


# -- sorted events and composite keys -------------------------------------------------------


@dataclass
class _SortedEvents:
    codes: Any  # entity code per event, sorted
    times: Any  # event time (us) per event, sorted within entity
    composite: Any  # codes * span + (times - base): sorted, searchable
    base: int
    span: int
    uniques: Any  # entity key per code
    key_type: pa.DataType
    frame: Any  # the prepared events, in sorted order
    count: int

    @classmethod
    def build(cls, view: ViewSpec, frame: Any, xp: Any, *, anchor: int | None = None) -> _SortedEvents:
        codes, uniques = _factorize(frame[view.entity_key])
        times = xp.asarray(_micros(frame[view.event_time]))
        sequence = xp.asarray(frame[SEQUENCE].to_numpy()) if SEQUENCE in frame.columns else xp.arange(len(frame))
        codes = xp.asarray(codes)
        order = xp.lexsort(xp.stack([sequence, times, codes]))
        codes, times = codes[order], times[order]
        reach = view.longest_window + view.coarsest_tile
        base = int(times.min()) - reach
        span = max(int(times.max()) + reach, anchor if anchor is not None else 0) - base + 1
        entities = int(codes.max()) + 1
        if entities * span >= _KEY_LIMIT:
            if entities == 1 or span >= _KEY_LIMIT // 2:
                raise OverflowError(
                    f"feature view `{view.name}`: its events and windows span {span / 3.15576e13:,.0f} years, "
                    f"more than the batch engine's int64 microsecond keys hold; shorten the longest window"
                )
            raise _KeyTooWide(max(1, (_KEY_LIMIT - 1) // span))
        composite = codes * span + (times - base)
        needed = list(view.input_columns)
        ordered = frame[needed].take(xp_to_numpy(order)).reset_index(drop=True)
        key_type = view.changelog_schema().field(view.entity_key).type
        return cls(codes, times, composite, base, span, uniques, key_type, ordered, len(frame))

    def keys_at(self, codes: Any) -> pa.Array:
        return pa.array(np.asarray(self.uniques)[xp_to_numpy(codes)], self.key_type)


def _factorize(keys: Any) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes in key order (so output is sorted by key) and the key of each code,
    on the host. cuDF returns a CuPy array (as narrow as int8) and a cuDF Index."""
    codes, uniques = keys.factorize(sort=True)
    codes = xp_to_numpy(codes)
    uniques = uniques.to_numpy() if hasattr(uniques, "to_numpy") else np.asarray(uniques)
    return codes.astype(np.int64), uniques


def _micros(series: Any) -> Any:
    """Event times as int64 microseconds (UTC) from a timestamp or int column: numpy for
    pandas; for cuDF (naive UTC times, see `backends.utc_as_naive`) a CuPy array."""
    if getattr(series.dtype, "kind", "") in "iu":
        return series.values.astype("int64") if is_device_frame(series) else series.to_numpy().astype(np.int64)
    if is_device_frame(series):
        return series.astype("datetime64[us]").astype("int64").values
    return np.asarray(series.to_numpy(dtype="datetime64[us]")).astype(np.int64)


@dataclass
class _Points:
    composite: Any
    codes: Any
    times: Any

    @property
    def size(self) -> int:
        return int(self.composite.shape[0])


def _change_points(
    view: ViewSpec, events: _SortedEvents, start: int | None, end: int | None, xp: Any, *, anchor: int | None = None
) -> _Points:
    candidates = [events.composite]
    for window in view.windows:
        expiry = events.times - events.times % window.every + window.length
        candidates.append(events.codes * events.span + (expiry - events.base))
    if anchor is not None:  # the state at `anchor` of every entity with an event before it
        first = xp.ones(events.codes.shape[0], dtype=bool)
        first[1:] = events.codes[1:] != events.codes[:-1]
        before = events.codes[first & (events.times < anchor)]
        candidates.append(before * events.span + (anchor - events.base))
    # Each candidate array is already sorted (expiries are monotone in time within an
    # entity), so a stable sort of their concatenation merges runs, and equal
    # neighbours are the duplicates: much cheaper than a hash-based unique.
    merged = xp.sort(xp.concatenate(candidates), kind="stable")
    distinct = xp.ones(merged.shape[0], dtype=bool)
    distinct[1:] = merged[1:] != merged[:-1]
    composite = merged[distinct]
    codes = composite // events.span
    times = composite % events.span + events.base
    keep = xp.ones(composite.shape[0], dtype=bool)
    if start is not None:
        keep &= times >= start
    if end is not None:
        keep &= times < end
    if not bool(keep.all()):
        composite, codes, times = composite[keep], codes[keep], times[keep]
    return _Points(composite, codes, times)


def _lower_bounds(events: _SortedEvents, points: _Points, feature: FeatureSpec, xp: Any) -> Any:
    every, length = feature.span.every, feature.span.length
    window_start = points.times - points.times % every - length + every
    return xp.searchsorted(events.composite, points.codes * events.span + (window_start - events.base), side="left")


# -- prefix arrays --------------------------------------------------------------------------


@dataclass
class _Column:
    values: Any  # float64 or int64, nulls replaced by 0
    present: Any  # bool: value is not null (and not NaN)
    is_int: bool


@dataclass
class _Prefixes:
    events: _SortedEvents
    xp: Any
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    def column(self, name: str) -> _Column:
        key = (name, "column")
        if key not in self._cache:
            series = self.events.frame[name]
            xp = self.xp
            # isna() treats NaN as missing too: NaN is null by the value rules.
            present = xp.asarray(~series.isna().to_numpy(dtype=bool))
            if _is_int(series):
                values = xp.asarray(series.fillna(0).to_numpy(dtype="int64"))
                self._cache[key] = _Column(values, present, True)
            elif _is_float(series):
                values = xp.asarray(series.to_numpy(dtype="float64", na_value=0.0))
                self._cache[key] = _Column(xp.where(present, values, 0.0), present, False)
            else:  # strings, bools: only Count and Last read them
                self._cache[key] = _Column(None, present, False)
        return self._cache[key]  # type: ignore[no-any-return]

    def cached(self, name: str, kind: str, build: Any) -> Any:
        if (name, kind) not in self._cache:
            self._cache[(name, kind)] = build()
        return self._cache[(name, kind)]

    def int_prefix(self, name: str) -> Any:
        return self.cached(name, "int_sum", lambda: _prefix(self.column(name).values, self.xp))

    def moments(self, name: str) -> list[tuple[Any, Any, Any]]:
        """Sparse table of (count, mean, M2) over blocks of 2**k events, merged with
        Chan's parallel formula: a window's Std is built from the blocks inside it
        only, so it is as stable as a two-pass Std over the window's own values."""

        def build() -> list[tuple[Any, Any, Any]]:
            xp = self.xp
            column = self.column(name)
            count = column.present.astype(np.float64)
            levels = [(count, column.values.astype(np.float64), xp.zeros_like(count))]
            width = 1
            while 2 * width <= count.shape[0]:
                n, mean, m2 = levels[-1]
                levels.append(
                    _merge_moments((n[:-width], mean[:-width], m2[:-width]), (n[width:], mean[width:], m2[width:]), xp)
                )
                width *= 2
            return levels

        return self.cached(name, "moments", build)  # type: ignore[no-any-return]

    def extreme(self, name: str, kind: str, longest: int) -> list[Any]:
        """Sparse table levels for ranges of up to `longest` events (grown on demand:
        windows span far fewer events than a partition holds)."""

        def build() -> list[Any]:
            column = self.column(name)
            if column.is_int:  # exact: through float64 an int past 2**53 would round
                bounds = np.iinfo(np.int64)
                return [self.xp.where(column.present, column.values, bounds.max if kind == "min" else bounds.min)]
            values = column.values.astype(np.float64)
            return [self.xp.where(column.present, values, np.inf if kind == "min" else -np.inf)]

        levels: list[Any] = self.cached(name, kind, build)
        _grow_sparse_table(levels, longest, self.xp.minimum if kind == "min" else self.xp.maximum)
        return levels

    def arrow(self, name: str) -> pa.Array:
        """The column as Arrow, in sorted event order (for Last of any type)."""
        return self.cached(name, "arrow", lambda: _to_arrow(self.events.frame[name]))

    def last_present(self, name: str) -> Any:
        def build() -> Any:
            xp = self.xp
            present = self.column(name).present
            index = xp.where(present, xp.arange(present.shape[0]), -1)
            return _running_max(index, xp)

        return self.cached(name, "last", build)


def _to_arrow(series: Any) -> pa.Array:
    if hasattr(series, "to_arrow"):  # cuDF
        return series.to_arrow()
    return pa.Array.from_pandas(series)


def _is_float(series: Any) -> bool:
    dtype = series.dtype
    return bool(getattr(dtype, "kind", "") == "f" or str(dtype).lower().startswith(("float", "double")))


def _is_int(series: Any) -> bool:
    dtype = series.dtype
    return bool(getattr(dtype, "kind", "") in "iu" or str(dtype).lower().startswith(("int", "uint")))


def _prefix(values: Any, xp: Any) -> Any:
    out = xp.zeros(values.shape[0] + 1, dtype=values.dtype)
    xp.cumsum(values, out=out[1:])
    return out


def _segmented_cumsum(values: Any, codes: Any, xp: Any) -> Any:
    """Cumulative sums restarting at each entity (codes are sorted): one entity's
    rounding never leaks into another's sums."""
    if xp is not np:
        try:
            import cudf
        except ImportError:  # arrays on a device without cuDF: one host round trip
            host = pd.Series(xp_to_numpy(values)).groupby(xp_to_numpy(codes), sort=False).cumsum()
            return xp.asarray(host.to_numpy())
        return cudf.Series(values).groupby(cudf.Series(codes), sort=False).cumsum().values
    return pd.Series(values).groupby(codes, sort=False).cumsum().to_numpy()


def _compensated_cumsum(values: Any, codes: Any, xp: Any) -> tuple[Any, Any]:
    """Per-entity running sums (inclusive) plus the exact rounding error of every step
    (TwoSum), accumulated.

    A window's sum, (total[hi] - total[lo]) + (error[hi] - error[lo]) in the per-entity
    prefix layout of `_EntityPrefixes`, is right to within a rounding of the result however
    large the entity's earlier values were; a plain prefix difference would lose the low
    bits of small windows after a huge value.
    """
    running = _segmented_cumsum(values, codes, xp)
    start = xp.ones(values.shape[0], dtype=bool)
    start[1:] = codes[1:] != codes[:-1]
    before = xp.zeros(values.shape[0], dtype=np.float64)
    before[1:] = running[:-1]
    before = xp.where(start, 0.0, before)
    virtual = running - before
    step_error = (before - (running - virtual)) + (values - virtual)
    return running, _segmented_cumsum(step_error, codes, xp)


@dataclass
class _EntityPrefixes:
    """Every float prefix sum a view reads (present counts, compensated sums, centred
    sums for Std), in a per-entity prefix layout: entity k's slots are a zero and then
    its inclusive running sums, so a window [lo, hi) of entity k is slot `hi + k` minus
    slot `lo + k`, with no special case at the entity's first event."""

    columns: dict[tuple[str, str], Any]  # float64 (events + entities,) each

    @classmethod
    def build(cls, view: ViewSpec, prefixes: _Prefixes, xp: Any) -> _EntityPrefixes:
        codes = prefixes.events.codes
        running: dict[tuple[str, str], Any] = {}
        for feature in view.windowed:
            name = feature.column
            if name is None:
                continue
            column = prefixes.column(name)
            if (name, "n") not in running:
                running[(name, "n")] = _restart(xp.cumsum(column.present.astype(np.float64)), codes, xp)
            if feature.kind in ("sum", "mean") and not column.is_int and (name, "sum") not in running:
                running[(name, "sum")], running[(name, "sum_error")] = _compensated_cumsum(column.values, codes, xp)
            if feature.kind == "std" and (name, "linear") not in running:
                deviation = _centred(column, codes, xp)
                running[(name, "linear")], running[(name, "linear_error")] = _compensated_cumsum(deviation, codes, xp)
                running[(name, "square")], running[(name, "square_error")] = _compensated_cumsum(
                    deviation * deviation, codes, xp
                )
        count = prefixes.events.count
        entities = int(codes[-1]) + 1
        slots = xp.arange(count) + codes + 1
        columns = {}
        for key, values in running.items():
            padded = xp.zeros(count + entities, dtype=np.float64)
            padded[slots] = values
            columns[key] = padded
        return cls(columns)

    def read(self, lo: Any, hi: Any, codes: Any) -> _Sums:
        """Sums over each window [lo, hi) (event positions) of entity `codes`."""
        return _Sums(self.columns, lo + codes, hi + codes)


@dataclass
class _Sums:
    columns: dict[tuple[str, str], Any]
    lower: Any
    upper: Any

    def get(self, name: str, kind: str) -> Any:
        column = self.columns[(name, kind)]
        return column.take(self.upper) - column.take(self.lower)

    def compensated(self, name: str, kind: str) -> Any:
        return self.get(name, kind) + self.get(name, f"{kind}_error")


def _restart(running: Any, codes: Any, xp: Any) -> Any:
    """Running sums over all events -> running sums per entity (codes sorted, dense);
    exact for counts."""
    change = xp.ones(codes.shape[0], dtype=bool)
    change[1:] = codes[1:] != codes[:-1]
    starts = xp.nonzero(change)[0]
    before = xp.where(starts > 0, running[xp.maximum(starts - 1, 0)], 0.0)
    return running - before[codes]


def _centred(column: _Column, codes: Any, xp: Any) -> Any:
    """x - (the entity's mean of x) where x is present, else 0: Std from sums of these
    does not cancel catastrophically for values far from zero."""
    values = column.values.astype(np.float64)
    entities = int(codes.max()) + 1
    sums = xp.bincount(codes, weights=values, minlength=entities)
    counts = xp.bincount(codes, weights=column.present.astype(np.float64), minlength=entities)
    shift = xp.where(counts > 0, sums / xp.maximum(counts, 1), 0.0)[codes]
    return xp.where(column.present, values - shift, 0.0)


def _grow_sparse_table(levels: list[Any], longest: int, combine: Any) -> None:
    """levels[k][i] = combine() over values[i : i + 2**k], for every 2**k <= longest."""
    while (2 << (len(levels) - 1)) <= min(longest, levels[0].shape[0]):
        width = 1 << (len(levels) - 1)
        previous = levels[-1]
        levels.append(combine(previous[:-width], previous[width:]))


def _range_extreme(levels: list[Any], lo: Any, hi: Any, combine: Any, xp: Any) -> Any:
    """combine() over values[lo:hi] for non-empty ranges (two overlapping lookups, per
    level, so each level's table is read in order)."""
    length = hi - lo
    level = xp.frexp(xp.maximum(length, 1).astype(np.float64))[1] - 1
    level = xp.where(length > 0, level, -1)  # empty ranges stay NaN (null; 0 for ints, masked by the caller)
    dtype = levels[0].dtype
    out = xp.full(lo.shape[0], 0 if dtype.kind == "i" else np.nan, dtype=dtype)
    for k in range(len(levels)):
        chosen = xp.nonzero(level == k)[0]
        if chosen.shape[0] == 0:
            continue
        table = levels[k]
        out[chosen] = combine(table.take(lo.take(chosen)), table.take(hi.take(chosen) - (1 << k)))
    return out


def _merge_moments(a: tuple[Any, Any, Any], b: tuple[Any, Any, Any], xp: Any) -> tuple[Any, Any, Any]:
    """Chan et al.: (count, mean, M2) of the union of two disjoint sets of values."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    safe = xp.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    mean = xp.where(n > 0, mean_a + delta * (n_b / safe), 0.0)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe)
    return n, mean, m2


def _range_moments(levels: list[tuple[Any, Any, Any]], lo: Any, hi: Any, xp: Any) -> tuple[Any, Any, Any]:
    """(count, mean, M2) over values[lo:hi]: the range split into power-of-two blocks
    (its length's binary digits), merged from the largest down."""
    length = hi - lo
    position = lo.copy()
    size = lo.shape[0]
    total: tuple[Any, Any, Any] = (xp.zeros(size), xp.zeros(size), xp.zeros(size))
    for k in range(len(levels) - 1, -1, -1):
        chosen = (length >> k) & 1 == 1
        if not bool(chosen.any()):
            continue
        n, mean, m2 = levels[k]
        at = xp.where(chosen, position, 0)
        block = (xp.where(chosen, n[at], 0.0), xp.where(chosen, mean[at], 0.0), xp.where(chosen, m2[at], 0.0))
        total = _merge_moments(total, block, xp)
        position = position + xp.where(chosen, 1 << k, 0)
    return total


def _running_max(values: Any, xp: Any) -> Any:
    if xp is np:
        return np.maximum.accumulate(values)
    # CuPy's ufunc.accumulate exists but supports only add and multiply: scan by doubling.
    out = values.copy()
    step = 1
    while step < out.shape[0]:
        out[step:] = xp.maximum(out[step:], out[:-step])
        step *= 2
    return out


# -- one feature ------------------------------------------------------------------------------


@dataclass
class _Window:
    """One window's [lo, hi) (event positions) per change point and the sums of every
    prefix column over it."""

    prefixes: _Prefixes
    lo: Any
    hi: Any
    sums: _Sums
    xp: Any
    _memo: dict[tuple[str, str], Any] = field(default_factory=dict)

    def memo(self, name: str, kind: str, build: Any) -> Any:
        if (name, kind) not in self._memo:
            self._memo[(name, kind)] = build()
        return self._memo[(name, kind)]

    def present(self, name: str) -> Any:
        return self.memo(name, "n", lambda: self.sums.get(name, "n").astype(np.int64))

    def total(self, name: str) -> Any:
        def build() -> Any:
            if self.prefixes.column(name).is_int:  # integers: one global prefix is exact
                prefix = self.prefixes.int_prefix(name)
                return prefix[self.hi] - prefix[self.lo]
            return self.sums.compensated(name, "sum")

        return self.memo(name, "sum", build)


def _aggregate(feature: FeatureSpec, window: _Window) -> pa.Array:
    xp, lo, hi = window.xp, window.lo, window.hi
    if feature.kind == "count" and feature.column is None:
        return pa.array(xp_to_numpy(hi - lo), pa.int64())
    assert feature.column is not None
    name = feature.column
    prefixes = window.prefixes
    n = window.present(name)
    empty = xp_to_numpy(n == 0)
    if feature.kind == "count":
        return pa.array(xp_to_numpy(n), pa.int64())
    if feature.kind == "sum":
        return pa.array(xp_to_numpy(window.total(name)), _arrow_type(feature.dtype))
    if feature.kind == "mean":
        mean = window.total(name) / xp.maximum(n, 1)
        return pa.array(xp_to_numpy(mean).astype(np.float64), pa.float64(), mask=empty)
    if feature.kind == "std":
        return pa.array(xp_to_numpy(_std(window, name, n)), pa.float64(), mask=empty)
    if feature.kind in ("min", "max"):
        combine = xp.minimum if feature.kind == "min" else xp.maximum
        longest = int((hi - lo).max()) if lo.shape[0] else 0
        values = _range_extreme(prefixes.extreme(name, feature.kind, longest), lo, hi, combine, xp)
        return _typed(xp_to_numpy(values), feature.dtype, empty)
    if feature.kind == "last":
        last = prefixes.last_present(name)
        index = last[xp.maximum(hi - 1, 0)]
        valid = xp_to_numpy((hi > lo) & (index >= lo))
        picked = pa.array(xp_to_numpy(xp.where(xp.asarray(valid), index, 0)), pa.int64())
        taken = prefixes.arrow(name).take(picked)
        return _masked(taken, ~valid, feature.dtype)
    raise ValueError(f"unknown aggregation kind {feature.kind!r}")


# Above this ratio of mean squared deviation (from the entity's mean) to variance, the
# fast Std may have lost digits to cancellation; those points are recomputed exactly.
_STD_CONDITION_LIMIT = 1e4
# Above this ratio of the entity's running sum of squares to the window's own, too.
_PREFIX_LIMIT = 1e12


def _std(window: _Window, name: str, n: Any) -> Any:
    """Population Std per window: fast from compensated prefix sums of the deviations
    from each entity's mean, and, where that is ill-conditioned (a window far from its
    entity's mean, relative to its spread), from Chan-merged blocks of the window's own
    values, which is as stable as a two-pass Std."""
    xp, lo, hi = window.xp, window.lo, window.hi
    count = xp.maximum(n, 1).astype(np.float64)
    mean_square = window.sums.compensated(name, "square") / count
    mean = window.sums.compensated(name, "linear") / count
    variance = xp.where(n > 1, xp.maximum(mean_square - mean * mean, 0.0), 0.0)
    # The window's sums are differences of the entity's running sums: when those are far
    # larger than the window's own (a huge value earlier in the entity's history), the
    # difference keeps too few digits even compensated (found by hypothesis: {1e12,
    # -1e12, ...} then {0.001, 0}, Std 0.000492 for 0.0005).
    before = window.sums.columns[(name, "square")].take(window.sums.upper)
    suspect = (n > 1) & (
        (mean_square > _STD_CONDITION_LIMIT * variance) | (before > _PREFIX_LIMIT * mean_square * count)
    )
    if bool(suspect.any()):
        chosen = xp.nonzero(suspect)[0]
        variance[chosen] = _exact_variance(window.prefixes, name, lo[chosen], hi[chosen], xp)
    return xp.sqrt(variance)


# Up to this many (window, event) pairs, ill-conditioned windows are recomputed by an
# explicit two-pass over their events; beyond it, by the Chan sparse table.
_TWO_PASS_LIMIT = 20_000_000


def _exact_variance(prefixes: _Prefixes, name: str, lo: Any, hi: Any, xp: Any) -> Any:
    lengths = hi - lo
    pairs = int(lengths.sum())
    if pairs > _TWO_PASS_LIMIT:
        count, _, m2 = _range_moments(prefixes.moments(name), lo, hi, xp)
        return xp.maximum(m2 / xp.maximum(count, 1.0), 0.0)
    column = prefixes.column(name)
    ends = xp.cumsum(lengths)
    starts = ends - lengths
    # The window of each pair (np.repeat(arange, lengths); CuPy's repeat takes no array).
    window_of = xp.searchsorted(ends, xp.arange(pairs), side="right")
    event = lo[window_of] + (xp.arange(pairs) - starts[window_of])
    present = column.present[event].astype(np.float64)
    values = xp.where(column.present[event], column.values[event].astype(np.float64), 0.0)
    windows = lo.shape[0]
    count = xp.bincount(window_of, weights=present, minlength=windows)
    mean = xp.bincount(window_of, weights=values, minlength=windows) / xp.maximum(count, 1.0)
    deviation = (values - mean[window_of]) * present
    m2 = xp.bincount(window_of, weights=deviation * deviation, minlength=windows)
    return xp.maximum(m2 / xp.maximum(count, 1.0), 0.0)


def _arrow_type(dtype: str) -> pa.DataType:
    return parse_dtype(dtype)


def _typed(values: np.ndarray, dtype: str, empty: np.ndarray) -> pa.Array:
    target = _arrow_type(dtype)
    if pa.types.is_integer(target):
        return pa.array(np.where(empty, 0, values).astype(np.int64), pa.int64(), mask=empty).cast(target)
    return pa.array(values, pa.float64(), mask=empty).cast(target)


def _masked(values: pa.Array, null: np.ndarray, dtype: str) -> pa.Array:
    target = _arrow_type(dtype)
    return pc.if_else(pa.array(null), pa.nulls(len(values), target), values.cast(target))
