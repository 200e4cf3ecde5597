"""Running a view's row transform and `where` filter on events: the one code path both
engines and the reference use, so derived columns cannot drift between them.

Only pandas API that cuDF also implements is used here.
"""

from __future__ import annotations

import math
from typing import Any

from featurestore.errors import TransformError
from featurestore.plan.code import load
from featurestore.plan.model import ViewSpec
from schemas.validation import FLOAT_LIMIT

# pandas/cuDF `astype` targets for Plan type names.
FRAME_DTYPES = {
    "int64": "int64",
    "int32": "int32",
    "float64": "float64",
    "float32": "float32",
    "bool": "bool",
    "string": "str",
}


def prepare_events(view: ViewSpec, events: Any) -> Any:
    """Events with the view's derived columns added and its `where` applied.

    `events` is a pandas or cuDF DataFrame with the source schema's columns. The result
    has a fresh RangeIndex and keeps the input's row order (the log order, which breaks
    ties between events at the same time).
    """
    frame = events.reset_index(drop=True)
    derived = load(view.transform)(frame)  # a view without derived columns returns none
    if not hasattr(derived, "columns"):
        raise TransformError(
            f"feature view `{view.name}`: the row transform must return a DataFrame of "
            f"the declared columns, got {type(derived).__name__}"
        )
    declared = [name for name, _ in view.columns]
    got = [str(c) for c in derived.columns]
    if sorted(got) != sorted(declared):
        raise TransformError(
            f"feature view `{view.name}`: the row transform returned columns {got}, expected exactly {declared}"
        )
    if len(derived) != len(frame):
        raise TransformError(
            f"feature view `{view.name}`: the row transform returned {len(derived)} rows "
            f"for {len(frame)} events; it must return one row per event (filter with where=)"
        )
    derived = derived.reset_index(drop=True)
    for name, dtype in view.columns:
        try:
            column = derived[name].astype(FRAME_DTYPES[dtype])
        except (TypeError, ValueError) as error:
            raise TransformError(
                f"feature view `{view.name}`: derived column `{name}` cannot be {dtype}: {error}"
            ) from error
        if dtype.startswith("float"):
            # The source fields are bounded by validation; a derived value that is not
            # finite or beyond the same bound counts as null (aggregations skip it), in
            # every engine alike, rather than making a window's Sum or Std inf or NaN.
            column = column.where(column.abs() <= FLOAT_LIMIT)
        frame[name] = column
    if view.where is not None:
        mask = load(view.where)(frame)
        if not hasattr(mask, "dtype") or str(mask.dtype) not in ("bool", "boolean"):
            raise TransformError(
                f"feature view `{view.name}`: where= must return a boolean Series, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if len(mask) != len(frame):
            raise TransformError(
                f"feature view `{view.name}`: where= returned {len(mask)} values for {len(frame)} events"
            )
        frame = frame[mask.fillna(False).reset_index(drop=True)].reset_index(drop=True)
    return frame


def event_micros(series: Any) -> list[int]:
    """Event times of a (pandas) column as integer microseconds, UTC."""
    import pyarrow as pa

    return pa.array(series).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()  # type: ignore[no-any-return]


def plain_values(values: list[Any]) -> list[Any]:
    """Python values from a frame column: numpy scalars unwrapped, and NaN, pd.NA and
    NaT turned into None (the value rules treat NaN as null)."""
    out: list[Any] = []
    for value in values:
        if (
            value is None
            or (isinstance(value, float) and math.isnan(value))
            or type(value).__name__ in ("NAType", "NaTType")
        ):
            out.append(None)
        elif hasattr(value, "item") and not isinstance(value, str):
            out.append(value.item())
        else:
            out.append(value)
    return out
