"""The value rules every engine follows, decided once (see docs/design.md).

- Empty window: Count 0, Sum 0 (int or float as the column), every other kind null.
- Nulls: every aggregation skips null inputs (NaN counts as null); Count() counts
  events, Count(col) counts non-null values of col. A window whose inputs are all null
  has Sum 0 and null Mean/Min/Max/Last/Std.
- Last: the value of the latest event by event time; among events at the same time,
  the one later in the log (Kafka offset order, or row order in a table).
- Std: population standard deviation (ddof=0); 0.0 for a single value.
- Floats: engines may add in different orders, so float features match when
  |a - b| <= FLOAT_ABS_TOL + FLOAT_REL_TOL * max(|a|, |b|). Ints, strings, bools and
  timestamps match exactly. Null matches only null.
"""

from __future__ import annotations

import math
from typing import Any

FLOAT_REL_TOL = 1e-9
FLOAT_ABS_TOL = 1e-6


def empty_value(kind: str, dtype: str) -> Any:
    """The feature value over a window with no (non-null) inputs."""
    if kind == "count":
        return 0
    if kind == "sum":
        return 0 if dtype.startswith("int") else 0.0
    return None


def values_match(expected: Any, got: Any, *, relative: float = FLOAT_REL_TOL, absolute: float = FLOAT_ABS_TOL) -> bool:
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
        return abs(a - b) <= absolute + relative * max(abs(a), abs(b))
    return bool(expected == got)
