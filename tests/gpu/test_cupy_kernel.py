"""The batch kernel's array code on a GPU (CuPy), with pandas frames on the host: the
same changelog as the reference engine, and as the numpy kernel on demo data.

These need CuPy and a device only (no cuDF), so they run on GPU machines whose image
holds CuPy but not RAPIDS; `scripts/gpu-check` runs them in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pandas as pd
import pytest
from hypothesis import given, settings

from featurestore.plan import compile_repo
from featurestore.semantics import changelog_differences
from pipelines.batch.backends import Backend, array_module, to_frame
from pipelines.batch.kernel import changelog_kernel
from tenx.demo_data import DemoConfig, generate
from tests.unit.pipelines.test_kernel_array_module import ill_conditioned_events
from tests.unit.pipelines.test_kernel_parity import VIEWS, check_against_reference, logs

ROOT = Path(__file__).resolve().parents[2]


def _cupy() -> Any:
    import cupy

    return cupy


@settings(max_examples=300)
@given(frame=logs(), view_index=st.integers(min_value=0, max_value=len(VIEWS) - 1), data=st.data())
def test_cupy_kernel_equals_reference(frame: pd.DataFrame, view_index: int, data: Any) -> None:
    check_against_reference(frame, view_index, data, xp=_cupy())


@pytest.mark.parametrize("view_name", ["user_spend", "merchant_sales"])
def test_cupy_kernel_equals_numpy_kernel_on_demo_data(view_name: str) -> None:
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    view = plan.view(view_name)
    table = next(generate(DemoConfig(events=200_000, users=2_000, days=7, chunk_rows=200_000)))
    frame = to_frame(table, Backend.PANDAS)
    expected = changelog_kernel(view, frame)
    got = changelog_kernel(view, frame, xp=_cupy())
    assert got.num_rows == expected.num_rows > 0
    kinds = {f.name: f.kind for f in view.features}
    assert changelog_differences(expected, got, key=view.entity_key, kinds=kinds) == []


def test_cupy_ill_conditioned_std_equals_numpy() -> None:
    """Small windows far from their entity's mean take the kernel's exact two-pass Std."""
    frame = ill_conditioned_events()
    kinds = {f.name: f.kind for f in VIEWS[0].features}
    expected = changelog_kernel(VIEWS[0], frame)
    got = changelog_kernel(VIEWS[0], frame, xp=_cupy())
    assert changelog_differences(expected, got, key="user_id", kinds=kinds) == []


def test_cupy_is_the_cudf_backends_array_module() -> None:
    assert array_module(Backend.CUDF) is _cupy()
