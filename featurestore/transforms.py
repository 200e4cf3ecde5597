"""Running a view's row transform and `where` filter on events: the one code path both
engines and the reference use, so derived columns cannot drift between them.

Only pandas API that cuDF also implements is used here.
"""

from __future__ import annotations

import math
from typing import Any

from featurestore.errors import DerivedCastError, TransformError
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


def nullable_int(dtype: Any) -> Any:
    """pyarrow `types_mapper`: integer columns as pandas nullable ints (exact, with a
    mask), everything else as `to_pandas` gives it (None)."""
    import pandas as pd
    import pyarrow as pa

    if not pa.types.is_integer(dtype):
        return None
    return pd.api.types.pandas_dtype(f"{'U' if pa.types.is_unsigned_integer(dtype) else ''}Int{dtype.bit_width}")


def events_frame(table: Any) -> Any:
    """An Arrow table of events as the pandas frame the engines compute on.

    `to_pandas` turns an int column holding a null into float64, which rounds values
    past 2**53 (64-bit ids, `Last` of an id, large `Sum`s): 2**53 + 1 came out 2**53.
    Such columns arrive here as pandas nullable ints instead; the others as `to_pandas`
    gives them. `prepare_events` still shows a view's transform and `where` the float64
    column they always saw, and aggregates the exact one."""
    frame = table.to_pandas()
    for name, column in zip(table.column_names, table.columns, strict=True):
        if column.null_count and nullable_int(column.type) is not None:
            frame[name] = column.to_pandas(types_mapper=nullable_int)
    return frame


def prepare_events(view: ViewSpec, events: Any) -> Any:
    """Events with the view's derived columns added and its `where` applied.

    `events` is a pandas or cuDF DataFrame with the source schema's columns. The result
    has a fresh RangeIndex and keeps the input's row order (the log order, which breaks
    ties between events at the same time). Nullable int columns (`events_frame`) stay
    exact in the result; the transform and `where` see them as plain pandas would
    (int64, or float64 with NaN where a value is null), whatever the engine read.
    """
    frame = events.reset_index(drop=True)
    shown = _as_plain_pandas(frame)
    derived = load(view.transform)(shown)  # a view without derived columns returns none
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
            raise DerivedCastError(
                f"feature view `{view.name}`: derived column `{name}` cannot be {dtype}: {error}"
            ) from error
        if dtype.startswith("float"):
            # The source fields are bounded by validation; a derived value that is not
            # finite or beyond the same bound counts as null (aggregations skip it), in
            # every engine alike, rather than making a window's Sum or Std inf or NaN.
            column = column.where(column.abs() <= FLOAT_LIMIT)
        frame[name] = column
        if shown is not frame:
            shown[name] = column
    if view.where is not None:
        mask = load(view.where)(shown)
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


def _as_plain_pandas(frame: Any) -> Any:
    """`frame` with its pandas nullable int columns as `to_pandas` makes them (a
    shallow copy), or `frame` itself when it has none (cuDF frames included)."""
    import pandas as pd
    from pandas.api.extensions import ExtensionDtype

    if not isinstance(frame, pd.DataFrame):
        return frame
    # Int64 -> int64, UInt8 -> uint8: the numpy type of such a column without nulls
    exact = {
        name: dtype.numpy_dtype
        for name, dtype in frame.dtypes.items()
        if isinstance(dtype, ExtensionDtype) and dtype.kind in "iu" and hasattr(dtype, "numpy_dtype")
    }
    if not exact:
        return frame
    shown = frame.copy(deep=False)
    for name, plain in exact.items():
        column = frame[name]
        shown[name] = column.astype("float64") if column.hasnans else column.astype(plain)
    return shown


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
