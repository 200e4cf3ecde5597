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
  Ints, strings, bools and timestamps match exactly. Null matches only null.
"""

from __future__ import annotations

import math
from typing import Any

FLOAT_REL_TOL = 1e-9
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


def values_match(expected: Any, got: Any, *, kind: str = "", scale: float = 0.0) -> bool:
    """Whether two feature values are the same under the rules above."""
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
        if kind == "std":
            return abs(a - b) <= FLOAT_ABS_TOL + FLOAT_REL_TOL * max(abs(a), abs(b)) + STD_SCALE_TOL * scale
        return abs(a - b) <= FLOAT_ABS_TOL + FLOAT_REL_TOL * max(abs(a), abs(b), scale)
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
    expected_columns = [expected.column(n).to_pylist() for n in names]
    got_columns = [got.column(n).to_pylist() for n in names]
    for row in range(expected.num_rows):
        for index, name in enumerate(names):
            a, b = expected_columns[index][row], got_columns[index][row]
            scale = scales[name][row] if name in scales else 0.0
            if not values_match(a, b, kind=(kinds or {}).get(name, ""), scale=scale or 0.0):
                where = f"{key}={expected_columns[0][row]!r} as_of={expected_columns[1][row]}"
                problems.append(f"row {row} ({where}): {name} expected {a!r}, got {b!r}")
                if len(problems) >= limit:
                    return problems
    return problems
