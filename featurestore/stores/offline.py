"""The offline store on Delta Lake: raw events per source, rejects, and changelogs per view.

Layout under the store root:

    events/<table>/                 raw events of a source, partitioned by `_date`
    rejects/<table>/                rows that failed validation, with the reason
    features/<view>__<version>/     changelog of one view version, partitioned by `_date`

Events carry `_seq`, their log order (the tie-break for `Last`), assigned at ingest. Each
events commit records the next free `_seq` as the version of the Delta application
transaction `tenx.events`; two writers that read the same table version and both append
conflict there (Delta's conflict check for the same app id), so one of them fails with
WriteConflict and renumbers, instead of both committing overlapping numbers.
A changelog write replaces exactly one time range, in one Delta commit, so a re-run of a
backfill replaces what it wrote before and never duplicates it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction

from featurestore.errors import TerminalError, WriteConflict
from featurestore.plan.model import AS_OF, SEQUENCE, SourceSpec, ViewSpec
from featurestore.stores.location import Location
from schemas.timestamps import from_micros, to_micros

DATE = "_date"
EVENTS_APP = "tenx.events"  # Delta app transaction of the events table: its version is the next `_seq`
REJECTS_APP = "tenx.rejects"  # per ingested file: `tenx.rejects:<sha256>`, its rejects recorded once
CHANGELOG_APP = "tenx.changelog"  # per day of a changelog table: `tenx.changelog:<YYYY-MM-DD>`

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("record", pa.string()),  # the rejected row as JSON, every value as given
        pa.field("reason", pa.string()),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class IngestRecord:
    """What a past ingest of a file committed (from the events table history)."""

    file_sha256: str
    rows: int
    rejected: int
    version: int


def micros_to_datetime(value: int) -> datetime:
    return from_micros(value)


def datetime_to_micros(value: datetime) -> int:
    if value.tzinfo is None:
        raise TerminalError(f"{value.isoformat()} has no timezone; give times in UTC (e.g. 2026-01-01T00:00:00Z)")
    return to_micros(value)


def _literal(micros: int) -> str:
    return "'" + micros_to_datetime(micros).strftime("%Y-%m-%dT%H:%M:%S.%fZ") + "'"


def _date_literal(micros: int) -> str:
    return "'" + micros_to_datetime(micros).strftime("%Y-%m-%d") + "'"


class DeltaOfflineStore:
    """Delta Lake tables under one folder or S3 prefix (`Location`)."""

    def __init__(self, root: Path | str | Location) -> None:
        self.location = root if isinstance(root, Location) else Location.parse(root)

    @property
    def root(self) -> Path:
        """The store's folder (local stores only)."""
        return self.location.local_path()

    def __repr__(self) -> str:
        return f"DeltaOfflineStore({self.location.uri!r})"

    def scratch_dir(self) -> Path:
        """Where a backfill's shuffle goes by default: beside the tables for a local
        store (a remote Dask cluster then shares it with the client), the system temp
        folder for an object store (never inside the bucket; workers on other hosts
        would need a shared folder here: `backfill_view(scratch_dir=)`)."""
        if self.location.is_local:
            return self.root / "_scratch"
        return Path(tempfile.gettempdir()) / "tenx-scratch"

    # -- paths ------------------------------------------------------------------------------
    def events_path(self, source: SourceSpec) -> Location:
        return self.location.join("events", source.table)

    def rejects_path(self, source: SourceSpec) -> Location:
        return self.location.join("rejects", source.table)

    def changelog_path(self, view: ViewSpec) -> Location:
        return self.location.join("features", f"{view.name}__{view.version}")

    def _table(self, location: Location, version: int | None = None) -> DeltaTable | None:
        try:
            if version is None:
                return DeltaTable(location.uri, storage_options=location.storage_options())
            return DeltaTable(location.uri, version=version, storage_options=location.storage_options())
        except TableNotFoundError:
            return None

    def _write(self, location: Location, data: Any, **options: Any) -> None:
        write_deltalake(location.uri, data, storage_options=location.storage_options(), **options)

    # -- events -----------------------------------------------------------------------------
    def events_schema(self, source: SourceSpec) -> pa.Schema:
        return (
            source.schema.arrow_schema()
            .append(pa.field(SEQUENCE, pa.int64(), nullable=False))
            .append(pa.field(DATE, pa.date32(), nullable=False))
        )

    def check_events_table(self, source: SourceSpec, *, appending: bool = True) -> None:
        """Raise TerminalError when the events table's columns are not the source
        schema's: a schema that gained a field (or lost or retyped one) after the table
        was made failed an ingest with Delta's SchemaMismatchError and a backfill with a
        KeyError deep in Dask, neither saying what differs. An events table keeps the
        schema it was created with (its files are immutable history). A reader
        (`appending` False) minds only fields missing or retyped: it reads no others."""
        table = self._table(self.events_path(source))
        if table is None:
            return
        stored = pa.schema(table.schema().to_arrow())
        has = {f.name: _plain(f.type) for f in stored if f.name not in (SEQUENCE, DATE)}
        wants = {f.name: _plain(f.type) for f in source.schema.arrow_schema()}
        problems = []
        if missing := [name for name in wants if name not in has]:
            problems.append(f"lacks field(s) {', '.join(f'`{n}`' for n in missing)}")
        if appending and (extra := [name for name in has if name not in wants]):
            problems.append(f"has field(s) {', '.join(f'`{n}`' for n in extra)} the schema no longer has")
        if retyped := [f"`{n}` ({has[n]} there, {t} now)" for n, t in wants.items() if n in has and has[n] != t]:
            problems.append(f"holds {', '.join(retyped)}")
        if problems:
            raise TerminalError(
                f"the events table of source `{source.name}` at {self.events_path(source)} {'; '.join(problems)}: "
                f"its schema changed after the table was made, and an events table keeps the schema it was made "
                f'with. Give the source a new table (Source(..., table="{source.table}_v2")), ingest its events '
                "there, and backfill its views"
            )

    def ingests(self, source: SourceSpec) -> list[IngestRecord]:
        table = self._table(self.events_path(source))
        if table is None:
            return []
        records = []
        for commit in table.history():
            digest = commit.get("tenx.file_sha256")
            if digest:
                records.append(
                    IngestRecord(digest, int(commit["tenx.rows"]), int(commit["tenx.rejected"]), commit["version"])
                )
        return records

    def events_version(self, source: SourceSpec, *, create: bool = False) -> int | None:
        """The events table's version now (None: no table yet): what an ingest reads
        before it checks for duplicates and appends (`append_events(read_version=)`).
        `create`: make the (empty) table first when there is none, so that even the
        first appends have a version to conflict on (two writers creating a table both
        succeed in delta-rs, the second as version 1; empty commits are harmless)."""
        path = self.events_path(source)
        table = self._table(path)
        if table is None and create:
            # Another writer may create it at the same moment ("protocol changed"): it exists then.
            with contextlib.suppress(CommitFailedError):
                self._write(path, self.events_schema(source).empty_table(), partition_by=[DATE], mode="append")
            table = self._table(path)
        return None if table is None else table.version()

    def next_sequence(self, source: SourceSpec, *, version: int | None = None) -> int:
        """The first `_seq` free after the events table's `version` (default: now)."""
        table = self._table(self.events_path(source), version)
        if table is None:
            return 0
        recorded = table.transaction_version(EVENTS_APP)
        if recorded is not None:
            return int(recorded)
        for commit in table.history():  # tables written before the app transaction: newest first
            if "tenx.seq_end" in commit and commit["version"] <= table.version():
                return int(commit["tenx.seq_end"])
        return 0

    def append_events(
        self,
        source: SourceSpec,
        batches: Iterable[pa.RecordBatch],
        *,
        rows: int,
        metadata: dict[str, str],
        read_version: int | None = None,
    ) -> tuple[int, int]:
        """Append `rows` validated events (exactly the source schema) in one commit,
        numbered after the events already there as of `read_version` (the table version
        the caller's checks read; default: now). Returns the sequence range [first, end).

        Raises WriteConflict when another writer appended after `read_version` (or
        created the table first): nothing is committed, and the caller reads again
        (its duplicate check included) and retries."""
        schema = self.events_schema(source)
        time_column = source.event_time
        path = self.events_path(source)
        if read_version is None:
            read_version = self.events_version(source, create=True)
        first = self.next_sequence(source, version=read_version)
        target = self._table(path, read_version)
        if target is None:
            raise WriteConflict(f"the events table of `{source.name}` at {path} went away; read again and retry")

        def numbered() -> Iterator[pa.RecordBatch]:
            sequence = first
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                dates = pc.cast(batch.column(time_column), pa.date32())
                numbers = pa.array(range(sequence, sequence + batch.num_rows), pa.int64())
                sequence += batch.num_rows
                yield pa.RecordBatch.from_arrays([*batch.columns, numbers, dates], schema=schema)
            if sequence != first + rows:
                raise ValueError(f"expected {rows} events, got {sequence - first}")

        try:
            write_deltalake(
                target,
                pa.RecordBatchReader.from_batches(schema, numbered()),
                partition_by=[DATE],
                mode="append",
                commit_properties=CommitProperties(
                    custom_metadata=metadata | {"tenx.seq_start": str(first), "tenx.seq_end": str(first + rows)},
                    app_transactions=[Transaction(EVENTS_APP, first + rows)],
                ),
            )
        except CommitFailedError as error:
            raise WriteConflict(
                f"another ingest of source `{source.name}` committed first ({error}); read again and retry"
            ) from error
        return first, first + rows

    def event_files(self, source: SourceSpec, start: int | None, end: int | None) -> list[str]:
        """Data files of the events table that may hold events in [start, end)."""
        table = self._table(self.events_path(source))
        if table is None:
            return []
        filters: list[Any] = []
        if start is not None:
            filters.append((DATE, ">=", micros_to_datetime(start).strftime("%Y-%m-%d")))
        if end is not None:
            filters.append((DATE, "<=", micros_to_datetime(end).strftime("%Y-%m-%d")))
        return self._file_paths(table, filters or None)

    def event_files_on(self, source: SourceSpec, days: Iterable[str]) -> list[str]:
        """Data files of the events table for these days (YYYY-MM-DD, UTC)."""
        table = self._table(self.events_path(source))
        chosen = sorted(set(days))
        return self._file_paths(table, [(DATE, "in", chosen)]) if table is not None and chosen else []

    def events_dataset(self, source: SourceSpec) -> ds.Dataset:
        table = self._table(self.events_path(source))
        if table is None:
            raise TerminalError(
                f"no events for source `{source.name}` at {self.events_path(source)}; run `tenx ingest` first"
            )
        return self._dataset(table, self.events_schema(source))

    def read_events(self, source: SourceSpec, start: int | None = None, end: int | None = None) -> pa.Table:
        """Events in [start, end) (microseconds), in log order."""
        dataset = self.events_dataset(source)
        expression = _time_filter(source.event_time, start, end)
        table = dataset.to_table(filter=expression) if expression is not None else dataset.to_table()
        return table.sort_by(SEQUENCE)

    def count_events(self, source: SourceSpec, start: int | None = None, end: int | None = None) -> int:
        """Events with time in [start, end)."""
        dataset = self.events_dataset(source)
        expression = _time_filter(source.event_time, start, end)
        return int(dataset.count_rows(filter=expression) if expression is not None else dataset.count_rows())

    def event_time_range(self, source: SourceSpec) -> tuple[int, int] | None:
        """(first, last) event time in microseconds, or None when there are no events."""
        table = self._table(self.events_path(source))
        if table is None:
            return None
        dataset = self._dataset(table, self.events_schema(source))
        column = dataset.to_table(columns=[source.event_time]).column(source.event_time)
        if len(column) == 0:
            return None
        bounds = pc.min_max(pc.cast(column, pa.int64()))
        return int(bounds["min"].as_py()), int(bounds["max"].as_py())

    # -- rejects ----------------------------------------------------------------------------
    def append_rejects(
        self, source: SourceSpec, rejects: pa.Table | pa.RecordBatchReader, *, metadata: dict[str, str]
    ) -> bool:
        """Record a file's rejects once: checked and committed against one table version
        with an app transaction per file digest, so two ingests of one file racing here
        write them once (the loser's commit conflicts and is dropped). Returns whether
        this call wrote them. The rows stream into one Parquet file that the commit then
        adds: delta-rs's writer held all of them in memory (about 275 MB a million)."""
        path = self.rejects_path(source)
        digest = metadata["tenx.file_sha256"]
        table = self._table(path)
        if table is None:
            with contextlib.suppress(CommitFailedError):  # another ingest created it at the same moment
                self._write(path, REJECTS_SCHEMA.empty_table(), mode="append")
            table = self._table(path)
        if table is None or table.transaction_version(f"{REJECTS_APP}:{digest}") is not None:
            return False
        if any(c.get("tenx.file_sha256") == digest for c in table.history()):  # recorded before the app transaction
            return False
        batches = rejects.cast(REJECTS_SCHEMA).to_batches() if isinstance(rejects, pa.Table) else rejects
        action = self._write_file(path, REJECTS_SCHEMA, batches)
        try:
            table.create_write_transaction(
                [action],
                mode="append",
                schema=REJECTS_SCHEMA,
                commit_properties=CommitProperties(
                    custom_metadata=metadata, app_transactions=[Transaction(f"{REJECTS_APP}:{digest}", 1)]
                ),
            )
        except CommitFailedError:
            return False  # another ingest of the same file recorded them first (its file stays uncommitted)
        return True

    def _write_file(self, folder: Location, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> AddAction:
        """One Parquet file of `batches` in a table's folder, written as they come (not
        committed: invisible to readers until its add action is)."""
        filesystem = self.location.filesystem()
        if self.location.is_local:
            filesystem.create_dir(folder.path, recursive=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        rows = 0
        with filesystem.open_output_stream(folder.join(name).path) as out:
            writer = pq.ParquetWriter(out, schema, compression="zstd")
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
            writer.close()
            size = out.tell()
        return AddAction(path=name, size=size, partition_values={}, modification_time=int(time.time() * 1000),
                         data_change=True, stats=json.dumps({"numRecords": rows}))  # fmt: skip

    def rejected_files(self, source: SourceSpec) -> set[str]:
        table = self._table(self.rejects_path(source))
        if table is None:
            return set()
        return {c["tenx.file_sha256"] for c in table.history() if "tenx.file_sha256" in c}

    def read_rejects(self, source: SourceSpec) -> pa.Table:
        table = self._table(self.rejects_path(source))
        return self._dataset(table, REJECTS_SCHEMA).to_table() if table is not None else REJECTS_SCHEMA.empty_table()

    # -- changelogs -------------------------------------------------------------------------
    def changelog_schema(self, view: ViewSpec) -> pa.Schema:
        return view.changelog_schema().append(pa.field(DATE, pa.date32(), nullable=False))

    def write_changelog(
        self, view: ViewSpec, batches: Iterable[pa.RecordBatch | pa.Table], *, start: int, end: int
    ) -> int:
        """Replace the changelog rows with `as_of` in [start, end) by `batches`, in one
        Delta commit (the simple path: files written here, then committed). Returns the
        number of rows written."""
        actions: list[AddAction] = []
        rows = 0
        for item in batches:
            table = item if isinstance(item, pa.Table) else pa.Table.from_batches([item])
            rows += table.num_rows
            actions.extend(self.write_changelog_files(view, table, start=start, end=end))
        self.commit_changelog(view, actions, start=start, end=end)
        return rows

    def write_changelog_files(self, view: ViewSpec, rows: pa.Table, *, start: int, end: int) -> list[AddAction]:
        """Write changelog rows (as_of in [start, end)) as Parquet files in the view's
        table folder, one per day, without committing them; returns their Delta add
        actions for `commit_changelog`. Safe to call from many workers at once: file
        names are unique, and uncommitted files are invisible to readers."""
        if rows.num_rows == 0:
            return []
        _check_range(view, rows, start, end)
        path = self.changelog_path(view)
        dates = pc.cast(rows.column(AS_OF), pa.date32())
        with_dates = rows.append_column(DATE, dates)
        order = pc.array_sort_indices(dates, order="ascending")
        ordered = with_dates.take(order)
        days = ordered.column(DATE).to_numpy()
        boundaries = _runs(days)
        actions = []
        schema = view.changelog_schema()
        filesystem = self.location.filesystem()
        for low, high in boundaries:
            day = str(days[low])
            folder = path.join(f"{DATE}={day}")
            if self.location.is_local:
                filesystem.create_dir(folder.path, recursive=True)
            name = f"part-{uuid.uuid4().hex}.parquet"
            chunk = ordered.slice(low, high - low).drop_columns([DATE]).cast(schema)
            footers: list[Any] = []
            # The footer and the size come from the writer: no second request per file
            # on an object store. Dictionary pages only for the entity key: on float
            # features they cost a third of the write time and made files larger.
            with filesystem.open_output_stream(folder.join(name).path) as out:
                writer = pq.ParquetWriter(
                    out,
                    schema,
                    compression="zstd",
                    use_dictionary=[view.entity_key],
                    metadata_collector=footers,
                )
                writer.write_table(chunk, row_group_size=131_072)
                writer.close()
                size = out.tell()
            actions.append(
                AddAction(
                    path=f"{DATE}={day}/{name}",
                    size=size,
                    partition_values={DATE: day},
                    modification_time=int(time.time() * 1000),
                    data_change=True,
                    stats=_file_stats(footers[0], view),
                )
            )
        return actions

    def changelog_version(self, view: ViewSpec) -> int:
        """The changelog table's version now, creating the (empty) table if there is none:
        a backfill reads it when it starts and commits against it (`read_version`), so
        any commit to the same days while it computed makes it fail, not overwrite."""
        path = self.changelog_path(view)
        table = self._table(path)
        if table is None:
            with contextlib.suppress(CommitFailedError):  # another backfill created it at the same moment
                self._write(path, self.changelog_schema(view).empty_table(), partition_by=[DATE], mode="append")
            table = self._table(path)
        if table is None:
            raise WriteConflict(f"the changelog table of `{view.name}` at {path} could not be created")
        return table.version()

    def commit_changelog(
        self, view: ViewSpec, actions: list[AddAction], *, start: int, end: int, read_version: int | None = None
    ) -> None:
        """Make written files the changelog for [start, end): one commit that replaces
        the days the range touches. Rows of its first and last day outside the range
        are rewritten into new files first, so exactly the range is replaced.
        `read_version`: the table version the caller started from (default: now)."""
        path = self.changelog_path(view)
        version = self.changelog_version(view) if read_version is None else read_version
        table = self._table(path, version)
        if table is None:
            raise WriteConflict(f"the changelog table of `{view.name}` at {path} went away; run the backfill again")
        first_day = micros_to_datetime(start).date()
        last_day = micros_to_datetime(end - 1).date()
        carried = [
            action
            for kept in self._rows_outside(view, table, first_day, last_day, start, end)
            for action in self.write_changelog_files(
                view, kept.drop_columns([DATE]), start=_MIN_MICROS, end=_MAX_MICROS
            )
        ]
        days = [str(first_day + timedelta(days=i)) for i in range((last_day - first_day).days + 1)]
        try:
            table.create_write_transaction(
                [*actions, *carried],
                mode="overwrite",
                schema=self.changelog_schema(view),
                partition_by=[DATE],
                partition_filters=[(DATE, "in", days)],
                commit_properties=CommitProperties(
                    custom_metadata={"tenx.view_version": view.version, "tenx.range": f"{start}:{end}"},
                    # One app transaction per day replaced: a concurrent commit to any of the
                    # same days conflicts even when neither removed a file (a new table's
                    # first backfills would otherwise both add their rows); other days do not.
                    app_transactions=[Transaction(f"{CHANGELOG_APP}:{day}", table.version() + 1) for day in days],
                ),
            )
        except CommitFailedError as error:
            # Delta's conflict check: another writer removed or added files of these days
            # after this backfill read them. Its commit stands; this one changed nothing.
            raise WriteConflict(
                f"another backfill of `{view.name}` (version {view.version}) committed days overlapping "
                f"{days[0]}..{days[-1]} while this one ran, so this one committed nothing; the other's values "
                "stand. Run this backfill again if its range should win"
            ) from error

    def _rows_outside(
        self, view: ViewSpec, table: DeltaTable, first_day: Any, last_day: Any, start: int, end: int
    ) -> list[pa.Table]:
        """Existing rows of the first and last day that fall outside [start, end)."""
        dataset = self._dataset(table, self.changelog_schema(view))
        outside = (ds.field(AS_OF) < _timestamp(start)) | (ds.field(AS_OF) >= _timestamp(end))
        days = ds.field(DATE).isin([pa.scalar(first_day, pa.date32()), pa.scalar(last_day, pa.date32())])
        kept = dataset.to_table(filter=days & outside)
        return [kept] if kept.num_rows else []

    def changelog_dataset(self, view: ViewSpec) -> ds.Dataset:
        table = self._table(self.changelog_path(view))
        if table is None:
            raise TerminalError(
                f"no changelog for feature view `{view.name}` version {view.version} at "
                f"{self.changelog_path(view)}; run `tenx backfill` first"
            )
        return self._dataset(table, self.changelog_schema(view))

    def changelog_files(self, view: ViewSpec) -> list[str]:
        """Live Parquet files of the view's changelog (no partition column inside)."""
        table = self._table(self.changelog_path(view))
        if table is None:
            raise TerminalError(
                f"no changelog for feature view `{view.name}` version {view.version} at "
                f"{self.changelog_path(view)}; run `tenx backfill` first"
            )
        return self._file_paths(table)

    def read_changelog(self, view: ViewSpec, start: int | None = None, end: int | None = None) -> pa.Table:
        """Changelog rows with as_of in [start, end), sorted by entity then time, without
        the partition column."""
        dataset = self.changelog_dataset(view)
        expression = _time_filter(AS_OF, start, end)
        table = dataset.to_table(filter=expression) if expression is not None else dataset.to_table()
        table = table.drop_columns([DATE]) if DATE in table.column_names else table
        return table.select(view.changelog_schema().names).sort_by(
            [(view.entity_key, "ascending"), (AS_OF, "ascending")]
        )

    # -- files ------------------------------------------------------------------------------
    def _dataset(self, table: DeltaTable, schema: pa.Schema) -> ds.Dataset:
        """A plain pyarrow dataset over the table's live files.

        deltalake's own `to_pyarrow_dataset()` leaves scanner threads that abort the process
        at exit now and then ("terminate called without an active exception": seen in 1 of
        ~8 runs with deltalake 1.6.6, pyarrow 26); reading the same files with pyarrow
        directly does not. tenx tables use no deletion vectors or column mapping, so the
        live files plus the hive `_date` partition are the whole table.
        """
        return self.files_dataset(self._file_paths(table), schema, base=self.location.file_path(table.table_uri))

    def files_dataset(
        self, files: list[str], schema: pa.Schema | None = None, *, base: str | None = None
    ) -> ds.Dataset:
        """A pyarrow dataset over files of this store (as `*_files` methods list them)."""
        partitioning = None
        if schema is not None and DATE in schema.names:
            partitioning = ds.partitioning(pa.schema([pa.field(DATE, pa.date32())]), flavor="hive")
        return ds.dataset(
            [self.location.file_path(f) for f in files],
            schema=schema,
            format="parquet",
            partitioning=partitioning,
            partition_base_dir=base.rstrip("/") if base else None,
            filesystem=self.location.filesystem(),
        )

    def parquet_view(self, connection: Any, name: str, files: list[str]) -> None:
        """Make `files` of this store the DuckDB view `name`: DuckDB's own reader for a
        local folder (parallel, pushdown: 2x faster than an Arrow scan), a pyarrow
        dataset on the store's filesystem for S3 (DuckDB's httpfs extension cannot be
        fetched everywhere, and pyarrow already holds the credentials)."""
        if self.location.is_local:
            connection.read_parquet(files).create_view(name)
        else:
            connection.register(name, self.files_dataset(files))

    def _file_paths(self, table: DeltaTable, filters: list[Any] | None = None) -> list[str]:
        """The table's live data files: local paths pyarrow, Dask and DuckDB open as they
        are (deltalake percent-encodes local paths, a space is `%20`, which none of them
        decode), or `s3://bucket/key` URIs."""
        return [_local(uri) for uri in table.file_uris(file_pruning_predicate=filters)]


_MIN_MICROS = -(2**62)
_MAX_MICROS = 2**62


def _runs(values: Any) -> list[tuple[int, int]]:
    """[low, high) bounds of runs of equal neighbours in a sorted array."""
    import numpy as np

    if len(values) == 0:
        return []
    changes = np.flatnonzero(values[1:] != values[:-1]) + 1
    edges = [0, *changes.tolist(), len(values)]
    return list(itertools.pairwise(edges))


def _check_range(view: ViewSpec, batch: pa.RecordBatch | pa.Table, start: int, end: int) -> None:
    times = batch.column(AS_OF)
    outside = pc.sum(pc.or_(pc.less(times, _timestamp(start)), pc.greater_equal(times, _timestamp(end)))).as_py()
    if outside:
        raise ValueError(f"{outside} changelog rows of `{view.name}` fall outside the range being written")


def _file_stats(metadata: Any, view: ViewSpec) -> str:
    """Delta file statistics (row count, min/max of the key and as_of) from Parquet
    footers, so readers can prune files."""
    minimum: dict[str, Any] = {}
    maximum: dict[str, Any] = {}
    for name in (view.entity_key, AS_OF):
        index = metadata.schema.to_arrow_schema().get_field_index(name)
        lows: list[Any] = []
        highs: list[Any] = []
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(index).statistics
            if statistics is None or not statistics.has_min_max:
                lows = highs = []
                break
            lows.append(statistics.min)
            highs.append(statistics.max)
        if lows:
            low, high = min(lows), max(highs)
            if name == AS_OF:
                low = micros_to_datetime(_as_micros(low)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                high = micros_to_datetime(_as_micros(high)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            minimum[name], maximum[name] = low, high
    return json.dumps({"numRecords": metadata.num_rows, "minValues": minimum, "maxValues": maximum})


def _as_micros(value: Any) -> int:
    if isinstance(value, datetime):
        return datetime_to_micros(value if value.tzinfo else value.replace(tzinfo=UTC))
    return int(value)


def _timestamp(micros: int) -> pa.Scalar:
    return pa.scalar(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def _time_filter(column: str, start: int | None, end: int | None) -> ds.Expression | None:
    expression: ds.Expression | None = None
    if start is not None:
        expression = ds.field(column) >= _timestamp(start)
    if end is not None:
        upper = ds.field(column) < _timestamp(end)
        expression = upper if expression is None else expression & upper
    return expression


def _local(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        return uri  # object stores: their own URI rules
    return urllib.parse.unquote(uri.removeprefix("file://"))


def _plain(dtype: pa.DataType) -> pa.DataType:
    """A type as the schema names it: Delta hands strings back as large or view strings."""
    return pa.string() if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype) else dtype
