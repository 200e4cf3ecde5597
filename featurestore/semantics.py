"""The value rules every engine follows, decided once (see docs/design.md).

- Empty window: Count 0, Sum 0 (int or float as the column), every other kind null.
- Nulls: every aggregation skips null inputs (NaN counts as null); Count() counts
  events, Count(col) counts non-null values of col. A window whose inputs are all null
  has Sum 0 and null Mean/Min/Max/Last/Std.
- Last: the value of the latest event by event time; among events at the same time,
  the one later in the log (Kafka offset order, or row order in a table).
- Std: population standard deviation (ddof=0); 0.0 for a single value.
- Floats: engines add in different orders, so float features match within the
  rounding error of a stable algorithm, relative to the size of the window's inputs
  (`scale` = the largest |x| in the window):
      Sum, Mean:  |a - b| <= 1e-6 + 1e-9 * max(|a|, |b|, scale)
      Std:        |a - b| <= 1e-6 + 1e-9 * max(|a|, |b|) + 1e-7 * scale
  (Std loses about half the digits when the spread is tiny next to the values.)
  Without a scale (comparing two engines' outputs alone) scale is taken as 0.
- float32 storage: engines compute in float64 and round once when storing, so two
  engines' values within the rules above may round to neighbouring float32s; they
  match within one float32 step more: + 2**-23 * max(|a|, |b|). Beyond float32's range
  a value is stored as +-inf.
  Ints, strings, bools and timestamps match exactly. Null matches only null.
- Latest (no window): the value of the newest event at or before the time asked
  (same time: the later in the log), null included; null before the entity's first event.
"""

from __future__ import annotations

import math
from typing import Any

FLOAT_REL_TOL = 1e-9
FLOAT32_STEP = 2.0**-23  # relative distance between neighbouring float32 values
FLOAT_ABS_TOL = 1e-6
STD_SCALE_TOL = 1e-7
SCALE_PREFIX = "_scale_"  # reference-only columns holding each float feature's scale


def empty_value(kind: str, dtype: str) -> Any:
    """The feature value over a window with no (non-null) inputs."""
    if kind == "count":
        return 0
    if kind == "sum":
        return 0 if dtype.startswith("int") else 0.0
    return None


def values_match(expected: Any, got: Any, *, kind: str = "", scale: float = 0.0, dtype: str = "") -> bool:
    """Whether two feature values are the same under the rules above (`dtype`: the
    feature's stored type, for the float32 rule)."""
    expected_null = expected is None or (isinstance(expected, float) and math.isnan(expected))
    got_null = got is None or (isinstance(got, float) and math.isnan(got))
    if expected_null or got_null:
        return expected_null and got_null
    if isinstance(expected, float) or isinstance(got, float):
        if isinstance(expected, bool) or isinstance(got, bool):
            return bool(expected == got)
        a, b = float(expected), float(got)
        if math.isinf(a) or math.isinf(b):
            return a == b
        step = FLOAT32_STEP * max(abs(a), abs(b)) if dtype == "float32" else 0.0
        if kind == "std":
            return abs(a - b) <= FLOAT_ABS_TOL + FLOAT_REL_TOL * max(abs(a), abs(b)) + STD_SCALE_TOL * scale + step
        return abs(a - b) <= FLOAT_ABS_TOL + FLOAT_REL_TOL * max(abs(a), abs(b), scale) + step
    return bool(expected == got)


def changelog_differences(
    expected: Any, got: Any, *, key: str, kinds: dict[str, str] | None = None, limit: int = 20
) -> list[str]:
    """Row-for-row differences between two changelog tables (pyarrow) under the rules
    above: first a row-count or key/time mismatch, then every differing value.

    `expected` may carry `_scale_<feature>` columns (the reference engine adds them on
    request); `kinds` maps feature names to aggregation kinds (for the Std rule)."""
    scale_names = [n for n in expected.schema.names if n.startswith(SCALE_PREFIX)]
    scales = {n[len(SCALE_PREFIX) :]: expected.column(n).to_pylist() for n in scale_names}
    if scale_names:
        expected = expected.drop_columns(scale_names)
    if expected.schema.names != got.schema.names:
        return [f"columns differ: expected {expected.schema.names}, got {got.schema.names}"]
    if expected.num_rows != got.num_rows:
        return [f"row counts differ: expected {expected.num_rows}, got {got.num_rows}"]
    problems: list[str] = []
    names = expected.schema.names
    narrow = {n for n in names if _is_float32(got.schema.field(n).type) or _is_float32(expected.schema.field(n).type)}
    expected_columns = [expected.column(n).to_pylist() for n in names]
    got_columns = [got.column(n).to_pylist() for n in names]
    for row in range(expected.num_rows):
        for index, name in enumerate(names):
            a, b = expected_columns[index][row], got_columns[index][row]
            scale = scales[name][row] if name in scales else 0.0
            dtype = "float32" if name in narrow else ""
            if not values_match(a, b, kind=(kinds or {}).get(name, ""), scale=scale or 0.0, dtype=dtype):
                where = f"{key}={expected_columns[0][row]!r} as_of={expected_columns[1][row]}"
                problems.append(f"row {row} ({where}): {name} expected {a!r}, got {b!r}")
                if len(problems) >= limit:
                    return problems
    return problems


def _is_float32(dtype: Any) -> bool:
    return str(dtype) == "float"  # pyarrow's name of float32 (float64 is "double")
