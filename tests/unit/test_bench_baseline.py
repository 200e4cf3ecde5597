"""The batch bench's raw baseline computes what the kernel computes; otherwise the
"kernel within 2x of the baseline" figure compares different work."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tenx_bench_batch", ROOT / "bench" / "batch.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_polars_baseline_returns_the_kernel_changelog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLARS_MAX_THREADS", "2")  # the bench part sets it; restored after
    bench = _bench()
    bench.part_prepare(tmp_path, events=60_000, users=800, days=10)
    checked = bench.part_verify(tmp_path)  # SystemExit with the first difference, if any
    assert checked["rows"] > 60_000 / bench.PARTITIONS  # every event plus its expiries
    kinds = ("count", "sum_amount_eur", "mean_amount_eur", "max_amount_eur", "std_amount_eur", "sum_foreign_eur")
    every_feature = {f"{kind}_{label}" for label in ("1h", "1d", "7d") for kind in kinds}
    assert set(checked["errors"]) == every_feature | {"min_amount_eur_7d", "last_amount_eur_1d"}
    assert checked["errors"]["count_7d"] == 0.0
    assert checked["errors"]["last_amount_eur_1d"] == 0.0
