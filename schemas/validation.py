"""Checking events against an EventSchema: one record (stream) or a whole batch (ingest).

Both paths report *every* problem, each naming the field, the expected type and the
value got, so a dead-letter entry or a rejects row says exactly what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dtypes import dtype_name
from schemas.schema import EventSchema, Field
from schemas.timestamps import to_micros

_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Float values tenx aggregates exactly: a window's Sum of up to ~1e8 such values, or its
# Std (a sum of squares: 1e140 squared is 1e280), stays finite. Larger values are refused
# (rejected by ingest, dead-lettered by the stream job), as non-finite ones are: an
# aggregate that overflowed to inf or NaN would be served as a valid value.
FLOAT_LIMIT = 1e140
_INT_BOUNDS = {"int64": (-(2**63), 2**63 - 1), "int32": (-(2**31), 2**31 - 1)}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one field of one record."""

    field: str
    expected: str
    got: str
    row: int | None = None

    def __str__(self) -> str:
        where = f"row {self.row}: " if self.row is not None else ""
        return f"{where}field `{self.field}`: expected {self.expected}, got {self.got}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- one record -------------------------------------------------------------------------


def validate_record(schema: EventSchema, record: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Check one decoded record (e.g. a JSON object from Kafka).

    Returns the normalised record (timestamps as integer microseconds since the epoch,
    UTC; ints as floats where the field is a float) and no problems, or None and every
    problem found. Fields not in the schema are ignored (producers may add fields
    before consumers know them).

    >>> from schemas.transactions import TRANSACTIONS
    >>> _, problems = validate_record(TRANSACTIONS, {"user_id": "x"})
    >>> str(problems[0])
    "field `transaction_id`: expected string, got missing"
    """
    if not isinstance(record, Mapping):
        return None, [Problem("<record>", "a JSON object", type(record).__name__)]
    out: dict[str, Any] = {}
    problems: list[Problem] = []
    for f in schema.fields:
        if f.name not in record:
            if f.nullable:
                out[f.name] = None
            else:
                problems.append(Problem(f.name, dtype_name(f.dtype), "missing"))
            continue
        value = record[f.name]
        normalised, problem = _check_value(schema, f, value)
        if problem is not None:
            problems.append(problem)
        else:
            out[f.name] = normalised
    if problems:
        return None, problems
    return out, []


def _check_value(schema: EventSchema, f: Field, value: Any) -> tuple[Any, Problem | None]:
    name = dtype_name(f.dtype)
    if value is None:
        if f.nullable:
            return None, None
        return None, Problem(f.name, f"{name} (not null)", "null")
    if name == "string":
        if isinstance(value, str):
            return value, None
    elif name in _INT_BOUNDS:
        if isinstance(value, int) and not isinstance(value, bool):
            low, high = _INT_BOUNDS[name]
            if low <= value <= high:
                return value, None
            return None, Problem(f.name, f"{name} within [{low}, {high}]", _short(value))
    elif name in ("float64", "float32"):
        if isinstance(value, int | float) and not isinstance(value, bool):
            as_float = float(value)
            if math.isfinite(as_float) and abs(as_float) <= _float_bound(name):
                return as_float, None
            return None, Problem(f.name, _FLOAT_EXPECTED[name], _short(value))
    elif name == "bool":
        if isinstance(value, bool):
            return value, None
    elif name == "timestamp[us, UTC]":
        return _check_timestamp(schema, f, value)
    return None, Problem(f.name, name, f"{type(value).__name__} {_short(value)}")


def _check_timestamp(schema: EventSchema, f: Field, value: Any) -> tuple[Any, Problem | None]:
    expected = "timestamp (integer microseconds since epoch, or ISO-8601 with timezone)"
    micros: int
    if isinstance(value, int) and not isinstance(value, bool):
        micros = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None, Problem(f.name, expected, f"unparseable string {_short(value)}")
        if parsed.tzinfo is None:
            return None, Problem(f.name, expected, f"timestamp without timezone {_short(value)}")
        micros = to_micros(parsed)
    else:
        return None, Problem(f.name, expected, f"{type(value).__name__} {_short(value)}")
    if not schema.min_time_us <= micros < schema.max_time_us:
        return None, Problem(
            f.name,
            f"a time in [{schema.min_time.isoformat()}, {schema.max_time.isoformat()})",
            f"{_short(value)} (absurd timestamp; seconds or milliseconds instead of microseconds?)",
        )
    return micros, None


# -- many records (a stream micro-batch) ---------------------------------------------------


_MISSING = object()


@dataclass(frozen=True)
class RecordsValidation:
    """Decoded records checked column by column: the valid ones as one Arrow table with
    the schema's types, their positions in the input, and every invalid one with its
    problems."""

    valid: pa.Table
    positions: list[int]
    rejected: list[tuple[int, list[Problem]]]


def validate_records(schema: EventSchema, records: list[Any]) -> RecordsValidation:
    """`validate_record` for many records at once, with the same outcome record by
    record: each field is checked over the whole list with one type test per value
    (`type(v) is int` rejects bools, as `validate_record` does), and only the records
    that fail are run through `validate_record`, for their reasons."""
    n = len(records)
    bad: set[int] = {i for i, r in enumerate(records) if type(r) is not dict}
    mappings = [r if type(r) is dict else {} for r in records] if bad else records
    columns: dict[str, list[Any]] = {}
    for f in schema.fields:
        got = [r.get(f.name, _MISSING) for r in mappings]
        bad.update(_failing(schema, f, dtype_name(f.dtype), got))
        columns[f.name] = got
    rejected: list[tuple[int, list[Problem]]] = []
    for index in sorted(bad):
        normalised, problems = validate_record(schema, records[index])
        if normalised is None:
            rejected.append((index, problems))
            continue
        for name, value in normalised.items():  # stricter than validate_record here: it decides
            columns[name][index] = value
        bad.discard(index)
    positions = [i for i in range(n) if i not in bad] if bad else list(range(n))
    arrays = []
    for f in schema.fields:
        values = columns[f.name]
        if bad:
            values = [values[i] for i in positions]
        values = [None if v is _MISSING else v for v in values] if f.nullable else values
        if pa.types.is_timestamp(f.dtype):  # microseconds by now
            arrays.append(pa.array(values, pa.int64()).cast(f.dtype))
        else:
            arrays.append(pa.array(values, f.dtype))
    fields = [pa.field(f.name, f.dtype, nullable=f.nullable) for f in schema.fields]
    return RecordsValidation(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), positions, rejected)


def _failing(schema: EventSchema, f: Field, name: str, values: list[Any]) -> list[int]:
    """Positions of the values `_check_value` would reject (a null or missing value is
    accepted where the field is nullable). Timestamps are replaced in `values` by their
    microseconds, ints in float columns by floats."""
    if name == "string":
        failing = [i for i, v in enumerate(values) if type(v) is not str]
    elif name in _INT_BOUNDS:
        low, high = _INT_BOUNDS[name]
        failing = [i for i, v in enumerate(values) if type(v) is not int or not low <= v <= high]
    elif name == "bool":
        failing = [i for i, v in enumerate(values) if type(v) is not bool]
    elif name in ("float64", "float32"):
        failing = _failing_floats(name, values)
    elif name == "timestamp[us, UTC]":
        failing = _failing_times(schema, values)
    else:
        failing = list(range(len(values)))  # a type the fast path does not know: ask validate_record
    if failing and f.nullable:
        failing = [i for i in failing if values[i] is not None and values[i] is not _MISSING]
    return failing


def _float_bound(name: str) -> float:
    return FLOAT_LIMIT if name == "float64" else min(_FLOAT32_MAX, FLOAT_LIMIT)


# float32's own range (3.4e38) is already within the limit.
_FLOAT_EXPECTED = {"float64": f"finite float64 within ±{FLOAT_LIMIT:g}", "float32": "finite float32"}


def _failing_floats(name: str, values: list[Any]) -> list[int]:
    bound = _float_bound(name)
    isfinite = math.isfinite
    failing = []
    for index, v in enumerate(values):
        kind = type(v)
        if kind is float:
            if not (isfinite(v) and abs(v) <= bound):
                failing.append(index)
        elif kind is int:
            try:
                as_float = float(v)
            except OverflowError:
                failing.append(index)
                continue
            values[index] = as_float
            if not (isfinite(as_float) and abs(as_float) <= bound):
                failing.append(index)
        else:
            failing.append(index)
    return failing


def _failing_times(schema: EventSchema, values: list[Any]) -> list[int]:
    low, high = schema.min_time_us, schema.max_time_us
    parse = datetime.fromisoformat
    failing = []
    for index, v in enumerate(values):
        micros: int | None = None
        if type(v) is str:
            try:
                parsed = parse(v.replace("Z", "+00:00"))
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is not None:
                micros = to_micros(parsed)
        elif type(v) is int:
            micros = v
        if micros is not None and low <= micros < high:
            values[index] = micros
        else:
            failing.append(index)
    return failing


# -- a batch ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchValidation:
    """The outcome of validating a table: the rows that conform and those that do not.

    `valid` has exactly the schema's Arrow schema. `rejected` holds the rejected input
    rows as given (every column cast to string) plus `row` (position in the input) and
    `reason` (every problem of that row, `; `-joined). Nothing is dropped silently:
    `valid.num_rows + rejected.num_rows == input rows`.
    """

    valid: pa.Table
    rejected: pa.Table
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return bool(self.rejected.num_rows == 0)


def validate_batch(schema: EventSchema, table: pa.Table) -> BatchValidation:
    """Validate and conform a whole Arrow table (vectorised; no Python loop over rows
    except over the rejected ones, to word their reasons)."""
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    reasons: dict[int, list[Problem]] = {}
    column_problems: list[Problem] = []
    columns: dict[str, pa.Array] = {}

    def flag(mask: np.ndarray, make: Any) -> None:
        for index in np.flatnonzero(mask):
            reasons.setdefault(int(index), []).append(make(int(index)))
        bad[mask] = True

    for f in schema.fields:
        name = dtype_name(f.dtype)
        if f.name not in table.column_names:
            if f.nullable:
                columns[f.name] = pa.nulls(n, f.dtype)
                continue
            column_problems.append(Problem(f.name, name, "missing column"))
            bad[:] = True
            columns[f.name] = pa.nulls(n, f.dtype)
            continue
        column = table.column(f.name).combine_chunks()
        cast, cast_problem = _cast_column(column, f)
        if cast_problem is not None:
            column_problems.append(cast_problem)
            bad[:] = True
            columns[f.name] = pa.nulls(n, f.dtype)
            continue
        assert cast is not None
        nulls = cast.is_null().to_numpy(zero_copy_only=False)
        unparsed = nulls & ~column.is_null().to_numpy(zero_copy_only=False)
        if unparsed.any():
            expected = f"{name} (ISO-8601 with timezone)" if pa.types.is_timestamp(f.dtype) else name
            if pa.types.is_integer(f.dtype) and pa.types.is_integer(column.type):
                expected = "{} within [{}, {}]".format(name, *_int_range(f.dtype))  # as validate_record says
            flag(unparsed, lambda i, f=f, c=column, e=expected: Problem(f.name, e, _short(c[i].as_py()), i))
            nulls = nulls & ~unparsed
        if pa.types.is_floating(f.dtype):
            finite = pc.and_(pc.is_finite(cast), pc.less_equal(pc.abs(cast), FLOAT_LIMIT))
            nan = pc.fill_null(pc.invert(finite), False).to_numpy(zero_copy_only=False)
            flag(
                nan & ~nulls,
                lambda i, f=f, c=cast, name=name: Problem(f.name, _FLOAT_EXPECTED[name], _short(c[i].as_py()), i),
            )
        if not f.nullable and nulls.any():
            flag(nulls, lambda i, f=f, name=name: Problem(f.name, f"{name} (not null)", "null", i))
        if f.name == schema.event_time and pa.types.is_timestamp(f.dtype):
            micros = pc.cast(cast, pa.int64()).to_numpy(zero_copy_only=False)
            valid_micros = np.where(nulls, schema.min_time_us, micros)
            absurd = (valid_micros < schema.min_time_us) | (valid_micros >= schema.max_time_us)
            flag(
                absurd,
                lambda i, f=f, us=micros: Problem(
                    f.name,
                    f"a time in [{schema.min_time.isoformat()}, {schema.max_time.isoformat()})",
                    f"{int(us[i])} microseconds since epoch (absurd timestamp)",
                    i,
                ),
            )
        columns[f.name] = cast

    conformed = pa.table([columns[f.name] for f in schema.fields], schema=_relaxed(schema))
    keep = pa.array(~bad)
    valid = conformed.filter(keep).cast(schema.arrow_schema())
    bad_rows = np.flatnonzero(bad)
    rejected = _rejected_table(table, bad_rows, reasons, column_problems)
    problems = tuple(column_problems) + tuple(p for i in sorted(reasons) for p in reasons[i])
    return BatchValidation(valid=valid, rejected=rejected, problems=problems)


def _relaxed(schema: EventSchema) -> pa.Schema:
    # Conformed columns may still hold nulls in required fields until filtered.
    return pa.schema([pa.field(f.name, f.dtype, nullable=True) for f in schema.fields])


def _parse_times(column: pa.Array, f: Field) -> tuple[pa.Array, Problem | None]:
    """ISO-8601 strings with an offset to timestamp[us, UTC]. Arrow parses the whole
    column at once; only when that fails are values parsed one by one, so a single bad
    string rejects its own row (the caller finds it as an unparsed non-null value)."""
    target = f.dtype
    try:
        return pc.cast(column, target), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    parsed: list[int | None] = []
    for value in column.to_pylist():
        micros: int | None = None
        if value is not None:
            try:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                moment = None
            if moment is not None and moment.tzinfo is not None:
                micros = to_micros(moment)
        parsed.append(micros)
    return pa.array(parsed, pa.int64()).cast(target), None


def floor_to_micros(column: Any) -> Any:
    """A timestamp column (array or chunked) in whole microseconds: finer units (pandas
    writes nanoseconds) are floored, so a time keeps the microsecond it falls in (times
    in tenx are integer microseconds), never the next one. Arrow's checked cast refused
    the whole file for one time with nanosecond digits. The floor is taken in UTC (the
    same instants, the zone kept in the result): in a zone with daylight saving time,
    Arrow's floor in local time raised "Local time is ambiguous" for the autumn's
    repeated hour."""
    unit, zone = column.type.unit, column.type.tz
    if unit == "ns":
        in_utc = column.cast(pa.timestamp("ns", tz="UTC")) if zone is not None else column
        column = pc.floor_temporal(in_utc, unit="microsecond")
    return column.cast(pa.timestamp("us", tz=zone)) if unit != "us" else column


def _is_text(dtype: pa.DataType) -> bool:
    return bool(pa.types.is_string(dtype) or pa.types.is_large_string(dtype))


def _parse_text(column: pa.Array, f: Field) -> pa.Array:
    """Numbers or booleans written as text (CSV): the whole column at once, else value by
    value with unparseable values left null (the caller rejects those rows)."""
    try:
        return pc.cast(column, f.dtype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    parsed = []
    for value in column.to_pylist():
        try:
            parsed.append(pc.cast(pa.array([value], pa.string()), f.dtype)[0].as_py() if value is not None else None)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            parsed.append(None)
    return pa.array(parsed, f.dtype)


def _cast_column(column: pa.Array, f: Field) -> tuple[pa.Array | None, Problem | None]:
    target = f.dtype
    got = column.type
    if got.equals(target):
        return column, None
    if pa.types.is_timestamp(target):
        if pa.types.is_timestamp(got):
            if got.tz is None:
                return None, Problem(
                    f.name,
                    "timestamp[us, UTC]",
                    f"{got} (timestamp without timezone; localize it to UTC before ingesting)",
                )
            return floor_to_micros(column).cast(target), None
        if pa.types.is_string(got) or pa.types.is_large_string(got):
            return _parse_times(column, f)
        return None, Problem(f.name, "timestamp[us, UTC]", str(got))
    if _is_text(got) and (pa.types.is_integer(target) or pa.types.is_floating(target) or pa.types.is_boolean(target)):
        return _parse_text(column, f), None
    if pa.types.is_floating(target) and (pa.types.is_integer(got) or pa.types.is_floating(got)):
        # An int past 2**53 (2**24 for float32) becomes the nearest float, as a float
        # field holds it; Arrow's checked cast refused the whole file for one such value.
        return pc.cast(column, target, safe=False), None
    if pa.types.is_integer(target) and pa.types.is_integer(got):
        # A value out of the field's range becomes null, and the caller rejects its row
        # alone; Arrow's checked cast refused the whole batch for one such value.
        outside = _outside_int_range(column, target)
        if outside is not None:
            column = pc.if_else(outside, pa.scalar(None, got), column)
        return pc.cast(column, target), None
    if pa.types.is_string(target) and (pa.types.is_large_string(got) or pa.types.is_string_view(got)):
        return pc.cast(column, target), None
    if pa.types.is_string(target) and pa.types.is_dictionary(got):
        return pc.cast(column, target), None
    return None, Problem(f.name, dtype_name(target), f"column of type {got}")


def _int_range(dtype: pa.DataType) -> tuple[int, int]:
    info = np.iinfo(dtype.to_pandas_dtype())
    return int(info.min), int(info.max)


def _outside_int_range(column: pa.Array, target: pa.DataType) -> pa.Array | None:
    """Where an integer column holds values `target` cannot (None if it holds none)."""
    low, high = _int_range(target)
    got_low, got_high = _int_range(column.type)
    outside = pa.array(np.zeros(len(column), dtype=bool))
    if got_low < low:
        outside = pc.or_(outside, pc.less(column, pa.scalar(low, column.type)))
    if got_high > high:
        outside = pc.or_(outside, pc.greater(column, pa.scalar(high, column.type)))
    outside = pc.fill_null(outside, False)
    return outside if pc.any(outside).as_py() else None


def _rejected_table(
    table: pa.Table,
    bad_rows: np.ndarray,
    reasons: dict[int, list[Problem]],
    column_problems: list[Problem],
) -> pa.Table:
    picked = table.take(pa.array(bad_rows, type=pa.int64())) if len(bad_rows) else table.slice(0, 0)
    as_text = {
        name: pc.cast(picked.column(name), pa.string())
        if _castable_to_string(picked.column(name).type)
        else pa.array([None] * picked.num_rows, pa.string())
        for name in picked.column_names
    }
    common = "; ".join(str(p) for p in column_problems)
    texts = []
    for index in bad_rows:
        own = "; ".join(str(Problem(p.field, p.expected, p.got)) for p in reasons.get(int(index), []))
        texts.append("; ".join(part for part in (common, own) if part))
    return pa.table(
        {
            **as_text,
            "row": pa.array(bad_rows.astype(np.int64), pa.int64()),
            "reason": pa.array(texts, pa.string()),
        }
    )


def _castable_to_string(dtype: pa.DataType) -> bool:
    return not (pa.types.is_nested(dtype) or pa.types.is_binary(dtype))
