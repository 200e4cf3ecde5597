"""Materialize: load the latest changelog row per entity (as of a time) from the Delta
feature table into the online store, in bounded chunks.

Safe beside a running stream job: the online store keeps whichever value has the newer
`as_of`, so materializing an older snapshot never moves a value back in time. Never as of
a time later than now: a backfill holds expiry rows ahead of now, and such a value would
also block the stream's writes (older `as_of`) until then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from featurestore.errors import TerminalError
from featurestore.plan.model import AS_OF, ViewSpec
from featurestore.stores.offline import DeltaOfflineStore, datetime_to_micros, micros_to_datetime
from featurestore.stores.online import OnlineStore

CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class MaterializeSummary:
    view: str
    version: str
    entities: int
    written: int
    skipped: int  # the online store already held a newer value
    seconds: float


def latest_rows(view: ViewSpec, offline: DeltaOfflineStore, *, as_of: int | None = None) -> pa.RecordBatchReader:
    """The last changelog row per entity with as_of <= `as_of` (now when None: all rows
    were loaded, a backfill's future expiry rows among them), streamed in batches.
    DuckDB keeps one row per entity in memory, not the table."""
    import duckdb

    if as_of is None:
        as_of = datetime_to_micros(datetime.now(UTC))

    dataset = offline.changelog_dataset(view)
    connection = duckdb.connect()
    connection.execute("SET enable_progress_bar = false")  # the CLI shows progress; DuckDB's would print over it
    # make_timestamp() below is a plain timestamp; compared with the zoned `as_of` column
    # it is read in the session's zone, the machine's by default: west of UTC the cut
    # let in rows from hours after `as_of` (a backfill's future expiry rows among them).
    connection.execute("SET TimeZone = 'UTC'")
    connection.register("changelog", dataset)
    key = view.entity_key
    # arg_max over a struct of every feature: arg_max of a single column would skip the
    # rows where that column is null (an empty window's Mean), picking an older value.
    vector = ", ".join(f'"{name}" := "{name}"' for name in view.feature_names)
    query = (
        f'SELECT "{key}", "{AS_OF}", vector.* FROM ('  # noqa: S608 - names come from the compiled plan
        f'SELECT "{key}", max("{AS_OF}") AS "{AS_OF}", arg_max(struct_pack({vector}), "{AS_OF}") AS vector '
        f'FROM changelog WHERE {AS_OF} <= make_timestamp({int(as_of)}) GROUP BY "{key}")'
    )
    return connection.sql(query).to_arrow_reader(CHUNK_ROWS)


def materialize(
    view: ViewSpec,
    offline: DeltaOfflineStore,
    online: OnlineStore,
    *,
    as_of: int | None = None,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> MaterializeSummary:
    """Load each entity's last changelog row as of `as_of` (microseconds; None: now)
    into `online`. Raises TerminalError for an `as_of` later than `clock()`."""
    began = time.perf_counter()
    now = datetime_to_micros(clock())
    if as_of is None:
        as_of = now
    elif as_of > now:
        now_text = micros_to_datetime(now).replace(microsecond=0).isoformat()
        raise TerminalError(
            f"view `{view.name}`: as of {micros_to_datetime(as_of).isoformat()} is later than now ({now_text}); "
            "the online store would get values from the future (a backfill's expiry rows) and refuse the stream "
            "job's writes as older until then: materialize as of now or an earlier time"
        )
    schema = view.changelog_schema()
    entities = written = skipped = 0
    for batch in latest_rows(view, offline, as_of=as_of):
        table = pa.Table.from_batches([batch]).cast(schema)
        result = online.write(view, table)
        entities += table.num_rows
        written += result.written
        skipped += result.skipped
        if progress is not None:
            progress(table.num_rows)
    return MaterializeSummary(view.name, view.version, entities, written, skipped, time.perf_counter() - began)
