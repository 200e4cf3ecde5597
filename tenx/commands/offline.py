"""The offline commands: `tenx ingest`, `rejects`, `backfill`, `export`, `materialize`
and `verify` (events in, feature tables out, values to the online store)."""

from __future__ import annotations

import functools
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from featurestore.errors import ConfigError, TerminalError
from featurestore.plan import Plan, SourceSpec
from tenx.commands.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    applied_plan,
    config_option,
    console,
    friendly,
    offline_store,
    online_store,
    print_error,
    progress_bar,
    settings_of,
    store_name,
    view_or_error,
)

# -- offline: ingest and backfill ----------------------------------------------------------


def _source(plan: Plan, name: str | None) -> SourceSpec:
    """The source named, or the plan's only one."""
    if name is None:
        if len(plan.sources) != 1:
            names = ", ".join(s.name for s in plan.sources)
            raise ConfigError(f"the plan has several sources ({names}); choose one with --source")
        return plan.sources[0]
    try:
        return plan.source(name)
    except KeyError as error:
        raise ConfigError(str(error.args[0])) from error


def _parse_time(value: str | None, option: str) -> int | None:
    """`2026-01-01` (midnight UTC) or ISO-8601 with a timezone, as microseconds."""
    from datetime import UTC

    from featurestore.stores.offline import datetime_to_micros

    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as error:
        raise ConfigError(
            f"{option} {value!r}: {error}; expected a time like 2026-01-01 or 2026-01-01T10:00:00Z"
        ) from error
    if moment.tzinfo is None:
        if len(value) == 10:
            moment = moment.replace(tzinfo=UTC)
        else:
            raise ConfigError(f"{option} {value!r} has no timezone; add Z for UTC (2026-01-01T10:00:00Z)")
    return datetime_to_micros(moment)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--source", "source_name", default=None, help="Source to load into (default: the plan's only source).")
@click.option(
    "--force",
    is_flag=True,
    help="Read a file again even if a file with the same content was ingested (its events must not "
    "be in the table any more, unless --allow-duplicates).",
)
@click.option(
    "--allow-duplicates",
    is_flag=True,
    help="Ingest events equal in every field to events already in the table (they count twice).",
)
@click.option(
    "--skip-duplicates",
    is_flag=True,
    help="Store only the events not already in the table (e.g. a corrected rejects file); count the others.",
)
@config_option
@friendly
def ingest(
    files: tuple[Path, ...],
    source_name: str | None,
    force: bool,
    allow_duplicates: bool,
    skip_duplicates: bool,
    config_file: Path | None,
) -> None:
    """Validate event FILES (.parquet, .csv, .jsonl) and load them into the source's
    Delta events table.

    Invalid rows go to the rejects table with the reason (the most frequent reasons are
    printed; `tenx rejects` lists them). A file already ingested is skipped (same
    SHA-256) unless --force; events already in the table (every field equal: a file
    overlapping an earlier one) are refused, since every feature would count them twice:
    --skip-duplicates stores only the others, --allow-duplicates stores them again. A
    file missing a column of the schema, empty, unreadable or not UTF-8 is refused before
    anything is written. Exits 1 when a file had rows and
    none was valid."""
    from pipelines.ingest import ingest_file

    if allow_duplicates and skip_duplicates:
        raise ConfigError("--allow-duplicates and --skip-duplicates contradict each other: choose one")
    settings = settings_of(config_file)
    plan = applied_plan(settings)
    source = _source(plan, source_name)
    store = offline_store(settings)
    table = Table(title=f"ingest into {store.events_path(source)}", title_justify="left")
    for column in ("file", "rows", "ingested", "rejected", "seconds"):
        table.add_column(column, justify="right" if column != "file" else "left")
    summaries = []
    refused: list[str] = []  # one file's mistake does not stop the others
    for path in files:
        with progress_bar() as progress:
            advance = functools.partial(progress.advance, progress.add_task(f"ingesting {path.name}", total=None))
            try:
                summary = ingest_file(
                    store,
                    source,
                    path,
                    force=force,
                    allow_duplicates=allow_duplicates,
                    skip_duplicates=skip_duplicates,
                    progress=advance,
                )
            except TerminalError as error:
                refused.append(str(error))
                table.add_row(str(path), "-", "refused", "-", "-")
                continue
        summaries.append(summary)
        if summary.skipped:
            table.add_row(str(path), "-", "already ingested", "-", f"{summary.seconds:.1f}")
            continue
        table.add_row(
            str(path),
            f"{summary.rows_in:,}",
            f"{summary.ingested:,}",
            f"{summary.rejected:,}",
            f"{summary.seconds:.1f}",
        )
    console.print(table)
    for summary in summaries:
        if summary.duplicates:
            nothing_new = "; nothing new was stored" if not summary.ingested else ""
            console.print(f"{summary.file}: {summary.duplicates:,} events already in the table left out{nothing_new}")
        if summary.reasons:
            console.print(f"{summary.file}: {summary.rejected:,} rejected; most frequent reasons:")
            for reason, count in summary.reasons:
                console.print(f"  {count:>9,}  {reason}", markup=False, highlight=False)
    if any(summary.rejected for summary in summaries):
        console.print(f"All rejects: `tenx rejects` (Delta table {store.rejects_path(source)})")
    for problem in refused:
        print_error(problem)
    if refused:
        sys.exit(EXIT_USAGE)
    # Valid events all already stored (--skip-duplicates) are not a failure: the table holds them.
    nothing = [str(s.file) for s in summaries if not s.skipped and s.rows_in and not s.ingested and not s.duplicates]
    if nothing:
        print_error(f"no valid event in {', '.join(nothing)}")
        sys.exit(EXIT_FAILURE)


@click.command()
@click.option("--source", "source_name", default=None, help="Source whose rejects to list (default: the only one).")
@click.option("--file", "file_name", default=None, help="Only rows rejected from this input file (as ingested).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=0), help="Rows to show (0: all).")
@config_option
@friendly
def rejects(source_name: str | None, file_name: str | None, limit: int, config_file: Path | None) -> None:
    """List rows `tenx ingest` rejected, newest first: file, row, reason and the record
    as read, with a count per reason."""
    from pipelines.ingest import reason_counts

    settings = settings_of(config_file)
    plan = applied_plan(settings)
    source = _source(plan, source_name)
    store = offline_store(settings)
    rows = store.read_rejects(source).to_pylist()
    if file_name is not None:
        rows = [row for row in rows if row["file"] == file_name or Path(row["file"]).name == file_name]
    if not rows:
        console.print(f"No rejected rows for source `{source.name}`{f' from {file_name}' if file_name else ''}.")
        return
    rows.sort(key=lambda row: (row["ingested_at"], row["file"], -row["row"]), reverse=True)
    summary = Table(title=f"{len(rows):,} rejected rows of `{source.name}` by reason", title_justify="left")
    summary.add_column("rows", justify="right")
    summary.add_column("reason (the bad values differ)")
    for kind, _, count in reason_counts(row["reason"] for row in rows):
        summary.add_row(f"{count:,}", kind)
    console.print(summary)
    shown = rows if limit == 0 else rows[:limit]
    table = Table(title=f"newest {len(shown):,}", title_justify="left")
    for column in ("ingested at", "file", "row", "reason", "record"):
        table.add_column(column, overflow="fold")
    for row in shown:
        moment = row["ingested_at"].strftime("%Y-%m-%d %H:%M:%SZ")
        table.add_row(moment, row["file"], str(row["row"]), row["reason"], row["record"])
    console.print(table)


@click.command()
@click.option(
    "--view", "views", multiple=True, help="Feature view to backfill (repeatable; default: all offline views)."
)
@click.option("--start", default=None, help="First as-of time (2026-01-01 or ISO-8601 with Z); default: first event.")
@click.option("--end", default=None, help="End of the range, exclusive; default: expiry of the last event.")
@click.option(
    "--backend",
    type=click.Choice(["pandas", "cudf"]),
    default="pandas",
    show_default=True,
    help="Partition frames: pandas on CPU, cuDF on GPU (needs tenx[gpu]).",
)
@click.option("--scheduler", default=None, help="Dask scheduler address (tcp://host:port); default: a local cluster.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads of the local cluster (default: cores; 2 with --backend cudf, as tasks share one GPU).",
)
@click.option(
    "--partitions", type=click.IntRange(min=1), default=None, help="Entity partitions (default: 1 per 400k events)."
)
@click.option(
    "--scratch-dir",
    default=None,
    help="Where the shuffle goes: a folder or an s3://bucket/prefix every worker reaches (default: beside a local "
    "offline store, the temp folder for one on S3; workers on other hosts need a shared one).",
)
@config_option
@friendly
def backfill(
    views: tuple[str, ...],
    start: str | None,
    end: str | None,
    backend: str,
    scheduler: str | None,
    workers: int | None,
    partitions: int | None,
    scratch_dir: str | None,
    config_file: Path | None,
) -> None:
    """Compute feature changelogs from the Delta events with Dask and write them to
    Delta feature tables. A range is replaced exactly: running it twice changes nothing."""
    from featurestore.stores.offline import micros_to_datetime
    from pipelines.batch.engine import Backend
    from pipelines.batch.engine import backfill as run_backfill

    settings = settings_of(config_file)
    plan = applied_plan(settings)
    for name in views:
        view_or_error(plan, name)
    store = offline_store(settings)
    began = time.perf_counter()
    with progress_bar() as progress:
        tasks: dict[str, Any] = {}

        def advance(view: str, done: int, total: int) -> None:
            if view not in tasks:
                tasks[view] = progress.add_task(f"backfilling {view}", total=total)
            progress.update(tasks[view], completed=done, total=total)

        summaries = run_backfill(
            plan,
            store,
            views=list(views) or None,
            start=_parse_time(start, "--start"),
            end=_parse_time(end, "--end"),
            backend=Backend(backend),
            scheduler=scheduler,
            workers=workers,
            partitions=partitions,
            progress=advance,
            scratch_dir=scratch_dir,
        )
    table = Table(title=f"backfill ({backend}, {time.perf_counter() - began:.1f} s)", title_justify="left")
    for column in ("view", "as-of range (UTC)", "events", "rows", "seconds", "events/s"):
        table.add_column(column, justify="left" if column in ("view", "as-of range (UTC)") else "right")
    for s in summaries:
        rate = s.events_read / s.seconds if s.seconds else 0.0
        table.add_row(
            s.view,
            f"{micros_to_datetime(s.start):%Y-%m-%d %H:%M} .. {micros_to_datetime(s.end):%Y-%m-%d %H:%M}",
            f"{s.events_read:,}",
            f"{s.rows_written:,}",
            f"{s.seconds:.1f}",
            f"{rate:,.0f}",
        )
    console.print(table)
    for s in summaries:
        view = plan.view(s.view)
        console.print(f"  {s.view} (version {s.version}): {store.changelog_path(view)}", highlight=False)


@click.command("export")
@click.option(
    "--labels",
    "labels_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Label rows: Parquet or CSV with the entity key column(s) and a timestamp column with a time zone "
    "(any zone: it is joined in UTC and written back as given).",
)
@click.option("--features", required=True, help="Comma-separated view:feature names (view:* for all of a view).")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output Parquet file.")
@click.option("--time-column", default="timestamp", show_default=True, help="Label column holding the label time.")
@click.option("--max-age", default=None, help="Blank values older than this at the label time (e.g. 2d); flagged.")
@click.option(
    "--chunk-rows",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Labels joined per chunk (bounds memory).",
)
@config_option
@friendly
def export(
    labels_path: Path,
    features: str,
    out: Path,
    time_column: str,
    max_age: str | None,
    chunk_rows: int,
    config_file: Path | None,
) -> None:
    """Export a point-in-time correct training set: every label row, in input order, with
    the feature values the online store would have served at its timestamp. Writes OUT
    (Parquet) and OUT.manifest.json (plan version, features, columns, rows in and out,
    time range).

    A feature's column is its name (count_1d), or <view>__<name> when the features come
    from several views or a label column has that name; <view>__as_of says which
    changelog row each value came from, and <view>__status what the online store would
    have answered: found, missing (no row yet: Count 0, Sum 0, others null) or stale
    (older than the view's ttl, or than --max-age, which also blanks the values and adds
    <view>__stale). The label columns come back as given, time zone included. The
    manifest lists the columns written."""
    from featurestore.durations import parse_duration
    from training import export_training_set

    if out.suffix.lower() != ".parquet":
        raise ConfigError(f"--out {out}: the training set is written as Parquet; name it *.parquet")
    if out.exists() and labels_path.exists() and out.resolve() == labels_path.resolve():
        raise ConfigError(f"--out {out} is the labels file; writing it would destroy the labels: choose another path")
    settings = settings_of(config_file)
    plan = applied_plan(settings)
    try:
        age = parse_duration(max_age) if max_age else None
    except ValueError as error:
        raise ConfigError(f"--max-age: {error}") from error
    references = [f.strip() for f in features.split(",") if f.strip()]
    with progress_bar() as progress:
        advance = functools.partial(progress.advance, progress.add_task("exporting", total=None))
        _, summary = export_training_set(
            plan,
            offline_store(settings),
            labels_path,
            references,
            time_column=time_column,
            max_age=age,
            out=out,
            chunk_rows=chunk_rows,
            progress=advance,
        )
    console.print(
        f"Exported {summary.rows_out:,} of {summary.rows_in:,} label rows x {len(summary.features)} features "
        f"to {out} in {summary.seconds:.1f} s (manifest: {out}.manifest.json)",
        highlight=False,
    )


# -- online: materialize and serve --------------------------------------------------------


@click.command()
@click.option("--view", "views", multiple=True, help="Feature view to load (repeatable; default: all online views).")
@click.option(
    "--as-of",
    "as_of",
    default=None,
    help="Load values as of this time: 2026-01-01 (midnight UTC) or ISO-8601 with a zone, 2026-01-01T10:00:00Z "
    "(default: now; never later than now).",
)
@config_option
@friendly
def materialize(views: tuple[str, ...], as_of: str | None, config_file: Path | None) -> None:
    """Load the latest changelog row per entity from the Delta feature tables into the
    online store (Redis when TENX_REDIS_URL is set, else the embedded store). Safe while
    the stream job writes: an older value never replaces a newer one."""
    from featurestore.stores.offline import micros_to_datetime
    from pipelines.materialize import materialize as run_materialize

    settings = settings_of(config_file)
    plan = applied_plan(settings)
    chosen = [view_or_error(plan, name) for name in views] if views else [v for v in plan.views if v.online]
    # Not the last changelog row: a backfill holds expiry rows up to the widest window
    # ahead, and a value from the future would also block the stream's writes until then.
    parsed = _parse_time(as_of, "--as-of")
    now = _now_us()
    if parsed is not None and parsed > now:
        now_text = micros_to_datetime(now).replace(microsecond=0).isoformat()
        raise ConfigError(
            f"--as-of {as_of!r} is later than now ({now_text}); the online store would get values from the future "
            "(a backfill's expiry rows) and refuse the stream job's writes as older until then: pass a time up to "
            "now, or leave --as-of out for now"
        )
    moment = parsed if parsed is not None else now
    empty: list[str] = []
    offline = offline_store(settings)
    online = online_store(settings, plan)
    table = Table(title=f"materialize into {store_name(settings)}", title_justify="left")
    for column in ("view", "entities", "written", "kept newer", "seconds"):
        table.add_column(column, justify="left" if column == "view" else "right")
    try:
        for view in chosen:
            with progress_bar() as progress:
                advance = functools.partial(
                    progress.advance, progress.add_task(f"materializing {view.name}", total=None)
                )
                summary = run_materialize(view, offline, online, as_of=moment, progress=advance)
            table.add_row(
                view.name,
                f"{summary.entities:,}",
                f"{summary.written:,}",
                f"{summary.skipped:,}",
                f"{summary.seconds:.1f}",
            )
            if not summary.entities:
                empty.append(view.name)
    finally:
        online.close()
    console.print(table)
    if empty:
        console.print(
            f"note: {', '.join(empty)}: no entity has a changelog row at or before "
            f"{micros_to_datetime(moment).isoformat()}; pass a later --as-of, or backfill the data first",
            highlight=False,
        )


def _now_us() -> int:
    from datetime import UTC

    from featurestore.stores.offline import datetime_to_micros

    # Backfills hold future expiry rows; the online store gets the values as of now.
    return datetime_to_micros(datetime.now(UTC))


@click.command()
@click.option("--view", "views", multiple=True, help="Feature view to check (repeatable; default: all online views).")
@click.option("--sample", default=200, show_default=True, type=click.IntRange(min=1), help="Entities per view.")
@config_option
@friendly
def verify(views: tuple[str, ...], sample: int, config_file: Path | None) -> None:
    """Online/offline parity: for a random sample of entities, the online value must
    equal the last changelog row at or before its online as_of. Exits 1 on a mismatch,
    and when no sampled entity is online (nothing could be compared)."""
    from featurestore.verify import STEPS, verify_view

    settings = settings_of(config_file)
    plan = applied_plan(settings)
    chosen = [view_or_error(plan, n) for n in views] if views else [v for v in plan.views if v.online]
    online = online_store(settings, plan)
    failed = False
    try:
        for view in chosen:
            with progress_bar() as progress:
                task = progress.add_task(f"verifying {view.name}: reading the changelog's entities", total=STEPS)

                def step(what: str, task: Any = task, name: str = view.name) -> None:
                    progress.update(task, advance=1, description=f"verifying {name}: {what}")

                report = verify_view(view, offline_store(settings), online, sample=sample, progress=step)
            status = "[green]ok[/]" if report.ok else "[red]MISMATCH[/]"
            console.print(
                f"{view.name}: {status} {report.checked} checked, {len(report.mismatches)} mismatching values, "
                f"{report.missing_online} not online, {report.missing_offline} without an offline row"
            )
            for mismatch in report.mismatches[:20]:
                console.print(f"  {mismatch}", markup=False, highlight=False)
            if report.nothing_online:
                console.print(
                    f"  none of the {report.missing_online} sampled entities has an online value, so nothing was "
                    "compared: run `tenx materialize` (or the stream job) for this plan first"
                )
            failed = failed or not report.ok
    finally:
        online.close()
    if failed:
        sys.exit(EXIT_FAILURE)
