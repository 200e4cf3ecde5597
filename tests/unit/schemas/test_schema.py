"""EventSchema checks and serialisation; the type vocabulary of schemas.dtypes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from schemas import (
    SUPPORTED,
    TIMESTAMP_UTC,
    TRANSACTIONS,
    EventSchema,
    Field,
    SchemaError,
    dtype_name,
    parse_dtype,
)

TYPES = "string, int64, int32, float64, float32, bool, timestamp[us, UTC]"


def schema(*fields: Field, event_time: str = "ts", **options: object) -> EventSchema:
    return EventSchema("s", fields, event_time=event_time, **options)  # type: ignore[arg-type]


def test_the_demo_schema_has_no_problems() -> None:
    assert TRANSACTIONS.problems() == []
    assert schema(Field("ts", "timestamp"), Field("id", "int"), entity_keys=["id"]).problems() == []


@pytest.mark.parametrize(
    ("dtype", "shown"),
    [
        (pa.timestamp("us"), "timestamp[us]"),
        (pa.timestamp("us", tz="Europe/Paris"), "timestamp[us, tz=Europe/Paris]"),
        (pa.timestamp("ms", tz="UTC"), "timestamp[ms, tz=UTC]"),
        (pa.int64(), "int64"),
        ("string", "string"),
    ],
)
def test_event_time_must_be_utc_microseconds(dtype: pa.DataType | str, shown: str) -> None:
    assert schema(Field("ts", dtype)).problems() == [
        f"event-time column `ts` must be timestamp[us, UTC], got {shown}; "
        "declare it as Field('ts', 'timestamp[us, UTC]')"
    ]


def test_event_time_must_not_be_nullable() -> None:
    assert schema(Field("ts", "timestamp", nullable=True)).problems() == ["event-time column `ts` must not be nullable"]


def test_every_schema_problem_is_reported_at_once() -> None:
    broken = schema(
        Field("id", "int64"),
        Field("id", "string"),
        Field("ts", "timestamp"),
        event_time="when",
        entity_keys=["id", "user"],
    )
    assert broken.problems() == [
        "field `id` is defined twice",
        "event-time column `when` is not a field; fields: id, id, ts",
        "entity-key column `user` is not a field",
    ]


def test_unsupported_field_types_and_non_utc_bounds_are_problems() -> None:
    broken = schema(
        Field("ts", "timestamp"),
        Field("tags", pa.list_(pa.string())),
        min_time=datetime(2000, 1, 1),
        max_time=datetime(2100, 1, 1, tzinfo=timezone(timedelta(hours=1))),
    )
    assert broken.problems() == [
        f"field `tags`: type list<item: string> is not supported; expected one of {TYPES}",
        "min_time 2000-01-01T00:00:00 must be a UTC datetime",
        "max_time 2100-01-01T00:00:00+01:00 must be a UTC datetime",
    ]


def test_a_min_time_before_1970_is_a_problem() -> None:
    # Events before 1970 were ingested and backfilled, then crashed materialize (the
    # online as_of is unsigned) with a bare struct.error.
    assert schema(Field("ts", "timestamp"), min_time=datetime(1950, 1, 1, tzinfo=UTC)).problems() == [
        "min_time 1950-01-01T00:00:00+00:00 is before 1970-01-01T00:00:00+00:00, the earliest time tenx stores "
        "online (its as_of is unsigned microseconds since 1970); use min_time=datetime(1970, 1, 1, tzinfo=UTC) "
        "or later"
    ]
    assert schema(Field("ts", "timestamp"), min_time=datetime(1970, 1, 1, tzinfo=UTC)).problems() == []


@pytest.mark.parametrize(
    "original",
    [
        TRANSACTIONS,
        EventSchema(
            "clicks",
            [
                Field("ts", "timestamp", description="when"),
                Field("user", "int32"),
                Field("score", "float32", nullable=True),
                Field("ok", "bool", nullable=True, description="did it work"),
                Field("page", "string"),
            ],
            event_time="ts",
            entity_keys=("user", "page"),
            min_time=datetime(2020, 1, 1, tzinfo=UTC),
            max_time=datetime(2030, 6, 30, 12, 0, 0, 1, tzinfo=UTC),
            description="Clicks.",
        ),
    ],
    ids=["transactions", "custom"],
)
def test_to_dict_from_dict_round_trip(original: EventSchema) -> None:
    data = json.loads(json.dumps(original.to_dict()))  # what a Plan file holds
    restored = EventSchema.from_dict(data)
    assert restored == original
    assert restored.arrow_schema() == original.arrow_schema()
    assert restored.min_time == original.min_time
    assert restored.max_time == original.max_time
    assert [f.description for f in restored.fields] == [f.description for f in original.fields]
    assert restored.to_dict() == original.to_dict()


def test_to_dict_names_types_with_the_plan_vocabulary() -> None:
    data = TRANSACTIONS.to_dict()
    assert [f["dtype"] for f in data["fields"]] == ["string", "int64", "int64", "float64"] + ["string"] * 3 + [
        "timestamp[us, UTC]"
    ]
    assert data["min_time_us"] == 946_684_800_000_000  # 2000-01-01
    assert data["max_time_us"] == 4_102_444_800_000_000  # 2100-01-01
    assert data["entity_keys"] == ["user_id", "merchant_id"]


def test_schemas_differing_in_a_field_are_not_equal() -> None:
    data = TRANSACTIONS.to_dict()
    data["fields"][1]["nullable"] = True
    assert EventSchema.from_dict(data) != TRANSACTIONS


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("str", pa.string()),
        ("utf8", pa.string()),
        ("string", pa.string()),
        ("int", pa.int64()),
        ("int64", pa.int64()),
        ("int32", pa.int32()),
        ("float", pa.float64()),
        ("double", pa.float64()),
        ("float32", pa.float32()),
        ("boolean", pa.bool_()),
        ("bool", pa.bool_()),
        ("timestamp", TIMESTAMP_UTC),
        ("timestamp[us, UTC]", TIMESTAMP_UTC),
        (int, pa.int64()),
        (float, pa.float64()),
        (str, pa.string()),
        (bool, pa.bool_()),
        (pa.int32(), pa.int32()),
    ],
)
def test_parse_dtype_accepts_names_aliases_and_python_types(
    given: str | type | pa.DataType, expected: pa.DataType
) -> None:
    assert parse_dtype(given).equals(expected)


@pytest.mark.parametrize(
    ("given", "shown"),
    [("decimal", "'decimal'"), ("Int64", "'Int64'"), ("timestamp[ns]", "'timestamp[ns]'"), (bytes, "<class 'bytes'>")],
)
def test_parse_dtype_rejects_unknown_types(given: str | type, shown: str) -> None:
    with pytest.raises(SchemaError) as raised:
        parse_dtype(given)
    assert str(raised.value) == f"unknown type {shown}; expected one of {TYPES}"


def test_field_with_an_unknown_type_fails_at_definition() -> None:
    with pytest.raises(SchemaError, match=r"^unknown type 'integer'; expected one of "):
        Field("x", "integer")


@pytest.mark.parametrize("name", SUPPORTED)
def test_dtype_name_and_parse_dtype_are_inverse(name: str) -> None:
    assert dtype_name(parse_dtype(name)) == name


@pytest.mark.parametrize(
    ("dtype", "shown"),
    [
        (pa.int8(), "int8"),
        (pa.timestamp("us"), "timestamp[us]"),
        (pa.timestamp("ns", tz="UTC"), "timestamp[ns, tz=UTC]"),
        (pa.large_string(), "large_string"),
    ],
)
def test_dtype_name_of_an_unsupported_type_raises(dtype: pa.DataType, shown: str) -> None:
    with pytest.raises(SchemaError) as raised:
        dtype_name(dtype)
    assert str(raised.value) == f"type {shown} is not supported; expected one of {TYPES}"


def test_field_lookup_names_the_known_fields() -> None:
    assert TRANSACTIONS.field("amount").dtype == pa.float64()
    with pytest.raises(SchemaError) as raised:
        TRANSACTIONS.field("price")
    assert str(raised.value) == (
        "schema `transactions` has no field `price`; fields: transaction_id, user_id, merchant_id, "
        "amount, currency, category, country, event_time"
    )


def test_arrow_schema_carries_types_and_nullability() -> None:
    arrow = schema(Field("ts", "timestamp"), Field("note", "string", nullable=True)).arrow_schema()
    assert arrow == pa.schema([pa.field("ts", TIMESTAMP_UTC, nullable=False), pa.field("note", pa.string())])


def test_a_schema_remembers_where_it_was_defined() -> None:
    defined = EventSchema("s", [Field("ts", "timestamp")], event_time="ts")
    line = test_a_schema_remembers_where_it_was_defined.__code__.co_firstlineno + 1
    assert Path(defined.location.path).resolve() == Path(__file__).resolve()
    assert defined.location.line == line
