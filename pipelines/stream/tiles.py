"""The stream state `tenx stream` runs: one view, one shard of entities, tiles held in
numpy columns and updated a micro-batch at a time (no Python loop over events except to
map entity keys and new tiles to slots).

It emits what can become an online value (the `Emit.LATEST` rows of
`pipelines.stream.state.ViewState`, the pure-Python state that also emits the full
changelog): after each micro-batch one row per touched entity at its newest event time,
and, as the watermark passes window expiries after an entity's newest event, one row at
the newest such expiry. Values follow `featurestore.semantics`; the tests hold it to
`ViewState` and the reference engine.

Why this is exact without a raw tail: every point evaluated is at or after all of the
entity's applied events (its newest event, or an expiry after it), so the window as of
point p is the entity's tiles with start >= tile(p) - W + g: a suffix of its tiles in
start order. Each tile of granularity g keeps per input column the count, sum, min,
max, mean and M2 (Welford, merged with Chan's formula) and last (time, sequence,
value) of its non-null values, only those the view's features need.

Layout: per granularity a `_Tiles` table, slot i = one (entity, tile start); per entity
the sorted tile starts and their slots (Python lists: a window is `bisect` + a slice);
per tile start its slots (for expiries and for forgetting tiles no window reaches).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurestore.plan.model import ViewSpec
from featurestore.stores.codec import with_nulls
from featurestore.transforms import plain_values
from pipelines.stream.compensated import add_compensated, compensated_sums
from pipelines.stream.watermark import Progress, Watermarks

INT_MIN = np.iinfo(np.int64).min
_NEVER = -(2**62)  # "no time yet" that survives subtracting a lateness
_FOREVER = 2**62  # a watermark past every expiry (end of a bounded input)
_INITIAL = 1024


# -- micro-batches in and out ---------------------------------------------------------------


@dataclass
class EventBatch:
    """Events of one view in log order, columnar: what crosses workers (numpy arrays and a
    list of keys pickle as a few buffers, not one object per event)."""

    keys: list[Any]
    times: np.ndarray  # int64 µs
    sequences: np.ndarray  # int64 log position (Last tie-break)
    values: list[np.ndarray]  # per input column: int64 / float64 (nulls filled) or object
    valid: list[np.ndarray]  # per input column: non-null

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray) -> EventBatch:
        keys = self.keys
        return EventBatch(
            [keys[i] for i in index.tolist()],
            self.times[index],
            self.sequences[index],
            [v[index] for v in self.values],
            [v[index] for v in self.valid],
        )

    @staticmethod
    def concat(batches: list[EventBatch]) -> EventBatch:
        if len(batches) == 1:
            return batches[0]
        return EventBatch(
            [k for b in batches for k in b.keys],
            np.concatenate([b.times for b in batches]),
            np.concatenate([b.sequences for b in batches]),
            [np.concatenate(c) for c in zip(*(b.values for b in batches), strict=True)],
            [np.concatenate(c) for c in zip(*(b.valid for b in batches), strict=True)],
        )


@dataclass
class RowBatch:
    """Rows (entity, as_of, feature vector), columnar: values[i] holds feature i for every
    row, nulls[i] marks its nulls (None: no nulls)."""

    keys: list[Any]
    as_of: np.ndarray  # int64 µs
    values: list[np.ndarray]
    nulls: list[np.ndarray | None]

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self) -> list[tuple[Any, int, tuple[Any, ...]]]:
        """Plain Python rows, like `ViewState` emits (None for null)."""
        columns = [with_nulls(values, nulls) for values, nulls in zip(self.values, self.nulls, strict=True)]
        vectors = zip(*columns, strict=True) if columns else ((),) * len(self.keys)
        return list(zip(self.keys, self.as_of.tolist(), (tuple(v) for v in vectors), strict=True))

    @staticmethod
    def empty(features: int) -> RowBatch:
        return RowBatch([], np.empty(0, np.int64), [np.empty(0) for _ in range(features)], [None] * features)

    @staticmethod
    def concat(batches: list[RowBatch]) -> RowBatch:
        nonempty = [b for b in batches if len(b)]
        if len(nonempty) <= 1:
            return nonempty[0] if nonempty else batches[0]
        batches = nonempty
        nulls: list[np.ndarray | None] = []
        for index in range(len(batches[0].values)):
            parts = [b.nulls[index] for b in batches]
            if all(p is None for p in parts):
                nulls.append(None)
            else:
                nulls.append(
                    np.concatenate(
                        [np.zeros(len(b), bool) if p is None else p for b, p in zip(batches, parts, strict=True)]
                    )
                )
        return RowBatch(
            [k for b in batches for k in b.keys],
            np.concatenate([b.as_of for b in batches]),
            [np.concatenate(c) for c in zip(*(b.values for b in batches), strict=True)],
            nulls,
        )


def input_dtype(view: ViewSpec, name: str) -> str:
    """The declared dtype of an input column (a derived column or a source field)."""
    for column, dtype in view.columns:
        if column == name:
            return dtype
    from schemas.dtypes import dtype_name

    return dtype_name(view.source.schema.field(name).dtype)


def batch_from_frame(view: ViewSpec, frame: Any, inputs: tuple[str, ...]) -> EventBatch:
    """An EventBatch from a prepared micro-batch (transform and `where` applied) whose rows
    carry their log positions in a `_seq` column."""
    import pyarrow as pa

    times = pa.array(frame[view.event_time]).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    values: list[np.ndarray] = []
    valid: list[np.ndarray] = []
    for name in inputs:
        dtype = input_dtype(view, name)
        series = frame[name]
        present = series.notna().to_numpy(dtype=bool)
        if dtype.startswith("int"):
            values.append(
                # A nullable int column (events_frame) straight to int64: through to_numpy's
                # default (float64 in pandas 3) a value past 2**53 rounds.
                series.to_numpy(dtype=np.float64 if series.dtype.kind == "f" else np.int64, na_value=0).astype(np.int64)
            )
        elif dtype.startswith("float"):
            values.append(series.to_numpy(dtype=np.float64, na_value=0.0))
        else:
            values.append(np.array(plain_values(series.tolist()), dtype=object))
        valid.append(present)
    return EventBatch(
        frame[view.entity_key].tolist(),
        times.to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
        frame["_seq"].to_numpy(dtype=np.int64),
        values,
        valid,
    )


# -- tiles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    name: str
    integer: bool
    numeric: bool
    total: bool
    extremes: tuple[bool, bool]  # min, max
    moments: bool
    last: bool

    @property
    def number(self) -> Any:
        return np.int64 if self.integer else np.float64

    @property
    def high(self) -> Any:
        return np.iinfo(np.int64).max if self.integer else np.inf

    @property
    def low(self) -> Any:
        return INT_MIN if self.integer else -np.inf


def _columns(view: ViewSpec, inputs: tuple[str, ...]) -> list[_Column]:
    out = []
    for name in inputs:
        kinds = {f.kind for f in view.features if f.column == name}
        dtype = input_dtype(view, name)
        integer = dtype.startswith("int")
        out.append(
            _Column(
                name,
                integer,
                integer or dtype.startswith("float"),
                total=bool(kinds & {"sum", "mean"}),
                extremes=("min" in kinds, "max" in kinds),
                moments="std" in kinds,
                last="last" in kinds,
            )
        )
    return out


class _Tiles:
    """The tiles of one granularity: numpy columns indexed by slot.

    Each entity's tiles form a chain in numpy arrays, newest first (`newest[eid]`, then
    `older[slot]`; `newer[slot]` back): an event in the entity's newest tile or a newer
    one (in-order data) is found and linked without a Python loop, and a window (a
    suffix of the tiles by start) is gathered by walking every touched entity's chain
    one step per numpy pass. Only a new tile older than an entity's newest (an event out
    of order across a tile boundary) is inserted by a short Python walk. `by_start`
    lists the slots per tile start, for expiries and for forgetting old tiles.
    """

    def __init__(self, every: int, columns: list[_Column]) -> None:
        self.every = every
        self.columns = columns
        self.capacity = 0
        self.used = 0
        self.free: list[int] = []
        self.newest = np.full(_INITIAL, -1, dtype=np.int64)  # per entity id
        self.by_start: dict[int, list[int]] = {}
        self.starts: list[int] = []  # sorted keys of by_start
        self.arrays: dict[str, np.ndarray] = {}
        self._grow(_INITIAL)

    @property
    def live(self) -> int:
        return self.used - len(self.free)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name, dtype, reset in self._specs():  # arrays added since the snapshot was taken
            if name not in self.arrays:
                self.arrays[name] = np.full(self.capacity, reset, dtype=dtype)

    def _specs(self) -> list[tuple[str, Any, Any]]:
        """(array name, dtype, reset value) for every array a tile needs."""
        specs: list[tuple[str, Any, Any]] = [
            ("eid", np.int64, -1),
            ("start", np.int64, 0),
            ("events", np.int64, 0),
            ("older", np.int64, -1),
            ("newer", np.int64, -1),
        ]
        for i, c in enumerate(self.columns):
            specs.append((f"count{i}", np.int64, 0))
            if c.total:
                specs.append((f"total{i}", c.number, 0))
                if not c.integer:  # Neumaier's running compensation: the low bits `total` lost
                    specs.append((f"comp{i}", np.float64, 0.0))
            if c.extremes[0]:
                specs.append((f"min{i}", c.number, c.high))
            if c.extremes[1]:
                specs.append((f"max{i}", c.number, c.low))
            if c.moments:
                specs += [(f"mean{i}", np.float64, 0.0), (f"m2{i}", np.float64, 0.0)]
            if c.last:
                value_dtype = c.number if c.numeric else object
                specs += [
                    (f"ltime{i}", np.int64, INT_MIN),
                    (f"lseq{i}", np.int64, INT_MIN),
                    (f"last{i}", value_dtype, 0 if c.numeric else None),
                ]
        return specs

    def _grow(self, capacity: int) -> None:
        for name, dtype, reset in self._specs():
            array = np.empty(capacity, dtype=dtype)
            if reset is not None:
                array[:] = reset
            old = self.arrays.get(name)
            if old is not None:
                array[: len(old)] = old
            self.arrays[name] = array
        self.capacity = capacity

    def ensure_entities(self, count: int) -> None:
        if count > len(self.newest):
            grown = np.full(max(count, len(self.newest) * 2), -1, dtype=np.int64)
            grown[: len(self.newest)] = self.newest
            self.newest = grown

    def allocate(self, count: int, eids: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Fresh tiles (reset, unlinked) for (entity, start) pairs; listed by start."""
        reused = self.free[len(self.free) - count :] if count <= len(self.free) else list(self.free)
        del self.free[len(self.free) - len(reused) :]
        fresh = count - len(reused)
        if self.used + fresh > self.capacity:
            self._grow(max(self.capacity * 2, self.used + fresh))
        slots = np.array(reused + list(range(self.used, self.used + fresh)), dtype=np.int64)
        self.used += fresh
        if reused:
            where = slots[: len(reused)]
            for name, _, reset in self._specs():
                self.arrays[name][where] = reset
        self.arrays["eid"][slots] = eids
        self.arrays["start"][slots] = starts
        unique, inverse = np.unique(starts, return_inverse=True)
        groups = np.split(slots[np.argsort(inverse, kind="stable")], np.cumsum(np.bincount(inverse))[:-1])
        for start, group in zip(unique.tolist(), groups, strict=True):
            members = self.by_start.get(start)
            if members is None:
                self.by_start[start] = group.tolist()
                if not self.starts or start > self.starts[-1]:
                    self.starts.append(start)
                else:
                    bisect.insort(self.starts, start)
            else:
                members.extend(group.tolist())
        return slots

    def _find(self, eids: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Slots of (entity, start) pairs sorted by (entity, start), creating the tiles
        that do not exist yet and linking them into their entities' chains."""
        a = self.arrays
        head = self.newest[eids]
        head_start = np.where(head >= 0, a["start"][np.maximum(head, 0)], INT_MIN)
        slots = np.where(head_start == starts, head, -1)
        newer = starts > head_start
        for index in np.flatnonzero(~newer & (slots < 0)).tolist():  # behind the newest tile: rare
            slots[index] = self._insert_behind(int(eids[index]), int(starts[index]))
        fresh = np.flatnonzero(newer)
        if len(fresh):
            e_new = eids[fresh]
            new = self.allocate(len(fresh), e_new, starts[fresh])
            slots[fresh] = new
            same = np.zeros(len(fresh), dtype=bool)
            same[1:] = e_new[1:] == e_new[:-1]
            previous = np.where(same, np.concatenate(([-1], new[:-1])), self.newest[e_new])
            a["older"][new] = previous
            linked = previous >= 0
            a["newer"][previous[linked]] = new[linked]
            last = np.ones(len(fresh), dtype=bool)
            last[:-1] = e_new[1:] != e_new[:-1]
            self.newest[e_new[last]] = new[last]
        return slots

    def _insert_behind(self, eid: int, start: int) -> int:
        older, starts = self.arrays["older"], self.arrays["start"]
        after = -1
        current = int(self.newest[eid])
        while current >= 0 and starts[current] > start:
            after, current = current, int(older[current])
        if current >= 0 and starts[current] == start:
            return current
        (slot,) = self.allocate(1, np.array([eid]), np.array([start])).tolist()
        older, newer = self.arrays["older"], self.arrays["newer"]  # allocate may have grown them
        older[slot], newer[slot] = current, after
        if current >= 0:
            newer[current] = slot
        older[after] = slot  # `after` exists: the new tile is behind the newest
        return int(slot)

    def fold(self, eids: np.ndarray, times: np.ndarray, sequences: np.ndarray, batch: EventBatch) -> None:
        """Add events (entity ids, times ...) to their tiles, creating tiles as needed."""
        n = len(times)
        every = self.every
        starts = times - times % every
        order = np.lexsort((sequences, times, starts, eids))
        e_sorted, s_sorted = eids[order], starts[order]
        first = np.ones(n, dtype=bool)
        first[1:] = (e_sorted[1:] != e_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
        segments = np.flatnonzero(first)
        lengths = np.diff(np.append(segments, n))
        slot = self._find(e_sorted[segments], s_sorted[segments])
        a = self.arrays
        a["events"][slot] += lengths
        t_sorted, q_sorted = times[order], sequences[order]
        for i, column in enumerate(self.columns):
            present = batch.valid[i][order]
            x = batch.values[i][order]
            count = a[f"count{i}"]
            n_b = np.add.reduceat(present.astype(np.int64), segments)
            if column.total or column.moments:
                zeroed = np.where(present, x, 0)
                s_b = np.add.reduceat(zeroed, segments)
                if column.total and column.integer:
                    a[f"total{i}"][slot] += s_b
                elif column.total:
                    exact, error = compensated_sums(zeroed, segments, lengths)
                    add_compensated(a[f"total{i}"], a[f"comp{i}"], slot, exact, error)
            if column.extremes[0]:
                m = np.minimum.reduceat(np.where(present, x, column.high), segments)
                a[f"min{i}"][slot] = np.minimum(a[f"min{i}"][slot], m)
            if column.extremes[1]:
                m = np.maximum.reduceat(np.where(present, x, column.low), segments)
                a[f"max{i}"][slot] = np.maximum(a[f"max{i}"][slot], m)
            if column.moments:
                has = n_b > 0
                # An int column's segment sum in floats: in int64 it could wrap (three
                # values near 2**62 in one micro-batch), and the mean and M2 with it.
                s_m = np.add.reduceat(zeroed.astype(np.float64), segments) if column.integer else s_b
                mean_b = np.divide(s_m, n_b, out=np.zeros(len(n_b)), where=has)
                segment_of = np.repeat(np.arange(len(segments)), lengths)
                deviation = np.where(present, x - mean_b[segment_of], 0.0)
                m2_b = np.add.reduceat(deviation * deviation, segments)
                n_a = count[slot].astype(np.float64)
                mean_a, m2_a = a[f"mean{i}"][slot], a[f"m2{i}"][slot]
                total = n_a + n_b
                safe = np.where(has, total, 1.0)
                delta = mean_b - mean_a
                a[f"mean{i}"][slot] = np.where(has, mean_a + delta * n_b / safe, mean_a)
                a[f"m2{i}"][slot] = np.where(has, m2_a + m2_b + delta * delta * n_a * n_b / safe, m2_a)
            if column.last:
                position = np.maximum.reduceat(np.where(present, np.arange(n), -1), segments)
                has = position >= 0
                candidate = position[has]
                target = slot[has]
                c_time, c_seq = t_sorted[candidate], q_sorted[candidate]
                o_time, o_seq = a[f"ltime{i}"][target], a[f"lseq{i}"][target]
                newer = (c_time > o_time) | ((c_time == o_time) & (c_seq >= o_seq))
                target, candidate = target[newer], candidate[newer]
                a[f"ltime{i}"][target] = c_time[newer]
                a[f"lseq{i}"][target] = c_seq[newer]
                a[f"last{i}"][target] = x[candidate]
            count[slot] += n_b

    def forget_before(self, horizon: int) -> np.ndarray:
        """Drop every tile starting before `horizon`; returns the entity ids that lost
        their last tile. Such tiles are the oldest of their chains: cut the chains."""
        cut = bisect.bisect_left(self.starts, horizon)
        if cut == 0:
            return np.empty(0, dtype=np.int64)
        slots = np.array([slot for start in self.starts[:cut] for slot in self.by_start.pop(start)], dtype=np.int64)
        del self.starts[:cut]
        a = self.arrays
        newer = a["newer"][slots]
        survivor = newer[newer >= 0]
        gone = np.zeros(self.capacity, dtype=bool)
        gone[slots] = True
        survivor = survivor[~gone[survivor]]
        a["older"][survivor] = -1
        emptied = a["eid"][slots[newer < 0]]  # the entity's newest tile went: all did
        self.newest[emptied] = -1
        self.free.extend(slots.tolist())
        return emptied

    def window(self, eids: np.ndarray, lowers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of each entity's tiles starting at or after its lower bound (all its
        tiles end before the point evaluated), grouped by entity in start order, and how
        many per entity. Walks all chains together, one tile per step."""
        a = self.arrays
        starts, older = a["start"], a["older"]
        rows = np.arange(len(eids))
        current = self.newest[eids]
        bound = lowers
        found_rows: list[np.ndarray] = []
        found_slots: list[np.ndarray] = []
        while len(rows):
            alive = current >= 0
            alive[alive] = starts[current[alive]] >= bound[alive]
            if not alive.all():
                rows, current, bound = rows[alive], current[alive], bound[alive]
            if not len(rows):
                break
            found_rows.append(rows)
            found_slots.append(current)
            current = older[current]
        if not found_rows:
            return np.empty(0, dtype=np.int64), np.zeros(len(eids), dtype=np.int64)
        row_of = np.concatenate(found_rows)
        slots = np.concatenate(found_slots)
        order = np.lexsort((starts[slots], row_of))
        return slots[order], np.bincount(row_of, minlength=len(eids)).astype(np.int64)


@dataclass
class _Window:
    """Aggregates of one window for a set of rows (entities at points)."""

    events: np.ndarray
    count: list[np.ndarray] = field(default_factory=list)
    total: list[np.ndarray | None] = field(default_factory=list)
    minimum: list[np.ndarray | None] = field(default_factory=list)
    maximum: list[np.ndarray | None] = field(default_factory=list)
    m2: list[np.ndarray | None] = field(default_factory=list)
    last: list[np.ndarray | None] = field(default_factory=list)


def _aggregate(tiles: _Tiles, slots: np.ndarray, lengths: np.ndarray) -> _Window:
    rows = len(lengths)
    nonempty = lengths > 0
    offsets = (np.cumsum(lengths) - lengths)[nonempty]
    a = tiles.arrays

    def reduce(ufunc: Any, values: np.ndarray, fill: Any, dtype: Any = None) -> np.ndarray:
        out = np.full(rows, fill, dtype=dtype or values.dtype)
        if len(offsets):
            out[nonempty] = ufunc.reduceat(values, offsets)
        return out

    window = _Window(reduce(np.add, a["events"][slots], 0))
    for i, column in enumerate(tiles.columns):
        count = a[f"count{i}"][slots]
        window.count.append(reduce(np.add, count, 0))
        if not column.total:
            window.total.append(None)
        elif column.integer:
            window.total.append(reduce(np.add, a[f"total{i}"][slots], 0))
        else:  # the tiles' totals added with compensation, plus what each tile had kept
            total = np.zeros(rows)
            if len(offsets):
                exact, error = compensated_sums(a[f"total{i}"][slots], offsets, lengths[nonempty])
                total[nonempty] = exact + (error + np.add.reduceat(a[f"comp{i}"][slots], offsets))
            window.total.append(total)
        window.minimum.append(reduce(np.minimum, a[f"min{i}"][slots], column.high) if column.extremes[0] else None)
        window.maximum.append(reduce(np.maximum, a[f"max{i}"][slots], column.low) if column.extremes[1] else None)
        if column.moments:
            n = count.astype(np.float64)
            mean = a[f"mean{i}"][slots]
            total_n = window.count[i].astype(np.float64)
            weighted = reduce(np.add, n * mean, 0.0)
            centre = np.divide(weighted, total_n, out=np.zeros(rows), where=total_n > 0)
            row_of = np.repeat(np.arange(rows), lengths)
            spread = a[f"m2{i}"][slots] + n * (mean - centre[row_of]) ** 2
            window.m2.append(reduce(np.add, spread, 0.0))
        else:
            window.m2.append(None)
        if column.last:
            position = reduce(np.maximum, np.where(count > 0, np.arange(len(slots)), -1), -1, np.int64)
            values = a[f"last{i}"]
            found = position >= 0
            last = np.empty(rows, dtype=values.dtype)
            last[found] = values[slots[position[found]]]
            if values.dtype != object:
                last[~found] = 0
            window.last.append(last)
        else:
            window.last.append(None)
    return window


# -- Latest features ----------------------------------------------------------------------------


class _NewestRows:
    """Per entity id, the newest event's (time, sequence) and the values of the columns
    `Latest` features read (numpy, grown with the entity ids; kept while the entity is)."""

    def __init__(self, columns: list[tuple[int, Any]]) -> None:
        self.time = np.full(_INITIAL, INT_MIN, dtype=np.int64)
        self.sequence = np.full(_INITIAL, INT_MIN, dtype=np.int64)
        # per input index: int64, float64 or object values, as the EventBatch holds them
        self.values = {i: np.full(_INITIAL, None if dtype is object else 0, dtype=dtype) for i, dtype in columns}
        self.valid = {i: np.zeros(_INITIAL, dtype=bool) for i, _ in columns}

    def ensure(self, count: int) -> None:
        size = len(self.time)
        if count <= size:
            return
        grown = max(count, size * 2)

        def grow(array: np.ndarray, reset: Any) -> np.ndarray:
            out = np.full(grown, reset, dtype=array.dtype)
            out[:size] = array
            return out

        self.time, self.sequence = grow(self.time, INT_MIN), grow(self.sequence, INT_MIN)
        self.values = {i: grow(v, None if v.dtype == object else 0) for i, v in self.values.items()}
        self.valid = {i: grow(v, False) for i, v in self.valid.items()}

    def update(self, eids: np.ndarray, batch: EventBatch) -> None:
        """Keep, per entity, the newest of its stored event and the batch's events (same
        time: the later sequence)."""
        order = np.lexsort((batch.sequences, batch.times, eids))
        sorted_eids = eids[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = sorted_eids[1:] != sorted_eids[:-1]
        position = order[last]
        eid = eids[position]
        time, sequence = batch.times[position], batch.sequences[position]
        newer = (time > self.time[eid]) | ((time == self.time[eid]) & (sequence >= self.sequence[eid]))
        position, eid = position[newer], eid[newer]
        self.time[eid], self.sequence[eid] = time[newer], sequence[newer]
        for index, values in self.values.items():
            values[eid] = batch.values[index][position]
            self.valid[index][eid] = batch.valid[index][position]

    def read(self, index: int, eids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        values, valid = self.values[index][eids], self.valid[index][eids]
        if values.dtype == object:
            values = np.where(valid, values, None)
        return values, _or_none(~valid)


# -- the state --------------------------------------------------------------------------------


class LatestState:
    """Online rows of one view for one shard of entities (see the module docstring)."""

    def __init__(self, view: ViewSpec) -> None:
        self.view = view
        self.inputs = view.input_columns
        self.lateness = view.source.allowed_lateness
        self.granularities = sorted({f.span.every for f in view.windowed})
        self.windows = sorted({(f.span.length, f.span.every) for f in view.windowed})
        self.reach = {g: max(w for w, e in self.windows if e == g) for g in self.granularities}
        self._column_index = {name: i for i, name in enumerate(self.inputs)}
        self.watermarks = Watermarks(self.lateness)
        self._reset()

    def _reset(self) -> None:
        columns = _columns(self.view, self.inputs)
        self.tables = {g: _Tiles(g, columns) for g in self.granularities}
        self.ids: dict[Any, int] = {}
        self.keys: list[Any] = []
        self.free_ids: list[int] = []
        self.heads = np.full(_INITIAL, INT_MIN, dtype=np.int64)
        self.expired_through: int | None = None  # expiries up to here are emitted
        self.newest = self._newest_rows()

    def _newest_rows(self) -> _NewestRows | None:
        """The newest event per entity, for Latest features (None without any)."""
        read = sorted({self._column_index[f.column or ""] for f in self.view.latest})
        if not read:
            return None
        kinds = {"int": np.int64, "flo": np.float64}
        return _NewestRows([(i, kinds.get(input_dtype(self.view, self.inputs[i])[:3], object)) for i in read])

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "watermarks" not in state:  # a snapshot from before per-partition watermarks
            max_time = state.pop("max_time", None)
            floor = None if max_time is None else max_time - state["lateness"]
            state["watermarks"] = Watermarks.resumed(state["lateness"], floor)
        self.__dict__.update(state)
        if "newest" not in state:  # a snapshot from before Latest features (the view has none)
            self.newest = None

    @property
    def watermark(self) -> int | None:
        """Events before it are late; expiries up to it are emitted (`Watermarks`)."""
        return self.watermarks.value

    def observe(self, progress: list[Progress]) -> None:
        """Partition progress reports (see `pipelines.stream.watermark`)."""
        if progress:
            self.watermarks.observe(progress)

    @property
    def entity_count(self) -> int:
        return len(self.ids)

    def apply(self, batch: EventBatch) -> tuple[RowBatch, np.ndarray]:
        """Apply a micro-batch. Returns a row per entity it touched (at the entity's
        newest event time) and the positions of the late events (not applied: older
        than the watermark when they arrived)."""
        touched, late = self._fold(batch)
        return self._evaluate(touched, self.heads[touched]), late

    def advance(self, watermark: int | None = None) -> RowBatch:
        """Rows for the window expiries the watermark has passed that come after an
        entity's newest event (the newest one per entity), then forget the tiles no
        window reaches any more."""
        limit = self.watermark if watermark is None else watermark
        eids, points = self._expiries(limit)
        rows = self._evaluate(eids, points)
        if limit is not None and limit < _FOREVER:
            self._forget(limit)
        return rows

    def step(self, batch: EventBatch | None, progress: list[Progress] | None = None) -> tuple[RowBatch, np.ndarray]:
        """`apply`, `observe` the progress reports that came with the batch, then
        `advance`, with one row per entity: the one that wins online (an expiry after
        the entity's newest event beats its event-time row)."""
        touched, late = self._fold(batch) if batch is not None else (np.empty(0, np.int64), np.empty(0, np.int64))
        self.observe(progress or [])
        limit = self.watermark
        expiring, expiries = self._expiries(limit)
        eids, points = _newest(np.concatenate([touched, expiring]), np.concatenate([self.heads[touched], expiries]))
        rows = self._evaluate(eids, points)
        if limit is not None:
            self._forget(limit)
        return rows, late

    def flush(self) -> RowBatch:
        """End of a bounded input: the last expiry row of every entity."""
        rows = self.advance(_FOREVER)
        self._reset()
        return rows

    # -- internals --------------------------------------------------------------------------

    def _fold(self, batch: EventBatch) -> tuple[np.ndarray, np.ndarray]:
        """Fold the events that are not late into their tiles: (entity ids touched,
        positions of the late events)."""
        if len(batch) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        watermark = self.watermark
        late = batch.times < (watermark if watermark is not None else INT_MIN)
        late_positions = np.flatnonzero(late)
        if len(late_positions):
            batch = batch.take(np.flatnonzero(~late))
            if len(batch) == 0:
                return np.empty(0, np.int64), late_positions
        eids = self._entity_ids(batch.keys)
        np.maximum.at(self.heads, eids, batch.times)
        if self.newest is not None:
            self.newest.ensure(len(self.keys))
            self.newest.update(eids, batch)
        for tiles in self.tables.values():
            tiles.ensure_entities(len(self.keys))
            tiles.fold(eids, batch.times, batch.sequences, batch)
        return np.unique(eids), late_positions

    def _expiries(self, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Per entity the newest window expiry in (last limit, limit] after its newest
        event: (entity ids, expiry times). Moves the emitted-through mark to `limit`."""
        none = np.empty(0, np.int64), np.empty(0, np.int64)
        if limit is None or (self.expired_through is not None and limit <= self.expired_through):
            return none
        previous = _NEVER if self.expired_through is None else self.expired_through
        self.expired_through = limit
        found_eids: list[np.ndarray] = []
        found_times: list[np.ndarray] = []
        for length, every in self.windows:
            tiles = self.tables[every]
            low = bisect.bisect_right(tiles.starts, previous - length)
            high = bisect.bisect_right(tiles.starts, limit - length)
            if low == high:
                continue
            slots = np.array([s for start in tiles.starts[low:high] for s in tiles.by_start[start]], dtype=np.int64)
            eids = tiles.arrays["eid"][slots]
            expiries = tiles.arrays["start"][slots] + length
            after = expiries > self.heads[eids]
            found_eids.append(eids[after])
            found_times.append(expiries[after])
        if not found_eids:
            return none
        return _newest(np.concatenate(found_eids), np.concatenate(found_times))

    def _entity_ids(self, keys: list[Any]) -> np.ndarray:
        ids = self.ids
        out = []
        for key in keys:
            eid = ids.get(key)
            if eid is None:
                if self.free_ids:
                    eid = self.free_ids.pop()
                    self.keys[eid] = key
                else:
                    eid = len(self.keys)
                    self.keys.append(key)
                    if eid >= len(self.heads):
                        grown = np.full(len(self.heads) * 2, INT_MIN, dtype=np.int64)
                        grown[: len(self.heads)] = self.heads
                        self.heads = grown
                self.heads[eid] = INT_MIN
                ids[key] = eid
            out.append(eid)
        return np.array(out, dtype=np.int64)

    def _forget(self, boundary: int) -> None:
        emptied = [tiles.forget_before(boundary - self.reach[every] - every) for every, tiles in self.tables.items()]
        if self.newest is not None or not emptied:
            return  # Latest features keep every entity's newest event, however old
        candidates = np.unique(np.concatenate(emptied))
        for tiles in self.tables.values():
            candidates = candidates[tiles.newest[candidates] < 0]
        for eid in candidates.tolist():
            del self.ids[self.keys[eid]]
            self.keys[eid] = None
            self.heads[eid] = INT_MIN
            self.free_ids.append(eid)

    def _evaluate(self, eids: np.ndarray, points: np.ndarray) -> RowBatch:
        """The view's vectors for entities at points (each at or after the entity's
        newest event)."""
        if len(eids) == 0:
            return RowBatch.empty(len(self.view.features))
        eid_list = eids.tolist()
        windows: dict[tuple[int, int], _Window] = {}
        for every in self.granularities:
            # One gather per granularity, for its widest window; narrower windows keep
            # the suffix of each entity's tiles that they reach.
            tiles = self.tables[every]
            head = points - points % every
            widest = self.reach[every]
            slots, lengths = tiles.window(eids, head - widest + every)
            row_of = np.repeat(np.arange(len(eid_list)), lengths)
            starts = tiles.arrays["start"][slots]
            for length, granularity in self.windows:
                if granularity != every:
                    continue
                if length == widest:
                    windows[(length, every)] = _aggregate(tiles, slots, lengths)
                    continue
                keep = starts >= (head - length + every)[row_of]
                narrow = np.bincount(row_of[keep], minlength=len(eid_list)).astype(np.int64)
                windows[(length, every)] = _aggregate(tiles, slots[keep], narrow)
        values: list[np.ndarray] = []
        nulls: list[np.ndarray | None] = []
        for feature in self.view.features:
            if feature.window is None:  # Latest: every point is at or after the entity's newest event
                assert self.newest is not None
                value, null = self.newest.read(self._column_index[feature.column or ""], eids)
                values.append(value)
                nulls.append(null)
                continue
            window = windows[(feature.window.length, feature.window.every)]
            value, null = _feature(feature.kind, feature.dtype, window, self._column_index.get(feature.column or ""))
            values.append(value)
            nulls.append(null)
        keys = self.keys
        return RowBatch([keys[e] for e in eid_list], points.astype(np.int64), values, nulls)


def _newest(eids: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The latest point per entity id."""
    if len(eids) == 0:
        return eids, points
    order = np.lexsort((points, eids))
    eids, points = eids[order], points[order]
    last = np.ones(len(eids), dtype=bool)
    last[:-1] = eids[1:] != eids[:-1]
    return eids[last], points[last]


def _feature(kind: str, dtype: str, window: _Window, column: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    if column is None:  # Count()
        return window.events, None
    count = window.count[column]
    if kind == "count":
        return count, None
    empty = count == 0
    if kind == "sum":
        total = window.total[column]
        assert total is not None
        return (total.astype(np.int64) if dtype.startswith("int") else total.astype(np.float64)), None
    if kind == "mean":
        total = window.total[column]
        assert total is not None
        return np.divide(total, count, out=np.zeros(len(count)), where=~empty), _or_none(empty)
    if kind == "std":
        m2 = window.m2[column]
        assert m2 is not None
        variance = np.divide(m2, count, out=np.zeros(len(count)), where=~empty)
        return np.sqrt(np.maximum(variance, 0.0)), _or_none(empty)
    chosen = {"min": window.minimum, "max": window.maximum, "last": window.last}.get(kind)
    if chosen is None:
        raise ValueError(f"unknown aggregation kind {kind!r}")
    value = chosen[column]
    assert value is not None
    if value.dtype == object:
        value = value.copy()
        value[empty] = None
    return value, _or_none(empty)


def _or_none(mask: np.ndarray) -> np.ndarray | None:
    return mask if bool(mask.any()) else None
