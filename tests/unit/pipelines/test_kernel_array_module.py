"""The kernel's array code stays within what CuPy (the cuDF backend's array module)
supports, checked on CPU: the kernel runs with `cupy_like` (numpy whose arrays refuse
to mix with host arrays, with CuPy's missing pieces; see that module) and
returns exactly what it returns with plain numpy. Without cuDF the kernel's per-entity
cumulative sums take a host round trip, which these runs exercise too.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pipelines.batch.kernel as kernel
from pipelines.batch.kernel import changelog_kernel
from tests.unit.pipelines import cupy_like
from tests.unit.pipelines.test_kernel_parity import VIEWS, logs
from tests.unit.pipelines.test_reference import BASE


@given(frame=logs(), view_index=st.integers(min_value=0, max_value=len(VIEWS) - 1))
def test_kernel_under_cupy_restrictions_equals_numpy(frame: pd.DataFrame, view_index: int) -> None:
    view = VIEWS[view_index]
    expected = changelog_kernel(view, frame)
    assert changelog_kernel(view, frame, xp=cupy_like).equals(expected)


def ill_conditioned_events() -> pd.DataFrame:
    """One user whose small windows sit far from the mean of all their values: the kernel's
    exact two-pass Std path."""
    values = [1e12, 1.0, 1.5, 2.0, 2.5, 1e12, 3.0, 3.5]
    return pd.DataFrame(
        {
            "user_id": np.array([1] * len(values), dtype=np.int64),
            "value": np.array(values),
            "amount": pd.array([1] * len(values), dtype="Int64"),
            "label": ["a"] * len(values),
            "event_time": pd.to_datetime(
                [BASE + timedelta(minutes=7 * i) for i in range(len(values))], utc=True
            ).as_unit("us"),
        }
    )


def test_ill_conditioned_std_under_cupy_restrictions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small window far from its entity's mean takes the exact two-pass Std path."""
    calls: list[int] = []
    exact = kernel._exact_variance

    def counted(*args: Any) -> Any:
        calls.append(1)
        return exact(*args)

    monkeypatch.setattr(kernel, "_exact_variance", counted)
    frame = ill_conditioned_events()
    expected = changelog_kernel(VIEWS[0], frame)
    got = changelog_kernel(VIEWS[0], frame, xp=cupy_like)
    assert calls, "no window took the exact Std path"
    assert got.equals(expected)


def test_cupy_like_refuses_what_cupy_refuses() -> None:
    device = cupy_like.arange(5)
    assert isinstance(device + 1, cupy_like.ndarray)
    assert type(device.get()) is np.ndarray
    with pytest.raises(TypeError, match="host array mixed"):
        device + np.arange(5)
    with pytest.raises(TypeError, match="host array mixed"):
        np.concatenate([device, np.arange(2)])
    with pytest.raises(NotImplementedError):
        cupy_like.maximum.accumulate(device)
    with pytest.raises(ValueError, match="repeats"):
        cupy_like.repeat(device, cupy_like.asarray([1, 2, 1, 1, 1]))
