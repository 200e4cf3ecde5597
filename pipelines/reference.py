"""The brute-force reference engine: DESIGN.md section 3, written to be obviously right.

For each entity it lists every change point (each event time, and each expiry time
s + W of every non-empty tile s) and evaluates every feature there by scanning the
entity's events (a `Latest` feature: the value of the newest event at or before it).
Quadratic and slow on purpose; the batch and stream engines are tested against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa

from featurestore.plan.model import AS_OF, FeatureSpec, ViewSpec
from featurestore.semantics import SCALE_PREFIX, empty_value
from featurestore.transforms import event_micros, plain_values, prepare_events
from featurestore.windows import expiry_time, window_start


def reference_changelog(
    view: ViewSpec,
    events: pd.DataFrame,
    *,
    start: int | None = None,
    end: int | None = None,
    with_scale: bool = False,
) -> pa.Table:
    """The changelog of `view` over `events` (a DataFrame in log order with the source
    schema's columns; event time as datetime64[us, UTC]).

    Returns one row per (entity, change point), sorted by entity then time, with the
    schema `view.changelog_schema()`. `start`/`end` (microseconds) keep only change
    points in [start, end); values still use every event before `start`, and an entity
    with events before `start` also gets a row at `start` (the state it carries into the
    range), so the rows of a range answer an as-of lookup anywhere in it on their own.

    `with_scale` appends a `_scale_<feature>` column (the largest |input| in the window)
    for each float Sum/Mean/Std feature, which `changelog_differences` uses to judge
    float rounding (see featurestore.semantics).
    """
    frame = prepare_events(view, events)
    times = event_micros(frame[view.event_time])
    keys = frame[view.entity_key].tolist()
    columns = {name: plain_values(frame[name].tolist()) for name in _inputs(view.features)}
    by_entity: dict[Any, list[int]] = {}
    for position, key in enumerate(keys):
        by_entity.setdefault(key, []).append(position)

    scaled = {f.name for f in view.features if f.kind in ("sum", "mean", "std") and f.dtype.startswith("float")}
    rows: list[dict[str, Any]] = []
    for key in sorted(by_entity):
        positions = by_entity[key]  # log order: the tie-break for Last
        points = {times[p] for p in positions}
        for window in view.windows:
            points.update(expiry_time(times[p], window.length, window.every) for p in positions)
        # The state carried into a range, for an entity whose events reach `start` (those
        # within the view's reach before it; any, with Latest features): one idle for
        # longer already has an earlier row saying its windows are empty.
        reach_from = start - view.reach if start is not None and view.reach is not None else None
        if start is not None and any(
            (reach_from is None or times[p] >= reach_from) and times[p] < start for p in positions
        ):
            points.add(start)
        for point in sorted(points):
            if (start is not None and point < start) or (end is not None and point >= end):
                continue
            row: dict[str, Any] = {view.entity_key: key, AS_OF: point}
            for feature in view.features:
                if feature.window is None:  # Latest: the newest event at or before the point
                    before = [p for p in positions if times[p] <= point]
                    newest = max(before, key=lambda p: (times[p], p))  # p grows with log order
                    row[feature.name] = columns[feature.column or ""][newest]
                    continue
                low = window_start(point, feature.window.length, feature.window.every)
                inside = [p for p in positions if low <= times[p] <= point]
                row[feature.name] = _aggregate(feature, inside, times, columns)
                if with_scale and feature.name in scaled:
                    magnitudes = [abs(v) for p in inside if (v := columns[feature.column or ""][p]) is not None]
                    row[SCALE_PREFIX + feature.name] = float(max(magnitudes, default=0.0))
            rows.append(row)

    schema = view.changelog_schema()
    if with_scale:
        for name in sorted(scaled, key=view.feature_names.index):
            schema = schema.append(pa.field(SCALE_PREFIX + name, pa.float64()))
    data = {name: [row[name] for row in rows] for name in schema.names}
    table = pa.table(
        {
            name: pa.array(values, type=schema.field(name).type if name != AS_OF else pa.int64())
            for name, values in data.items()
        }
    )
    return table.set_column(
        table.schema.get_field_index(AS_OF), AS_OF, table.column(AS_OF).cast(schema.field(AS_OF).type)
    ).cast(schema)


def _inputs(features: Iterable[FeatureSpec]) -> set[str]:
    return {f.column for f in features if f.column is not None}


def _aggregate(feature: FeatureSpec, inside: list[int], times: list[int], columns: dict[str, list[Any]]) -> Any:
    if feature.kind == "count" and feature.column is None:
        return len(inside)
    assert feature.column is not None
    values = [columns[feature.column][p] for p in inside]
    present = [(times[p], order, v) for order, (p, v) in enumerate(zip(inside, values, strict=True)) if v is not None]
    if feature.kind == "count":
        return len(present)
    if not present:
        return empty_value(feature.kind, feature.dtype)
    numbers = [v for _, _, v in present]
    if feature.kind == "sum":
        return sum(numbers) if feature.dtype.startswith("int") else math.fsum(numbers)
    if feature.kind == "mean":
        return math.fsum(numbers) / len(numbers)
    if feature.kind == "min":
        return min(numbers)
    if feature.kind == "max":
        return max(numbers)
    if feature.kind == "last":
        return max(present, key=lambda item: (item[0], item[1]))[2]
    if feature.kind == "std":
        mean = math.fsum(numbers) / len(numbers)
        return math.sqrt(math.fsum((x - mean) ** 2 for x in numbers) / len(numbers))
    raise ValueError(f"unknown aggregation kind {feature.kind!r}")
