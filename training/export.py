"""Point-in-time correct training sets: each label row gets the feature values the
online store would have served at its timestamp.

For every requested view, a label (entity k, time t) takes the latest changelog row of
k with `as_of <= t` (DuckDB ASOF LEFT JOIN). An entity with no row yet gets the
empty-window values (Count 0, Sum 0, others null), and `<view>__status` tells the cases
apart with the words the online client uses: `missing` (no row at or before t), `stale`
(a row older than the view's ttl, or than `max_age`, at t) or `found`. Every label row
comes back exactly once, in input order, duplicates and the input's own columns
untouched (the time column keeps its type and time zone). Labels are processed in
chunks of input rows, so memory is bounded whatever their number; DuckDB itself runs
under a memory limit and spills to disk.

    result = export_training_set(plan, offline, labels, ["user_spend:count_1d", ...])
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.plan.model import AS_OF, Plan, ViewSpec
from featurestore.semantics import empty_value
from featurestore.stores.offline import DeltaOfflineStore
from schemas.dtypes import parse_dtype
from schemas.validation import floor_to_micros
from training.errors import LabelError

CHUNK_ROWS = 1_000_000
ROW = "__tenx_row"


@dataclass(frozen=True)
class ExportSummary:
    rows_in: int
    rows_out: int
    features: tuple[str, ...]
    plan_version: str
    first_label: str | None
    last_label: str | None
    seconds: float
    output: str | None
    columns: tuple[str, ...] = field(default=())
    max_age: int | None = None  # microseconds: values older than this at the label time were blanked
    feature_columns: dict[str, str] = field(default_factory=dict)  # view:feature -> its column in the output

    def manifest(self) -> dict[str, Any]:
        return {
            "plan_version": self.plan_version,
            "features": list(self.features),
            # Where each feature is: `tenx train` reads exactly these columns, never a label
            # column that happens to carry a feature-like name (an earlier export's).
            "feature_columns": self.feature_columns,
            "max_age_us": self.max_age,  # `tenx train` hands it to the card: the server blanks the same values
            "label_rows_in": self.rows_in,
            "label_rows_out": self.rows_out,
            "label_time_range": [self.first_label, self.last_label],
            "seconds": round(self.seconds, 3),
            "output": self.output,
            "columns": list(self.columns),
        }


@dataclass(frozen=True)
class _ViewRequest:
    view: ViewSpec
    names: tuple[str, ...]


def parse_features(plan: Plan, references: Sequence[str]) -> list[_ViewRequest]:
    """`view:feature` names (or `view:*`) grouped by view, in the order given; unknown
    names get close-match suggestions."""
    if not references:
        raise LabelError("no features asked; give view:feature names, e.g. user_spend:count_1d")
    grouped: dict[str, list[str]] = {}
    every = [f"{v.name}:{f}" for v in plan.views for f in v.feature_names]
    for reference in references:
        view_name, sep, name = reference.partition(":")
        try:
            view = plan.view(view_name) if sep else None
        except KeyError:
            view = None
        if view is None or (name != "*" and name not in view.feature_names):
            close = difflib.get_close_matches(reference, every, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise LabelError(f"unknown feature {reference!r}{hint} (features are named view:feature)")
        names = grouped.setdefault(view_name, [])
        for feature in view.feature_names if name == "*" else [name]:
            if feature not in names:
                names.append(feature)
    return [_ViewRequest(plan.view(name), tuple(names)) for name, names in grouped.items()]


def read_labels(source: Path | pa.Table | Any, *, column_types: Mapping[str, pa.DataType] | None = None) -> pa.Table:
    """Labels from a Parquet/CSV file, an Arrow table, or a pandas/polars DataFrame.
    `column_types`: the types of a CSV's columns that must not be inferred (string
    entity keys: ids of digits only read as int64 otherwise)."""
    if isinstance(source, pa.Table):
        return source
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise LabelError(f"label file {path} does not exist")
        if path.suffix == ".parquet":
            return pq.read_table(path)
        if path.suffix == ".csv":
            import pyarrow.csv as pacsv

            try:
                return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=column_types))
            except pa.ArrowInvalid as error:
                raise LabelError(f"label file {path}: {error}") from None
        raise LabelError(f"label file {path}: expected .parquet or .csv")
    if hasattr(source, "to_arrow"):  # polars
        return source.to_arrow()
    if hasattr(source, "columns"):  # pandas
        return pa.Table.from_pandas(source, preserve_index=False)
    raise LabelError(f"labels must be a file path, an Arrow table or a DataFrame, got {type(source).__name__}")


def _with_key_types(labels: pa.Table, requests: list[_ViewRequest]) -> pa.Table:
    """Entity-key columns as the views key them, where that loses nothing: pandas 3 and
    polars hand over strings as large_string or string_view, and a DataFrame may hold
    ids as int32. Anything else is left for `_check_labels` to name."""
    for request in requests:
        key = request.view.entity_key
        if key not in labels.column_names:
            continue
        got = labels.schema.field(key).type
        want = request.view.changelog_schema().field(key).type
        widens = pa.types.is_string(want) and (pa.types.is_large_string(got) or pa.types.is_string_view(got))
        widens |= pa.types.is_int64(want) and pa.types.is_integer(got) and not pa.types.is_uint64(got)
        if widens and not got.equals(want):
            labels = labels.set_column(labels.column_names.index(key), key, labels.column(key).cast(want))
    return labels


def feature_column(view: str, feature: str, *, views: int, label_columns: Sequence[str]) -> str:
    """A feature's column in the output: its name, or `view__name` when several views
    are exported or a label column has the name."""
    return f"{view}__{feature}" if views > 1 or feature in label_columns else feature


def _added_columns(requests: list[_ViewRequest], label_columns: Sequence[str], max_age: int | None) -> list[str]:
    """Every column the export adds to the labels, in order."""
    added = []
    for request in requests:
        view = request.view.name
        added += [feature_column(view, n, views=len(requests), label_columns=label_columns) for n in request.names]
        added += [f"{view}__as_of", f"{view}__status", *([f"{view}__stale"] if max_age is not None else [])]
    return added


def _check_labels(labels: pa.Table, requests: list[_ViewRequest], time_column: str, max_age: int | None = None) -> None:
    if labels.num_rows == 0:
        raise LabelError("the label table is empty; nothing to export")
    names = labels.column_names
    if time_column not in names:
        raise LabelError(
            f"label table has no time column `{time_column}` (columns: {', '.join(names)}); use --time-column"
        )
    dtype = labels.schema.field(time_column).type
    if not pa.types.is_timestamp(dtype):
        raise LabelError(
            f"label column `{time_column}` is {dtype}, expected a timestamp with a timezone "
            "(e.g. pd.to_datetime(..., utc=True))"
        )
    if dtype.tz is None:
        raise LabelError(
            f"label column `{time_column}` has timestamps without a timezone; localize them to UTC first "
            "(tenx will not guess a timezone)"
        )
    for request in requests:
        key = request.view.entity_key
        if key not in names:
            raise LabelError(
                f"label table has no entity column `{key}` for view `{request.view.name}` (columns: {', '.join(names)})"
            )
        if labels.schema.field(key).type != request.view.changelog_schema().field(key).type:
            expected = request.view.changelog_schema().field(key).type
            raise LabelError(f"label column `{key}` is {labels.schema.field(key).type}, expected {expected}")
        if labels.column(key).null_count:
            raise LabelError(f"label column `{key}` has {labels.column(key).null_count} null entity keys")
    if labels.column(time_column).null_count:
        raise LabelError(f"label column `{time_column}` has {labels.column(time_column).null_count} null times")
    clashes = [name for name in _added_columns(requests, names, max_age) if name in names]
    if clashes:
        # Two columns of one name: the Parquet file could not be read back by name, and
        # pandas kept only one of them.
        raise LabelError(
            f"label column(s) {', '.join(f'`{c}`' for c in clashes)} have the name of a column the export adds "
            "(an earlier export's output?): drop or rename them in the labels"
        )


def export_training_set(
    plan: Plan,
    offline: DeltaOfflineStore,
    labels: Path | pa.Table | Any,
    features: Sequence[str],
    *,
    time_column: str = "timestamp",
    max_age: int | None = None,
    out: Path | None = None,
    chunk_rows: int = CHUNK_ROWS,
    memory_limit: str = "1400MB",
    progress: Callable[[int], None] | None = None,
) -> tuple[pa.Table | None, ExportSummary]:
    """Join labels to features point-in-time. Returns (table, summary); with `out`,
    rows stream into that Parquet file (plus `<out>.manifest.json`) and table is None.

    `max_age` (microseconds): values whose changelog row is older than that at the
    label time are blanked (null), and `<view>__stale` says so; never silently.
    """
    began = time.perf_counter()
    requests = parse_features(plan, features)
    # A string key keeps its digits as written (`007`); an int key is still inferred, so
    # a wrong one is named by _check_labels.
    keys = {
        r.view.entity_key: pa.string()
        for r in requests
        if pa.types.is_string(r.view.changelog_schema().field(r.view.entity_key).type)
    }
    table = _with_key_types(read_labels(labels, column_types=keys), requests)
    _check_labels(table, requests, time_column, max_age)
    # Joined on UTC microseconds (a label time with nanosecond digits floored: it sees
    # what was known in its microsecond); returned as given (Europe/Paris stays so).
    at = table.schema.get_field_index(time_column)
    joined = table.set_column(
        at, time_column, floor_to_micros(table.column(time_column)).cast(pa.timestamp("us", tz="UTC"))
    )
    chunks = _join_chunks(requests, offline, joined, time_column, max_age, chunk_rows, memory_limit, shown=table)
    times = pc.min_max(table.column(time_column))
    first = times["min"].as_py()
    last = times["max"].as_py()
    produced: list[pa.Table] = []
    rows_out = 0
    writer: pq.ParquetWriter | None = None
    columns: tuple[str, ...] = ()
    # Rows go to `<out>.partial`, renamed to `out` once complete: an interrupted or failed
    # export never leaves a training set that looks whole but lacks rows.
    staging = out.with_name(out.name + ".partial") if out is not None else None
    complete = False
    try:
        for chunk in chunks:
            rows_out += chunk.num_rows
            columns = tuple(chunk.column_names)
            if staging is not None:
                if writer is None:
                    staging.parent.mkdir(parents=True, exist_ok=True)
                    writer = pq.ParquetWriter(staging, chunk.schema, compression="zstd")
                writer.write_table(chunk)
            else:
                produced.append(chunk)
            if progress is not None:
                progress(chunk.num_rows)
        if rows_out != table.num_rows:  # the contract; never ship a partial set silently
            raise RuntimeError(f"export produced {rows_out} rows for {table.num_rows} labels")
        complete = True
    finally:
        chunks.close()  # removes the scratch folder now, also when a write or progress call raised
        if writer is not None:
            writer.close()
        if staging is not None and out is not None:
            if complete and writer is not None:
                # The old manifest goes first: never a new file beside an old manifest.
                Path(f"{out}.manifest.json").unlink(missing_ok=True)
                os.replace(staging, out)
            else:
                staging.unlink(missing_ok=True)
    summary = ExportSummary(
        rows_in=table.num_rows,
        rows_out=rows_out,
        features=tuple(f"{r.view.name}:{n}" for r in requests for n in r.names),
        plan_version=plan.version,
        first_label=first.isoformat() if first else None,
        last_label=last.isoformat() if last else None,
        seconds=time.perf_counter() - began,
        output=str(out) if out is not None else None,
        columns=columns,
        max_age=max_age,
        feature_columns={
            f"{r.view.name}:{n}": feature_column(r.view.name, n, views=len(requests), label_columns=table.column_names)
            for r in requests
            for n in r.names
        },
    )
    if out is not None:
        Path(f"{out}.manifest.json").write_text(json.dumps(summary.manifest(), indent=2) + "\n")
        return None, summary
    return pa.concat_tables(produced) if produced else table.slice(0, 0), summary


def _join_chunks(
    requests: list[_ViewRequest],
    offline: DeltaOfflineStore,
    labels: pa.Table,
    time_column: str,
    max_age: int | None,
    chunk_rows: int,
    memory_limit: str,
    *,
    shown: pa.Table | None = None,
) -> Generator[pa.Table, None, None]:
    """Labels with their features, a chunk of input rows at a time, in input order.

    Per view, two steps, each run once for all labels. (1) An ASOF join of every label's
    (row, entity, time) against the changelog's (entity, as_of) only: which changelog
    row each label takes. (2) A hash join of those (entity, as_of) pairs, the build side,
    with the changelog's feature columns, read once in a stream; its rows go to one
    Parquet folder per chunk of labels (unless there is only one chunk), which is then
    read back a chunk at a time and put in input order. Carrying the feature columns
    through the ASOF join instead made DuckDB sort every changelog row with all of them
    (17 s and a spill for 1M labels x 20 features against 26M rows; 5 s this way, at
    1.3 GB). Running both steps per chunk re-sorted and re-read the changelog for every
    chunk (10M labels: 68 s; once: see docs/design.md).
    """
    import duckdb

    connection = duckdb.connect()
    connection.execute(f"SET memory_limit = '{memory_limit}'")
    # Timestamps come back in UTC whatever the machine's zone (the labels are UTC too),
    # and the same whether a view's rows come straight from DuckDB or through Parquet.
    connection.execute("SET TimeZone = 'UTC'")
    # Spill files go to the system temp folder, never into the user's working folder.
    connection.execute(f"SET temp_directory = '{tempfile.gettempdir()}/tenx-duckdb'")
    connection.execute("SET preserve_insertion_order = false")  # order comes back from the row numbers
    connection.execute("SET enable_progress_bar = false")  # the caller shows progress; DuckDB's goes to the terminal
    for index, request in enumerate(requests):
        # DuckDB's own Parquet reader over the table's live files: parallel, with
        # projection and filter pushdown (2x faster than scanning an Arrow dataset).
        files = offline.changelog_files(request.view)
        if not files:  # backfilled over a range without events: every label gets empty windows
            connection.register(f"changelog_{index}", request.view.changelog_schema().empty_table())
            continue
        offline.parquet_view(connection, f"changelog_{index}", files)
    time_name = _quote(time_column)[1:-1]  # user-given: escaped, then used inside quotes
    needed = list(dict.fromkeys([r.view.entity_key for r in requests] + [time_column]))
    numbered = labels.select(needed).append_column(ROW, pa.array(range(labels.num_rows), pa.int64()))
    connection.register("labels", numbered)
    chunks = max(1, -(-labels.num_rows // chunk_rows))
    with tempfile.TemporaryDirectory(prefix="tenx-export-") as scratch:
        fetched: list[Callable[[int], pa.Table]] = []
        outputs: list[tuple[str, list[tuple[str, Any, pa.DataType | None]]]] = []
        for index, request in enumerate(requests):
            match, fetch, as_of_column, columns = _view_queries(
                index, request, labels, time_name, max_age, len(requests)
            )
            connection.execute(match)
            fetched.append(_fetched(connection, fetch, chunks, chunk_rows, Path(scratch) / f"view_{index}"))
            connection.execute(f"DROP TABLE matched_{index}")
            outputs.append((as_of_column, columns))
        connection.unregister("labels")
        del numbered
        output = shown if shown is not None else labels
        for number in range(chunks):
            chunk = output.slice(number * chunk_rows, chunk_rows)
            result = chunk
            for read, (as_of_column, columns) in zip(fetched, outputs, strict=True):
                part = read(number)
                part = part.take(pc.sort_indices(part.column(ROW)))
                if part.num_rows != chunk.num_rows:  # (entity, as_of) is unique in a changelog
                    raise RuntimeError(f"feature join returned {part.num_rows} rows for {chunk.num_rows} labels")
                for column, fallback, dtype in columns:
                    values = part.column(column)
                    if fallback is not None:
                        # No changelog row yet: the empty-window value (Count 0, Sum 0).
                        # Values blanked by max_age have a row, so they stay blank.
                        values = pc.if_else(pc.is_null(part.column(as_of_column)), pa.scalar(fallback, dtype), values)
                    result = result.append_column(column, values)
            yield result


def _fetched(connection: Any, fetch: str, chunks: int, chunk_rows: int, folder: Path) -> Callable[[int], pa.Table]:
    """Runs one view's feature query once for every label; returns a reader of the rows
    of one chunk of labels (any order). One chunk stays in memory; more go to Parquet
    files, one folder per chunk, so each chunk is read back alone."""
    if chunks == 1:
        whole = connection.sql(fetch).to_arrow_table()
        return lambda number: whole
    target = str(folder).replace("'", "''")
    connection.execute(
        f'COPY (SELECT *, "{ROW}" // {chunk_rows} AS __chunk FROM ({fetch})) '  # noqa: S608 - our names
        f"TO '{target}' (FORMAT parquet, PARTITION_BY (__chunk), COMPRESSION snappy)"
    )

    def read(number: int) -> pa.Table:
        files = sorted((folder / f"__chunk={number}").glob("*.parquet"))
        if not files:  # every label has a row (LEFT JOIN), so every chunk has files
            raise RuntimeError(f"feature join wrote no rows for label chunk {number}")
        return pa.concat_tables([pq.read_table(file) for file in files])

    return read


def _view_queries(
    index: int, request: _ViewRequest, labels: pa.Table, time_name: str, max_age: int | None, views: int
) -> tuple[str, str, str, list[tuple[str, Any, pa.DataType | None]]]:
    """(match statement, fetch query, its as_of column, output columns with their
    empty-window fills) of one view."""
    view = request.view
    key = view.entity_key
    matched = f"matched_{index}"
    as_of_column = f"{view.name}__as_of"
    age = f'epoch_us(l."{time_name}") - epoch_us(c."{AS_OF}")'
    stale = f'(c."{AS_OF}" IS NOT NULL AND {age} > {max_age})' if max_age is not None else "false"
    old = f'(c."{AS_OF}" IS NOT NULL AND {age} > {view.ttl})' if view.ttl else "false"  # the online rule
    match = (
        f"CREATE OR REPLACE TEMP TABLE {matched} AS "  # noqa: S608 - plan names are [a-z0-9_]
        f'SELECT l."{ROW}", l."{key}", c."{AS_OF}", {stale} AS __stale, {old} AS __old FROM labels l '
        f'ASOF LEFT JOIN (SELECT "{key}", "{AS_OF}" FROM changelog_{index}) c '
        f'ON l."{key}" = c."{key}" AND l."{time_name}" >= c."{AS_OF}"'
    )
    selects: list[str] = []
    columns: list[tuple[str, Any, pa.DataType | None]] = []
    for name in request.names:
        column = feature_column(view.name, name, views=views, label_columns=labels.column_names)
        feature = view.feature(name)
        selects.append(f'CASE WHEN m.__stale THEN NULL ELSE c."{name}" END AS "{column}"')
        fallback = empty_value(feature.kind, feature.dtype)
        columns.append((column, fallback, parse_dtype(feature.dtype) if fallback is not None else None))
    selects.append(f'm."{AS_OF}" AS "{as_of_column}"')
    columns.append((as_of_column, None, None))
    selects.append(
        f"CASE WHEN m.\"{AS_OF}\" IS NULL THEN 'missing' WHEN m.__stale OR m.__old THEN 'stale' "
        f"ELSE 'found' END AS \"{view.name}__status\""
    )
    columns.append((f"{view.name}__status", None, None))
    if max_age is not None:
        selects.append(f'm.__stale AS "{view.name}__stale"')
        columns.append((f"{view.name}__stale", None, None))
    needed = ", ".join(f'"{n}"' for n in (key, AS_OF, *request.names))
    fetch = (
        f'SELECT m."{ROW}", {", ".join(selects)} FROM {matched} m '  # noqa: S608 - plan names are [a-z0-9_]
        f"LEFT JOIN (SELECT {needed} FROM changelog_{index}) c "
        f'ON c."{key}" = m."{key}" AND c."{AS_OF}" = m."{AS_OF}"'
    )
    return match, fetch, as_of_column, columns


def _quote(name: str) -> str:
    """A SQL identifier for any label column name."""
    return '"' + name.replace('"', '""') + '"'


__all__ = ["ExportSummary", "LabelError", "export_training_set", "parse_features", "read_labels"]
