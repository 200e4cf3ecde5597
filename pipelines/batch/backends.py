"""Frame backends for the batch engine: pandas on CPU, cuDF on GPU (imported lazily)."""

from __future__ import annotations

from enum import Enum
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from featurestore.errors import TerminalError

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
    """An Arrow table as the backend's DataFrame (pandas: Arrow-backed strings)."""
    if backend is Backend.PANDAS:
        return table.to_pandas()
    return frame_module(backend).DataFrame.from_arrow(table)
