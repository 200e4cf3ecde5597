"""The offline store on Delta Lake: raw events per source, rejects, and changelogs per view.

Layout under the store root:

    events/<table>/                 raw events of a source, partitioned by `_date`
    rejects/<table>/                rows that failed validation, with the reason
    features/<view>__<version>/     changelog of one view version, partitioned by `_date`

Events carry `_seq`, their log order (the tie-break for `Last`), assigned at ingest.
A changelog write replaces exactly one time range, in one Delta commit, so a re-run of a
backfill replaces what it wrote before and never duplicates it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from featurestore.errors import TerminalError
from featurestore.plan.model import AS_OF, SourceSpec, ViewSpec

SEQUENCE = "_seq"
DATE = "_date"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

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
    return _EPOCH + timedelta(microseconds=value)


def datetime_to_micros(value: datetime) -> int:
    if value.tzinfo is None:
        raise TerminalError(f"{value.isoformat()} has no timezone; give times in UTC (e.g. 2026-01-01T00:00:00Z)")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _literal(micros: int) -> str:
    return "'" + micros_to_datetime(micros).strftime("%Y-%m-%dT%H:%M:%S.%fZ") + "'"


def _date_literal(micros: int) -> str:
    return "'" + micros_to_datetime(micros).strftime("%Y-%m-%d") + "'"


class DeltaOfflineStore:
    """Delta Lake tables under one folder (or, later, an object-store prefix)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DeltaOfflineStore({str(self.root)!r})"

    # -- paths ------------------------------------------------------------------------------
    def events_path(self, source: SourceSpec) -> Path:
        return self.root / "events" / source.table

    def rejects_path(self, source: SourceSpec) -> Path:
        return self.root / "rejects" / source.table

    def changelog_path(self, view: ViewSpec) -> Path:
        return self.root / "features" / f"{view.name}__{view.version}"

    @staticmethod
    def _table(path: Path) -> DeltaTable | None:
        try:
            return DeltaTable(str(path))
        except TableNotFoundError:
            return None

    # -- events -----------------------------------------------------------------------------
    def events_schema(self, source: SourceSpec) -> pa.Schema:
        return source.schema.arrow_schema().append(pa.field(SEQUENCE, pa.int64(), nullable=False)).append(
            pa.field(DATE, pa.date32(), nullable=False)
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

    def next_sequence(self, source: SourceSpec) -> int:
        table = self._table(self.events_path(source))
        if table is None:
            return 0
        for commit in table.history():  # newest first
            if "tenx.seq_end" in commit:
                return int(commit["tenx.seq_end"])
        return 0

    def append_events(
        self,
        source: SourceSpec,
        batches: Iterable[pa.RecordBatch],
        *,
        rows: int,
        metadata: dict[str, str],
    ) -> tuple[int, int]:
        """Append `rows` validated events (exactly the source schema) in one commit,
        numbered after the events already there. Returns the sequence range [first, end)."""
        schema = self.events_schema(source)
        time_column = source.event_time
        first = self.next_sequence(source)

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

        write_deltalake(
            str(self.events_path(source)),
            pa.RecordBatchReader.from_batches(schema, numbered()),
            partition_by=[DATE],
            mode="append",
            commit_properties=CommitProperties(
                custom_metadata=metadata | {"tenx.seq_start": str(first), "tenx.seq_end": str(first + rows)}
            ),
        )
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
        return list(table.file_uris(file_pruning_predicate=filters or None))  # type: ignore[arg-type]

    def events_dataset(self, source: SourceSpec) -> ds.Dataset:
        table = self._table(self.events_path(source))
        if table is None:
            raise TerminalError(
                f"no events for source `{source.name}` at {self.events_path(source)}; run `tenx ingest` first"
            )
        return table.to_pyarrow_dataset()

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
        column = table.to_pyarrow_dataset().to_table(columns=[source.event_time]).column(source.event_time)
        if len(column) == 0:
            return None
        bounds = pc.min_max(pc.cast(column, pa.int64()))
        return int(bounds["min"].as_py()), int(bounds["max"].as_py())

    # -- rejects ----------------------------------------------------------------------------
    def append_rejects(self, source: SourceSpec, rejects: pa.Table, *, metadata: dict[str, str]) -> None:
        write_deltalake(
            str(self.rejects_path(source)),
            rejects.cast(REJECTS_SCHEMA),
            mode="append",
            commit_properties=CommitProperties(custom_metadata=metadata),
        )

    def rejected_files(self, source: SourceSpec) -> set[str]:
        table = self._table(self.rejects_path(source))
        if table is None:
            return set()
        return {c["tenx.file_sha256"] for c in table.history() if "tenx.file_sha256" in c}

    def read_rejects(self, source: SourceSpec) -> pa.Table:
        table = self._table(self.rejects_path(source))
        return table.to_pyarrow_table() if table is not None else REJECTS_SCHEMA.empty_table()

    # -- changelogs -------------------------------------------------------------------------
    def changelog_schema(self, view: ViewSpec) -> pa.Schema:
        return view.changelog_schema().append(pa.field(DATE, pa.date32(), nullable=False))

    def write_changelog(
        self, view: ViewSpec, batches: Iterable[pa.RecordBatch | pa.Table], *, start: int, end: int
    ) -> int:
        """Replace the changelog rows with `as_of` in [start, end) by `batches`, in one
        commit. Returns the number of rows written."""
        schema = self.changelog_schema(view)
        written = {"rows": 0}

        def dated() -> Iterator[pa.RecordBatch]:
            for item in batches:
                for batch in item.to_batches() if isinstance(item, pa.Table) else [item]:
                    if batch.num_rows == 0:
                        continue
                    outside = pc.sum(
                        pc.or_(pc.less(batch.column(AS_OF), _timestamp(start)), pc.greater_equal(batch.column(AS_OF), _timestamp(end)))
                    ).as_py()
                    if outside:
                        raise ValueError(f"{outside} changelog rows of `{view.name}` fall outside the range written")
                    dates = pc.cast(batch.column(AS_OF), pa.date32())
                    written["rows"] += batch.num_rows
                    yield pa.RecordBatch.from_arrays([*batch.columns, dates], schema=schema)

        predicate = (
            f"{DATE} >= {_date_literal(start)} AND {DATE} <= {_date_literal(end)} "
            f"AND {AS_OF} >= {_literal(start)} AND {AS_OF} < {_literal(end)}"
        )
        path = self.changelog_path(view)
        exists = self._table(path) is not None
        write_deltalake(
            str(path),
            pa.RecordBatchReader.from_batches(schema, dated()),
            partition_by=[DATE],
            mode="overwrite" if exists else "append",
            predicate=predicate if exists else None,
            commit_properties=CommitProperties(
                custom_metadata={"tenx.view_version": view.version, "tenx.range": f"{start}:{end}"}
            ),
        )
        return written["rows"]

    def changelog_dataset(self, view: ViewSpec) -> ds.Dataset:
        table = self._table(self.changelog_path(view))
        if table is None:
            raise TerminalError(
                f"no changelog for feature view `{view.name}` version {view.version} at "
                f"{self.changelog_path(view)}; run `tenx backfill` first"
            )
        return table.to_pyarrow_dataset()

    def read_changelog(self, view: ViewSpec, start: int | None = None, end: int | None = None) -> pa.Table:
        """Changelog rows with as_of in [start, end), sorted by entity then time, without
        the partition column."""
        dataset = self.changelog_dataset(view)
        expression = _time_filter(AS_OF, start, end)
        table = dataset.to_table(filter=expression) if expression is not None else dataset.to_table()
        table = table.drop_columns([DATE]) if DATE in table.column_names else table
        return table.select(view.changelog_schema().names).sort_by([(view.entity_key, "ascending"), (AS_OF, "ascending")])


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
