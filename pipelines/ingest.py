"""Loading raw event files into a source's Delta events table, validated.

Every input row ends up in exactly one place: the events table (valid) or the rejects
table (with every reason). Files are read in batches, so memory stays bounded; a file
already ingested (same SHA-256) is skipped unless forced. Events already in the table
(every field equal, a file overlapping an earlier one) are refused unless allowed: they
would be counted twice by every feature.
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from featurestore.errors import TerminalError, WriteConflict
from featurestore.plan.model import SourceSpec
from featurestore.stores.offline import REJECTS_SCHEMA, DeltaOfflineStore
from schemas.validation import validate_batch, validate_record

BATCH_ROWS = 250_000
COMMIT_ATTEMPTS = 20  # an ingest racing others renumbers and retries this often before giving up
FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class IngestSummary:
    file: Path
    rows_in: int
    ingested: int
    rejected: int
    seconds: float
    skipped: bool = False  # already ingested
    reasons: tuple[tuple[str, int], ...] = ()  # the most frequent reject reasons, with counts
    duplicates: int = 0  # valid events already in the table, left out (skip_duplicates)


class DuplicateEventsError(TerminalError):
    """Valid events of a file are already in the events table."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ingest_file(
    store: DeltaOfflineStore,
    source: SourceSpec,
    path: Path,
    *,
    force: bool = False,
    allow_duplicates: bool = False,
    skip_duplicates: bool = False,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> IngestSummary:
    """Validate `path` (Parquet, CSV or JSON lines) against the source schema and append
    its valid rows to the events table and its invalid rows to the rejects table.

    Raises TerminalError, before writing anything, for a file that is empty, unreadable
    or lacks a column of the schema, and DuplicateEventsError for valid events already
    in the table (unless `allow_duplicates`, which stores them again, or
    `skip_duplicates`, which stores only the others and counts those left out)."""
    if allow_duplicates and skip_duplicates:
        raise TerminalError("allow_duplicates and skip_duplicates contradict each other: choose one")
    began = time.perf_counter()
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise TerminalError(f"{path}: unknown format {path.suffix!r}; expected .parquet, .csv or .jsonl")
    if not path.exists():
        raise TerminalError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise TerminalError(f"{path}: the file is empty")
    _check_columns(path, kind, source)
    digest = file_digest(path)

    def already_ingested() -> bool:
        """The file's digest is in the events table's history (`--force` ignores it)."""
        return not force and any(record.file_sha256 == digest for record in store.ingests(source))

    if already_ingested():
        return IngestSummary(path, 0, 0, 0, time.perf_counter() - began, skipped=True)
    store.check_events_table(source)  # before reading the file: it could not be appended

    now = clock()
    rows_in = valid_rows = rejected = 0
    reasons = _Reasons()
    with tempfile.TemporaryDirectory(prefix="tenx-ingest-") as scratch:
        staged = Path(scratch) / "valid.parquet"
        # Rejects go to a scratch file too, as valid rows do: kept in memory until the
        # commit, they grew the process by about 275 MB a million (each is its row as JSON).
        staged_rejects = Path(scratch) / "rejects.parquet"
        writer = pq.ParquetWriter(staged, source.schema.arrow_schema())
        reject_writer = pq.ParquetWriter(staged_rejects, REJECTS_SCHEMA)
        try:
            for offset, batch in _batches(path, kind, source):
                rows_in += batch.num_rows
                valid, rejects = _validate(source, batch, offset, path, now)
                if valid.num_rows:
                    writer.write_table(valid)
                    valid_rows += valid.num_rows
                if rejects.num_rows:
                    reject_writer.write_table(rejects.cast(REJECTS_SCHEMA))
                    reasons.add(rejects.column("reason").to_pylist())
                    rejected += rejects.num_rows
                if progress is not None:
                    progress(batch.num_rows)
        finally:
            writer.close()
            reject_writer.close()

        # Check and append against one version of the events table; when another ingest
        # appends first, the append fails (WriteConflict) and everything is read again:
        # `_seq` numbers never overlap and the duplicate check sees the winner's events.
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            version = store.events_version(source, create=True)
            if attempt > 1 and already_ingested():
                return IngestSummary(path, 0, 0, 0, time.perf_counter() - began, skipped=True)  # the winner had it
            try:
                stored, duplicates = _append(
                    store,
                    source,
                    staged,
                    path,
                    valid_rows=valid_rows,
                    scratch=Path(scratch),
                    version=version,
                    digest=digest,
                    rejects=(staged_rejects, rejected),
                    allow_duplicates=allow_duplicates,
                    skip_duplicates=skip_duplicates,
                )
                break
            except DuplicateEventsError:
                if already_ingested():  # the same file, committed by another ingest while this one checked
                    return IngestSummary(path, 0, 0, 0, time.perf_counter() - began, skipped=True)
                raise
            except WriteConflict:
                if attempt == COMMIT_ATTEMPTS:
                    raise
                time.sleep(random.uniform(0.02, 0.2) * attempt)  # jitter: racing writers drift apart
        valid_rows = stored
    seconds = time.perf_counter() - began
    return IngestSummary(path, rows_in, valid_rows, rejected, seconds, reasons=reasons.top(), duplicates=duplicates)


def _append(
    store: DeltaOfflineStore,
    source: SourceSpec,
    staged: Path,
    path: Path,
    *,
    valid_rows: int,
    scratch: Path,
    version: int | None,
    digest: str,
    rejects: tuple[Path, int],
    allow_duplicates: bool,
    skip_duplicates: bool,
) -> tuple[int, int]:
    """One attempt: the duplicate check and the commits, against events table `version`.
    Returns (events stored, duplicates left out); raises WriteConflict when another
    writer appended after `version`."""
    duplicates = 0
    if valid_rows and not allow_duplicates:
        found = _stored_duplicates(store, source, staged, path, scratch)
        if len(found) and not skip_duplicates:
            raise DuplicateEventsError(
                f"{path}: {len(found):,} of its {valid_rows:,} valid events are already in the events table of "
                f"`{source.name}` (every field equal); ingesting them again would count them twice. Pass "
                "--skip-duplicates to store only the new ones, or --allow-duplicates if they really are "
                "distinct events."
            )
        if len(found):
            duplicates = len(found)
            staged = _without_rows(staged, found, scratch / "new.parquet", source)
            valid_rows -= duplicates
    metadata = {
        "tenx.file_sha256": digest,
        "tenx.file": str(path),
        "tenx.rows": str(valid_rows),
        "tenx.rejected": str(rejects[1]),
    }
    # Rejects first: should the process die between the two commits, a re-run
    # (the file is not yet recorded as ingested) writes the events, and the
    # rejects of a file are looked up by its digest, never written twice.
    if rejects[1]:  # once per file, even when ingests of it race (see append_rejects)
        stored = pq.ParquetFile(rejects[0])
        batches = pa.RecordBatchReader.from_batches(REJECTS_SCHEMA, stored.iter_batches(batch_size=BATCH_ROWS))
        store.append_rejects(source, batches, metadata=metadata)
    if valid_rows:
        reader = pq.ParquetFile(staged)
        store.append_events(
            source,
            reader.iter_batches(batch_size=BATCH_ROWS),
            rows=valid_rows,
            metadata=metadata,
            read_version=version,
        )
    return valid_rows, duplicates


def _check_columns(path: Path, kind: str, source: SourceSpec) -> None:
    """A Parquet or CSV file must name each column of the schema once, and hold every
    required one (else every row would be rejected for the same reason): said at once,
    nothing written."""
    if kind == "jsonl":
        return  # each record carries its own fields: checked per record
    try:
        names = pq.ParquetFile(path).schema_arrow.names if kind == "parquet" else pacsv.open_csv(path).schema.names
    except (pa.ArrowInvalid, OSError) as error:
        raise TerminalError(f"{path}: not a readable {kind} file ({error})") from error
    repeated = [name for name, count in collections.Counter(names).items() if count > 1 and name in source.schema.names]
    if repeated:
        raise TerminalError(
            f"{path}: the file names column(s) {', '.join(f'`{name}`' for name in repeated)} of source "
            f"`{source.name}` more than once; tenx cannot tell which is meant: rename or drop the extra ones"
        )
    problems = []
    # A missing required column rejects every row: refused.
    missing = [f.name for f in source.schema.fields if f.name not in names and not f.nullable]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, names, n=1)
            hints.append(f"`{name}`" + (f" (the file has `{close[0]}`)" if close else ""))
        problems.append(f"missing column(s) {', '.join(hints)} of source `{source.name}`")
    # A missing nullable column reads as nulls, unless the file has it in another case or
    # with spaces (`Fval`, `txt `): its values would be stored as null without a word.
    unused = [name for name in names if name not in source.schema.names]
    misspelled = [
        (f.name, near)
        for f in source.schema.fields
        if f.nullable and f.name not in names and (near := _spelled_otherwise(f.name, unused)) is not None
    ]
    if misspelled:
        hints = [f"`{name}` (the file has `{near}`)" for name, near in misspelled]
        problems.append(
            f"nullable column(s) {', '.join(hints)} of source `{source.name}` not found by name, so they would "
            "be stored as all null: rename the file's column(s) to the schema's names (if one really is another "
            "column, add an empty column of the schema's name)"
        )
    if problems:
        raise TerminalError(f"{path}: {'; '.join(problems)}; the file has: {', '.join(names) or 'no columns'}")


def _spelled_otherwise(name: str, candidates: list[str]) -> str | None:
    """The candidate that is `name` in another case or with spaces around it. Only that:
    a close spelling may well be another column (`subcategory` beside `category`,
    `amount_usd` beside `amount_eur`), and this refuses a file that is otherwise valid."""
    for candidate in candidates:
        if candidate.strip().casefold() == name.casefold():
            return candidate
    return None


def _stored_duplicates(
    store: DeltaOfflineStore, source: SourceSpec, staged: Path, path: Path, scratch: Path
) -> np.ndarray:
    """Row numbers (in the staged file) of the staged events equal, in every field, to an
    event already in the table; sorted.

    Only the table's files for the days the staged events fall on are read (date
    partitions), so appending newer events costs little; DuckDB streams the comparison
    within a memory limit, spilling to the ingest's scratch folder."""
    import duckdb

    times = pq.read_table(staged, columns=[source.event_time]).column(source.event_time)
    days = [day.isoformat() for day in pc.unique(pc.cast(times, pa.date32())).to_pylist()]  # UTC days
    files = store.event_files_on(source, days)
    if not files:
        return np.empty(0, dtype=np.int64)
    names = ", ".join(f'"{name}"' for name in source.schema.names)
    same = " AND ".join(f's."{name}" IS NOT DISTINCT FROM e."{name}"' for name in source.schema.names)
    connection = duckdb.connect()
    try:
        connection.execute("SET TimeZone = 'UTC'")
        connection.execute("SET enable_progress_bar = false")
        connection.execute("SET memory_limit = '1GB'")
        connection.execute(f"SET temp_directory = '{str(scratch).replace(chr(39), chr(39) * 2)}'")
        # DuckDB's own reader (pyarrow datasets registered in DuckDB were 1.5x slower); it
        # takes an existing path literally, glob characters included (tested).
        connection.read_parquet([str(staged)], file_row_number=True).create_view("staged")
        store.parquet_view(connection, "stored", files)
        found = connection.execute(
            "SELECT s.file_row_number FROM staged s "  # noqa: S608 - schema names
            f"SEMI JOIN (SELECT {names} FROM stored) e ON {same} ORDER BY 1"
        ).fetchnumpy()["file_row_number"]
    except duckdb.Error as error:
        raise TerminalError(f"{path}: could not compare with the stored events: {error}") from error
    finally:
        connection.close()
    return np.asarray(found, dtype=np.int64)


def _without_rows(staged: Path, rows: np.ndarray, out: Path, source: SourceSpec) -> Path:
    """A copy of the staged file without the given (sorted) row numbers, batch by batch."""
    writer = pq.ParquetWriter(out, source.schema.arrow_schema())
    offset = 0
    try:
        for batch in pq.ParquetFile(staged).iter_batches(batch_size=BATCH_ROWS):
            inside = rows[(rows >= offset) & (rows < offset + batch.num_rows)] - offset
            keep = np.ones(batch.num_rows, dtype=bool)
            keep[inside] = False
            if keep.any():
                writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)))
            offset += batch.num_rows
    finally:
        writer.close()
    return out


def reason_kind(reason: str) -> str:
    """A reject reason without its value: "field `x`: expected int64, got 'oops'" ->
    "field `x`: expected int64". Reasons with different bad values count as one kind."""
    return "; ".join(part.rsplit(", got ", 1)[0] for part in reason.split("; "))


def reason_counts(reasons: Iterable[str]) -> list[tuple[str, str, int]]:
    """(kind, first example, count) per kind of reason, most frequent first."""
    counts: collections.Counter[str] = collections.Counter()
    example: dict[str, str] = {}
    for reason in reasons:
        kind = reason_kind(reason)
        counts[kind] += 1
        example.setdefault(kind, reason)
    return [(kind, example[kind], count) for kind, count in counts.most_common()]


class _Reasons:
    """Counts of reject reasons by kind, as batches are read (`reason_counts`, kept
    incrementally: the rejects themselves are not kept)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.example: dict[str, str] = {}

    def add(self, reasons: Iterable[str]) -> None:
        for reason in reasons:
            kind = reason_kind(reason)
            self.counts[kind] += 1
            self.example.setdefault(kind, reason)

    def top(self, limit: int = 5) -> tuple[tuple[str, int], ...]:
        """The most frequent kinds of reason, each shown by its first example."""
        return tuple((self.example[kind], count) for kind, count in self.counts.most_common(limit))


def _batches(path: Path, kind: str, source: SourceSpec) -> Iterator[tuple[int, pa.Table]]:
    """(offset of the first row, rows) in file order."""
    offset = 0
    if kind == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            yield offset, pa.Table.from_batches([batch])
            offset += batch.num_rows
    elif kind == "csv":
        # Everything as text: validation parses it, so one bad cell rejects one row. Only
        # an unquoted empty cell is null: Arrow's default spellings of null (NA, null,
        # N/A, nan, "") turned Namibia's country code `NA` into a null.
        names = pacsv.open_csv(path).schema.names
        options = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=True,
            null_values=[""],
            quoted_strings_can_be_null=False,
        )
        not_text = [f.name for f in source.schema.fields if not pa.types.is_string(f.dtype) and f.name in names]
        try:
            reader = pacsv.open_csv(path, convert_options=options, read_options=pacsv.ReadOptions(block_size=32 << 20))
        except pa.ArrowInvalid as error:
            raise _unreadable_csv(path, offset, names, error) from error
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as error:  # a malformed line (wrong field count, bad quoting)
                raise _unreadable_csv(path, offset, names, error) from error
            yield offset, _empty_as_null(pa.Table.from_batches([batch]), not_text)
            offset += batch.num_rows
    else:
        yield from _json_lines(path)


# What CSV writers write for a missing value (Arrow's default spellings of null; R's
# write.csv writes NA). Null in a number, bool or time column, where none of them can be
# a value; text in a string column (Namibia's country code is NA).
_NULL_SPELLINGS = pa.array(pacsv.ConvertOptions().null_values, pa.string())


def _empty_as_null(table: pa.Table, names: list[str]) -> pa.Table:
    """A quoted empty cell (`""`, as writers quoting every field write a missing value)
    or a spelling of null (`NA`, `null`, `N/A`, `nan`, ...) is null in a number, bool or
    time column: no such value is either. In a string column both stay text."""
    for name in names:
        column = table.column(name)
        missing = pc.is_in(column, value_set=_NULL_SPELLINGS)
        if pc.any(missing).as_py():
            table = table.set_column(
                table.schema.get_field_index(name), name, pc.if_else(missing, pa.scalar(None, pa.string()), column)
            )
    return table


def _unreadable_csv(path: Path, offset: int, names: list[str], error: pa.ArrowInvalid) -> TerminalError:
    """One line for a CSV file pyarrow cannot read past row `offset` (nothing ingested)."""
    text = str(error)
    if "invalid UTF8" in text:
        column = re.search(r"column #(\d+)", text)
        where = f", column `{names[int(column.group(1))]}`" if column and int(column.group(1)) < len(names) else ""
        return TerminalError(
            f"{path}: not UTF-8 text (in the block from row {offset:,}{where}); tenx reads CSV files as UTF-8: "
            f"convert it first, e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.csv`; "
            "nothing was ingested"
        )
    return TerminalError(f"{path}: not a readable csv file after row {offset:,} ({text}); nothing was ingested")


def _json_lines(path: Path) -> Iterator[tuple[int, pa.Table]]:
    """JSON lines become a table of one `_json` text column; `_validate` decodes them one
    by one (a broken line must reject itself, not the file). A line that is not UTF-8 is
    kept (invalid bytes shown as U+FFFD) with why in `_not_utf8`, and is rejected for
    it: replacing the bytes silently would change the record (two keys could become one)."""
    offset = 0
    lines: list[str] = []
    problems: list[str | None] = []

    def table() -> pa.Table:
        return pa.table({"_json": lines, "_not_utf8": pa.array(problems, pa.string())})

    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                problem = None
            except UnicodeDecodeError as error:
                line = raw.decode("utf-8", errors="replace")
                problem = f"not UTF-8 text: byte 0x{raw[error.start]:02x} at position {error.start}"
            lines.append(line.rstrip("\n"))
            problems.append(problem)
            if len(lines) >= BATCH_ROWS:
                yield offset, table()
                offset += len(lines)
                lines, problems = [], []
    if lines:
        yield offset, table()


def _validate(source: SourceSpec, batch: pa.Table, offset: int, path: Path, now: datetime) -> tuple[pa.Table, pa.Table]:
    if batch.column_names == ["_json", "_not_utf8"]:
        lines, problems = batch.column("_json").to_pylist(), batch.column("_not_utf8").to_pylist()
        valid, rejects = _validate_json(source, lines, offset, path, now, problems)
    else:
        valid, rejects = _validate_table(source, batch, offset, path, now)
    return _refuse_future(source, valid, rejects, offset, path, now)


def _refuse_future(
    source: SourceSpec, valid: pa.Table, rejects: pa.Table, offset: int, path: Path, now: datetime
) -> tuple[pa.Table, pa.Table]:
    """Events more than the source's max_future ahead of the clock are rejected, as the
    stream job dead-letters them: a producer's wrong clock, not an event."""
    if not valid.num_rows:
        return valid, rejects
    times = valid.column(source.event_time).cast(pa.int64()).to_numpy(zero_copy_only=False)
    future = times > source.future_limit(int(now.timestamp() * 1_000_000))
    if not future.any():
        return valid, rejects
    # Input rows of the valid rows: the rows of the batch that were not rejected, in order.
    refused = set(rejects.column("row").to_pylist())
    rows = [row for row in range(offset, offset + valid.num_rows + len(refused)) if row not in refused]
    found = valid.filter(pa.array(future)).to_pylist()
    extra = pa.table(
        {
            "file": [str(path)] * len(found),
            "row": [rows[i] for i in np.flatnonzero(future).tolist()],
            "record": [orjson.dumps(record, default=str).decode() for record in found],
            "reason": [source.future_reason(int(moment)) for moment in times[future].tolist()],
            "ingested_at": pa.array([now] * len(found), pa.timestamp("us", tz="UTC")),
        },
        schema=REJECTS_SCHEMA,
    )
    return valid.filter(pa.array(~future)), pa.concat_tables([rejects, extra])


def _validate_table(
    source: SourceSpec, batch: pa.Table, offset: int, path: Path, now: datetime
) -> tuple[pa.Table, pa.Table]:
    result = validate_batch(source.schema, batch)
    rejected = result.rejected
    records = [
        orjson.dumps({k: v for k, v in row.items() if k not in ("row", "reason")}).decode()
        for row in rejected.to_pylist()
    ]
    rejects = pa.table(
        {
            "file": [str(path)] * rejected.num_rows,
            "row": pa.compute.add(rejected.column("row"), offset),
            "record": records,
            "reason": rejected.column("reason"),
            "ingested_at": pa.array([now] * rejected.num_rows, pa.timestamp("us", tz="UTC")),
        },
        schema=REJECTS_SCHEMA,
    )
    return result.valid, rejects


def _validate_json(
    source: SourceSpec, lines: list[str], offset: int, path: Path, now: datetime, problems: list[str | None]
) -> tuple[pa.Table, pa.Table]:
    good: list[dict[str, object]] = []
    bad: dict[str, list[object]] = {name: [] for name in REJECTS_SCHEMA.names}
    for index, line in enumerate(lines):
        reason = problems[index]  # not UTF-8
        if reason is None:
            try:
                decoded = orjson.loads(line)
            except orjson.JSONDecodeError as error:
                reason = f"invalid JSON: {error}"
            else:
                record, found = validate_record(source.schema, decoded)
                if record is not None:
                    good.append(record)
                    continue
                reason = "; ".join(str(p) for p in found)
        for name, value in (("file", str(path)), ("row", offset + index), ("record", line), ("reason", reason)):
            bad[name].append(value)
        bad["ingested_at"].append(now)
    schema = source.schema.arrow_schema()
    time_column = source.event_time
    columns = {
        f.name: (
            pa.array([r[f.name] for r in good], pa.int64()).cast(f.dtype)
            if f.name == time_column
            else pa.array([r[f.name] for r in good], f.dtype)
        )
        for f in source.schema.fields
    }
    return pa.table(columns, schema=schema), pa.table(bad, schema=REJECTS_SCHEMA)
