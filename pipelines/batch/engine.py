"""The batch engine: Dask reads a source's Delta events, shuffles them by entity, runs
the changelog kernel on each partition and writes one view's changelog range to Delta.

Values at `start` are right because events from `start - longest window` on are read.
The whole range is replaced in one Delta commit, so a re-run replaces, never duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from featurestore.errors import TerminalError, TransientError
from featurestore.plan.model import Plan, ViewSpec
from featurestore.stores.offline import SEQUENCE, DeltaOfflineStore
from pipelines.batch.backends import Backend, array_module, to_frame
from pipelines.batch.kernel import changelog_kernel

Progress = Callable[[str, int, int], None]  # (view, partitions done, partitions total)


@dataclass(frozen=True)
class BackfillSummary:
    view: str
    version: str
    start: int
    end: int
    events_read: int
    rows_written: int
    partitions: int
    seconds: float
    backend: str


def default_range(view: ViewSpec, store: DeltaOfflineStore) -> tuple[int, int] | None:
    """Everything: from the first event to the expiry of the last one."""
    bounds = store.event_time_range(view.source)
    if bounds is None:
        return None
    first, last = bounds
    return first, last + view.longest_window + max(f.window.every for f in view.features) + 1


def _partition_changelog(
    frame: pd.DataFrame, view: ViewSpec, start: int, end: int, backend: str
) -> pd.DataFrame:
    """Runs on a Dask worker: kernel over one partition, Arrow-backed pandas out."""
    chosen = Backend(backend)
    table = changelog_kernel(view, frame, start=start, end=end, xp=array_module(chosen))
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def _meta(view: ViewSpec) -> pd.DataFrame:
    return view.changelog_schema().empty_table().to_pandas(types_mapper=pd.ArrowDtype)


def backfill_view(
    view: ViewSpec,
    store: DeltaOfflineStore,
    client: Any,
    *,
    start: int | None = None,
    end: int | None = None,
    backend: Backend = Backend.PANDAS,
    partitions: int | None = None,
    progress: Progress | None = None,
) -> BackfillSummary:
    """Compute and write the changelog of `view` for as_of in [start, end)."""
    import dask.dataframe as dd
    from distributed import as_completed

    began = time.perf_counter()
    if start is None or end is None:
        everything = default_range(view, store)
        if everything is None:
            raise TerminalError(
                f"no events for source `{view.source.name}` at {store.events_path(view.source)}; "
                "run `tenx ingest` first"
            )
        start = everything[0] if start is None else start
        end = everything[1] if end is None else end
    if end <= start:
        raise TerminalError(f"empty range: --end must be after --start (got {start} .. {end} us)")
    read_from = start - view.longest_window - max(f.window.every for f in view.features)
    files = store.event_files(view.source, read_from, end)
    if not files:
        store.write_changelog(view, [], start=start, end=end)
        return BackfillSummary(view.name, view.version, start, end, 0, 0, 0, time.perf_counter() - began, backend.value)

    time_column = view.event_time
    columns = [*view.source.schema.names, SEQUENCE]
    lower = pd.Timestamp(read_from, unit="us", tz="UTC")
    upper = pd.Timestamp(end, unit="us", tz="UTC")
    events = dd.read_parquet(
        files,
        columns=columns,
        filters=[(time_column, ">=", lower), (time_column, "<", upper)],
        dataframe_backend="cudf" if backend is Backend.CUDF else "pandas",
    )
    count = partitions or max(2, min(256, events.npartitions))
    shuffled = events.shuffle(on=view.entity_key, npartitions=count)
    changelog = shuffled.map_partitions(
        _partition_changelog, view, start, end, backend.value, meta=_meta(view), align_dataframes=False
    )
    parts = changelog.to_delayed()
    futures = client.compute(parts)
    done = 0

    def results() -> Iterator[pa.Table]:
        nonlocal done
        for future in as_completed(futures):
            frame = future.result()
            future.release()
            done += 1
            if progress is not None:
                progress(view.name, done, len(parts))
            yield pa.Table.from_pandas(frame, preserve_index=False, schema=view.changelog_schema())

    rows = store.write_changelog(view, results(), start=start, end=end)
    events_read = store.count_events(view.source, read_from, end)
    return BackfillSummary(
        view.name, view.version, start, end, events_read, rows, len(parts), time.perf_counter() - began, backend.value
    )


def dask_client(scheduler: str | None, *, workers: int | None = None, timeout_s: float = 30.0) -> AbstractContextManager[Any]:
    """A client to `scheduler` (tcp://host:port), or to a new LocalCluster."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout=timeout_s)  # type: ignore[no-any-return]
        except OSError as error:
            raise TransientError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from error
    cluster = LocalCluster(
        n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=50
    )
    client = Client(cluster, timeout=timeout_s)

    class _Local(AbstractContextManager[Any]):
        def __enter__(self) -> Any:
            return client

        def __exit__(self, *exc: object) -> None:
            client.close()
            cluster.close()

    return _Local()


def backfill(
    plan: Plan,
    store: DeltaOfflineStore,
    *,
    views: list[str] | None = None,
    start: int | None = None,
    end: int | None = None,
    backend: Backend = Backend.PANDAS,
    scheduler: str | None = None,
    workers: int | None = None,
    partitions: int | None = None,
    progress: Progress | None = None,
    client: Any = None,
) -> list[BackfillSummary]:
    """Backfill every offline view of the plan (or those named) over [start, end)."""
    chosen = [plan.view(name) for name in views] if views else [v for v in plan.views if v.offline]
    if backend is Backend.CUDF:
        array_module(backend)  # fail early with the install hint
    context: AbstractContextManager[Any] = nullcontext(client) if client is not None else dask_client(scheduler, workers=workers)
    with context as active:
        return [
            backfill_view(
                view, store, active, start=start, end=end, backend=backend, partitions=partitions, progress=progress
            )
            for view in chosen
        ]


__all__ = ["Backend", "BackfillSummary", "backfill", "backfill_view", "dask_client", "default_range", "to_frame"]
