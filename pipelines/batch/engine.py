"""The batch engine: Dask reads a source's Delta events, shuffles them by entity, runs
the changelog kernel on each partition and writes one view's changelog range to Delta.

Values at `start` are right because events from `start - longest window` on are read.
The whole range is replaced in one Delta commit, so a re-run replaces, never duplicates.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa

from featurestore.errors import TerminalError, TransientError
from featurestore.plan.model import SEQUENCE, Plan, ViewSpec
from featurestore.stores.location import Location
from featurestore.stores.offline import DeltaOfflineStore
from featurestore.transforms import nullable_int, prepare_events
from pipelines.batch.backends import Backend, array_module, frame_module, to_frame
from pipelines.batch.kernel import changelog_kernel
from schemas.timestamps import from_micros

T = TypeVar("T")
Progress = Callable[[str, int, int], None]  # (view, partitions done, partitions total)

# Events per shuffled partition: the unit of kernel work and of memory (a partition's
# changelog is about 3x its events, times the features).
PARTITION_EVENTS = 400_000
# A shard holding more events than this (a hot entity) is computed in time slices.
SLICE_EVENTS = 2 * PARTITION_EVENTS


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
    return first, last + view.longest_window + view.coarsest_tile + 1


def everything_from(view: ViewSpec, store: DeltaOfflineStore, start: int) -> int:
    """The first event time of the view's source (or `start` when there is none)."""
    bounds = store.event_time_range(view.source)
    return start if bounds is None else min(start, bounds[0])


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
    scratch_dir: str | None = None,
) -> BackfillSummary:
    """Compute and write the changelog of `view` for as_of in [start, end)."""
    import dask.dataframe as dd

    began = time.perf_counter()
    store.check_events_table(view.source, appending=False)
    given = (start is not None, end is not None)
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
        raise TerminalError(_empty_range(view, start, end, given))
    # The changelog as it is now: the commit at the end is made against this version, so
    # another backfill committing the same days meanwhile makes this one fail, saying so.
    read_version = store.changelog_version(view)
    # Values as of `start` need the window before it; Latest features need all history.
    read_from = start - view.reach if view.reach is not None else everything_from(view, store, start)
    files = store.event_files(view.source, read_from, end)
    if not files:
        store.write_changelog(view, [], start=start, end=end)
        return BackfillSummary(view.name, view.version, start, end, 0, 0, 0, time.perf_counter() - began, backend.value)

    time_column = view.event_time
    columns = [*view.source.schema.names, SEQUENCE]
    lower = pd.Timestamp(read_from, unit="us", tz="UTC")
    upper = pd.Timestamp(end, unit="us", tz="UTC")
    events_read = store.count_events(view.source, read_from, end)
    count = partitions or max(2, -(-events_read // PARTITION_EVENTS))
    filters = [(time_column, ">=", lower), (time_column, "<", upper)]
    if store.location.is_local:
        # A partition per row group (about 1M events): stage 1 holds a few.
        # Int columns as pandas nullable ints in every partition (one meta for all): a
        # row group with a null would otherwise read as float64 and round past 2**53.
        events = dd.read_parquet(
            files,
            columns=columns,
            filters=filters,
            split_row_groups=True,
            arrow_to_pandas={"types_mapper": nullable_int},
        )
    else:
        # A partition per file, read on the worker through a client it makes from its
        # own environment: no credentials in the task graph (a pyarrow S3FileSystem
        # pickles its keys), and a worker on another host uses its own endpoint.
        from dask.delayed import delayed

        meta = store.events_schema(view.source).empty_table().select(columns).to_pandas(types_mapper=nullable_int)
        parts = [delayed(_read_events_file, pure=True)(store.location, f, columns, filters) for f in files]
        events = dd.from_delayed(parts, meta=meta, verify_meta=False)
    # read by pyarrow on either backend; a cuDF partition is made on its worker (`_write_buckets`)
    # Scratch lives beside a local store by default (a remote Dask cluster then shares it
    # with the client); for an object store it is local unless `scratch_dir` names a
    # shared folder or an s3:// prefix (workers on other hosts share only that).
    scratch_root = (
        Location.parse(scratch_dir, options=dict(store.location.options), name="--scratch-dir") if scratch_dir else None
    )
    if scratch_root is None or scratch_root.is_local:
        local_root = scratch_root.local_path() if scratch_root is not None else store.scratch_dir()
        local_root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_scratch(local_root)
        # Cleanup errors are ignored: after an interrupt, workers may still be writing
        # into the folder; a later backfill on this host removes it.
        with tempfile.TemporaryDirectory(
            prefix=f"shuffle-{view.name}-", dir=local_root, ignore_cleanup_errors=True
        ) as folder:
            (Path(folder) / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
            rows, shards = _shuffle_and_compute(
                client, events, view, store, Location.parse(folder), count, start, end, backend, progress, read_version
            )
    else:
        _remove_abandoned_remote_scratch(scratch_root)
        folder_location = scratch_root.join(f"shuffle-{view.name}-{uuid.uuid4().hex[:12]}")
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}
        with folder_location.filesystem().open_output_stream(folder_location.join(OWNER).path) as out:
            out.write(json.dumps(owner).encode())
        try:
            rows, shards = _shuffle_and_compute(
                client, events, view, store, folder_location, count, start, end, backend, progress, read_version
            )
        finally:
            with contextlib.suppress(OSError):
                folder_location.filesystem().delete_dir(folder_location.path)
    return BackfillSummary(
        view.name,
        view.version,
        start,
        end,
        events_read,
        rows,
        shards,
        time.perf_counter() - began,
        backend.value,
    )


def _read_events_file(location: Location, uri: str, columns: list[str], filters: list[Any]) -> pd.DataFrame:
    """Runs on a Dask worker: one events file of an object store, filtered by time."""
    import pyarrow.parquet as pq

    table = pq.read_table(location.file_path(uri), columns=columns, filters=filters, filesystem=location.filesystem())
    frame: pd.DataFrame = table.to_pandas(types_mapper=nullable_int)
    return frame


def _shuffle_and_compute(
    client: Any,
    events: Any,
    view: ViewSpec,
    store: DeltaOfflineStore,
    folder: Location,
    count: int,
    start: int,
    end: int,
    backend: Backend,
    progress: Progress | None,
    read_version: int,
) -> tuple[int, int]:
    """Stage 1: shuffle by entity through `folder`: each input partition, on a worker,
    hash-partitions its events and writes one Parquet file per bucket
    (`<bucket>/<input part>.parquet`). Memory holds a few input partitions, at any size.
    (Dask's p2p shuffle kept its buffers in the worker: 7.6 GB at 50M events.)
    Stage 2: per shard, the kernel and its Parquet files, on the workers, a few in
    flight; then one Delta commit of every file. Returns (rows written, shards)."""
    import pyarrow.fs as pafs

    _shuffle_to_buckets(client, events, view, count, folder, backend)
    listed = folder.filesystem().get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    shards = sorted(info.path for info in listed if info.type == pafs.FileType.Directory)
    rows = 0
    actions: list[Any] = []
    for shard_rows, shard_actions in _kernel_results(
        client, shards, folder, view, store, start, end, backend, progress
    ):
        rows += shard_rows
        actions.extend(shard_actions)
    store.commit_changelog(view, actions, start=start, end=end, read_version=read_version)
    return rows, len(shards)


OWNER = "owner.json"  # in a shuffle folder: the host and process of its backfill
ABANDONED_AFTER_S = 24 * 3600


def _remove_abandoned_scratch(root: Path, *, idle_s: float = ABANDONED_AFTER_S) -> None:
    """Shuffle folders left by an interrupted or killed backfill: made on this host (same
    name), by a process that is gone, and untouched for `idle_s` (a container with the
    same host name but its own process ids must not lose a live folder). Folders of
    other hosts on a shared store are left alone."""
    host = socket.gethostname()
    for folder in root.glob("shuffle-*"):
        try:
            owner = json.loads((folder / OWNER).read_text())
            newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
        except (OSError, ValueError):
            continue
        if owner.get("host") != host or owner.get("pid") == os.getpid() or time.time() - newest < idle_s:
            continue
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (PermissionError, KeyError, TypeError, ValueError):
            continue  # alive (another user's), or not an owner file of ours


REMOTE_ABANDONED_AFTER_S = 48 * 3600


def _remove_abandoned_remote_scratch(root: Location, *, idle_s: float = REMOTE_ABANDONED_AFTER_S) -> None:
    """Shuffle prefixes under an object-store scratch root left by interrupted or killed
    backfills: whose owner file says they were made more than `idle_s` ago (no process
    on another host can be asked whether it is alive, so age alone decides; a prefix
    without a readable owner file is left alone)."""
    import pyarrow.fs as pafs

    filesystem = root.filesystem()
    try:
        listed = filesystem.get_file_info(pafs.FileSelector(root.path, allow_not_found=True))
    except OSError:
        return
    for info in listed:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("shuffle-"):
            continue
        try:
            with filesystem.open_input_stream(f"{info.path}/{OWNER}") as stream:
                created = float(json.loads(stream.read())["created"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if time.time() - created > idle_s:
            with contextlib.suppress(OSError):
                filesystem.delete_dir(info.path)


def _empty_range(view: ViewSpec, start: int, end: int, given: tuple[bool, bool]) -> str:
    first, last = (from_micros(t).isoformat().replace("+00:00", "Z") for t in (start, end))
    if given == (True, True):
        return f"empty range: --end {last} must be after --start {first}"
    if given[0]:
        return (
            f"--start {first} is at or after the end of `{view.name}`'s data ({last}: its last event's "
            "latest window expiry); nothing to compute"
        )
    return f"--end {last} is at or before the start of `{view.name}`'s data ({first}: its first event)"


GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive integer keys


def bucket_ids(frame: Any, key: str, count: int, backend: Backend) -> Any:
    """The bucket (0 .. count-1) of every row's entity: integer keys by Fibonacci
    hashing, other keys by the frame library's own row hash."""
    xp = array_module(backend)
    column = frame[key]
    if str(column.dtype).lower().startswith(("int", "uint", "float")):
        # One key, one bucket, whatever a partition's column type: a nullable int key
        # reads as float64 in a row group with a null and as int64 elsewhere.
        whole = column.fillna(0).astype("int64")
        values = whole.to_numpy() if backend is Backend.PANDAS else whole.values
        hashed = values.astype(xp.uint64) * xp.uint64(GOLDEN)
    elif backend is Backend.PANDAS:
        hashed = pd.util.hash_pandas_object(column, index=False).to_numpy()
    else:
        hashed = column.hash_values(method="xxhash64").values.astype(xp.uint64)  # murmur3 is 32 bits
    return (hashed >> xp.uint64(32)) % xp.uint64(count)


def _write_buckets(frame: Any, view: ViewSpec, count: int, folder: Location, name: str, backend: str) -> int:
    """Runs on a Dask worker: one input partition's events, through the view's row
    transform and `where` (row-wise, so before the shuffle is the same as after it),
    cut to the columns the kernel reads, one file per bucket. Returns events read."""
    chosen = Backend(backend)
    read = len(frame)
    if read == 0:
        return 0
    if chosen is not Backend.PANDAS:
        # Dask reads the Delta files with pyarrow (its zoned-time filters are exact; cuDF's
        # reader drops the zone); the transform, hashing and writing run on the device.
        frame = to_frame(pa.Table.from_pandas(frame, preserve_index=False), chosen)
    key = view.entity_key
    frame = prepare_events(view, frame)
    frame = frame[list(dict.fromkeys([key, view.event_time, SEQUENCE, *view.input_columns]))]
    if len(frame) == 0:
        return read
    xp = array_module(chosen)
    ids = bucket_ids(frame, key, count, chosen)
    order = xp.argsort(ids, kind="stable")
    ordered = frame.take(order)
    bounds = xp.searchsorted(ids[order], xp.arange(count + 1, dtype=xp.uint64)).tolist()
    # Scratch files are read once: dictionary pages (pyarrow's default) cost 38% of the
    # write for these mostly unique numeric columns. (cuDF's writer keeps its defaults:
    # its option differs between releases.)
    options = {"use_dictionary": False} if chosen is Backend.PANDAS else {}
    filesystem = None if folder.is_local else folder.filesystem()
    for bucket in range(count):
        low, high = bounds[bucket], bounds[bucket + 1]
        if high <= low:
            continue
        target = folder.join(f"{bucket:05d}", f"{name}.parquet")
        if filesystem is None:
            Path(target.path).parent.mkdir(exist_ok=True)
            ordered.iloc[low:high].to_parquet(target.path, index=False, **options)
        else:  # through pyarrow's S3 client: a device frame goes to the host first
            import pyarrow.parquet as pq

            piece = ordered.iloc[low:high]
            table = (
                piece.to_arrow() if hasattr(piece, "to_arrow") else pa.Table.from_pandas(piece, preserve_index=False)
            )
            pq.write_table(table, target.path, filesystem=filesystem, use_dictionary=False)
    return read


def _shuffle_to_buckets(
    client: Any, events: Any, view: ViewSpec, count: int, folder: Location, backend: Backend
) -> None:
    from dask.delayed import delayed

    def submit(part: tuple[int, Any]) -> Any:
        index, frame = part
        task = delayed(_write_buckets, pure=False)(frame, view, count, folder, f"part-{index:05d}", backend.value)
        return client.compute(task)

    for _ in _bounded(client, enumerate(events.to_delayed()), submit):
        pass


def _bounded(client: Any, items: Iterable[T], start: Callable[[T], Any]) -> Iterator[Any]:
    """Results of `start(item)` futures as they complete, at most one more in flight than
    the cluster has threads: memory holds a few partitions, not the whole input."""
    from distributed import as_completed

    pending = iter(items)
    in_flight = max(2, sum(client.nthreads().values()) + 1)
    queue = as_completed([start(item) for item in itertools.islice(pending, in_flight)])
    for future in queue:
        result = future.result()
        future.release()
        following = next(pending, None)
        if following is not None:
            queue.add(start(following))
        yield result


def _shard_dataset(path: str, filesystem: Any) -> Any:
    """A shard's shuffle files as one dataset. Each file's types are what its own rows
    gave pandas: a nullable bool column that is all null in one input partition's slice
    is written as Arrow's null type there, and a dataset takes its schema from the first
    file, so the next file's bools could not be read (`Unsupported cast from bool to
    null`) and the view could not be backfilled. The files' schemas are unified."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(path, format="parquet", filesystem=filesystem)
    schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
    if any(not schema.equals(schemas[0]) for schema in schemas[1:]):
        unified = pa.unify_schemas(schemas, promote_options="permissive")
        dataset = ds.dataset(path, format="parquet", filesystem=filesystem, schema=unified)
    return dataset


def _shard_changelog(
    path: str, folder: Location, view: ViewSpec, store: DeltaOfflineStore, start: int, end: int, backend: str
) -> tuple[int, list[Any]]:
    """Runs on a Dask worker: read one shuffled shard, run the kernel, write its rows
    as uncommitted Delta files. Returns (rows, add actions).

    A shard far above the partition size (an entity with millions of events lands
    whole in one shard) runs in time slices: as_of in [a, b) needs only the events in
    [a - longest window - coarsest tile, b), as a range backfill does, so memory
    follows the slice, not the hottest entity."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    chosen = Backend(backend)
    dataset = _shard_dataset(path, folder.filesystem())  # `folder`: the shuffle's
    time_column = view.event_time
    slices = [(start, end)]
    # Slices of a view with Latest features would each read all history: no gain.
    if view.reach is not None and dataset.count_rows() > SLICE_EVENTS:
        times = np.sort(pc.cast(dataset.to_table(columns=[time_column]).column(time_column), "int64").to_numpy())
        pieces = -(-len(times) // PARTITION_EVENTS)
        cuts = sorted({int(times[len(times) * i // pieces]) for i in range(1, pieces)} - {start})
        bounds = [start, *(c for c in cuts if start < c < end), end]
        slices = list(itertools.pairwise(bounds))
    reach = view.reach or 0
    rows = 0
    actions: list[Any] = []
    moment = _timestamp_of(time_column, dataset)
    for low, high in slices:
        if len(slices) == 1:
            table = dataset.to_table()
        else:
            table = dataset.to_table(
                filter=(ds.field(time_column) >= moment(low - reach)) & (ds.field(time_column) < moment(high))
            )
        frame = to_frame(table, chosen)
        del table
        # Only the range's start gets rows for the state carried into it; a later slice
        # continues the rows of the slice before it.
        changelog = changelog_kernel(
            view, frame, start=low, end=high, xp=array_module(chosen), prepared=True, anchored=low == start
        )
        del frame
        rows += changelog.num_rows
        actions.extend(store.write_changelog_files(view, changelog, start=low, end=high))
    return rows, actions


def _timestamp_of(column: str, dataset: Any) -> Callable[[int], Any]:
    """Microseconds as a scalar of the dataset's time column type (for filters)."""
    import pyarrow as pa

    kind = dataset.schema.field(column).type
    return lambda micros: pa.scalar(micros, pa.int64()).cast(kind)


def _kernel_results(
    client: Any,
    shards: list[str],
    folder: Location,
    view: ViewSpec,
    store: DeltaOfflineStore,
    start: int,
    end: int,
    backend: Backend,
    progress: Progress | None,
) -> Iterator[tuple[int, list[Any]]]:
    """Shard results (rows, add actions) as they complete, a few shards in flight."""

    def submit(path: str) -> Any:
        return client.submit(_shard_changelog, path, folder, view, store, start, end, backend.value, pure=False)

    for done, result in enumerate(_bounded(client, shards, submit), start=1):
        if progress is not None:
            progress(view.name, done, len(shards))
        yield result


def dask_client(
    scheduler: str | None, *, workers: int | None = None, timeout_s: float = 30.0
) -> AbstractContextManager[Any]:
    """A client to `scheduler` (tcp://host:port), or to a new LocalCluster.

    The local cluster is one worker process with a thread per core: the kernel is numpy
    work that releases the GIL, and threads share the changelog (about 3 rows per event)
    with the writer instead of pickling it between processes (measured: 2.2-3.6 s of
    transfer per million events with processes, none with threads).
    """
    import logging

    from distributed import Client, LocalCluster

    # The p2p shuffle logs a WARNING for every shuffle it starts and stops.
    logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)

    if scheduler:
        try:
            return Client(scheduler, timeout=timeout_s)
        except OSError as error:
            raise TransientError(f"cannot reach the Dask scheduler at {scheduler}: {error}") from error
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=workers or os.cpu_count() or 2,
        processes=False,
        # Loopback only, on free ports: the scheduler and the worker always serve HTTP;
        # with no address the scheduler took 0.0.0.0:8787 (open to the network, and a
        # clash with a second backfill or a notebook's cluster), the worker 0.0.0.0.
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
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
    scratch_dir: str | None = None,
) -> list[BackfillSummary]:
    """Backfill every offline view of the plan (or those named) over [start, end)."""
    chosen = [plan.view(name) for name in views] if views else [v for v in plan.views if v.offline]
    if backend is Backend.CUDF:
        array_module(backend)  # fail early with the install hint: CuPy, then cuDF
        frame_module(backend)
        # Each task holds a partition on the device, and CuPy's memory pool keeps what it
        # freed: two at a time leave room on a 16 GB card (--workers raises it).
        workers = workers or 2
    context: AbstractContextManager[Any] = (
        nullcontext(client) if client is not None else dask_client(scheduler, workers=workers)
    )
    with context as active:
        return [
            backfill_view(
                view,
                store,
                active,
                start=start,
                end=end,
                backend=backend,
                partitions=partitions,
                progress=progress,
                scratch_dir=scratch_dir,
            )
            for view in chosen
        ]


__all__ = ["Backend", "BackfillSummary", "backfill", "backfill_view", "dask_client", "default_range", "to_frame"]
