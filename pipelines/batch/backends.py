"""Frame backends for the batch engine: pandas on CPU, cuDF on GPU (imported lazily)."""

from __future__ import annotations

from enum import Enum
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from featurestore.errors import TerminalError
from featurestore.transforms import events_frame

CUDF_HINT = (
    "the cudf backend needs an NVIDIA GPU with RAPIDS: pip install 'tenx[gpu]' for CUDA 12 "
    "or 'tenx[gpu-cu13]' for CUDA 13 (see https://docs.rapids.ai/install), or use --backend pandas"
)


class Backend(Enum):
    PANDAS = "pandas"
    CUDF = "cudf"


def array_module(backend: Backend) -> ModuleType:
    """numpy for pandas frames, cupy for cuDF frames."""
    if backend is Backend.PANDAS:
        return np
    try:
        import cupy
    except ImportError as error:
        raise TerminalError(CUDF_HINT) from error
    return cupy  # type: ignore[no-any-return]


def frame_module(backend: Backend) -> Any:
    if backend is Backend.PANDAS:
        return pd
    try:
        import cudf
    except ImportError as error:
        raise TerminalError(CUDF_HINT) from error
    return cudf


def to_frame(table: pa.Table, backend: Backend) -> Any:
    """An Arrow table as the backend's DataFrame (pandas: `events_frame`, exact nullable ints; cuDF:
    timestamps without their time zone, see `utc_as_naive`)."""
    if backend is Backend.PANDAS:
        return events_frame(table)
    return frame_module(backend).DataFrame.from_arrow(utc_as_naive(table))


def utc_as_naive(table: pa.Table) -> pa.Table:
    """Time-zone-aware timestamp columns as naive ones holding the same UTC instants.

    Event times are UTC throughout tenx. cuDF's support for zoned columns is partial (its
    Parquet reader drops the zone, comparisons between zoned scalars and naive columns
    raise, and zoned columns reach numpy as Python objects), so cuDF frames carry naive
    UTC times; the kernel reads either kind as microseconds."""
    fields = [
        pa.field(f.name, pa.timestamp(f.type.unit), f.nullable, f.metadata)
        if pa.types.is_timestamp(f.type) and f.type.tz is not None
        else f
        for f in table.schema
    ]
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return table if schema.equals(table.schema) else table.cast(schema)


def is_device_frame(value: Any) -> bool:
    """A cuDF DataFrame, Series or Index (without importing cuDF)."""
    return type(value).__module__.split(".")[0] == "cudf"
