"""`tenx loadtest --pipelines`: the batch backfill and the stream job at 1x and `scale`x events.

For each size the demo data is generated and ingested (not timed), then the Dask
backfill and the Bytewax stream job each run in a fresh process of their own (spawned,
so the peak memory is that run's, not the caller's) over the same events:

    work/
      repo/        the template feature repo (`tenx init`), compiled once
      1x/          events.parquet (ingested into offline/), events.jsonl (replayed by
                   the stream job), online.sqlite (embedded store), stream/ (dead letters)
      10x/         the same at `scale` times the events

Each run reports wall seconds, events, µs per event and peak resident memory (MiB);
the ratio of the `scale`x time to the 1x time says whether cost grows linearly.
A run that does not account for every event (the backfill read fewer, the stream job
read fewer, sent some to dead letters or late, or left an entity without an online
value) is an error, never a fast figure.
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from featurestore.errors import TerminalError

Growth = Literal["sub-linear", "linear", "super-linear"]
T = TypeVar("T")

# A time ratio within ±15% of the scale is linear: two runs of the same size on a shared
# 2-core machine differ by up to ~10%, so a tighter band would call noise a trend.
LINEAR_TOLERANCE = 0.15
# Below this the fixed costs (a Delta commit, a Bytewax worker, a SQLite transaction)
# dominate and the per-event figures say nothing about the engines.
MIN_EVENTS = 1_000
# 1x, as many as `tenx quickstart` makes; with scale 10 about 3 minutes on 2 cores.
DEFAULT_EVENTS = 200_000
# Sized as `tenx quickstart` sizes its demo data (200k events, 2,000 users, 14 days):
# a bigger size is more users, each as active as before, over the same two weeks, so the
# online store and the stream state grow with the events as a growing business's would.
EVENTS_PER_USER = 100
DAYS = 14
MARKER = ".tenx-loadtest-pipelines"  # the folder is ours: a re-run may clear it


def growth(ratio: float, scale: float) -> Growth:
    """How cost grew when the input grew `scale` times and the cost `ratio` times:
    within ±LINEAR_TOLERANCE of `scale` (edges included) is linear.

    >>> growth(10.0, 10), growth(8.5, 10), growth(8.4, 10), growth(11.6, 10)
    ('linear', 'linear', 'sub-linear', 'super-linear')
    """
    if not (math.isfinite(scale) and scale > 1):
        raise ValueError(f"growth: scale must be a finite number above 1, got {scale}")
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"growth: ratio must be a finite number above 0, got {ratio}")
    share = ratio / scale
    low, high = 1 - LINEAR_TOLERANCE, 1 + LINEAR_TOLERANCE
    # isclose: an edge stays linear whatever the rounding of ratio / scale.
    if share < low and not math.isclose(share, low):
        return "sub-linear"
    if share > high and not math.isclose(share, high):
        return "super-linear"
    return "linear"


def run_pipelines(
    work: Path,
    *,
    events: int,
    scale: int = 10,
    redis_url: str | None = None,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the batch backfill and the stream job at `events` and at `scale * events`
    demo events in `work` (a new or empty folder, or one this function made before; its
    contents are replaced) and return the report's `pipelines` block:

        {"scale": 10,
         "batch":  {"1x": {"events", "seconds", "us_per_event", "peak_mib"}, "10x": {...},
                    "growth": "linear", "time_ratio": 9.6, "memory_ratio": 2.1},
         "stream": {...the same...}}

    The stream job writes to Redis at `redis_url` (under a prefix of this run, deleted
    afterwards) or, without one, to an embedded SQLite store in `work`. Measured on 2
    cores (embedded store): 200k events then 2M take about 3 minutes in all, most of it
    the stream job at 2M; the batch run at 2M peaks at about 1.6 GiB.
    """
    if isinstance(events, bool) or not isinstance(events, int) or events < MIN_EVENTS:
        raise ValueError(
            f"events={events!r}: too few to time (fixed start-up costs would dominate); "
            f"pass events={MIN_EVENTS} or more (default {DEFAULT_EVENTS})"
        )
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise ValueError(f"scale={scale!r}: compares a size with itself; pass scale=2 or more (default 10)")
    say = progress or (lambda _: None)
    _prepare_work(work)
    plan_json = _compile_plan(work / "repo")
    # The data ends a day ago: the stream job turns away events from the future, and
    # ingest refuses them.
    start = (datetime.now(UTC) - timedelta(days=DAYS + 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    prefix = f"tenx:loadtest-{uuid.uuid4().hex[:8]}"
    results: dict[str, dict[str, dict[str, float | int]]] = {"batch": {}, "stream": {}}
    for multiple in (1, scale):
        label = f"{multiple}x"
        count = events * multiple
        folder = work / label
        users = max(10, count // EVENTS_PER_USER)
        say(f"pipelines {label}: generating and ingesting {count:,} demo events ({users:,} users, {DAYS} days)")
        written = _in_fresh_process(f"{label} data", _prepare, folder, plan_json, count, users, start, seed)
        say(f"pipelines {label}: batch backfill (Dask, pandas) of {written:,} events")
        results["batch"][label] = _in_fresh_process(f"{label} batch", _batch_run, folder, plan_json, written)
        say(f"pipelines {label}: {_line(results['batch'][label])}")
        where = f"Redis under {prefix}:{label}" if redis_url else "the embedded store"
        say(f"pipelines {label}: stream job (Bytewax, file replay) of {written:,} events into {where}")
        results["stream"][label] = _in_fresh_process(
            f"{label} stream", _stream_run, folder, plan_json, written, redis_url, f"{prefix}:{label}"
        )
        say(f"pipelines {label}: {_line(results['stream'][label])}")
    return {"scale": scale, **{kind: _compare(steps, scale) for kind, steps in results.items()}}


def _line(figures: dict[str, float | int]) -> str:
    return (
        f"{figures['events']:,} events in {figures['seconds']:.1f} s, "
        f"{figures['us_per_event']:.1f} µs per event, peak {figures['peak_mib']:.0f} MiB"
    )


def _compare(steps: dict[str, dict[str, float | int]], scale: int) -> dict[str, Any]:
    """The two sizes side by side with the ratios. Growth is judged on time: peak memory
    starts from the interpreter and libraries (150-300 MiB at any size), so its ratio is
    reported but would call nearly everything sub-linear."""
    small, large = steps["1x"], steps[f"{scale}x"]
    time_ratio = large["seconds"] / small["seconds"]
    return {
        "1x": small,
        f"{scale}x": large,
        "growth": growth(time_ratio, scale),
        "time_ratio": round(time_ratio, 3),
        "memory_ratio": round(large["peak_mib"] / small["peak_mib"], 3),
    }


def _prepare_work(work: Path) -> None:
    """`work` new or empty (marked as ours), or ours from a previous run (cleared)."""
    if work.exists() and not work.is_dir():
        raise ValueError(f"{work} is a file; pass a new or empty folder")
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise ValueError(
                f"{work} is not empty and was not made by `tenx loadtest --pipelines`: its contents would be "
                "replaced; pass a new or empty folder"
            )
        for child in work.iterdir():
            if child.name != MARKER:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("Made by `tenx loadtest --pipelines`; running it again replaces everything here.\n")


def _compile_plan(repo: Path) -> str:
    """The template feature repo's plan (what `tenx quickstart` runs), as JSON for the
    runs: engines load a compiled plan, never the user's modules."""
    from featurestore.plan import compile_repo
    from tenx.scaffold import init_repo

    init_repo(repo, project="loadtest")
    return compile_repo(repo, project="loadtest", modules=["features"]).to_json()


def _in_fresh_process(what: str, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a new interpreter (spawn: nothing inherited from this
    process, so its peak memory is its own); its exception is re-raised here."""
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(function, *args).result()
    except BrokenProcessPool as error:
        raise TerminalError(
            f"loadtest pipelines: the {what} run ended without a result (its process was killed, e.g. out of "
            "memory); pass fewer events"
        ) from error


def _own_peak_mib() -> float:
    """This process's peak resident memory, MiB. On Linux VmHWM, the high-water mark of
    the process's own address space since its exec: ru_maxrss would not do, as Linux
    carries it across exec, so a child spawned from a big parent starts at the parent's
    peak. Elsewhere ru_maxrss (kilobytes; bytes on macOS). Each run is all in this one
    process (Dask's local cluster runs threads, Bytewax's run_main one worker), so no
    child process's memory is left out; a Redis server's is not counted."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _figures(events: int, seconds: float) -> dict[str, float | int]:
    return {
        "events": events,
        "seconds": round(seconds, 6),
        "us_per_event": round(seconds / events * 1e6, 3),
        "peak_mib": round(_own_peak_mib(), 1),
    }


# -- what runs in the fresh processes -----------------------------------------------------


def _prepare(folder: Path, plan_json: str, events: int, users: int, start: datetime, seed: int) -> int:
    """Demo events as Parquet (ingested into the Delta events table) and the same events
    as JSON lines (the stream job's input, as Kafka would carry them). Returns the count."""
    from featurestore.plan.model import Plan
    from featurestore.stores.offline import DeltaOfflineStore
    from pipelines.ingest import ingest_file
    from tenx.demo_data import DemoConfig, write_demo_data

    plan = Plan.from_json(plan_json)
    config = DemoConfig(events=events, users=users, merchants=max(10, users // 10), days=DAYS, start=start, seed=seed)
    parquet = write_demo_data(folder / "events.parquet", config)
    jsonl = write_demo_data(folder / "events.jsonl", config)
    if not parquet.events == jsonl.events == events:
        raise TerminalError(
            f"loadtest pipelines: asked for {events:,} demo events, got {parquet.events:,} in Parquet and "
            f"{jsonl.events:,} in JSON lines"
        )
    source = plan.source("transactions")
    ingested = ingest_file(DeltaOfflineStore(folder / "offline"), source, parquet.path)
    if ingested.ingested != events or ingested.rejected:
        raise TerminalError(
            f"loadtest pipelines: ingest of {parquet.path} stored {ingested.ingested:,} of {events:,} events "
            f"({ingested.rejected:,} rejected: {ingested.reasons}); expected every demo event"
        )
    return events


def _batch_run(folder: Path, plan_json: str, events: int) -> dict[str, float | int]:
    """`tenx backfill` of every offline view over all the events (Dask, pandas
    partitions, a local cluster with a thread per core). Timed: the backfill call, not
    the imports or the cluster's start, which cost the same at any size."""
    from featurestore.plan.model import Plan
    from featurestore.stores.offline import DeltaOfflineStore
    from pipelines.batch.engine import backfill, dask_client

    plan = Plan.from_json(plan_json)
    store = DeltaOfflineStore(folder / "offline")
    with dask_client(None) as client:
        began = time.perf_counter()
        done = backfill(plan, store, client=client)
        seconds = time.perf_counter() - began
    short = [f"{s.view} read {s.events_read:,}" for s in done if s.events_read != events]
    if short or not done:
        raise TerminalError(
            f"loadtest pipelines: the backfill at {folder.name} did not read every event "
            f"({'; '.join(short) or 'no view ran'}; expected {events:,} each)"
        )
    return _figures(events, seconds)


def _stream_run(
    folder: Path, plan_json: str, events: int, redis_url: str | None, prefix: str
) -> dict[str, float | int]:
    """The stream job as `tenx stream --from-file` builds it (every online view, 1
    worker, 4 shards, latest values only), to the end of the file. Timed: the run, not
    the imports. Then checked: every event read, none dead or late, and an online value
    for every entity the events name."""
    from bytewax import operators as op
    from bytewax import testing
    from prometheus_client import REGISTRY

    from featurestore.plan.model import Plan
    from featurestore.stores.online import open_online_store
    from pipelines.stream.dataflow import (
        JsonLinesSink,
        JsonLinesSource,
        OnlineSink,
        Outputs,
        StoreFactory,
        build_dataflow,
    )
    from pipelines.stream.metrics import DeadLetterReason
    from pipelines.stream.state import Emit

    plan = Plan.from_json(plan_json)
    replay = folder / "events.jsonl"
    outputs = folder / "stream"
    sqlite = folder / "online.sqlite"
    views = [v for v in plan.views if v.online]
    flow = build_dataflow(
        plan,
        lambda flow, source: op.input(f"file_{source.name}", flow, JsonLinesSource(replay)),
        Outputs(
            OnlineSink(StoreFactory(redis_url, sqlite, prefix=prefix), views),
            JsonLinesSink(outputs / "dead_letters.jsonl"),
            JsonLinesSink(outputs / "late.jsonl"),
        ),
        drain=False,
        emit=Emit.LATEST,
    )
    run_main: Callable[[Any], None] = testing.run_main  # Bytewax's functions carry no annotations
    began = time.perf_counter()
    run_main(flow)
    seconds = time.perf_counter() - began
    figures = _figures(events, seconds)  # before the checks below read the events back

    def counted(name: str, **labels: str) -> int:
        return int(REGISTRY.get_sample_value(name, labels) or 0)

    sources = {v.source.name for v in views}
    read = sum(counted("tenx_stream_events_in_total", source=s) for s in sources)
    dead = sum(
        counted("tenx_stream_dead_letters_total", source=s, reason=r.value) for s in sources for r in DeadLetterReason
    )
    late = sum(counted("tenx_stream_late_total", view=v.name) for v in views)
    store = open_online_store(redis_url=redis_url, sqlite_path=sqlite, prefix=prefix)
    try:
        missing = _entities_without_value(store, views, folder / "events.parquet")
    finally:
        if redis_url:
            _delete_keys(store, prefix)
        store.close()
    if read != events * len(sources) or dead or late or missing:
        raise TerminalError(
            f"loadtest pipelines: the stream job at {folder.name} did not apply every event: read {read:,} of "
            f"{events * len(sources):,}, {dead:,} dead letters ({outputs}), {late:,} late, "
            f"entities without an online value: {', '.join(missing) or 'none'}; expected every event applied"
        )
    return figures


def _entities_without_value(store: Any, views: list[Any], events_path: Path) -> list[str]:
    """Per view, `name: n of m` when n of the m entities its (filtered) events name have
    no online value."""
    import pyarrow.parquet as pq

    from featurestore.transforms import prepare_events

    frame = pq.read_table(events_path).to_pandas()
    missing = []
    for view in views:
        keys = prepare_events(view, frame)[view.entity_key].drop_duplicates().tolist()
        absent = sum(value is None for value in store.read(view, keys))
        if absent:
            missing.append(f"{view.name}: {absent:,} of {len(keys):,}")
    return missing


def _delete_keys(store: Any, prefix: str) -> None:
    """This run's keys out of the caller's Redis (the prefix is the run's own)."""
    client = store.client
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


__all__ = ["DEFAULT_EVENTS", "LINEAR_TOLERANCE", "MIN_EVENTS", "growth", "run_pipelines"]
