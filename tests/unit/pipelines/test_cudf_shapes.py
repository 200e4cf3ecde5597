"""What the kernel and the shuffle do with the shapes cuDF returns, modelled from cuDF's
sources (no GPU here): `Series.factorize` gives a CuPy array of narrow codes and a cuDF
Index; cuDF frames carry naive UTC times; a non-integer key is hashed to 64 bits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipelines.batch.backends import Backend, is_device_frame, utc_as_naive
from pipelines.batch.engine import bucket_ids
from pipelines.batch.kernel import _factorize


class _DeviceCodes:
    """A CuPy array: no `to_numpy`, `.get()` copies to the host."""

    def __init__(self, values: np.ndarray) -> None:
        self._values = values

    def get(self) -> np.ndarray:
        return self._values.copy()


class _CudfIndex:
    __module__ = "cudf.core.index"

    def __init__(self, values: list[Any]) -> None:
        self._values = values

    def to_numpy(self) -> np.ndarray:
        return np.array(self._values, dtype=object)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Implicit conversion to a host NumPy array via __array__ is not allowed")


class _CudfKeys:
    __module__ = "cudf.core.series"

    def factorize(self, sort: bool = False) -> tuple[_DeviceCodes, _CudfIndex]:
        assert sort
        return _DeviceCodes(np.array([1, 0, 1, 2], dtype=np.int8)), _CudfIndex(["a", "b", "c"])


def test_factorize_takes_cudf_codes_and_index_to_the_host() -> None:
    codes, uniques = _factorize(_CudfKeys())
    assert codes.dtype == np.int64  # int8 codes would overflow codes * span
    assert codes.tolist() == [1, 0, 1, 2]
    assert uniques.tolist() == ["a", "b", "c"]


def test_device_frames_are_told_apart_without_importing_cudf() -> None:
    assert is_device_frame(_CudfKeys())
    assert not is_device_frame(pa.table({"a": [1]}).to_pandas())


def test_utc_as_naive_keeps_the_instants_and_leaves_other_columns() -> None:
    table = pa.table(
        {
            "event_time": pa.array([0, 1_700_000_000_000_000, None], pa.timestamp("us", tz="UTC")),
            "naive": pa.array([1, 2, 3], pa.timestamp("ms")),
            "user_id": pa.array([1, 2, 3], pa.int64()),
        }
    )
    naive = utc_as_naive(table)
    assert naive.schema.field("event_time").type == pa.timestamp("us")
    assert naive.schema.field("naive").type == pa.timestamp("ms")
    assert naive.column("event_time").cast(pa.int64()).to_pylist() == [0, 1_700_000_000_000_000, None]
    assert utc_as_naive(naive) is naive


class _CudfStringColumn:
    """A cuDF string Series: hash_values gives 32-bit murmur3 unless told otherwise."""

    __module__ = "cudf.core.series"
    dtype = "object"

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def hash_values(self, method: str = "murmur3") -> Any:
        if method == "murmur3":
            values = np.array([hash(k) & 0xFFFFFFFF for k in self.keys], dtype=np.uint32)
        elif method == "xxhash64":
            values = np.array([hash(k) & 0xFFFFFFFFFFFFFFFF for k in self.keys], dtype=np.uint64)
        else:
            raise ValueError(method)
        return type("Hashed", (), {"values": values})()


def test_string_keys_spread_over_buckets_on_cudf(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.batch.engine as engine

    monkeypatch.setattr(engine, "array_module", lambda backend: np)
    keys = [f"merchant-{i}" for i in range(1000)]
    buckets = bucket_ids({"merchant_id": _CudfStringColumn(keys)}, "merchant_id", 16, Backend.CUDF)
    assert len(set(buckets.tolist())) == 16  # 32-bit hashes >> 32 would all be bucket 0
