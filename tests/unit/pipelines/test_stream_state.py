"""The stream state equals the reference: row for row on in-order logs fed in random
micro-batches, and in its final values on logs out of order within the lateness."""

from __future__ import annotations

import itertools
from typing import Any

import hypothesis.strategies as st
import pandas as pd
import pyarrow as pa
from hypothesis import given

from featurestore.plan import AS_OF, ViewSpec
from featurestore.semantics import changelog_differences
from featurestore.transforms import prepare_events
from pipelines.reference import reference_changelog
from pipelines.stream.state import Emit, Row, ViewState, events_from_frame
from pipelines.stream.watermark import Progress
from tests.unit.pipelines.test_kernel_parity import VIEWS, logs


def batch_progress(frame: pd.DataFrame) -> list[Progress]:
    """What the decode step reports after a one-partition micro-batch: its newest event
    time (over every valid event, before any `where=`)."""
    if len(frame) == 0:
        return []
    return [Progress(0, event_time=int(pa.array(frame["event_time"]).cast(pa.int64()).to_numpy().max()))]


def run_stream(view: ViewSpec, frame: pd.DataFrame, cuts: list[int], emit: Emit = Emit.CHANGELOG) -> list[Row]:
    """Feed `frame` (log order, one partition) in micro-batches split at `cuts`, each
    followed by its progress report, as the dataflow does; rows in emit order."""
    state = ViewState(view, emit)
    frame = frame.assign(_seq=range(len(frame)))
    rows: list[Row] = []
    bounds = sorted({0, len(frame), *[c for c in cuts if 0 < c < len(frame)]})
    for low, high in itertools.pairwise(bounds):
        batch = prepare_events(view, frame.iloc[low:high])
        emitted, _ = state.apply(events_from_frame(view, batch, state.inputs, []))
        rows.extend(emitted)
        state.observe(batch_progress(frame.iloc[low:high]))
        rows.extend(state.advance())
    rows.extend(state.flush())
    return rows


def rows_of(items: list[Any], view: str | None = None) -> list[Row]:
    """Plain rows from the (view name, RowBatch) items a row sink of the dataflow receives."""
    return [row for name, batch in items if view is None or name == view for row in batch.rows()]


def as_changelog(view: ViewSpec, rows: list[Row]) -> pa.Table:
    """The changelog a stream produced: the last row emitted per (entity, as_of) wins."""
    latest: dict[tuple[Any, int], tuple[Any, ...]] = {}
    for entity, as_of, values in rows:
        latest[(entity, as_of)] = values
    ordered = sorted(latest.items())
    schema = view.changelog_schema()
    data: dict[str, list[Any]] = {name: [] for name in schema.names}
    for (entity, as_of), values in ordered:
        data[view.entity_key].append(entity)
        data[AS_OF].append(as_of)
        for name, value in zip(view.feature_names, values, strict=True):
            data[name].append(value)
    columns = {n: pa.array(v, pa.int64() if n == AS_OF else schema.field(n).type) for n, v in data.items()}
    table = pa.table(columns)
    return table.set_column(1, AS_OF, table.column(AS_OF).cast(schema.field(AS_OF).type)).cast(schema)


@given(frame=logs(), view_index=st.integers(0, len(VIEWS) - 1), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_in_order_stream_equals_reference_row_for_row(frame: pd.DataFrame, view_index: int, cuts: list[int]) -> None:
    view = VIEWS[view_index]
    ordered = frame.sort_values("event_time", kind="stable").reset_index(drop=True)
    expected = reference_changelog(view, ordered, with_scale=True)
    got = as_changelog(view, run_stream(view, ordered, cuts))
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, got, key=view.entity_key, kinds=kinds) == []


@given(frame=logs(), view_index=st.integers(0, len(VIEWS) - 1), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_out_of_order_within_lateness_converges_to_the_last_batch_row(
    frame: pd.DataFrame, view_index: int, cuts: list[int]
) -> None:
    # The generated logs span 20 minutes with a 5-minute lateness: keep only the events
    # the stream accepts (the rest must be reported late), then compare final values.
    view = VIEWS[view_index]
    state_rows = run_stream(view, frame, cuts)
    accepted = accepted_events(view, frame, cuts)
    expected = reference_changelog(view, accepted, with_scale=True)
    final_expected = last_per_entity(expected, view)
    final_got = last_per_entity(as_changelog(view, state_rows), view)
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(final_expected, final_got, key=view.entity_key, kinds=kinds) == []


def accepted_events(view: ViewSpec, frame: pd.DataFrame, cuts: list[int]) -> pd.DataFrame:
    """Replay the watermark rule by brute force to find which events a stream applies:
    an event is late when it is more than the lateness older than the newest event of
    an earlier micro-batch (a batch's events are judged before its progress counts)."""
    lateness = view.source.allowed_lateness
    times = pa.array(frame["event_time"]).cast(pa.int64()).to_pylist()
    bounds = sorted({0, len(frame), *[c for c in cuts if 0 < c < len(frame)]})
    keep, newest = [], None
    for low, high in itertools.pairwise(bounds):
        for time in times[low:high]:
            keep.append(newest is None or time >= newest - lateness)
        newest = max(times[low:high]) if newest is None else max(newest, *times[low:high])
    return frame[pd.Series(keep, index=frame.index, dtype=bool)].reset_index(drop=True)


def last_per_entity(table: pa.Table, view: ViewSpec) -> pa.Table:
    rows = table.to_pylist()
    latest: dict[Any, dict[str, Any]] = {}
    for row in rows:
        key = row[view.entity_key]
        if key not in latest or row[AS_OF] >= latest[key][AS_OF]:
            latest[key] = row
    names = list(table.schema.names)
    ordered = [latest[k] for k in sorted(latest)]
    out = pa.table({n: pa.array([r[n] for r in ordered], table.schema.field(n).type) for n in names})
    return out


@given(frame=logs(), view_index=st.integers(0, len(VIEWS) - 1), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_latest_only_emission_serves_the_same_online_values(
    frame: pd.DataFrame, view_index: int, cuts: list[int]
) -> None:
    view = VIEWS[view_index]
    full = last_per_entity(as_changelog(view, run_stream(view, frame, cuts)), view)
    latest_rows = run_stream(view, frame, cuts, Emit.LATEST)
    latest = last_per_entity(as_changelog(view, latest_rows), view)
    assert latest.equals(full)
    assert len(latest_rows) <= len(run_stream(view, frame, cuts))
