"""The small set of Arrow types an event field may have, and their names in a Plan."""

from __future__ import annotations

import pyarrow as pa

from schemas.errors import SchemaError

TIMESTAMP_UTC = pa.timestamp("us", tz="UTC")

# Plan files name types with these strings; the mapping is the whole vocabulary, so a
# Plan written today reads the same tomorrow whatever pyarrow's own str() does.
_BY_NAME: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "timestamp[us, UTC]": TIMESTAMP_UTC,
}
_ALIASES: dict[str, str] = {
    "str": "string",
    "utf8": "string",
    "int": "int64",
    "float": "float64",
    "double": "float64",
    "boolean": "bool",
    "timestamp": "timestamp[us, UTC]",
}
SUPPORTED = tuple(_BY_NAME)


def dtype_name(dtype: pa.DataType) -> str:
    """The Plan name of a supported Arrow type; raises SchemaError for others."""
    for name, candidate in _BY_NAME.items():
        if candidate.equals(dtype):
            return name
    raise SchemaError(f"type {dtype} is not supported; expected one of {', '.join(SUPPORTED)}")


def parse_dtype(value: str | pa.DataType | type) -> pa.DataType:
    """Resolve a type given as an Arrow type, a Plan name or a Python type.

    >>> parse_dtype("float") == pa.float64()
    True
    """
    if isinstance(value, pa.DataType):
        return value
    if value is int:
        return pa.int64()
    if value is float:
        return pa.float64()
    if value is str:
        return pa.string()
    if value is bool:
        return pa.bool_()
    if isinstance(value, str):
        name = _ALIASES.get(value, value)
        if name in _BY_NAME:
            return _BY_NAME[name]
    raise SchemaError(f"unknown type {value!r}; expected one of {', '.join(SUPPORTED)}")


def is_numeric(dtype: pa.DataType) -> bool:
    return bool(pa.types.is_integer(dtype) or pa.types.is_floating(dtype))


def is_timestamp(dtype: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(dtype))
