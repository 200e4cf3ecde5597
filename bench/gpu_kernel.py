"""GPU kernel benchmark: the batch changelog kernel with CuPy against the same kernel
with numpy (the CPU baseline), on the same demo events, in one run.

For each demo view: the numpy kernel's seconds (one process, the CPU path of `tenx
backfill` per partition), the CuPy kernel's seconds (median of --repeat runs after a
warm-up, device synchronised), the speed-up, and the largest difference between the two
changelogs (rows, keys and times must be equal; counts, extremes and Last exactly;
sums, means and Std within float rounding). Frames stay pandas on the host, so this
needs CuPy and a GPU, not cuDF: it is what `scripts/gpu-check` runs on a lent GPU
machine. Prints a table and writes JSON (bench/results/gpu_kernel.json, or --out).

    python bench/gpu_kernel.py                      # 2M events, 20k users, 14 days
    python bench/gpu_kernel.py --events 10000000 --users 100000 --days 30
    python bench/gpu_kernel.py --smoke              # seconds; JSON in a temp folder (CI)

With --smoke and no CuPy installed, the "GPU" side is the CPU stand-in for CuPy
(tests/unit/cupy_stand_in: numpy that refuses what CuPy refuses), as `scripts/gpu-check
--dry-run` uses it: the script and its comparison run end to end, the speed-up is
meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = ROOT / "tests" / "unit" / "cupy_stand_in"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _smoke  # noqa: E402

from featurestore.plan import compile_repo  # noqa: E402
from pipelines.batch.kernel import changelog_kernel  # noqa: E402
from tenx.demo_data import DemoConfig, generate  # noqa: E402

# Largest allowed |numpy - cupy| / max(1, |numpy|) per aggregation kind: parallel scans
# on the GPU add in another order than numpy's sequential cumsum.
TOLERANCE = {"count": 0.0, "max": 0.0, "min": 0.0, "last": 0.0, "sum": 1e-9, "mean": 1e-9, "std": 1e-6}


def differences(view: Any, expected: pa.Table, got: pa.Table) -> dict[str, float]:
    """The largest relative difference per feature; raises SystemExit where the two
    changelogs disagree beyond TOLERANCE (or in rows, keys, times, nulls)."""
    if expected.num_rows != got.num_rows:
        raise SystemExit(f"{view.name}: {got.num_rows:,} rows on GPU, {expected.num_rows:,} on CPU")
    for name in (view.entity_key, "as_of"):
        if not expected.column(name).equals(got.column(name)):
            raise SystemExit(f"{view.name}: column {name} differs between GPU and CPU")
    worst: dict[str, float] = {}
    for feature in view.features:
        a, b = expected.column(feature.name), got.column(feature.name)
        if a.null_count != b.null_count or not a.is_null().equals(b.is_null()):
            raise SystemExit(f"{view.name}: nulls of {feature.name} differ between GPU and CPU")
        if not pa.types.is_integer(a.type) and not pa.types.is_floating(a.type):
            if not a.equals(b):
                raise SystemExit(f"{view.name}: {feature.name} differs between GPU and CPU")
            worst[feature.name] = 0.0
            continue
        x = a.fill_null(0).to_numpy().astype(np.float64)
        y = b.fill_null(0).to_numpy().astype(np.float64)
        error = float((np.abs(x - y) / np.maximum(1.0, np.abs(x))).max(initial=0.0))
        if error > TOLERANCE[feature.kind]:
            raise SystemExit(f"{view.name}: {feature.name} differs by {error:.2e} (relative) between GPU and CPU")
        worst[feature.name] = error
    return worst


def import_cupy(*, stand_in: bool) -> Any:
    """CuPy; where it is missing and `stand_in`, the CPU stand-in (a smoke run)."""
    try:
        import cupy
    except ImportError:
        if not stand_in:
            raise SystemExit(
                "bench/gpu_kernel.py needs CuPy and an NVIDIA GPU: run `scripts/gpu-check` on a GPU machine "
                "(`scripts/gpu-check --dry-run` or `--smoke` rehearse it here with a CPU stand-in)"
            ) from None
    else:
        return cupy
    print(f"CuPy is not installed: smoke run with the CPU stand-in ({STAND_IN.relative_to(ROOT)})", file=sys.stderr)
    sys.path.insert(0, str(STAND_IN))
    import cupy

    return cupy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--repeat", type=int, default=3, help="CuPy runs per view (median reported).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_kernel.json")
    args = _smoke.parse_arguments(
        parser,
        lambda folder: {"events": 20_000, "users": 200, "days": 3, "repeat": 1, "out": folder / "gpu_kernel.json"},
    )
    cupy = import_cupy(stand_in=args.smoke)

    device = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    device = device.decode() if isinstance(device, bytes) else str(device)
    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])
    began = time.perf_counter()
    config = DemoConfig(events=args.events, users=args.users, days=args.days, chunk_rows=1_000_000)
    frame = pa.concat_tables(generate(config)).to_pandas()
    print(f"{args.events:,} demo events generated in {time.perf_counter() - began:.1f} s on {device}", file=sys.stderr)

    results: dict[str, dict[str, Any]] = {}
    for view in plan.views:
        began = time.perf_counter()
        expected = changelog_kernel(view, frame)
        cpu_s = time.perf_counter() - began
        changelog_kernel(view, frame.head(10_000), xp=cupy)  # compile CuPy's kernels once
        cupy.cuda.Device().synchronize()
        runs = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            got = changelog_kernel(view, frame, xp=cupy)
            cupy.cuda.Device().synchronize()
            runs.append(time.perf_counter() - began)
        worst = differences(view, expected, got)
        gpu_s = statistics.median(runs)
        results[view.name] = {
            "rows": expected.num_rows,
            "features": len(view.features),
            "numpy_s": cpu_s,
            "cupy_s": gpu_s,
            "cupy_runs_s": runs,
            "speedup": cpu_s / gpu_s,
            "max_relative_difference": max(worst.values(), default=0.0),
            "differences": worst,
        }

    lines = [("view", "rows", "numpy s (CPU)", "cupy s (GPU)", "speed-up", "max rel. diff")]
    for name, result in results.items():
        lines.append(
            (
                name,
                f"{result['rows']:,}",
                f"{result['numpy_s']:.2f}",
                f"{result['cupy_s']:.2f}",
                f"{result['speedup']:.1f}x",
                f"{result['max_relative_difference']:.1e}",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    print(f"\nGPU kernel benchmark: {args.events:,} events, {args.users:,} users, {args.days} days, {device}")
    for row in lines:
        cells = zip(row, widths, strict=True)
        print("  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(cells)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "events": args.events,
                "users": args.users,
                "days": args.days,
                "device": device,
                "cpus": os.cpu_count(),
                "versions": {"numpy": np.__version__, "cupy": cupy.__version__, "pyarrow": pa.__version__},
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
