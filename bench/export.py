"""Training export benchmark: point-in-time joins of 1M and 10M label rows against the
changelog of 10M backfilled demo events (user_spend, 20 features), against a raw
hand-written DuckDB ASOF JOIN over the same Delta changelog files, in the same run.

Both write Parquet. Each run is its own process, so peak RSS is its own. Uses the data
`bench/batch.py` prepared and backfilled (bench/data/batch, or --data); prepares it if
missing. Labels draw users from those of the events, plus 500 ids without history.
Prints a table and writes bench/results/export.json (or --out).

    python bench/export.py                 # labels: 1M and 10M
    python bench/export.py --labels 1000000
    python bench/export.py --smoke         # seconds; data and JSON in a temp folder (CI)
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
import _smoke  # noqa: E402
from _harness import child as _child  # noqa: E402
from _harness import own_peak_mb  # noqa: E402


def child(args: list[str]) -> dict[str, float]:
    return _child(__file__, args)


def _plan(data: Path):  # type: ignore[no-untyped-def]
    from featurestore.registry import FileRegistry

    plan = FileRegistry(data / "registry").current()
    assert plan is not None
    return plan


def part_labels(data: Path, count: int) -> dict[str, float]:
    """Labels: random users (including 500 ids without history) at random times over the
    data's span, plus a label column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from featurestore.stores.offline import DeltaOfflineStore

    plan = _plan(data)
    first, last = DeltaOfflineStore(data / "offline").event_time_range(plan.source("transactions"))  # type: ignore[misc]
    users = pc.max(pq.read_table(data / "transactions.parquet", columns=["user_id"]).column("user_id")).as_py()
    rng = np.random.default_rng(count)
    times = rng.integers(first, last + 86_400_000_000, count)
    table = pa.table(
        {
            "user_id": pa.array(rng.integers(1, users + 500, count), pa.int64()),
            "timestamp": pa.array(times, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "label": pa.array(rng.random(count) < 0.05),
        }
    )
    pq.write_table(table, data / f"labels_{count}.parquet")
    return {"rows": count}


def part_tenx(data: Path, count: int) -> dict[str, float]:
    from featurestore.stores.offline import DeltaOfflineStore
    from training import export_training_set

    plan = _plan(data)
    began = time.perf_counter()
    _, summary = export_training_set(
        plan,
        DeltaOfflineStore(data / "offline"),
        data / f"labels_{count}.parquet",
        ["user_spend:*"],
        out=data / f"train_tenx_{count}.parquet",
    )
    assert summary.rows_out == count
    return {"seconds": time.perf_counter() - began, "rows": summary.rows_out, "peak_rss_mb": own_peak_mb()}


def part_duckdb(data: Path, count: int) -> dict[str, float]:
    import duckdb
    from deltalake import DeltaTable

    from featurestore.stores.offline import DeltaOfflineStore

    plan = _plan(data)
    view = plan.view("user_spend")
    files = DeltaTable(str(DeltaOfflineStore(data / "offline").changelog_path(view))).file_uris()
    connection = duckdb.connect()
    began = time.perf_counter()
    listing = ", ".join(f"'{f}'" for f in files)
    connection.execute(
        f"""
        COPY (
          SELECT l.*, c.* EXCLUDE (user_id)
          FROM read_parquet('{data / f"labels_{count}.parquet"}') l
          ASOF LEFT JOIN read_parquet([{listing}]) c
            ON l.user_id = c.user_id AND l.timestamp >= c.as_of
        ) TO '{data / f"train_duckdb_{count}.parquet"}' (FORMAT parquet, COMPRESSION zstd)
        """
    )
    rows = connection.execute(f"SELECT count(*) FROM '{data / f'train_duckdb_{count}.parquet'}'").fetchone()[0]
    return {"seconds": time.perf_counter() - began, "rows": rows, "peak_rss_mb": own_peak_mb()}


PARTS = {"labels": part_labels, "tenx": part_tenx, "duckdb": part_duckdb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, action="append", help="Label rows (repeatable); default 1M and 10M.")
    parser.add_argument("--data", type=Path, default=DATA, help="The folder bench/batch.py prepared and backfilled.")
    parser.add_argument("--out", type=Path, default=RESULTS / "export.json", help="Results JSON file.")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    args = _smoke.parse_arguments(
        parser, lambda folder: {"labels": [2_000], "data": folder / "batch", "out": folder / "export.json"}
    )
    sizes = args.labels or [1_000_000, 10_000_000]
    data = args.data
    if args.part:
        print(json.dumps(PARTS[args.part](data, sizes[0])))
        return
    if not (data / "registry").exists():
        print(f"no backfilled data in {data}: running bench/batch.py --skip-baselines first", file=sys.stderr)
        # Its JSON goes beside the data: a partial run must not replace bench/results/batch.json.
        prepare = ["--skip-baselines", "--data", str(data), "--out", str(data / "batch.json")]
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "batch.py"), *prepare, *(["--smoke"] if args.smoke else [])],
            check=True,
        )
    import pyarrow.parquet as pq

    events = pq.ParquetFile(data / "transactions.parquet").metadata.num_rows
    results: dict[str, dict[str, dict[str, float]]] = {}
    for size in sizes:
        print(f"labels: {size:,} ...", file=sys.stderr)
        common = ["--labels", str(size), "--data", str(data)]
        child(["--part", "labels", *common])
        results[str(size)] = {
            "tenx": child(["--part", "tenx", *common]),
            "duckdb": child(["--part", "duckdb", *common]),
        }
    print(f"\nexport benchmark: user_spend (20 features) over {events:,} backfilled events")
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": {"cpus": os.cpu_count()}, "results": results, "targets": targets}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
