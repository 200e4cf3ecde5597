"""Training export benchmark: point-in-time joins of 1M and 10M label rows against the
changelog of 10M backfilled demo events (user_spend, 20 features), against a raw
hand-written DuckDB ASOF JOIN over the same Delta changelog files, in the same run.

Both write Parquet. Each run is its own process, so peak RSS is its own. Uses the data
`bench/batch.py` prepared and backfilled (bench/data/batch); prepares it if missing.
Prints a table and writes bench/results/export.json.

    python bench/export.py                 # labels: 1M and 10M
    python bench/export.py --labels 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "batch"
RESULTS = ROOT / "bench" / "results"


sys.path.insert(0, str(ROOT / "bench"))
from _harness import child as _child  # noqa: E402
from _harness import own_peak_mb  # noqa: E402


def child(args: list[str]) -> dict[str, float]:
    return _child(__file__, args)


def _plan():  # type: ignore[no-untyped-def]
    from featurestore.registry import FileRegistry

    plan = FileRegistry(DATA / "registry").current()
    assert plan is not None
    return plan


def part_labels(count: int) -> dict[str, float]:
    """Labels: random users (including a few without history) at random times over the
    data's span, plus a label column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featurestore.stores.offline import DeltaOfflineStore

    plan = _plan()
    first, last = DeltaOfflineStore(DATA / "offline").event_time_range(plan.source("transactions"))  # type: ignore[misc]
    rng = np.random.default_rng(count)
    times = rng.integers(first, last + 86_400_000_000, count)
    table = pa.table(
        {
            "user_id": pa.array(rng.integers(1, 100_500, count), pa.int64()),
            "timestamp": pa.array(times, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "label": pa.array(rng.random(count) < 0.05),
        }
    )
    pq.write_table(table, DATA / f"labels_{count}.parquet")
    return {"rows": count}


def part_tenx(count: int) -> dict[str, float]:
    from featurestore.stores.offline import DeltaOfflineStore
    from training import export_training_set

    plan = _plan()
    began = time.perf_counter()
    _, summary = export_training_set(
        plan,
        DeltaOfflineStore(DATA / "offline"),
        DATA / f"labels_{count}.parquet",
        ["user_spend:*"],
        out=DATA / f"train_tenx_{count}.parquet",
    )
    assert summary.rows_out == count
    return {"seconds": time.perf_counter() - began, "rows": summary.rows_out, "peak_rss_mb": own_peak_mb()}


def part_duckdb(count: int) -> dict[str, float]:
    import duckdb
    from deltalake import DeltaTable

    from featurestore.stores.offline import DeltaOfflineStore

    plan = _plan()
    view = plan.view("user_spend")
    files = DeltaTable(str(DeltaOfflineStore(DATA / "offline").changelog_path(view))).file_uris()
    connection = duckdb.connect()
    began = time.perf_counter()
    listing = ", ".join(f"'{f}'" for f in files)
    connection.execute(
        f"""
        COPY (
          SELECT l.*, c.* EXCLUDE (user_id)
          FROM read_parquet('{DATA / f"labels_{count}.parquet"}') l
          ASOF LEFT JOIN read_parquet([{listing}]) c
            ON l.user_id = c.user_id AND l.timestamp >= c.as_of
        ) TO '{DATA / f"train_duckdb_{count}.parquet"}' (FORMAT parquet, COMPRESSION zstd)
        """
    )
    rows = connection.execute(f"SELECT count(*) FROM '{DATA / f'train_duckdb_{count}.parquet'}'").fetchone()[0]
    return {"seconds": time.perf_counter() - began, "rows": rows, "peak_rss_mb": own_peak_mb()}


PARTS = {"labels": part_labels, "tenx": part_tenx, "duckdb": part_duckdb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, action="append", help="Label rows (repeatable); default 1M and 10M.")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = args.labels or [1_000_000, 10_000_000]
    if args.part:
        print(json.dumps(PARTS[args.part](sizes[0])))
        return
    if not (DATA / "registry").exists():
        print("no backfilled data in bench/data/batch: running bench/batch.py --skip-baselines first", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "bench" / "batch.py"), "--skip-baselines"], check=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for size in sizes:
        print(f"labels: {size:,} ...", file=sys.stderr)
        child(["--part", "labels", "--labels", str(size)])
        results[str(size)] = {
            "tenx": child(["--part", "tenx", "--labels", str(size)]),
            "duckdb": child(["--part", "duckdb", "--labels", str(size)]),
        }
    print("\nexport benchmark: user_spend (20 features) over 10M backfilled events")
    print(f"{'labels':>12}  {'part':<7}{'seconds':>9}{'rows/s':>13}{'peak RSS MB':>13}{'vs duckdb':>11}")
    targets = {}
    for size, parts in results.items():
        for name, result in parts.items():
            ratio = result["seconds"] / parts["duckdb"]["seconds"]
            print(
                f"{int(size):>12,}  {name:<7}{result['seconds']:>9.1f}{int(size) / result['seconds']:>13,.0f}"
                f"{result['peak_rss_mb']:>13,.0f}{ratio:>10.2f}x"
            )
        if size == "1000000":
            targets["1M_within_1.5x_duckdb"] = parts["tenx"]["seconds"] <= 1.5 * parts["duckdb"]["seconds"]
            targets["1M_peak_rss_le_2gib"] = parts["tenx"]["peak_rss_mb"] <= 2048
        if size == "10000000":
            targets["10M_peak_rss_le_4gib"] = parts["tenx"]["peak_rss_mb"] <= 4096
    print("targets: " + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in targets.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "export.json"
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "results": results, "targets": targets}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
