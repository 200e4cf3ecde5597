"""Record (stream) and batch (ingest) validation against an EventSchema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import TRANSACTIONS, EventSchema, Field, validate_batch, validate_record, validate_records

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds since the epoch
TIME_EXPECTED = "timestamp (integer microseconds since epoch, or ISO-8601 with timezone)"
DEFAULT_BOUNDS = "a time in [2000-01-01T00:00:00+00:00, 2100-01-01T00:00:00+00:00)"
ABSURD_HINT = "(absurd timestamp; seconds or milliseconds instead of microseconds?)"
MISSING = object()


def record(**changes: Any) -> dict[str, Any]:
    """A valid TRANSACTIONS record as a producer would send it; MISSING drops a key."""
    base: dict[str, Any] = {
        "transaction_id": "tx-1",
        "user_id": 7,
        "merchant_id": 3,
        "amount": 12.5,
        "currency": "EUR",
        "category": "grocery",
        "country": "FR",
        "event_time": "2026-01-01T00:00:00Z",
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not MISSING}


def problem_texts(schema: EventSchema, value: Any) -> list[str]:
    out, problems = validate_record(schema, value)
    assert out is None
    return [str(p) for p in problems]


SMALL = EventSchema(
    "small",
    [
        Field("id", "int32"),
        Field("score", "float32", nullable=True),
        Field("flag", "bool"),
        Field("note", "string", nullable=True),
        Field("ts", "timestamp"),
    ],
    event_time="ts",
    entity_keys=("id",),
)


# -- one record -----------------------------------------------------------------------------


def test_valid_record_is_normalised() -> None:
    out, problems = validate_record(TRANSACTIONS, record(amount=10, shop="ignored"))
    assert problems == []
    assert out == {
        "transaction_id": "tx-1",
        "user_id": 7,
        "merchant_id": 3,
        "amount": 10.0,
        "currency": "EUR",
        "category": "grocery",
        "country": "FR",
        "event_time": T0,
    }
    assert type(out["amount"]) is float  # an int for a float field comes out a float
    assert type(out["event_time"]) is int


@pytest.mark.parametrize(
    ("given", "micros"),
    [
        ("2026-01-01T00:00:00Z", T0),
        ("2026-01-01T00:00:00+00:00", T0),
        ("2026-01-01T02:00:00+02:00", T0),
        ("2025-12-31T19:00:00-05:00", T0),
        ("2026-01-01T00:00:00.000001Z", T0 + 1),
        ("2026-01-01T02:00:00.250000+02:00", T0 + 250_000),
        (T0, T0),
        (T0 + 123, T0 + 123),
    ],
)
def test_event_time_becomes_utc_microseconds(given: Any, micros: int) -> None:
    out, problems = validate_record(TRANSACTIONS, record(event_time=given))
    assert problems == []
    assert out is not None
    assert out["event_time"] == micros


def test_every_problem_of_a_record_is_reported_at_once() -> None:
    bad = record(
        transaction_id=MISSING,
        user_id="7",
        merchant_id=True,
        amount=float("inf"),
        currency=None,
        event_time="2026-01-01T00:00:00",
    )
    assert problem_texts(TRANSACTIONS, bad) == [
        "field `transaction_id`: expected string, got missing",
        "field `user_id`: expected int64, got str '7'",
        "field `merchant_id`: expected int64, got bool True",
        "field `amount`: expected finite float64 within ±1e+140, got inf",
        "field `currency`: expected string (not null), got null",
        f"field `event_time`: expected {TIME_EXPECTED}, got timestamp without timezone '2026-01-01T00:00:00'",
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"currency": MISSING}, "field `currency`: expected string, got missing"),
        ({"user_id": None}, "field `user_id`: expected int64 (not null), got null"),
        ({"user_id": "12"}, "field `user_id`: expected int64, got str '12'"),
        ({"user_id": 1.0}, "field `user_id`: expected int64, got float 1.0"),
        ({"user_id": False}, "field `user_id`: expected int64, got bool False"),
        (
            {"user_id": 2**63},
            "field `user_id`: expected int64 within [-9223372036854775808, "
            "9223372036854775807], got 9223372036854775808",
        ),
        ({"amount": True}, "field `amount`: expected float64, got bool True"),
        ({"amount": "12,50"}, "field `amount`: expected float64, got str '12,50'"),
        ({"amount": float("nan")}, "field `amount`: expected finite float64 within ±1e+140, got nan"),
        ({"amount": float("-inf")}, "field `amount`: expected finite float64 within ±1e+140, got -inf"),
        # Finite, but a window's Sum or Std of it overflows: served as inf/NaN, never.
        ({"amount": 1.7e308}, "field `amount`: expected finite float64 within ±1e+140, got 1.7e+308"),
        ({"amount": -2e140}, "field `amount`: expected finite float64 within ±1e+140, got -2e+140"),
        ({"country": 33}, "field `country`: expected string, got int 33"),
        (
            {"event_time": "2026-01-01 00:00:00"},
            f"field `event_time`: expected {TIME_EXPECTED}, got timestamp without timezone '2026-01-01 00:00:00'",
        ),
        (
            {"event_time": "yesterday"},
            f"field `event_time`: expected {TIME_EXPECTED}, got unparseable string 'yesterday'",
        ),
        (
            {"event_time": "2026-13-01T00:00:00Z"},
            f"field `event_time`: expected {TIME_EXPECTED}, got unparseable string '2026-13-01T00:00:00Z'",
        ),
        (
            {"event_time": 1_700_000_000},
            f"field `event_time`: expected {DEFAULT_BOUNDS}, got 1700000000 {ABSURD_HINT}",
        ),
        (
            {"event_time": 1_700_000_000_000},
            f"field `event_time`: expected {DEFAULT_BOUNDS}, got 1700000000000 {ABSURD_HINT}",
        ),
        (
            {"event_time": "1970-01-01T00:00:00Z"},
            f"field `event_time`: expected {DEFAULT_BOUNDS}, got '1970-01-01T00:00:00Z' {ABSURD_HINT}",
        ),
        (
            {"event_time": 1.767e15},
            f"field `event_time`: expected {TIME_EXPECTED}, got float 1767000000000000.0",
        ),
        ({"event_time": None}, "field `event_time`: expected timestamp[us, UTC] (not null), got null"),
    ],
)
def test_each_problem_kind_is_worded(changes: dict[str, Any], message: str) -> None:
    assert problem_texts(TRANSACTIONS, record(**changes)) == [message]


def test_long_values_are_shortened_in_messages() -> None:
    [message] = problem_texts(TRANSACTIONS, record(user_id="x" * 200))
    assert message == "field `user_id`: expected int64, got str '" + "x" * 56 + "..."


@pytest.mark.parametrize("value", [[1, 2], None, '{"user_id": 1}', 42])
def test_a_record_that_is_not_an_object_is_rejected(value: Any) -> None:
    assert problem_texts(TRANSACTIONS, value) == [
        f"field `<record>`: expected a JSON object, got {type(value).__name__}"
    ]


def test_int32_bounds_and_bool_are_checked() -> None:
    ts = "2026-01-01T00:00:00Z"
    for edge in (-(2**31), 2**31 - 1):
        out, problems = validate_record(SMALL, {"id": edge, "flag": True, "ts": ts})
        assert problems == []
        assert out is not None
        assert out["id"] == edge
    assert problem_texts(SMALL, {"id": 2**31, "flag": 1, "ts": ts}) == [
        "field `id`: expected int32 within [-2147483648, 2147483647], got 2147483648",
        "field `flag`: expected bool, got int 1",
    ]
    assert problem_texts(SMALL, {"id": -(2**31) - 1, "flag": "true", "ts": ts}) == [
        "field `id`: expected int32 within [-2147483648, 2147483647], got -2147483649",
        "field `flag`: expected bool, got str 'true'",
    ]


def test_nullable_fields_may_be_missing_or_null_but_not_mistyped() -> None:
    ts = "2026-01-01T00:00:00Z"
    out, problems = validate_record(SMALL, {"id": 1, "flag": False, "ts": ts})
    assert problems == []
    assert out == {"id": 1, "score": None, "flag": False, "note": None, "ts": T0}
    out, problems = validate_record(SMALL, {"id": 1, "score": None, "note": None, "flag": False, "ts": ts})
    assert problems == []
    assert out == {"id": 1, "score": None, "flag": False, "note": None, "ts": T0}
    out, _ = validate_record(SMALL, {"id": 1, "score": 2, "note": "hi", "flag": False, "ts": ts})
    assert out == {"id": 1, "score": 2.0, "flag": False, "note": "hi", "ts": T0}
    assert problem_texts(SMALL, {"id": 1, "score": "2", "note": 5, "flag": False, "ts": ts}) == [
        "field `score`: expected float32, got str '2'",
        "field `note`: expected string, got int 5",
    ]
    assert problem_texts(SMALL, {"id": 1, "score": float("nan"), "flag": False, "ts": ts}) == [
        "field `score`: expected finite float32, got nan",
    ]


def test_schema_time_bounds_are_used_and_max_is_exclusive() -> None:
    low = datetime(2026, 1, 1, tzinfo=UTC)
    high = datetime(2026, 2, 1, tzinfo=UTC)
    schema = EventSchema("jan", [Field("ts", "timestamp")], event_time="ts", min_time=low, max_time=high)
    assert validate_record(schema, {"ts": "2026-01-01T00:00:00Z"}) == ({"ts": T0}, [])
    assert problem_texts(schema, {"ts": "2026-02-01T00:00:00Z"}) == [
        "field `ts`: expected a time in [2026-01-01T00:00:00+00:00, 2026-02-01T00:00:00+00:00), "
        f"got '2026-02-01T00:00:00Z' {ABSURD_HINT}"
    ]
    assert problem_texts(schema, {"ts": T0 - 1}) == [
        "field `ts`: expected a time in [2026-01-01T00:00:00+00:00, 2026-02-01T00:00:00+00:00), "
        f"got {T0 - 1} {ABSURD_HINT}"
    ]


def test_float32_overflow_is_rejected_by_record_validation() -> None:
    _, problems = validate_record(SMALL, {"id": 1, "score": 1e300, "flag": True, "ts": T0})
    assert [str(p) for p in problems] == ["field `score`: expected finite float32, got 1e+300"]


# -- a batch --------------------------------------------------------------------------------


def ts_array(micros: list[int | None]) -> pa.Array:
    return pa.array(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def transactions_table(n: int = 4, **columns: pa.Array | None) -> pa.Table:
    """n valid TRANSACTIONS rows (loose nullability, like a Parquet file); a column given as
    None is dropped, others replace the default."""
    data: dict[str, pa.Array | None] = {
        "transaction_id": pa.array([f"tx-{i}" for i in range(n)]),
        "user_id": pa.array(range(1, n + 1), pa.int64()),
        "merchant_id": pa.array([100 + i for i in range(n)], pa.int64()),
        "amount": pa.array([1.5 * i for i in range(n)], pa.float64()),
        "currency": pa.array(["EUR"] * n),
        "category": pa.array(["grocery"] * n),
        "country": pa.array(["FR"] * n),
        "event_time": ts_array([T0 + i for i in range(n)]),
    }
    data.update(columns)
    return pa.table({name: column for name, column in data.items() if column is not None})


def test_batch_splits_good_and_bad_rows() -> None:
    table = transactions_table(
        6,
        user_id=pa.array([1, None, 3, 4, 5, None], pa.int64()),
        amount=pa.array([1.0, 2.0, float("nan"), 4.0, 5.0, float("inf")]),
        event_time=ts_array([T0, T0 + 1, T0 + 2, 1_700_000_000, T0 + 4, T0 + 5]),
        extra=pa.array(["x"] * 6),  # unknown columns are ignored
    )
    result = validate_batch(TRANSACTIONS, table)

    assert result.valid.schema == TRANSACTIONS.arrow_schema()
    assert result.valid.schema.equals(TRANSACTIONS.arrow_schema())
    assert result.valid.column("transaction_id").to_pylist() == ["tx-0", "tx-4"]
    assert pc.cast(result.valid.column("event_time"), pa.int64()).to_pylist() == [T0, T0 + 4]
    assert result.valid.num_rows + result.rejected.num_rows == table.num_rows
    assert not result.ok

    rejected = result.rejected
    assert rejected.column("row").to_pylist() == [1, 2, 3, 5]
    assert rejected.column("transaction_id").to_pylist() == ["tx-1", "tx-2", "tx-3", "tx-5"]
    assert rejected.column("extra").to_pylist() == ["x"] * 4
    assert set(rejected.column_names) == {*table.column_names, "row", "reason"}
    assert all(rejected.schema.field(name).type == pa.string() for name in table.column_names)
    reasons = rejected.column("reason").to_pylist()
    assert reasons[0] == "field `user_id`: expected int64 (not null), got null"
    assert reasons[1] == "field `amount`: expected finite float64 within ±1e+140, got nan"
    assert reasons[2].startswith(f"field `event_time`: expected {DEFAULT_BOUNDS}, got ")
    assert reasons[2].endswith("(absurd timestamp)")
    assert "got 1700000000 microseconds since epoch" in reasons[2]
    # both problems of row 5, in schema order
    assert reasons[3] == (
        "field `user_id`: expected int64 (not null), got null; "
        "field `amount`: expected finite float64 within ±1e+140, got inf"
    )
    assert [str(p) for p in result.problems if p.row in (1, 2)] == [
        "row 1: field `user_id`: expected int64 (not null), got null",
        "row 2: field `amount`: expected finite float64 within ±1e+140, got nan",
    ]


def test_a_clean_batch_rejects_nothing() -> None:
    result = validate_batch(TRANSACTIONS, transactions_table(3))
    assert result.ok
    assert result.problems == ()
    assert result.valid.num_rows == 3
    assert result.valid.schema == TRANSACTIONS.arrow_schema()
    assert result.rejected.num_rows == 0
    assert {"row", "reason"} <= set(result.rejected.column_names)


def test_an_empty_batch_is_fine() -> None:
    result = validate_batch(TRANSACTIONS, transactions_table(0))
    assert result.ok
    assert result.valid.num_rows == 0
    assert result.valid.schema == TRANSACTIONS.arrow_schema()


NAIVE = (
    "field `event_time`: expected timestamp[us, UTC], got timestamp[us] "
    "(timestamp without timezone; localize it to UTC before ingesting)"
)


@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ({"currency": None}, "field `currency`: expected string, got missing column"),
        ({"user_id": pa.array([1.0, 2.0, 3.0])}, "field `user_id`: expected int64, got column of type double"),
        ({"amount": pa.array([True, False, True])}, "field `amount`: expected float64, got column of type bool"),
        ({"event_time": pa.array([T0] * 3, pa.int64())}, "field `event_time`: expected timestamp[us, UTC], got int64"),
        ({"event_time": ts_array([T0] * 3).cast(pa.timestamp("us"))}, NAIVE),
    ],
)
def test_column_problems_reject_every_row(columns: dict[str, pa.Array | None], reason: str) -> None:
    table = transactions_table(3, **columns)
    result = validate_batch(TRANSACTIONS, table)
    assert result.valid.num_rows == 0
    assert result.valid.schema == TRANSACTIONS.arrow_schema()
    assert result.rejected.column("row").to_pylist() == [0, 1, 2]
    assert result.rejected.column("reason").to_pylist() == [reason] * 3
    assert [str(p) for p in result.problems] == [reason]


def test_numbers_written_as_text_are_parsed_and_bad_cells_reject_their_row() -> None:
    # CSV ingest reads every column as text; one bad cell must not reject the file.
    table = transactions_table(3, user_id=pa.array(["1", "x2", "3"]), amount=pa.array(["1.5", "2", "nope"]))
    result = validate_batch(TRANSACTIONS, table)
    assert result.valid.column("user_id").to_pylist() == [1]
    assert result.valid.column("amount").to_pylist() == [1.5]
    assert result.rejected.column("row").to_pylist() == [1, 2]
    assert result.rejected.column("reason").to_pylist() == [
        "field `user_id`: expected int64, got 'x2'",
        "field `amount`: expected float64, got 'nope'",
    ]


def test_column_and_row_problems_are_both_reported() -> None:
    table = transactions_table(2, currency=None, user_id=pa.array([1, None], pa.int64()))
    reasons = validate_batch(TRANSACTIONS, table).rejected.column("reason").to_pylist()
    assert reasons == [
        "field `currency`: expected string, got missing column",
        "field `currency`: expected string, got missing column; field `user_id`: expected int64 (not null), got null",
    ]


def test_compatible_columns_are_cast() -> None:
    table = transactions_table(
        3,
        user_id=pa.array([1, 2, 3], pa.int32()),
        merchant_id=pa.array([4, 5, 6], pa.int16()),
        amount=pa.array([1, -2, 3], pa.int64()),
        currency=pa.array(["EUR", "USD", "EUR"], pa.large_string()),
        category=pa.array(["a", "b", "a"]).dictionary_encode(),
        event_time=ts_array([T0] * 3).cast(pa.timestamp("ms", tz="Europe/Paris")),
    )
    result = validate_batch(TRANSACTIONS, table)
    assert result.ok
    valid = result.valid
    assert valid.schema == TRANSACTIONS.arrow_schema()
    assert valid.column("user_id").to_pylist() == [1, 2, 3]
    assert valid.column("merchant_id").to_pylist() == [4, 5, 6]
    assert valid.column("amount").to_pylist() == [1.0, -2.0, 3.0]
    assert valid.column("currency").to_pylist() == ["EUR", "USD", "EUR"]
    assert valid.column("category").to_pylist() == ["a", "b", "a"]
    assert pc.cast(valid.column("event_time"), pa.int64()).to_pylist() == [T0] * 3


def test_iso_string_time_column_is_parsed_to_utc() -> None:
    strings = pa.array(["2026-01-01T00:00:00Z", "2026-01-01T02:00:00+02:00", "2025-12-31T23:00:00-01:00"])
    result = validate_batch(TRANSACTIONS, transactions_table(3, event_time=strings))
    assert result.ok
    assert pc.cast(result.valid.column("event_time"), pa.int64()).to_pylist() == [T0] * 3


def test_a_missing_nullable_column_becomes_nulls() -> None:
    table = pa.table({"id": pa.array([1, 2], pa.int32()), "flag": [True, False], "ts": ts_array([T0, T0])})
    result = validate_batch(SMALL, table)
    assert result.ok
    assert result.valid.schema == SMALL.arrow_schema()
    assert result.valid.column("score").to_pylist() == [None, None]
    assert result.valid.column("note").to_pylist() == [None, None]


def test_nan_in_a_nullable_float_column_is_rejected_but_null_is_fine() -> None:
    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int32()),
            "score": pa.array([None, float("nan"), 0.5]),
            "flag": [True, True, True],
            "ts": ts_array([T0] * 3),
        }
    )
    result = validate_batch(SMALL, table)
    assert result.valid.column("id").to_pylist() == [1, 3]
    assert result.rejected.column("row").to_pylist() == [1]
    assert result.rejected.column("reason").to_pylist() == ["field `score`: expected finite float32, got nan"]


def test_an_int64_value_out_of_int32_range_rejects_only_its_row() -> None:
    # Arrow's checked cast refused the whole column for one value: every row of the
    # batch was rejected, with a reason false for all but one.
    table = pa.table({"id": pa.array([1, 2**40, -(2**31)]), "flag": [True] * 3, "ts": ts_array([T0] * 3)})
    result = validate_batch(SMALL, table)
    assert result.valid.column("id").to_pylist() == [1, -(2**31)]
    assert result.rejected.column("row").to_pylist() == [1]
    assert result.rejected.column("reason").to_pylist() == [
        "field `id`: expected int32 within [-2147483648, 2147483647], got 1099511627776"
    ]


def test_a_uint64_value_past_int64_rejects_only_its_row() -> None:
    table = transactions_table(3, user_id=pa.array([1, 2**63, 2**64 - 1], pa.uint64()))
    result = validate_batch(TRANSACTIONS, table)
    assert result.valid.column("user_id").to_pylist() == [1]
    assert result.rejected.column("row").to_pylist() == [1, 2]
    assert result.rejected.column("reason").to_pylist() == [
        f"field `user_id`: expected int64 within [-9223372036854775808, 9223372036854775807], got {value}"
        for value in (2**63, 2**64 - 1)
    ]


def test_a_far_future_event_time_is_rejected_not_raised() -> None:
    nanos_as_micros = 1_767_225_600_000_000_000  # nanoseconds written into a microsecond column
    result = validate_batch(TRANSACTIONS, transactions_table(2, event_time=ts_array([T0, nanos_as_micros])))
    assert result.rejected.column("row").to_pylist() == [1]
    assert "(absurd timestamp)" in result.rejected.column("reason")[0].as_py()


def test_iso_string_times_with_fractional_seconds_are_accepted() -> None:
    strings = pa.array(["2026-01-01T00:00:00.000001Z", "2026-01-01T02:00:00.5+02:00"])
    result = validate_batch(TRANSACTIONS, transactions_table(2, event_time=strings))
    assert result.ok
    assert pc.cast(result.valid.column("event_time"), pa.int64()).to_pylist() == [T0 + 1, T0 + 500_000]


def test_an_unparseable_time_string_rejects_only_its_row() -> None:
    strings = pa.array(["2026-01-01T00:00:00Z", "yesterday", "2026-01-01T00:00:02Z"])
    result = validate_batch(TRANSACTIONS, transactions_table(3, event_time=strings))
    assert result.valid.column("transaction_id").to_pylist() == ["tx-0", "tx-2"]
    assert result.rejected.column("row").to_pylist() == [1]


# -- many records at once (the stream's micro-batches) ------------------------------------

MIXED = EventSchema(
    "mixed",
    [
        Field("id", "string"),
        Field("n", "int64"),
        Field("small", "int32", nullable=True),
        Field("x", "float64"),
        Field("f", "float32", nullable=True),
        Field("flag", "bool", nullable=True),
        Field("note", "string", nullable=True),
        Field("at", "timestamp[us, UTC]"),
    ],
    event_time="at",
)

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 1_700_000_000, 1_700_000_000_000_000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e39, -3.5e38, 0.5]),
    st.text(max_size=5),
    st.sampled_from(
        [
            "2024-05-01T10:00:00+00:00",
            "2024-05-01T10:00:00.123456Z",
            "2024-05-01T10:00:00",
            "2024-05-01 12:00:00+02:00",
            "1900-01-01T00:00:00+00:00",
            "not a time",
        ]
    ),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def records(draw: Any) -> Any:
    if draw(st.integers(0, 20)) == 0:
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)))
    names = [f.name for f in MIXED.fields] + ["extra"]
    return {name: draw(ANY_VALUE) for name in names if draw(st.integers(0, 9)) > 0}


@given(st.lists(records(), max_size=12))
def test_records_validate_as_each_record_does(batch: list[Any]) -> None:
    result = validate_records(MIXED, batch)
    expected = [validate_record(MIXED, record) for record in batch]
    assert result.positions == [i for i, (ok, _) in enumerate(expected) if ok is not None]
    assert [(i, [str(p) for p in problems]) for i, problems in result.rejected] == [
        (i, [str(p) for p in problems]) for i, (ok, problems) in enumerate(expected) if ok is None
    ]
    assert result.valid.num_rows == len(result.positions)
    micros = result.valid.set_column(
        result.valid.schema.get_field_index("at"), "at", result.valid.column("at").cast(pa.int64())
    )
    for row, index in zip(micros.to_pylist(), result.positions, strict=True):
        normalised = expected[index][0]
        assert normalised is not None
        assert row == normalised


def test_records_are_decoded_column_by_column_into_typed_arrow_columns() -> None:
    good = {"id": "a", "n": 3, "x": 2, "at": "2024-05-01T10:00:00Z", "extra": [1]}
    result = validate_records(MIXED, [good, {"id": "b"}, good])
    assert result.positions == [0, 2]
    assert [i for i, _ in result.rejected] == [1]
    assert result.valid.schema.field("x").type == pa.float64()
    assert result.valid.column("x").to_pylist() == [2.0, 2.0]
    assert result.valid.column("at").type == pa.timestamp("us", tz="UTC")
    assert result.valid.column("small").to_pylist() == [None, None]


def test_every_timestamp_field_comes_back_as_a_timestamp() -> None:
    # Transforms see the schema's types for every field, not only for the event time.
    schema = EventSchema(
        "two_times",
        [Field("id", "string"), Field("created_at", "timestamp[us, UTC]"), Field("at", "timestamp[us, UTC]")],
        event_time="at",
    )
    result = validate_records(schema, [{"id": "a", "created_at": "2024-05-01T09:00:00Z", "at": 1_714_554_000_000_000}])
    assert result.valid.schema == schema.arrow_schema()
    assert result.valid.column("created_at").to_pylist() == [datetime(2024, 5, 1, 9, tzinfo=UTC)]


def test_nanosecond_times_are_floored_to_their_microsecond_and_big_ints_fit_float_fields() -> None:
    """pandas writes nanosecond timestamps, and ids past 2**53 may land in a float field:
    Arrow's checked casts refused the whole file with a raw ArrowInvalid."""
    nanos = pa.array([T0 * 1000 + 789, T0 * 1000 + 1_000], pa.timestamp("ns", tz="UTC"))
    table = transactions_table(2, event_time=nanos, amount=pa.array([2**53 + 1, 3], pa.int64()))
    result = validate_batch(TRANSACTIONS, table)
    assert result.ok
    assert pc.cast(result.valid.column("event_time"), pa.int64()).to_pylist() == [T0, T0 + 1]
    assert result.valid.column("amount").to_pylist() == [float(2**53), 3.0]  # the nearest float64


def test_nanosecond_times_in_a_daylight_saving_zone_are_floored_in_utc() -> None:
    """The autumn's repeated hour is ambiguous in local time: Arrow's floor there raised
    "Local time is ambiguous" for both labels and events."""
    from schemas.validation import floor_to_micros

    fold = 1_792_888_200_000_000  # 2026-10-25T00:30:00Z: 02:30 CEST, and an hour later 02:30 CET
    nanos = [fold * 1000 + 789, (fold + 3_600_000_000) * 1000 + 999, (fold - 1) * 1000]
    paris = pa.array(nanos, pa.timestamp("ns", tz="Europe/Paris"))
    floored = floor_to_micros(paris)
    assert floored.type == pa.timestamp("us", tz="Europe/Paris")
    assert pc.cast(floored, pa.int64()).to_pylist() == [fold, fold + 3_600_000_000, fold - 1]
    chunked = floor_to_micros(pa.chunked_array([paris[:1], paris[1:]]))
    assert pc.cast(chunked, pa.int64()).to_pylist() == [fold, fold + 3_600_000_000, fold - 1]
    result = validate_batch(TRANSACTIONS, transactions_table(3, event_time=paris))
    assert result.ok
    assert pc.cast(result.valid.column("event_time"), pa.int64()).to_pylist() == [fold, fold + 3_600_000_000, fold - 1]
