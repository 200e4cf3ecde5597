"""Hand-computed cases for the reference engine: the contract every engine is held to.

Base time 2026-01-01 00:00 UTC; `m(x)` is x minutes after it. Most views use a 10-minute
window hopped every 5 minutes (W=10m, g=5m): an event in the tile starting at s counts
from its own time until s + 10m.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from featurestore import Count, Entity, Last, Latest, Max, Mean, Min, Source, Std, Sum, Window, feature_view
from featurestore.errors import TransformError
from featurestore.plan import AS_OF, ViewSpec, compile_definitions
from featurestore.transforms import events_frame
from pipelines.reference import reference_changelog
from schemas import EventSchema, Field

BASE = datetime(2026, 1, 1, tzinfo=UTC)
BASE_US = 1_767_225_600_000_000
MINUTE = 60_000_000

EVENTS = EventSchema(
    "events",
    [
        Field("user_id", "int64"),
        Field("value", "float64", nullable=True),
        Field("amount", "int64", nullable=True),
        Field("label", "string", nullable=True),
        Field("event_time", "timestamp[us, UTC]"),
    ],
    event_time="event_time",
    entity_keys=["user_id"],
)
USER = Entity("user", key="user_id")
SOURCE = Source("events", EVENTS)
W10 = Window("10m", every="5m")


def m(minutes: float) -> int:
    """Microseconds `minutes` after BASE."""
    return BASE_US + round(minutes * MINUTE)


def make_view(*aggregations: Any, where: Any = None, windows: Any = (W10,)) -> ViewSpec:
    @feature_view(entity=USER, source=SOURCE, aggregations=list(aggregations), windows=windows, where=where)
    def view(events: pd.DataFrame) -> pd.DataFrame:
        return events[[]]

    return compile_definitions("test", views=[view]).views[0]


def events(*rows: tuple[Any, ...]) -> pd.DataFrame:
    """Rows of (user_id, minute, value[, amount[, label]]) in log order."""
    records = []
    for row in rows:
        user, minute, value, *rest = row
        records.append(
            {
                "user_id": user,
                "value": value,
                "amount": rest[0] if len(rest) > 0 else None,
                "label": rest[1] if len(rest) > 1 else None,
                "event_time": BASE + timedelta(microseconds=m(minute) - BASE_US),
            }
        )
    frame = pd.DataFrame.from_records(records, columns=["user_id", "value", "amount", "label", "event_time"])
    frame["amount"] = frame["amount"].astype("Int64")
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True).dt.as_unit("us")
    return frame


def changelog(view: ViewSpec, frame: pd.DataFrame, **kwargs: Any) -> list[tuple[Any, ...]]:
    """(user, minutes after BASE, *feature values) per row."""
    table = reference_changelog(view, frame, **kwargs)
    out = []
    for row in table.to_pylist():
        minutes = (row[AS_OF] - BASE) / timedelta(minutes=1)
        values = tuple(row[name] for name in view.feature_names)
        out.append((row["user_id"], minutes, *values))
    return out


# -- tiles and expiry ----------------------------------------------------------------------


def test_single_event_counts_until_its_tile_start_plus_window() -> None:
    view = make_view(Count())
    assert changelog(view, events((1, 2, 1.0))) == [(1, 2, 1), (1, 10, 0)]


def test_event_exactly_on_a_tile_boundary_belongs_to_the_tile_it_starts() -> None:
    view = make_view(Count())
    assert changelog(view, events((1, 5, 1.0))) == [(1, 5, 1), (1, 15, 0)]


def test_event_one_microsecond_before_a_boundary_belongs_to_the_earlier_tile() -> None:
    view = make_view(Count())
    just_before = 5 - 1 / MINUTE
    assert changelog(view, events((1, just_before, 1.0))) == [(1, just_before, 1), (1, 10, 0)]


def test_sawtooth_tiles_drop_out_one_by_one() -> None:
    view = make_view(Count())
    assert changelog(view, events((1, 1, 1.0), (1, 7, 1.0))) == [
        (1, 1, 1),
        (1, 7, 2),
        (1, 10, 1),  # tile [0, 5) expires at 0 + 10m
        (1, 15, 0),  # tile [5, 10) expires at 5 + 10m
    ]


def test_window_start_is_inclusive_at_the_hopped_tail() -> None:
    # As of 12m the window covers [tile(12m) - 10m + 5m, 12m] = [5m, 12m].
    view = make_view(Count())
    before_tail = 5 - 1 / MINUTE
    assert changelog(view, events((1, before_tail, 1.0), (1, 5, 1.0), (1, 12, 1.0))) == [
        (1, before_tail, 1),
        (1, 5, 2),
        (1, 10, 1),  # the event just before 5m has expired; the one at 5m has not
        (1, 12, 2),
        (1, 15, 1),
        (1, 20, 0),
    ]


def test_event_at_the_expiry_time_of_another_makes_one_row() -> None:
    view = make_view(Count())
    assert changelog(view, events((1, 1, 1.0), (1, 10, 1.0))) == [(1, 1, 1), (1, 10, 1), (1, 20, 0)]


def test_coarser_granularity_shortens_the_tail() -> None:
    # W=10m with g=10m: an event at 7m lives in tile [0, 10) and expires at 10m.
    coarse = make_view(Count(), windows=[Window("10m", every="10m")])
    fine = make_view(Count())
    assert changelog(coarse, events((1, 7, 1.0))) == [(1, 7, 1), (1, 10, 0)]
    assert changelog(fine, events((1, 7, 1.0))) == [(1, 7, 1), (1, 15, 0)]


@pytest.mark.parametrize(
    ("length", "event_minute", "expiry_minute"),
    [
        ("1h", 10 * 60 + 7, 11 * 60 + 5),  # g = 5m
        ("1d", 10 * 60 + 7, 10 * 60 + 24 * 60),  # g = 1h
        ("12d", 10 * 60 + 7, 12 * 24 * 60),  # g = 1d
    ],
)
def test_default_granularity_rule(length: str, event_minute: int, expiry_minute: int) -> None:
    view = make_view(Count(), windows=[length])
    assert changelog(view, events((1, event_minute, 1.0))) == [(1, event_minute, 1), (1, expiry_minute, 0)]


def test_several_windows_share_change_points() -> None:
    view = make_view(Count(), windows=[W10, Window("15m", every="5m")])
    assert view.feature_names == ("count_10m", "count_15m")
    assert changelog(view, events((1, 2, 1.0))) == [(1, 2, 1, 1), (1, 10, 0, 1), (1, 15, 0, 0)]


def test_several_windows_and_aggregations_in_one_view() -> None:
    view = make_view(Count(), Sum("value", windows=[Window("15m", every="5m")]))
    assert view.feature_names == ("count_10m", "sum_value_15m")
    assert changelog(view, events((1, 3, 2.0), (1, 8, 3.0))) == [
        (1, 3, 1, 2.0),
        (1, 8, 2, 5.0),
        (1, 10, 1, 5.0),
        (1, 15, 0, 3.0),
        (1, 20, 0, 0.0),
    ]


# -- same-time events and Last -------------------------------------------------------------


def test_events_at_the_same_time_change_the_vector_together() -> None:
    view = make_view(Count(), Sum("value"), Last("value"))
    assert changelog(view, events((1, 3, 1.0), (1, 3, 2.0), (1, 3, 3.0))) == [
        (1, 3, 3, 6.0, 3.0),
        (1, 10, 0, 0.0, None),
    ]


def test_last_breaks_time_ties_by_log_order() -> None:
    view = make_view(Last("value"))
    assert changelog(view, events((1, 3, 5.0), (1, 3, 1.0))) == [(1, 3, 1.0), (1, 10, None)]


def test_last_is_latest_by_event_time_not_by_log_position() -> None:
    view = make_view(Last("value"))
    # Logged out of order: the 6m event arrives before the 2m event.
    assert changelog(view, events((1, 6, 10.0), (1, 2, 20.0))) == [
        (1, 2, 20.0),
        (1, 6, 10.0),
        (1, 10, 10.0),
        (1, 15, None),
    ]


def test_last_skips_null_values() -> None:
    view = make_view(Last("value"))
    assert changelog(view, events((1, 1, 4.0), (1, 2, None))) == [(1, 1, 4.0), (1, 2, 4.0), (1, 10, None)]


def test_last_of_a_string_column() -> None:
    view = make_view(Last("label"))
    assert changelog(view, events((1, 1, None, None, "a"), (1, 2, None, None, "b"))) == [
        (1, 1, "a"),
        (1, 2, "b"),
        (1, 10, None),
    ]


# -- empty windows and nulls ---------------------------------------------------------------


def test_empty_window_values() -> None:
    view = make_view(Count(), Sum("value"), Mean("value"), Min("value"), Max("value"), Last("value"), Std("value"))
    assert changelog(view, events((1, 1, 2.0))) == [
        (1, 1, 1, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0),
        (1, 10, 0, 0.0, None, None, None, None, None),
    ]


def test_nulls_are_skipped_but_count_counts_events() -> None:
    view = make_view(Count(), Count("value"), Sum("value"), Mean("value"), Min("value"))
    assert changelog(view, events((1, 1, None), (1, 2, 4.0))) == [
        (1, 1, 1, 0, 0.0, None, None),
        (1, 2, 2, 1, 4.0, 4.0, 4.0),
        (1, 10, 0, 0, 0.0, None, None),
    ]


def test_nan_is_null() -> None:
    view = make_view(Count("value"), Sum("value"), Max("value"))
    assert changelog(view, events((1, 1, float("nan")), (1, 2, 1.5))) == [
        (1, 1, 0, 0.0, None),
        (1, 2, 1, 1.5, 1.5),
        (1, 10, 0, 0.0, None),
    ]


# -- each aggregation ----------------------------------------------------------------------


def test_mean_and_population_std() -> None:
    view = make_view(Mean("value"), Std("value"))
    rows = changelog(view, events((1, 1, 1.0), (1, 2, 2.0), (1, 3, 3.0), (1, 4, 4.0)))
    assert rows[3][:2] == (1, 4)
    assert rows[3][2] == 2.5
    assert rows[3][3] == pytest.approx(math.sqrt(1.25), rel=1e-15)
    assert rows[0][2:] == (1.0, 0.0)  # one value: std 0


def test_min_and_max_with_negative_values() -> None:
    view = make_view(Min("value"), Max("value"))
    assert changelog(view, events((1, 1, -3.0), (1, 6, 7.5), (1, 7, -10.0))) == [
        (1, 1, -3.0, -3.0),
        (1, 6, -3.0, 7.5),
        (1, 7, -10.0, 7.5),
        (1, 10, -10.0, 7.5),
        (1, 15, None, None),
    ]


def test_integer_sum_min_max_stay_integers() -> None:
    view = make_view(Sum("amount"), Max("amount"))
    assert [f.dtype for f in view.features] == ["int64", "int64"]
    rows = changelog(view, events((1, 1, None, 3), (1, 2, None, -5)))
    assert rows == [(1, 1, 3, 3), (1, 2, -2, 3), (1, 10, 0, None)]
    assert all(isinstance(value, int) for value in rows[1][2:])


def test_huge_values_cancel_exactly_in_the_reference() -> None:
    view = make_view(Sum("value"))
    rows = changelog(view, events((1, 1, 1e15), (1, 1, 1.0), (1, 1, -1e15)))
    assert rows[0] == (1, 1, 1.0)


# -- entities, filters, transforms, ranges -------------------------------------------------


def test_entities_are_independent_and_sorted_by_key() -> None:
    view = make_view(Count())
    assert changelog(view, events((2, 1, 1.0), (1, 6, 1.0))) == [
        (1, 6, 1),
        (1, 15, 0),
        (2, 1, 1),
        (2, 10, 0),
    ]


def test_filtered_events_make_no_change_points() -> None:
    view = make_view(Count(), where=lambda e: e["value"] > 0)
    assert changelog(view, events((1, 1, -1.0), (1, 2, 5.0))) == [(1, 2, 1), (1, 10, 0)]


def test_row_transform_columns_feed_aggregations() -> None:
    @feature_view(
        entity=USER,
        source=SOURCE,
        columns={"doubled": "float64"},
        aggregations=[Sum("doubled")],
        windows=[W10],
    )
    def doubled_view(events: pd.DataFrame) -> pd.DataFrame:
        return events.assign(doubled=events["value"] * 2)[["doubled"]]

    view = compile_definitions("test", views=[doubled_view]).views[0]
    assert changelog(view, events((1, 1, 1.5), (1, 2, 2.0))) == [(1, 1, 3.0), (1, 2, 7.0), (1, 10, 0.0)]


def test_range_keeps_rows_in_range_but_values_use_earlier_events() -> None:
    view = make_view(Count())
    frame = events((1, 1, 1.0), (1, 7, 1.0))
    assert changelog(view, frame, start=m(7), end=m(15)) == [(1, 7, 2), (1, 10, 1)]


def test_no_events_no_rows() -> None:
    view = make_view(Count())
    assert changelog(view, events()) == []


def test_transform_returning_wrong_columns_is_an_error_naming_the_view() -> None:
    @feature_view(entity=USER, source=SOURCE, columns={"x": "float64"}, aggregations=[Sum("x")], windows=[W10])
    def sneaky(events: pd.DataFrame) -> pd.DataFrame:
        if len(events) > 2:
            return events.assign(y=1.0)[["y"]]
        return events.assign(x=1.0)[["x"]]

    view = compile_definitions("test", views=[sneaky]).views[0]
    with pytest.raises(TransformError) as raised:
        reference_changelog(view, events((1, 1, 1.0), (1, 2, 1.0), (1, 3, 1.0)))
    assert str(raised.value) == (
        "feature view `sneaky`: the row transform returned columns ['y'], expected exactly ['x']"
    )


# -- Latest: no window --------------------------------------------------------------------------


def test_latest_is_the_newest_events_value_nulls_included_and_never_expires() -> None:
    view = make_view(Latest("value"), Count())
    log = events((1, 2, 1.0), (1, 4, None), (1, 4, 7.0), (1, 20, None), (2, 3, 2.5))
    # same time: the later event in the log wins; a null in the newest event is the value;
    # the Count expires at 10 and 30, Latest stays.
    assert changelog(view, log) == [
        (1, 2, 1.0, 1),
        (1, 4, 7.0, 3),
        (1, 10, 7.0, 0),
        (1, 20, None, 1),
        (1, 30, None, 0),
        (2, 3, 2.5, 1),
        (2, 10, 2.5, 0),
    ]


def test_a_view_of_latest_values_changes_only_at_events() -> None:
    view = make_view(Latest("value"), Latest("label"), windows=())
    log = events((1, 2, 1.0, None, "a"), (1, 9_000, 3.0, None, None))
    assert changelog(view, log) == [(1, 2, 1.0, "a"), (1, 9_000, 3.0, None)]


def test_latest_skips_events_the_where_filter_drops() -> None:
    view = make_view(Latest("value"), where=lambda e: e["value"] > 0, windows=())
    assert changelog(view, events((1, 1, 5.0), (1, 2, -1.0))) == [(1, 1, 5.0)]


# -- ints past float precision ------------------------------------------------------------------


def test_an_int_column_holding_a_null_stays_exact_and_the_transform_sees_what_pandas_gives() -> None:
    """to_pandas reads an int column with a null as float64, which rounds past 2**53
    (2**53 + 1 came out 2**53). events_frame keeps it exact for the aggregations; the
    transform and where= still see float64 with NaN, as they always did."""

    @feature_view(
        entity=USER,
        source=SOURCE,
        columns={"saw_float": "int64"},
        aggregations=[Max("saw_float"), Last("amount"), Sum("amount"), Min("amount")],
        windows=[W10],
        where=lambda e: e["amount"].isna() | (e["amount"] > 0),
    )
    def seen(events: pd.DataFrame) -> pd.DataFrame:
        return events.assign(saw_float=int(events["amount"].dtype == "float64"))[["saw_float"]]

    view = compile_definitions("test", views=[seen]).views[0]
    big = 2**53 + 1

    def table(*rows: tuple[int, int, int | None]) -> pa.Table:
        """(user, minute, amount) rows as the engines read them from Delta or Kafka."""
        return pa.table(
            {
                "user_id": [user for user, _, _ in rows],
                "value": [1.0] * len(rows),
                "amount": pa.array([amount for _, _, amount in rows], pa.int64()),
                "label": pa.array([None] * len(rows), pa.string()),
                "event_time": pa.array([m(minute) for _, minute, _ in rows], pa.timestamp("us", tz="UTC")),
            }
        )

    frame = events_frame(table((1, 1, big), (2, 2, None), (1, 3, big + 2)))
    assert str(frame["amount"].dtype) == "Int64"
    assert changelog(view, frame)[:2] == [(1, 1, 1, big, big, big), (1, 3, 1, big + 2, 2 * big + 2, big)]
    # Without a null the column is int64 as before, and the transform sees int64.
    plain = events_frame(table((1, 1, big)))
    assert str(plain["amount"].dtype) == "int64"
    assert changelog(view, plain)[0] == (1, 1, 0, big, big, big)
