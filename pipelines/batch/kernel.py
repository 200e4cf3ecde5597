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
   compensated (TwoSum) prefix sums, shifted sums of squares for Std, sparse tables for
   Min/Max, a running "last non-null index" for Last.

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

from featurestore.plan.model import AS_OF, FeatureSpec, ViewSpec
from featurestore.stores.offline import SEQUENCE  # log order: Kafka offset / ingest order
from featurestore.transforms import prepare_events
from schemas.dtypes import parse_dtype


def changelog_kernel(
    view: ViewSpec,
    events: Any,
    *,
    start: int | None = None,
    end: int | None = None,
    xp: Any = np,
) -> pa.Table:
    """The changelog rows of `view` for change points in [start, end) (microseconds),
    as an Arrow table with `view.changelog_schema()`, sorted by entity then time."""
    frame = prepare_events(view, events)
    schema = view.changelog_schema()
    if len(frame) == 0:
        return schema.empty_table()
    sorted_events = _SortedEvents.build(view, frame, xp)
    points = _change_points(view, sorted_events, start, end, xp)
    if points.size == 0:
        return schema.empty_table()
    columns: dict[str, pa.Array] = {
        view.entity_key: sorted_events.keys_at(points.codes),
        AS_OF: pa.array(xp_to_numpy(points.times), pa.int64()).cast(schema.field(AS_OF).type),
    }
    prefixes = _Prefixes(sorted_events, xp)
    hi = xp.searchsorted(sorted_events.composite, points.composite, side="right")
    first = xp.searchsorted(sorted_events.codes, points.codes, side="left")
    bounds: dict[tuple[int, int], Any] = {}
    for feature in view.features:
        window = (feature.window.length, feature.window.every)
        if window not in bounds:
            bounds[window] = _lower_bounds(sorted_events, points, feature, xp)
        columns[feature.name] = _aggregate(feature, _Window(prefixes, window, bounds[window], hi, first, xp))
    return pa.table([columns[name] for name in schema.names], schema=schema)


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
    def build(cls, view: ViewSpec, frame: Any, xp: Any) -> _SortedEvents:
        codes, uniques = _factorize(frame[view.entity_key])
        times = xp.asarray(_micros(frame[view.event_time]))
        sequence = xp.asarray(frame[SEQUENCE].to_numpy()) if SEQUENCE in frame.columns else xp.arange(len(frame))
        codes = xp.asarray(codes)
        order = xp.lexsort(xp.stack([sequence, times, codes]))
        codes, times = codes[order], times[order]
        longest = max(f.window.length for f in view.features)
        coarsest = max(f.window.every for f in view.features)
        base = int(times.min()) - longest - coarsest
        span = int(times.max()) + longest + coarsest - base + 1
        if (int(codes.max()) + 1) * span >= 2**62:
            raise OverflowError(
                f"feature view `{view.name}`: {int(codes.max()) + 1} entities over a time span of "
                f"{span} us do not fit one int64 search key; use more partitions"
            )
        composite = codes * span + (times - base)
        needed = list(view.input_columns)
        ordered = frame[needed].take(xp_to_numpy(order)).reset_index(drop=True)
        key_type = view.changelog_schema().field(view.entity_key).type
        return cls(codes, times, composite, base, span, uniques, key_type, ordered, len(frame))

    def keys_at(self, codes: Any) -> pa.Array:
        return pa.array(np.asarray(self.uniques)[xp_to_numpy(codes)], self.key_type)


def _factorize(keys: Any) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes in key order (so output is sorted by key) and the key of each code."""
    codes, uniques = keys.factorize(sort=True)
    if hasattr(codes, "to_numpy"):  # cuDF returns device columns
        codes, uniques = codes.to_numpy(), uniques.to_numpy()
    return np.asarray(codes, dtype=np.int64), np.asarray(uniques)


def _micros(series: Any) -> np.ndarray:
    """Event times as int64 microseconds (UTC) from a tz-aware or int column."""
    if getattr(series.dtype, "kind", "") in "iu":
        return np.asarray(series.to_numpy(), dtype=np.int64)
    return np.asarray(series.to_numpy(dtype="datetime64[us]")).astype(np.int64)


@dataclass
class _Points:
    composite: Any
    codes: Any
    times: Any

    @property
    def size(self) -> int:
        return int(self.composite.shape[0])


def _change_points(view: ViewSpec, events: _SortedEvents, start: int | None, end: int | None, xp: Any) -> _Points:
    candidates = [events.composite]
    for window in view.windows:
        expiry = events.times - events.times % window.every + window.length
        candidates.append(events.codes * events.span + (expiry - events.base))
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
    every, length = feature.window.every, feature.window.length
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

    def present_count(self, name: str) -> Any:
        return self.cached(name, "count", lambda: _prefix(self.column(name).present.astype(np.int64), self.xp))

    def total(self, name: str) -> tuple[Any, Any]:
        column = self.column(name)
        if column.is_int:
            return self.cached(name, "sum", lambda: (_prefix(column.values, self.xp), None))  # type: ignore[no-any-return]
        return self.cached(name, "sum", lambda: _compensated_prefix(column.values, self.events.codes, self.xp))  # type: ignore[no-any-return]

    def centred(self, name: str) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
        """Compensated prefix sums of d and d*d, d = x - (the entity's mean of x)."""

        def build() -> tuple[tuple[Any, Any], tuple[Any, Any]]:
            xp = self.xp
            column = self.column(name)
            values = column.values.astype(np.float64)
            codes = self.events.codes
            entities = int(codes.max()) + 1
            sums = xp.bincount(codes, weights=values, minlength=entities)
            counts = xp.bincount(codes, weights=column.present.astype(np.float64), minlength=entities)
            shift = xp.where(counts > 0, sums / xp.maximum(counts, 1), 0.0)[codes]
            deviation = xp.where(column.present, values - shift, 0.0)
            codes = self.events.codes
            return _compensated_prefix(deviation, codes, xp), _compensated_prefix(deviation * deviation, codes, xp)

        return self.cached(name, "centred", build)  # type: ignore[no-any-return]

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

    def extreme(self, name: str, kind: str) -> list[Any]:
        def build() -> list[Any]:
            xp = self.xp
            column = self.column(name)
            values = column.values.astype(np.float64)
            fill = np.inf if kind == "min" else -np.inf
            combine = xp.minimum if kind == "min" else xp.maximum
            return _sparse_table(xp.where(column.present, values, fill), combine, xp)

        return self.cached(name, kind, build)  # type: ignore[no-any-return]

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
    if xp is np:
        return pd.Series(values).groupby(codes, sort=False).cumsum().to_numpy()
    import cudf

    return cudf.Series(values).groupby(cudf.Series(codes), sort=False).cumsum().values


def _compensated_prefix(values: Any, codes: Any, xp: Any) -> tuple[Any, Any]:
    """Per-entity prefix sums plus the exact rounding error of every step (TwoSum),
    accumulated: prefix[i + 1] covers the entity's values up to and including i.

    A window's sum, (total[hi] - total[lo]) + (error[hi] - error[lo]) with the `lo`
    terms taken as 0 at the entity's first event, is right to within a rounding of the
    result however large the entity's earlier values were; a plain prefix difference
    would lose the low bits of small windows after a huge value.
    """
    running = _segmented_cumsum(values, codes, xp)
    total = xp.zeros(values.shape[0] + 1, dtype=np.float64)
    total[1:] = running
    start = xp.ones(values.shape[0], dtype=bool)
    start[1:] = codes[1:] != codes[:-1]
    before = xp.where(start, 0.0, total[:-1])
    after = running
    virtual = after - before
    step_error = (before - (after - virtual)) + (values - virtual)
    error = xp.zeros(values.shape[0] + 1, dtype=np.float64)
    error[1:] = _segmented_cumsum(step_error, codes, xp)
    return total, error


def _window_sum(prefix: tuple[Any, Any], lo: Any, hi: Any, first: Any, xp: Any) -> Any:
    """Sum over events [lo, hi) of one entity whose first event is at `first`."""
    total, error = prefix
    if error is None:  # integers: one global prefix is exact
        return total[hi] - total[lo]
    at_start = lo == first
    lower_total = xp.where(at_start, 0.0, total[lo])
    lower_error = xp.where(at_start, 0.0, error[lo])
    return (total[hi] - lower_total) + (error[hi] - lower_error)


def _sparse_table(values: Any, combine: Any, xp: Any) -> list[Any]:
    levels = [values]
    width = 1
    while 2 * width <= values.shape[0]:
        previous = levels[-1]
        levels.append(combine(previous[:-width], previous[width:]))
        width *= 2
    return levels


def _range_extreme(levels: list[Any], lo: Any, hi: Any, combine: Any, xp: Any) -> Any:
    """combine() over values[lo:hi] for non-empty ranges (two overlapping lookups)."""
    length = hi - lo
    level = xp.floor(xp.log2(xp.maximum(length, 1).astype(np.float64))).astype(np.int64)
    level = xp.where(length > 0, level, -1)  # empty ranges stay NaN (null)
    out = xp.full(lo.shape[0], np.nan, dtype=np.float64)
    for k in range(len(levels)):
        chosen = level == k
        if not bool(chosen.any()):
            continue
        table = levels[k]
        out[chosen] = combine(table[lo[chosen]], table[hi[chosen] - (1 << k)])
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
    if hasattr(xp.maximum, "accumulate"):
        return xp.maximum.accumulate(values)
    # cupy lacks ufunc.accumulate for maximum on some versions: scan by doubling.
    out = values.copy()
    step = 1
    while step < out.shape[0]:
        out[step:] = xp.maximum(out[step:], out[:-step])
        step *= 2
    return out


# -- one feature ------------------------------------------------------------------------------


@dataclass
class _Window:
    """One window's [lo, hi) per change point, with per-column results cached so that
    e.g. Sum and Mean of a column share one window sum."""

    prefixes: _Prefixes
    key: tuple[int, int]
    lo: Any
    hi: Any
    first: Any
    xp: Any
    _memo: dict[tuple[str, str], Any] = field(default_factory=dict)

    def memo(self, name: str, kind: str, build: Any) -> Any:
        if (name, kind) not in self._memo:
            self._memo[(name, kind)] = build()
        return self._memo[(name, kind)]

    def present(self, name: str) -> Any:
        def build() -> Any:
            counts = self.prefixes.present_count(name)
            return counts[self.hi] - counts[self.lo]

        return self.memo(name, "n", build)

    def total(self, name: str) -> Any:
        prefix = self.prefixes.total
        return self.memo(name, "sum", lambda: _window_sum(prefix(name), self.lo, self.hi, self.first, self.xp))


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
        return pa.array(xp_to_numpy(_std(prefixes, name, lo, hi, window.first, n, xp)), pa.float64(), mask=empty)
    if feature.kind in ("min", "max"):
        combine = xp.minimum if feature.kind == "min" else xp.maximum
        values = _range_extreme(prefixes.extreme(name, feature.kind), lo, hi, combine, xp)
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


def _std(prefixes: _Prefixes, name: str, lo: Any, hi: Any, first: Any, n: Any, xp: Any) -> Any:
    """Population Std per window: fast from compensated prefix sums of the deviations
    from each entity's mean, and, where that is ill-conditioned (a window far from its
    entity's mean, relative to its spread), from Chan-merged blocks of the window's own
    values, which is as stable as a two-pass Std."""
    linear, squares = prefixes.centred(name)
    count = xp.maximum(n, 1).astype(np.float64)
    mean_square = _window_sum(squares, lo, hi, first, xp) / count
    mean = _window_sum(linear, lo, hi, first, xp) / count
    variance = xp.where(n > 1, xp.maximum(mean_square - mean * mean, 0.0), 0.0)
    suspect = (n > 1) & (mean_square > _STD_CONDITION_LIMIT * variance)
    if bool(suspect.any()):
        chosen = xp.nonzero(suspect)[0]
        variance[chosen] = _exact_variance(prefixes, name, lo[chosen], hi[chosen], xp)
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
    window_of = xp.repeat(xp.arange(lo.shape[0]), lengths)
    starts = xp.cumsum(lengths) - lengths
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
