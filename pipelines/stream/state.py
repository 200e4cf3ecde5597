"""Stream state for one view and one shard of entities: event-time tiles, a raw tail,
a watermark and expiry timers. Pure Python, no Bytewax: the dataflow wraps it, tests
drive it directly.

Per entity the state keeps, for each tile granularity g of the view's windows, one
partial aggregate per tile *below the compaction boundary* C, and the raw events at or
after C. Evaluating a feature at time p merges the partials of the window's tiles and
the raw events in [tile(p) - W + g, p]. Every point ever evaluated is >= C, because:

- the watermark only moves forward (`pipelines.stream.watermark`: the slowest input
  partition's newest event time minus the allowed lateness), and an event older than
  the watermark is late (not applied: it goes to the late output);
- expiry rows (s + W) are emitted once the watermark has passed them, *before* the
  boundary moves up to the new watermark;
- event rows are evaluated at event times >= the watermark.

So a row at p sees exactly the events <= p, as the reference does, while old events are
folded into one partial per tile. Values follow `featurestore.semantics`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from featurestore.plan.model import FeatureSpec, ViewSpec
from featurestore.semantics import empty_value
from featurestore.transforms import event_micros, plain_values
from pipelines.stream.watermark import Progress, Watermarks

# (entity, as_of µs, values in feature order)
Row = tuple[Any, int, tuple[Any, ...]]
# (time µs, sequence, input values in `ViewState.inputs` order)
Event = tuple[int, int, tuple[Any, ...]]


class _Partial:
    """Aggregates of one input column over a set of events (a tile, or a window)."""

    __slots__ = ("compensation", "count", "last", "m2", "maximum", "mean", "minimum", "total")

    def __init__(self) -> None:
        self.count = 0  # non-null values
        self.total: int | float = 0  # stays an int for int columns: exact
        self.compensation: int | float = 0  # Neumaier: the low bits float additions to `total` lost
        self.minimum: Any = None
        self.maximum: Any = None
        self.last: tuple[int, int, Any] | None = None  # (time, sequence, value)
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, time: int, sequence: int, value: Any) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        self.count += 1
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._add_total(value)
            self.minimum = value if self.minimum is None or value < self.minimum else self.minimum
            self.maximum = value if self.maximum is None or value > self.maximum else self.maximum
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)
        if self.last is None or (time, sequence) >= self.last[:2]:
            self.last = (time, sequence, value)

    def _add_total(self, value: int | float) -> None:
        total = self.total + value
        if isinstance(total, float):
            if abs(self.total) >= abs(value):
                self.compensation += (self.total - total) + value
            else:
                self.compensation += (value - total) + self.total
        self.total = total

    @property
    def sum(self) -> int | float:
        return self.total + self.compensation

    def merge(self, other: _Partial) -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.total, self.mean, self.m2 = other.count, other.total, other.mean, other.m2
            self.compensation = other.compensation
            self.minimum, self.maximum, self.last = other.minimum, other.maximum, other.last
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / n
        self.m2 += other.m2 + delta * delta * self.count * other.count / n
        self.count = n
        self._add_total(other.total)
        self.compensation += other.compensation
        if other.minimum is not None and (self.minimum is None or other.minimum < self.minimum):
            self.minimum = other.minimum
        if other.maximum is not None and (self.maximum is None or other.maximum > self.maximum):
            self.maximum = other.maximum
        if other.last is not None and (self.last is None or other.last[:2] >= self.last[:2]):
            self.last = other.last


@dataclass
class _Tile:
    events: int = 0
    columns: list[_Partial] = field(default_factory=list)


@dataclass
class _Entity:
    tiles: dict[int, dict[int, _Tile]] = field(default_factory=dict)  # every -> tile start -> tile
    raw: list[Event] = field(default_factory=list)  # events at or after the boundary
    head: int | None = None  # latest event time applied
    expiries: set[int] = field(default_factory=set)
    # (length, every, head tile T) -> merged tile partials of [T - length + every, T]:
    # the folded part of a window, kept up to date as events fold into it, so it is
    # built once per head tile (event rows and expiry rows use different heads).
    merged: dict[tuple[int, int, int], _Tile] = field(default_factory=dict)
    newest: Event | None = None  # the newest folded event (for Latest features)


class Emit(Enum):
    """Which rows the state emits.

    CHANGELOG: every change point (the full changelog; parity tests, changelog sinks).
    LATEST: only rows that can become an entity's online value: per micro-batch the
    newest event time of each entity, and expiries after the entity's last event
    (an expiry older than a later event can never win the newer-as_of write).
    """

    CHANGELOG = "changelog"
    LATEST = "latest"


class ViewState:
    """The stream state of one view for one shard of entities."""

    def __init__(self, view: ViewSpec, emit: Emit = Emit.CHANGELOG) -> None:
        self.view = view
        self.emit = emit
        self.inputs = view.input_columns
        self._column_index = {name: index for index, name in enumerate(self.inputs)}
        self.lateness = view.source.allowed_lateness
        self.granularities = sorted({f.span.every for f in view.windowed})
        self.longest = view.longest_window
        # Tiles of granularity g are kept only as long as the longest window using g.
        self.reach = {g: max(f.span.length for f in view.windowed if f.span.every == g) for g in self.granularities}
        self.keeps_newest = bool(view.latest)  # Latest features: an entity's newest event is kept forever
        self.entities: dict[Any, _Entity] = {}
        self.watermarks = Watermarks(self.lateness)
        self.boundary: int | None = None  # events before it are folded into tiles
        self._timers: list[tuple[int, Any]] = []  # (expiry, entity) heap, may hold stale entries

    # -- watermark -----------------------------------------------------------------------------
    @property
    def watermark(self) -> int | None:
        return self.watermarks.value

    def is_late(self, time: int) -> bool:
        return self.watermarks.is_late(time)

    def observe(self, progress: list[Progress]) -> None:
        """Partition progress reports (see `pipelines.stream.watermark`)."""
        if progress:
            self.watermarks.observe(progress)

    # -- applying events -----------------------------------------------------------------------
    def apply(self, events: Iterable[tuple[Any, Event]]) -> tuple[list[Row], list[tuple[Any, Event]]]:
        """Apply (entity, event) pairs in log order. Returns the rows they change (one per
        entity and new event time, or a re-evaluation at the entity's head for an event
        that arrived behind it) and the late events (older than the watermark: not
        applied). The watermark moves only with `observe`."""
        late: list[tuple[Any, Event]] = []
        touched: dict[Any, list[int]] = {}
        for entity, event in events:
            time = event[0]
            if self.is_late(time):
                late.append((entity, event))
                continue
            state = self.entities.get(entity)
            if state is None:
                state = self.entities[entity] = _Entity()
            if self.emit is Emit.LATEST:
                # Every point LATEST evaluates (the entity's newest event, or an expiry
                # after it) is at or after all of the entity's events: no raw tail is
                # needed to exclude later ones, so events fold into tiles at once.
                self._fold(state, event)
            else:
                state.raw.append(event)
            for window in self.view.windows:
                expiry = time - time % window.every + window.length
                if expiry not in state.expiries:
                    state.expiries.add(expiry)
                    heapq.heappush(self._timers, (expiry, entity))
            times = touched.setdefault(entity, [])
            times.append(max(time, state.head) if state.head is not None else time)
            state.head = time if state.head is None else max(state.head, time)
        latest_only = self.emit is Emit.LATEST
        rows = [
            (entity, point, self.evaluate(entity, point))
            for entity, points in touched.items()
            for point in ([max(points)] if latest_only else sorted(set(points)))
        ]
        return rows, late

    # -- time passing --------------------------------------------------------------------------
    def advance(self, watermark: int | None = None) -> list[Row]:
        """Emit the expiry rows the watermark has passed (all of them with +inf), then
        fold events below it into tiles and forget what no window can reach."""
        limit = self.watermark if watermark is None else watermark
        if limit is None:
            return []
        rows: list[Row] = []
        while self._timers and self._timers[0][0] <= limit:
            expiry, entity = heapq.heappop(self._timers)
            state = self.entities.get(entity)
            if state is None or expiry not in state.expiries:
                continue
            state.expiries.discard(expiry)
            if self.emit is Emit.LATEST and state.head is not None and expiry <= state.head:
                continue  # a later event's row already holds the newer value
            rows.append((entity, expiry, self.evaluate(entity, expiry)))
        if limit != math.inf:
            self._compact(int(limit))
        return rows

    def flush(self) -> list[Row]:
        """End of a bounded input: every pending expiry, in time order."""
        rows = self.advance(math.inf)  # type: ignore[arg-type]
        self.entities.clear()
        return rows

    def _compact(self, boundary: int) -> None:
        if self.boundary is not None and boundary <= self.boundary:
            return
        previous = self.boundary
        self.boundary = boundary
        if self.emit is Emit.LATEST and previous is not None:
            if not self.granularities:
                return  # nothing is raw and there are no tiles
            finest = self.granularities[0]
            if previous // finest == boundary // finest:
                return  # nothing is raw, and no tile can have left every window yet
        for entity in list(self.entities):
            state = self.entities[entity]
            if state.raw:
                keep: list[Event] = []
                for event in state.raw:
                    if event[0] < boundary:
                        self._fold(state, event)
                    else:
                        keep.append(event)
                state.raw = keep
            for key in [k for k in state.merged if k[2] + k[1] <= boundary]:
                del state.merged[key]  # no point left to evaluate in that head tile
            for every, tiles in state.tiles.items():
                horizon = boundary - self.reach[every] - every
                for start in [s for s in tiles if s < horizon]:
                    del tiles[start]
            if not state.raw and not state.expiries and not any(state.tiles.values()) and not self.keeps_newest:
                del self.entities[entity]

    def _fold(self, state: _Entity, event: Event) -> None:
        time, sequence, values = event
        if self.keeps_newest and (state.newest is None or (time, sequence) >= state.newest[:2]):
            state.newest = event
        for (length, every, head), cached in state.merged.items():
            if head - length + every <= time - time % every <= head:
                cached.events += 1
                for partial, value in zip(cached.columns, values, strict=True):
                    partial.add(time, sequence, value)
        for every in self.granularities:
            start = time - time % every
            tiles = state.tiles.setdefault(every, {})
            tile = tiles.get(start)
            if tile is None:
                tile = tiles[start] = _Tile(0, [_Partial() for _ in self.inputs])
            tile.events += 1
            for partial, value in zip(tile.columns, values, strict=True):
                partial.add(time, sequence, value)

    # -- values --------------------------------------------------------------------------------
    def evaluate(self, entity: Any, point: int) -> tuple[Any, ...]:
        """The view's vector for `entity` as of `point` (>= the compaction boundary)."""
        state = self.entities.get(entity)
        cache: dict[tuple[int, int], tuple[int, list[_Partial]]] = {}
        values = []
        newest = self._newest(state, point) if self.keeps_newest else None
        for feature in self.view.features:
            if feature.window is None:  # Latest
                values.append(None if newest is None else newest[2][self._column_index[feature.column or ""]])
                continue
            window = (feature.window.length, feature.window.every)
            if window not in cache:
                cache[window] = self._window(state, point, *window)
            values.append(_value(feature, *cache[window], self._column_index))
        return tuple(values)

    @staticmethod
    def _newest(state: _Entity | None, point: int) -> Event | None:
        """The entity's newest event at or before `point`: the folded one (all before
        the boundary, so before the point) or a raw one."""
        if state is None:
            return None
        newest = state.newest
        for event in state.raw:
            if event[0] <= point and (newest is None or event[:2] >= newest[:2]):
                newest = event
        return newest

    def _window(self, state: _Entity | None, point: int, length: int, every: int) -> tuple[int, list[_Partial]]:
        if state is None:
            return 0, [_Partial() for _ in self.inputs]
        head = point - point % every
        lower = head - length + every
        folded = state.merged.get((length, every, head))
        if folded is None:
            folded = _Tile(0, [_Partial() for _ in self.inputs])
            for start, tile in state.tiles.get(every, {}).items():
                if lower <= start <= head:
                    folded.events += tile.events
                    for total, partial in zip(folded.columns, tile.columns, strict=True):
                        total.merge(partial)
            state.merged[(length, every, head)] = folded
        if not state.raw:
            return folded.events, folded.columns  # read only: no copy needed
        events = folded.events
        merged = [_Partial() for _ in self.inputs]
        for total, partial in zip(merged, folded.columns, strict=True):
            total.merge(partial)
        for time, sequence, values in state.raw:
            if lower <= time <= point:
                events += 1
                for total, value in zip(merged, values, strict=True):
                    total.add(time, sequence, value)
        return events, merged


def _value(feature: FeatureSpec, events: int, partials: list[_Partial], index: dict[str, int]) -> Any:
    if feature.kind == "count" and feature.column is None:
        return events
    partial = partials[index[feature.column or ""]]
    kind = feature.kind
    if kind == "count":
        return partial.count
    if partial.count == 0:
        return empty_value(kind, feature.dtype)
    if kind == "sum":
        return int(partial.total) if feature.dtype.startswith("int") else float(partial.sum)
    if kind == "mean":
        return partial.sum / partial.count
    if kind == "min":
        return partial.minimum
    if kind == "max":
        return partial.maximum
    if kind == "last":
        return partial.last[2] if partial.last is not None else None
    if kind == "std":
        return math.sqrt(max(partial.m2 / partial.count, 0.0))
    raise ValueError(f"unknown aggregation kind {kind!r}")


def events_from_frame(
    view: ViewSpec, frame: Any, inputs: tuple[str, ...], sequences: list[int]
) -> list[tuple[Any, Event]]:
    """(entity, event) pairs from a prepared micro-batch (transform and `where` applied)
    whose rows carry `sequences` (their log positions) in a `_seq` column."""
    if len(frame) == 0:
        return []
    times = event_micros(frame[view.event_time])
    keys = frame[view.entity_key].tolist()
    columns = [plain_values(frame[name].tolist()) for name in inputs]
    sequence = frame["_seq"].tolist() if "_seq" in frame.columns else sequences
    return [(keys[i], (times[i], sequence[i], tuple(column[i] for column in columns))) for i in range(len(keys))]
