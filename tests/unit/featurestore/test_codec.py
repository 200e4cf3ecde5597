"""Packed online values: round trips, batch decoding, ordering bytes, version checks."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from featurestore import Count, Entity, Last, Max, Mean, Source, Sum, feature_view
from featurestore.plan import ViewSpec, compile_definitions
from featurestore.stores.codec import (
    HEADER,
    decode,
    decode_many,
    decode_matrix,
    encode,
    encode_columns,
    online_key,
    online_keys,
)
from schemas import TRANSACTIONS

USER = Entity("user", key="user_id")
TX = Source("transactions", TRANSACTIONS)


def view_of(*aggregations: Any) -> ViewSpec:
    @feature_view(entity=USER, source=TX, aggregations=list(aggregations), windows=["1h"])
    def codec_view(tx: Any) -> Any:
        return tx[[]]

    return compile_definitions("codec", views=[codec_view]).views[0]


FIXED = view_of(Count(), Sum("amount"), Mean("amount"), Max("merchant_id"))  # int64, float64, float64, int64
MIXED = view_of(Count(), Mean("amount"), Last("currency"))

floats = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))
ints = st.integers(-(2**63), 2**63 - 1)


@given(
    as_of=st.integers(0, 2**63 - 1),
    count=ints,
    total=st.floats(allow_nan=False),
    mean=floats,
    biggest=st.one_of(st.none(), ints),
)
def test_fixed_round_trip(as_of: int, count: int, total: float, mean: float | None, biggest: int | None) -> None:
    values = [count, total, mean, biggest]
    packed = encode(FIXED, as_of, values)
    assert decode(FIXED, packed) == (as_of, values)
    assert decode_many(FIXED, [None, packed, None]) == [None, (as_of, tuple(values)), None]


@given(label=st.one_of(st.none(), st.text()), mean=floats)
def test_variable_round_trip(label: str | None, mean: float | None) -> None:
    packed = encode(MIXED, 7, [3, mean, label])
    assert decode(MIXED, packed) == (7, [3, mean, label])
    assert decode_many(MIXED, [packed]) == [(7, (3, mean, label))]


@given(
    rows=st.lists(
        st.tuples(st.integers(0, 2**63 - 1), ints, st.floats(allow_nan=False), floats, st.one_of(st.none(), ints)),
        max_size=20,
    )
)
def test_columns_encode_byte_for_byte_as_rows_do(rows: list[tuple[Any, ...]]) -> None:
    as_of = np.array([r[0] for r in rows], dtype=np.uint64).astype(np.int64)
    kinds = [np.int64, np.float64, np.float64, np.int64]
    values, nulls = [], []
    for index, kind in enumerate(kinds):
        column = [r[index + 1] for r in rows]
        null = np.array([v is None for v in column], dtype=bool)
        values.append(np.array([0 if v is None else v for v in column], dtype=kind))
        nulls.append(null if null.any() else None)
    assert encode_columns(FIXED, as_of, values, nulls) == [encode(FIXED, r[0], list(r[1:])) for r in rows]


def test_columns_with_text_encode_value_by_value() -> None:
    values = [np.array([3], np.int64), np.array([0.5]), np.array(["EUR"], dtype=object)]
    nulls = [None, np.array([True]), None]
    assert encode_columns(MIXED, np.array([9], np.int64), values, nulls) == [encode(MIXED, 9, [3, None, "EUR"])]


def test_columns_that_do_not_match_the_views_features_are_refused_not_packed_as_zeros() -> None:
    """A state of another view version handed two columns for four features: the rest
    were packed as 0.0 and stored as values."""
    two = [np.array([1], np.int64), np.array([0.5])]
    with pytest.raises(ValueError, match="has 4 features, got 2 columns"):
        encode_columns(FIXED, np.array([9], np.int64), two, [None, None])


def test_as_of_bytes_order_values_by_time() -> None:
    earlier, later = encode(FIXED, 1_000, [1, 1.0, 1.0, 1]), encode(FIXED, 256_000, [0, 0.0, None, None])
    assert earlier[1:9] < later[1:9]
    assert HEADER.unpack_from(later)[1] == 256_000


def test_values_of_another_version_are_refused() -> None:
    other = view_of(Count(), Sum("amount"), Mean("amount"), Max("merchant_id"), Count("country"))
    packed = encode(FIXED, 1, [1, 1.0, 1.0, 1])
    with pytest.raises(ValueError, match=f"expected 1 / {other.version}"):
        decode(other, packed)
    with pytest.raises(ValueError, match=f"expected 1 / {other.version}"):
        decode_many(other, [encode(other, 1, [1, 1.0, 1.0, 1, 0]), packed])


def test_keys() -> None:
    assert online_key(FIXED, 42) == f"tenx:codec_view:{FIXED.version}:42".encode()
    assert online_keys(FIXED, [42, "a"], prefix="p") == [
        f"p:codec_view:{FIXED.version}:42".encode(),
        f"p:codec_view:{FIXED.version}:a".encode(),
    ]


FLOATS = view_of(Sum("amount"), Mean("amount"), Max("amount"))


@given(rows=st.lists(st.one_of(st.none(), st.lists(floats, min_size=3, max_size=3)), min_size=0, max_size=40))
def test_batch_decoding_equals_value_by_value(rows: list[list[float | None] | None]) -> None:
    raws = [None if row is None else encode(FLOATS, 5 + i, row) for i, row in enumerate(rows)]
    expected = [None if raw is None else (decode(FLOATS, raw)[0], tuple(decode(FLOATS, raw)[1])) for raw in raws]
    assert decode_many(FLOATS, raws) == expected


FLOAT32 = view_of(Sum("amount", dtype="float32"), Mean("amount", dtype="float32"), Max("amount", dtype="float32"))
NARROW_MIXED = view_of(Count(), Mean("amount", dtype="float32"), Sum("amount"))
wide_floats = st.one_of(st.none(), st.floats(allow_nan=False))


def as_float32(value: float | None) -> float | None:
    with np.errstate(over="ignore"):
        return None if value is None else float(np.float32(value))


@given(rows=st.lists(st.one_of(st.none(), st.lists(wide_floats, min_size=3, max_size=3)), min_size=0, max_size=40))
def test_float32_values_take_4_bytes_and_round_once(rows: list[list[float | None] | None]) -> None:
    raws = [None if row is None else encode(FLOAT32, 5 + i, row) for i, row in enumerate(rows)]
    for raw, row in zip(raws, rows, strict=True):
        if raw is not None and row is not None:
            assert len(raw) == HEADER.size + 1 + 3 * 4
            assert raw[0] == 2  # codec 2: float32 in 4 bytes
            assert decode(FLOAT32, raw)[1] == [as_float32(v) for v in row]  # beyond float32's range: inf
    expected = [None if raw is None else (decode(FLOAT32, raw)[0], tuple(decode(FLOAT32, raw)[1])) for raw in raws]
    assert decode_many(FLOAT32, raws) == expected  # the numpy path (16+ values) agrees


@given(rows=st.lists(st.tuples(st.integers(0, 2**62), ints, wide_floats, st.floats(allow_nan=False)), max_size=20))
def test_float32_columns_encode_byte_for_byte_as_rows_do(rows: list[tuple[Any, ...]]) -> None:
    as_of = np.array([r[0] for r in rows], dtype=np.int64)
    count = np.array([r[1] for r in rows], dtype=np.int64)
    mean = np.array([0.0 if r[2] is None else r[2] for r in rows], dtype=np.float64)
    null = np.array([r[2] is None for r in rows], dtype=bool)
    total = np.array([r[3] for r in rows], dtype=np.float64)
    got = encode_columns(NARROW_MIXED, as_of, [count, mean, total], [None, null if null.any() else None, None])
    assert got == [encode(NARROW_MIXED, r[0], list(r[1:])) for r in rows]


def test_a_float32_view_is_half_the_bytes_of_float64() -> None:
    wide = view_of(*(Mean("amount", name=f"m{i}") for i in range(20)))
    narrow = view_of(*(Mean("amount", name=f"m{i}", dtype="float32") for i in range(20)))
    values = [0.1 * i for i in range(20)]
    assert len(encode(wide, 1, values)) - HEADER.size == 3 + 160
    assert len(encode(narrow, 1, values)) - HEADER.size == 3 + 80


def test_values_written_before_codec_2_for_float32_features_are_still_read() -> None:
    # Max of a float32 field was already a float32 feature, packed in 8 bytes (codec 1);
    # its view version is unchanged, so those stored values must still decode.
    import struct

    from featurestore.stores.codec import layout

    view = FLOAT32
    shape = layout(view)
    values = [1.5, None, -2.25]
    head = HEADER.pack(1, 42, shape.version) + bytes([0b010])
    legacy = head + struct.pack("<ddd", 1.5, 0.0, -2.25)
    assert decode(view, legacy) == (42, values)
    assert decode_many(view, [legacy] * 20 + [encode(view, 43, values)]) == [(42, tuple(values))] * 20 + [
        (43, tuple(values))
    ]


def test_nan_stays_nan_in_both_float32_encoders() -> None:
    packed = encode(FLOAT32, 1, [float("nan"), 1.0, 2.0])
    column = encode_columns(
        FLOAT32, np.array([1], np.int64), [np.array([np.nan]), np.array([1.0]), np.array([2.0])], [None, None, None]
    )
    assert packed == column[0]
    assert np.isnan(decode(FLOAT32, packed)[1][0])


@pytest.mark.parametrize(
    "view", [FLOATS, FLOAT32, FIXED, NARROW_MIXED, MIXED], ids=lambda v: v.name + str(len(v.features))
)
@given(data=st.data())
def test_decode_matrix_equals_value_by_value(view: ViewSpec, data: st.DataObject) -> None:
    """What the model server reads (a float matrix, NaN for null or absent, -1 as_of for
    absent) is what `decode` gives, for every layout: uniform floats (one gather),
    mixed fixed-width (a field loop), variable width (value by value)."""
    numeric = [i for i, f in enumerate(view.features) if f.dtype != "string"]
    positions = data.draw(st.lists(st.sampled_from(numeric), min_size=1, max_size=len(numeric)))

    def value(dtype: str) -> Any:
        if dtype == "string":
            return st.one_of(st.none(), st.text(max_size=5))
        if dtype.startswith("int"):
            return st.one_of(st.none(), st.integers(-(2**53), 2**53))
        return st.one_of(st.none(), st.floats(-1e30, 1e30))

    row = st.tuples(*(value(f.dtype) for f in view.features)).map(list)
    rows = data.draw(st.lists(st.one_of(st.none(), row), max_size=30))
    raws = [None if r is None else encode(view, 10 + i, r) for i, r in enumerate(rows)]
    as_of, matrix = decode_matrix(view, raws, positions)
    for index, raw in enumerate(raws):
        if raw is None:
            assert as_of[index] == -1
            assert np.isnan(matrix[index]).all()
            continue
        time, values = decode(view, raw)
        assert as_of[index] == time
        expected = [np.nan if values[p] is None else float(values[p]) for p in positions]
        np.testing.assert_array_equal(matrix[index], expected)
