"""The columnar stream state (`tenx stream`'s) serves exactly what the pure-Python state
serves: after every micro-batch, the online value of every entity (newer-or-equal
as_of wins, as the stores write) is the same, and the same events are late. Through
`ViewState` it equals the reference engine (tests/unit/pipelines/test_stream_state.py)."""

from __future__ import annotations

import itertools
import math
import pickle
from datetime import timedelta
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
from hypothesis import given

from featurestore.plan import ViewSpec
from featurestore.semantics import values_match
from featurestore.transforms import prepare_events
from pipelines.batch.kernel import changelog_kernel
from pipelines.reference import reference_changelog
from pipelines.stream.compensated import compensated_sums
from pipelines.stream.state import Emit, ViewState, events_from_frame
from pipelines.stream.tiles import EventBatch, LatestState, RowBatch, batch_from_frame
from pipelines.stream.watermark import Progress
from tests.unit.pipelines.test_kernel_parity import VIEWS, WINDOWED_ONLY, logs
from tests.unit.pipelines.test_reference import BASE, BASE_US
from tests.unit.pipelines.test_stream_state import batch_progress

Online = dict[Any, tuple[int, tuple[Any, ...]]]


def serve(online: Online, rows: list[tuple[Any, int, tuple[Any, ...]]]) -> None:
    for entity, as_of, values in rows:
        current = online.get(entity)
        if current is None or as_of >= current[0]:
            online[entity] = (as_of, values)


def replay(view: ViewSpec, frame: pd.DataFrame, cuts: list[int], *, snapshot: bool = False) -> list[Any]:
    """Both states fed the same micro-batches; per batch: (python online, columnar
    online, python late sequences, columnar late sequences)."""
    python, columnar, stepped = ViewState(view, Emit.LATEST), LatestState(view), LatestState(view)
    python_online: Online = {}
    columnar_online: Online = {}
    stepped_online: Online = {}
    frame = frame.assign(_seq=range(len(frame)))
    steps = []
    bounds = sorted({0, len(frame), *[c for c in cuts if 0 < c < len(frame)]})
    for low, high in itertools.pairwise(bounds):
        batch = prepare_events(view, frame.iloc[low:high])
        progress = batch_progress(frame.iloc[low:high])
        rows, late = python.apply(events_from_frame(view, batch, python.inputs, []))
        python.observe(progress)
        serve(python_online, rows + python.advance())
        events = batch_from_frame(view, batch, columnar.inputs)
        emitted, late_positions = columnar.apply(events)
        columnar.observe(progress)
        serve(columnar_online, emitted.rows() + columnar.advance().rows())
        # what the dataflow runs: apply + observe + advance, one row per entity
        one_row_each, _ = stepped.step(events, progress)
        assert len(set(one_row_each.keys)) == len(one_row_each)
        serve(stepped_online, one_row_each.rows())
        assert stepped_online == columnar_online
        if snapshot:  # what Bytewax recovery does between epochs
            columnar = pickle.loads(pickle.dumps(columnar))
        late_python = [event[1] for _, event in late]
        late_columnar = events.sequences[late_positions].tolist()
        steps.append((dict(python_online), dict(columnar_online), late_python, late_columnar))
    serve(python_online, python.flush())
    serve(columnar_online, columnar.flush().rows())
    steps.append((python_online, columnar_online, [], []))
    return steps


def assert_same_online(view: ViewSpec, expected: Online, got: Online) -> None:
    assert sorted(expected) == sorted(got)
    kinds = [f.kind for f in view.features]
    for entity, (as_of, values) in expected.items():
        got_as_of, got_values = got[entity]
        assert got_as_of == as_of, entity
        for name, kind, a, b in zip(view.feature_names, kinds, values, got_values, strict=True):
            # Both states add floats in tile order; Std differs only in the merge formula.
            assert values_match(a, b, kind=kind, scale=1e12), (entity, name, a, b)
            assert type(a) is type(b) or a is None or b is None, (name, a, b)


@given(frame=logs(), view_index=st.integers(0, len(VIEWS) - 1), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_columnar_state_serves_what_the_python_state_serves(
    frame: pd.DataFrame, view_index: int, cuts: list[int]
) -> None:
    view = VIEWS[view_index]
    for python_online, columnar_online, late_python, late_columnar in replay(view, frame, cuts):
        assert late_columnar == late_python
        assert_same_online(view, python_online, columnar_online)


@given(frame=logs(), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_columnar_state_survives_a_snapshot_between_batches(frame: pd.DataFrame, cuts: list[int]) -> None:
    view = VIEWS[1]
    for python_online, columnar_online, _, _ in replay(view, frame, cuts, snapshot=True):
        assert_same_online(view, python_online, columnar_online)


@pytest.mark.parametrize("latest", [False, True])
def test_state_forgets_tiles_and_entities_no_window_reaches(latest: bool) -> None:
    # one 10-minute window in 5-minute tiles, 5 minutes of lateness; with Latest features
    # too, the entities stay: their newest values are served however old.
    view = VIEWS[0] if latest else WINDOWED_ONLY
    state = LatestState(view)
    assert state.inputs == ("amount", "label", "value")
    minute = 60_000_000

    def batch(entity: int, minutes: float, sequence: int) -> EventBatch:
        return EventBatch(
            [entity],
            np.array([int(minutes * minute)], np.int64),
            np.array([sequence], np.int64),
            [np.array([1], np.int64), np.array(["a"], dtype=object), np.array([1.0])],  # amount, label, value
            [np.array([True]), np.array([True]), np.array([True])],
        )

    state.apply(batch(1, 0, 0))
    state.apply(batch(2, 1, 1))
    assert state.entity_count == 2
    rows, _ = state.apply(batch(3, 60, 2))
    state.observe([Progress(0, event_time=60 * minute)])  # watermark 55 min: entities 1 and 2 expired
    expired = state.advance()
    assert sorted(expired.keys) == [1, 2]
    assert expired.as_of.tolist() == [10 * minute, 10 * minute]
    count = view.feature_names.index("count_10m")
    assert expired.values[count].tolist() == [0, 0]
    assert state.entity_count == (3 if latest else 1)  # tiles of 1 and 2 forgotten, and the entities
    assert sum(t.live for t in state.tables.values()) == 1
    if latest:
        assert expired.values[view.feature_names.index("value")].tolist() == [1.0, 1.0]
        assert expired.values[view.feature_names.index("latest_label")].tolist() == ["a", "a"]
    assert len(rows) == 1
    assert rows.keys == [3]


def test_row_batches_concatenate_keeping_types_and_nulls() -> None:
    a = RowBatch([1], np.array([5], np.int64), [np.array([2], np.int64), np.array([0.5])], [None, np.array([True])])
    b = RowBatch([2], np.array([6], np.int64), [np.array([3], np.int64), np.array([1.5])], [None, None])
    both = RowBatch.concat([RowBatch.empty(2), a, b])
    assert both.rows() == [(1, 5, (2, None)), (2, 6, (3, 1.5))]
    assert both.values[0].dtype == np.int64


def test_an_out_of_order_tile_when_the_table_is_full() -> None:
    # Inserting a tile behind an entity's newest one when every slot is taken grows the
    # table first (regression: the insert wrote into the arrays from before the growth).
    view = VIEWS[0]
    minute = 60_000_000

    def batch(entities: list[int], minutes: int, first: int) -> EventBatch:
        n = len(entities)
        return EventBatch(
            entities,
            np.full(n, minutes * minute, np.int64),
            np.arange(first, first + n, dtype=np.int64),
            [np.ones(n, np.int64), np.array(["a"] * n, dtype=object), np.ones(n)],
            [np.ones(n, bool)] * 3,
        )

    state = LatestState(view)
    state.step(batch(list(range(1024)), 10, 0), [Progress(0, event_time=10 * minute)])
    assert [t.live for t in state.tables.values()] == [t.capacity for t in state.tables.values()]
    rows, late = state.step(batch([0], 9, 5_000))  # within the lateness, one tile behind
    assert len(late) == 0
    assert rows.rows()[0][0] == 0
    count = view.feature_names.index("count_10m")
    assert rows.values[count].tolist() == [2]


CANCELLING = st.one_of(
    st.sampled_from([1e16, -1e16, 1e15, -1e15, 3e14]),
    st.integers(-40, 40).map(lambda k: k * 0.25),
)


@st.composite
def cancelling_logs(draw: Any) -> pd.DataFrame:
    """Huge amounts that cancel, between small ones: a plain float sum loses the small
    ones (1e16 + 1 - 1e16 == 0)."""
    size = draw(st.integers(1, 30))
    frame = pd.DataFrame(
        {
            "user_id": draw(st.lists(st.integers(1, 2), min_size=size, max_size=size)),
            "value": draw(st.lists(CANCELLING, min_size=size, max_size=size)),
            "amount": pd.array([1] * size, dtype="Int64"),
            "label": ["a"] * size,
            "event_time": pd.to_datetime(
                [
                    BASE + timedelta(seconds=30 * s)
                    for s in draw(st.lists(st.integers(0, 30), min_size=size, max_size=size))
                ],
                utc=True,
            ).as_unit("us"),
        }
    )
    return frame.sort_values("event_time", kind="stable").reset_index(drop=True)


@given(
    frame=cancelling_logs(), view_index=st.integers(0, len(VIEWS) - 1), cuts=st.lists(st.integers(0, 30), max_size=4)
)
def test_cancelling_amounts_sum_as_exactly_as_the_batch_engine(
    frame: pd.DataFrame, view_index: int, cuts: list[int]
) -> None:
    # Compensated (Neumaier/TwoSum) sums in both stream states: Sum and Mean equal the
    # reference's exact sums (math.fsum) and the batch kernel's, with no allowance for
    # the size of the values cancelled (no scale).
    view = VIEWS[view_index]
    reference = reference_changelog(view, frame).to_pylist()
    batch = changelog_kernel(view, frame).to_pylist()
    assert len(batch) == len(reference)
    sums = [i for i, f in enumerate(view.features) if f.kind in ("sum", "mean") and f.column == "value"]

    def as_of(row: dict[str, Any]) -> int:
        return int(row["as_of"].timestamp() * 1_000_000)

    def check(expected: dict[str, Any], values: list[Any] | tuple[Any, ...]) -> None:
        for index in sums:
            name, kind, dtype = view.feature_names[index], view.features[index].kind, view.features[index].dtype
            got = values[index]
            assert values_match(expected[name], got, kind=kind, dtype=dtype), (name, expected[name], got)

    for expected, from_batch in zip(reference, batch, strict=True):
        check(expected, [from_batch[name] for name in view.feature_names])
    steps = replay(view, frame, cuts)
    python_online, columnar_online, _, _ = steps[-2]  # every event applied, before the end's expiries
    for online in (python_online, columnar_online):
        for user, (moment, values) in online.items():
            rows = [r for r in reference if r["user_id"] == user and as_of(r) <= moment]
            check(rows[-1], values)


@given(
    st.lists(
        st.lists(
            st.one_of(CANCELLING, st.floats(min_value=-1e307, max_value=1e307, allow_nan=False)), min_size=1, max_size=8
        ),
        min_size=1,
        max_size=12,
    )
)
def test_compensated_segment_sums_are_within_twice_working_precision_of_fsum(segments: list[list[float]]) -> None:
    # The documented bound of a compensated sum: one rounding of the result plus
    # (n u)^2 times the sum of magnitudes (1e16 + 0.25 - 1e16 is exactly 0.25). Values up
    # to 1e307 overflow one running sum over every segment: the restarted path then.
    values = np.array([v for segment in segments for v in segment])
    lengths = np.array([len(segment) for segment in segments])
    starts = np.cumsum(lengths) - lengths
    sums, errors = compensated_sums(values, starts, lengths)
    u = 2.0**-53
    for segment, total, error in zip(segments, sums.tolist(), errors.tolist(), strict=True):
        exact = math.fsum(segment)
        bound = 2 * u * abs(exact) + (len(segment) * 2 * u) ** 2 * math.fsum(abs(v) for v in segment)
        assert abs((total + error) - exact) <= bound, (segment, total + error, exact)


def test_a_derived_value_beyond_the_float_limit_counts_as_null_in_every_engine() -> None:
    # Source fields are bounded by validation; a transform can still make inf (or 1e300):
    # it counts as null in the reference, the batch kernel and both stream states, so
    # no window's Sum, Mean or Std becomes inf or NaN.
    from featurestore import Count, Entity, Mean, Std, Sum, Window, feature_view
    from featurestore.plan import compile_definitions
    from tests.unit.pipelines.test_reference import SOURCE, events

    @feature_view(
        entity=Entity("user", key="user_id"),
        source=SOURCE,
        columns={"scaled": "float64"},
        aggregations=[Count("scaled"), Sum("scaled"), Mean("scaled"), Std("scaled")],
        windows=[Window("10m", every="5m")],
    )
    def scaled(tx: pd.DataFrame) -> pd.DataFrame:
        return tx.assign(scaled=tx["value"] * 1e300)[["scaled"]]

    view = compile_definitions("test", views=[scaled]).views[0]
    frame = events((1, 0, 1e-299), (1, 1, 1e200), (1, 2, 2e-299), (1, 3, -1e10))  # 1e500: inf; -1e310: -inf
    reference = reference_changelog(view, frame).to_pylist()
    batch = changelog_kernel(view, frame).to_pylist()
    steps = replay(view, frame, [2])
    python_online, columnar_online, _, _ = steps[-2]
    last = reference[[r["as_of"] for r in reference].index(max(r["as_of"] for r in reference if r["count_scaled_10m"]))]
    assert last["count_scaled_10m"] == 2
    assert last["sum_scaled_10m"] == pytest.approx(30.0)
    for row in (batch[reference.index(last)],):
        assert row["count_scaled_10m"] == 2
        assert math.isfinite(row["std_scaled_10m"])
    for online in (python_online, columnar_online):
        values = dict(zip(view.feature_names, online[1][1], strict=True))
        assert values["count_scaled_10m"] == 2
        assert values["sum_scaled_10m"] == pytest.approx(30.0)
        assert math.isfinite(values["std_scaled_10m"])


def test_timestamp_features_reach_the_online_store_as_the_same_microseconds_from_every_engine() -> None:
    """Last and Latest of a timestamp column: the stream's rows were pandas Timestamps
    the codec could not pack (the sink failed, and again on every restart: the job never
    got past them); the batch engine's went through Arrow datetimes the same way."""
    from featurestore.definitions.aggregations import Count, Last, Latest
    from featurestore.stores.codec import decode, encode_columns, encode_rows
    from tests.unit.pipelines.test_reference import events, make_view

    view = make_view(Count(), Last("event_time", name="last_t"), Latest("event_time", name="latest_t"))
    frame = events((1, 0, 1.0), (1, 1, 2.0), (2, 3, 1.0)).assign(_seq=range(3))
    state = LatestState(view)
    batch = batch_from_frame(view, prepare_events(view, frame), state.inputs)
    rows, _ = state.step(batch, batch_progress(frame))
    streamed = {
        key: decode(view, packed)
        for key, packed in zip(rows.keys, encode_columns(view, rows.as_of, rows.values, rows.nulls), strict=True)
    }
    minute = 60_000_000
    at = {1: BASE_US + minute, 2: BASE_US + 3 * minute}  # each user's last event
    counts = {1: 2, 2: 1}
    assert streamed == {user: (time, [counts[user], time, time]) for user, time in at.items()}
    for changelog in (reference_changelog(view, frame), changelog_kernel(view, frame)):
        newest = {}
        for key, as_of, packed in encode_rows(view, changelog):
            if as_of <= at[key]:
                newest[key] = decode(view, packed)
        assert newest == streamed
