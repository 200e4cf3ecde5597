"""Ingest benchmark: `tenx ingest` of 10M demo events into a fresh Delta events table, a
new day appended to it, and the same 10M refused as already there, each beside a raw
baseline measured in the same run on the same data:

- ingest (validate every row, stage, one Delta commit with log order `_seq`) vs raw:
  pyarrow reads the file and `write_deltalake` writes it partitioned by day, no
  validation;
- append: a new day of events (new ids) landing on the table's last day, so the
  duplicate check reads that day's files (the common case: appending newer events);
- re-ingest refused (`--force` of the same file: every event is already there; the time
  until the error) vs raw: one DuckDB semi-join of the file against the table's files on
  every field, the comparison the check makes.

Uses the events `bench/batch.py` generated (bench/data/batch/transactions.parquet, or
--events-file; prepared if missing); writes its tables under bench/data/ingest (or
--data). Each part runs in its own process (peak RSS is its own). Prints a table and
writes bench/results/ingest.json (or --out).

    python bench/ingest.py
    python bench/ingest.py --smoke         # seconds; data and JSON in a temp folder (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "bench" / "data" / "batch" / "transactions.parquet"
DATA = ROOT / "bench" / "data" / "ingest"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402
from _harness import child, own_peak_mb  # noqa: E402


def _source() -> Any:
    from featurestore.plan import compile_repo

    plan = compile_repo(ROOT / "tenx" / "templates" / "repo", project="bench", modules=["features"])
    return plan.source("transactions")


def _store(data: Path) -> Any:
    from featurestore.stores.offline import DeltaOfflineStore

    return DeltaOfflineStore(data / "offline")


def part_ingest(events: Path, data: Path) -> dict[str, Any]:
    from pipelines.ingest import ingest_file

    shutil.rmtree(data / "offline", ignore_errors=True)
    began = time.perf_counter()
    summary = ingest_file(_store(data), _source(), events)
    return {"seconds": time.perf_counter() - began, "events": summary.ingested, "peak_rss_mb": own_peak_mb()}


def part_raw(events: Path, data: Path) -> dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    target = data / "raw"
    shutil.rmtree(target, ignore_errors=True)
    began = time.perf_counter()
    table = pq.read_table(events)
    table = table.append_column("_date", pc.cast(table.column("event_time"), "date32"))
    write_deltalake(str(target), table, partition_by=["_date"])
    return {"seconds": time.perf_counter() - began, "events": table.num_rows, "peak_rss_mb": own_peak_mb()}


def part_append(events: Path, data: Path) -> dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.ingest import ingest_file
    from schemas.timestamps import from_micros
    from tenx.demo_data import DemoConfig, write_demo_data

    last = pc.max(pc.cast(pq.read_table(events, columns=["event_time"]).column("event_time"), "int64")).as_py()
    day = from_micros(last).replace(hour=0, minute=0, second=0, microsecond=0)
    count = pq.ParquetFile(events).metadata.num_rows // 30
    path = data / "new-day.parquet"
    write_demo_data(path, DemoConfig(events=count, users=100_000, days=1, start=day, seed=2026))
    began = time.perf_counter()
    summary = ingest_file(_store(data), _source(), path)
    return {"seconds": time.perf_counter() - began, "events": summary.ingested, "peak_rss_mb": own_peak_mb()}


def part_reingest(events: Path, data: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from pipelines.ingest import DuplicateEventsError, ingest_file

    began = time.perf_counter()
    try:
        ingest_file(_store(data), _source(), events, force=True)
    except DuplicateEventsError:
        refused = True
    else:
        refused = False
    seconds = time.perf_counter() - began
    rows = pq.ParquetFile(events).metadata.num_rows
    return {"seconds": seconds, "events": rows, "refused": refused, "peak_rss_mb": own_peak_mb()}


def part_duckdb_semi(events: Path, data: Path) -> dict[str, Any]:
    import duckdb

    source = _source()
    files = _store(data).event_files(source, None, None)
    names = source.schema.names
    same = " AND ".join(f's."{n}" IS NOT DISTINCT FROM e."{n}"' for n in names)
    columns = ", ".join(f'"{n}"' for n in names)
    connection = duckdb.connect()
    connection.execute("SET enable_progress_bar = false")
    began = time.perf_counter()
    found = connection.execute(
        f"SELECT count(*) FROM read_parquet(?) s SEMI JOIN (SELECT {columns} FROM read_parquet(?)) e ON {same}",
        [str(events), files],
    ).fetchone()
    assert found is not None
    return {"seconds": time.perf_counter() - began, "events": int(found[0]), "peak_rss_mb": own_peak_mb()}


PARTS = {
    "ingest": part_ingest,
    "raw": part_raw,
    "append": part_append,
    "reingest": part_reingest,
    "duckdb_semi": part_duckdb_semi,
}
BASELINE = {"ingest": "raw", "reingest": "duckdb_semi"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--events-file", type=Path, default=EVENTS, help="Demo events (bench/batch.py makes them where missing)."
    )
    parser.add_argument("--data", type=Path, default=DATA, help="Folder of the tables this benchmark writes.")
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest.json", help="Results JSON file.")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    args = _smoke.parse_arguments(
        parser,
        lambda folder: {
            "events_file": folder / "batch" / "transactions.parquet",
            "data": folder / "ingest",
            "out": folder / "ingest.json",
        },
    )
    events, data = args.events_file, args.data
    if args.part:
        print(json.dumps(PARTS[args.part](events, data)))
        return
    if not events.exists():
        print(f"no demo events at {events}: running bench/batch.py --skip-baselines first", file=sys.stderr)
        # Its JSON goes beside the events: a partial run must not replace bench/results/batch.json.
        prepare = ["--skip-baselines", "--data", str(events.parent), "--out", str(events.parent / "batch.json")]
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "batch.py"), *prepare, *(["--smoke"] if args.smoke else [])],
            check=True,
        )
        if not events.exists():
            raise SystemExit(f"bench/batch.py ran but left no events at {events}")
    data.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name in PARTS:  # in order: append and reingest use the table ingest made
        print(f"running {name} ...", file=sys.stderr)
        results[name] = child(__file__, ["--part", name, "--events-file", str(events), "--data", str(data)])
    if not results["reingest"]["refused"]:
        raise SystemExit("re-ingesting the same events was not refused")
    print("\ningest benchmark: demo events, Delta events table (validation, log order, duplicate check)")
    print(f"{'part':<12}{'events':>13}{'seconds':>9}{'events/s':>13}{'peak RSS MB':>13}{'vs raw':>9}")
    for name, result in results.items():
        base = BASELINE.get(name)
        ratio = f"{result['seconds'] / results[base]['seconds']:.2f}x" if base else "-"
        print(
            f"{name:<12}{result['events']:>13,}{result['seconds']:>9.1f}{result['events'] / result['seconds']:>13,.0f}"
            f"{result['peak_rss_mb']:>13,.0f}{ratio:>9}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
