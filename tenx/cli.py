"""The `tenx` command line. Settings are read here, once, and passed down."""

from __future__ import annotations

import functools
import os
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from featurestore.config import ENVIRONMENT, Settings
from featurestore.durations import format_duration
from featurestore.errors import ConfigError, RegistryError, TerminalError
from featurestore.plan import Plan, SourceSpec, diff_plans
from featurestore.registry import FileRegistry
from tenx import __version__
from tenx.commands import canary as _canary  # noqa: F401 - registers models canary/promote/rollback/status
from tenx.commands.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    applied_plan,
    check_port_free,
    compile_plan,
    config_option,
    console,
    errors,
    friendly,
    offline_store,
    online_store,
    print_error,
    progress_bar,
    read_token,
    settings_of,
    store_name,
    token_options,
    view_or_error,
)
from tenx.commands.cost import cost
from tenx.commands.loadtest import loadtest
from tenx.commands.models import models, predict, serve_models, train
from tenx.commands.stream import stream
from tenx.commands.top import top

_ENV_HELP = "\n".join(f"  {name}: {meaning}" for name, meaning in ENVIRONMENT.items())


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=f"\b\nEnvironment variables:\n{_ENV_HELP}",  # \b: one variable per line, not rewrapped
)
@click.version_option(__version__, prog_name="tenx")
def main() -> None:
    """tenx: define a feature once, compute it in two engines, serve it as a lookup.

    \b
    Start here:
      tenx init demo && cd demo   scaffold a feature repo
      tenx plan                   compile it and show what would change
      tenx apply                  record the plan in the registry
      tenx demo-data out.parquet  generate demo card transactions
    """


# -- init ---------------------------------------------------------------------------------


@main.command()
@click.argument("name", type=click.Path(path_type=Path, file_okay=False))
@friendly
def init(name: Path) -> None:
    """Create a feature repo NAME (a folder) with tenx.yaml and demo features."""
    from tenx.scaffold import init_repo

    written = init_repo(name)
    for path in written:
        console.print(f"  created {path}")
    console.print(f"\nNext: [bold]cd {name} && tenx plan[/]")


# -- plan / apply ---------------------------------------------------------------------------


def _plan_table(plan: Plan) -> Table:
    table = Table(title=f"plan {plan.version} (project {plan.project})", title_justify="left")
    for column in ("view", "entity", "source", "features", "windows", "ttl", "online", "version"):
        table.add_column(column)
    for view in plan.views:
        table.add_row(
            view.name,
            f"{view.entity.name} ({view.entity.key})",
            view.source.name,
            str(len(view.features)),
            ", ".join([w.label for w in sorted(view.windows, key=lambda w: w.length)] + ["latest"] * bool(view.latest)),
            format_duration(view.ttl) if view.ttl else "-",
            "yes" if view.online else "no",
            view.version,
        )
    return table


def _sources_table(plan: Plan) -> Table:
    """Where each source's events come from: its Kafka topic (what `tenx stream` reads
    and `tenx demo-data --to-kafka` should write to), its Delta table, and its timing."""
    table = Table(title="sources", title_justify="left")
    for column in ("source", "kafka topic", "events table", "allowed lateness", "idle timeout", "max future"):
        table.add_column(column)
    for source in plan.sources:
        table.add_row(
            source.name,
            source.topic,
            source.table,
            format_duration(source.allowed_lateness),
            format_duration(source.idle_timeout),
            format_duration(source.max_future),
        )
    return table


def _print_diff(plan: Plan, applied: Plan | None) -> bool:
    """Print the changes against the applied plan; True when any is breaking."""
    if applied is not None and applied.version == plan.version:
        console.print(f"No changes: plan {plan.version} is applied.")
        return False
    title = "Changes against the applied plan" if applied else "Nothing applied yet; applying would add"
    console.print(f"\n{title}{f' {applied.version}' if applied else ''}:")
    changes = diff_plans(applied, plan)
    for change in changes:
        style = "red" if change.breaking else {"+": "green", "-": "red", "~": "yellow"}[change.kind.value]
        console.print(f"  [{style}]{change}[/]", highlight=False)
    return any(change.breaking for change in changes)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the compiled plan as JSON instead of a summary.")
@click.option(
    "--features",
    "list_features",
    is_flag=True,
    help="Also list every feature as view:name (what export --features and the API take), with its definition.",
)
@friendly
def plan(config_file: Path | None, as_json: bool, list_features: bool) -> None:
    """Compile the feature repo, print the plan and its diff against the applied one.

    Exits 2 and lists every problem when the definitions are wrong. Changes marked
    BREAKING alter or remove online features (clients need a backfill + materialize).
    """
    settings = settings_of(config_file)
    compiled = compile_plan(settings)
    if as_json:
        click.echo(compiled.to_json(), nl=False)
        return
    console.print(_plan_table(compiled))
    console.print(_sources_table(compiled))
    if not compiled.views:
        errors.print(f"warning: {_no_views(settings)}", highlight=False)
    if list_features:
        console.print(_features_table(compiled))
    applied = FileRegistry(settings.registry_dir).current()
    _print_diff(compiled, applied)


def _no_views(settings: Settings) -> str:
    where = f"modules {', '.join(settings.modules)}" if settings.modules else f"folder {settings.features_path}"
    return f"the feature repo defines no feature view ({where}, from {settings.config_file}): check `features:` there"


def _features_table(plan: Plan) -> Table:
    table = Table(title="features", title_justify="left")
    for column in ("feature", "aggregation", "window", "every", "type"):
        table.add_column(column)
    for view in plan.views:
        for feature in view.features:
            table.add_row(
                f"{view.name}:{feature.name}",
                f"{feature.kind}({feature.column or ''})",
                feature.window.label if feature.window else "none (latest)",
                format_duration(feature.window.every) if feature.window else "-",
                feature.dtype,
            )
    return table


@main.command()
@config_option
@friendly
def apply(config_file: Path | None) -> None:
    """Compile the feature repo and record the plan in the registry as the applied one."""
    settings = settings_of(config_file)
    compiled = compile_plan(settings)
    if not compiled.views:
        raise ConfigError(_no_views(settings) + "; nothing applied")
    registry = FileRegistry(settings.registry_dir)
    current = registry.current_version()
    try:
        applied = registry.current()
    except RegistryError as error:
        # A damaged plan file (a crash, a hand edit) must not block the apply that repairs
        # it: there is no diff to show against it, and the apply rewrites the file.
        errors.print(f"warning: {error}; applying without a diff against it", highlight=False)
        applied = None
    _print_diff(compiled, applied)
    if applied is not None and applied.version == compiled.version:
        return
    record = registry.apply(compiled, expected=current)
    console.print(f"\nApplied plan [bold]{record.version}[/] to {settings.registry_dir}")


# -- demo data ------------------------------------------------------------------------------


@main.command("demo-data")
@click.argument("out", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--events", default=100_000, show_default=True, type=click.IntRange(min=1), help="Valid events to write.")
@click.option("--users", default=1_000, show_default=True, type=click.IntRange(min=1), help="Distinct users.")
@click.option("--merchants", default=200, show_default=True, type=click.IntRange(min=1), help="Distinct merchants.")
@click.option("--days", default=7, show_default=True, type=click.IntRange(min=1), help="Days of history.")
@click.option(
    "--start",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="First day (UTC), e.g. 2026-01-01 [default: --days before today, so the data ends at today's "
    "midnight and served values are fresh].",
)
@click.option("--seed", default=42, show_default=True, help="Random seed: same seed and --start, same data.")
@click.option(
    "--out-of-order",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of events arriving late in the log (by under 2 minutes).",
)
@click.option(
    "--malformed",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Malformed records to mix in.",
)
@click.option(
    "--to-kafka",
    "to_kafka",
    default=None,
    metavar="TOPIC",
    help="Also produce the events (JSON, keyed by user_id) to this Kafka topic ($TENX_KAFKA_BOOTSTRAP).",
)
@click.option(
    "--labels",
    "labels_out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write 20,000 training labels to this Parquet file: user_id, timestamp and buys_within_6h (the "
    "user buys again within 6 hours), for `tenx export --labels`.",
)
@friendly
def demo_data(
    out: Path,
    events: int,
    users: int,
    merchants: int,
    days: int,
    start: datetime | None,
    seed: int,
    out_of_order: float,
    malformed: int,
    to_kafka: str | None,
    labels_out: Path | None,
) -> None:
    """Generate demo card transactions into OUT (.parquet, or .jsonl for JSON lines).

    Seeded and realistic: Zipf-like user popularity, a daily traffic curve, a share of
    out-of-order events; memory stays bounded however many events are asked for.
    """
    from datetime import UTC

    from tenx.demo_data import DemoConfig, write_demo_data

    if out.suffix not in (".parquet", ".jsonl", ".json", ".ndjson"):
        raise ConfigError(f"output {out} must end in .parquet or .jsonl")
    from featurestore.config import kafka_options

    bootstrap = os.environ.get("TENX_KAFKA_BOOTSTRAP")
    options = kafka_options(os.environ)  # no feature repo needed here: the environment's settings
    if to_kafka:  # checked before anything is written
        from pipelines.stream.dataflow import kafka_topics

        if not bootstrap:
            raise ConfigError("--to-kafka needs TENX_KAFKA_BOOTSTRAP (host:port of a Kafka broker)")
        kafka_topics(bootstrap, options=options)
    if start is None:  # ends at today's midnight (UTC): values are fresh, within any ttl
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        start = today - timedelta(days=days)
    config = DemoConfig(
        events=events,
        users=users,
        merchants=merchants,
        days=days,
        start=start.replace(tzinfo=UTC),
        seed=seed,
        out_of_order=out_of_order,
        malformed=malformed,
    )
    began = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("generating", total=events)
        summary = write_demo_data(out, config, progress=lambda n: progress.advance(task, n))
    seconds = time.perf_counter() - began
    console.print(
        f"Wrote {summary.events:,} events"
        + (f" + {summary.malformed:,} malformed" if summary.malformed else "")
        + f" to {summary.path} ({summary.bytes_written / 1e6:.1f} MB, {seconds:.1f} s), "
        f"{summary.first_time:%Y-%m-%d %H:%M} .. {summary.last_time:%Y-%m-%d %H:%M} UTC"
    )
    if labels_out is not None:
        import pyarrow.parquet as pq

        from tenx.demo_data import LABEL, demo_labels

        if out.suffix == ".parquet":
            events_table = pq.read_table(out, columns=["user_id", "event_time"])
        else:
            import pyarrow.json as pajson

            events_table = pajson.read_json(out).select(["user_id", "event_time"])
        labels = demo_labels(events_table)
        labels_out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(labels, labels_out)
        positives = labels.column(LABEL).to_numpy(zero_copy_only=False).mean()
        console.print(f"Wrote {labels.num_rows:,} labels to {labels_out} ({positives:.0%} {LABEL})")
    if to_kafka and bootstrap:
        from tenx.demo_data import produce_to_kafka

        sent = produce_to_kafka(out, bootstrap, to_kafka, options=options)
        console.print(f"Produced {sent:,} records to Kafka topic {to_kafka} at {bootstrap}")


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


@main.command()
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


@main.command()
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


@main.command()
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


@main.command("export")
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


@main.command()
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


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="Port.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="uvicorn worker processes.")
@token_options
@click.option(
    "--max-values",
    envvar="TENX_API_MAX_VALUES",
    default=250_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most values (entities x features) one request may ask for; more is a 413 ($TENX_API_MAX_VALUES).",
)
@config_option
@friendly
def serve(
    host: str,
    port: int,
    workers: int,
    token: str | None,
    token_file: Path | None,
    max_values: int,
    config_file: Path | None,
) -> None:
    """Run the HTTP feature API: POST /features, /health (= /health/ready), /health/live, /health/ready, /metrics,
    /openapi.json. It only looks values up in the online store."""

    import uvicorn

    from serving.http import BoundedHeadProtocol

    settings = settings_of(config_file)
    applied_plan(settings)  # fail now, with the fix, rather than serve 503s
    if settings.config_file is not None:
        os.environ["TENX_CONFIG"] = str(settings.config_file)
    token = read_token(token, token_file)
    if token:
        os.environ["TENX_API_TOKEN"] = token  # the worker processes' environment, not their command line
    os.environ["TENX_API_MAX_VALUES"] = str(max_values)
    check_port_free(host, port)
    console.print(f"tenx feature API on http://{host}:{port} ({store_name(settings)})")
    uvicorn.run(
        "serving.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http=BoundedHeadProtocol,  # httptools, with a bound on a request's head (serving/http.py)
    )


# -- verify and quickstart -------------------------------------------------------------------


@main.command()
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


@main.command()
@click.argument(
    "directory", required=False, default="tenx-quickstart", type=click.Path(path_type=Path, file_okay=False)
)
@click.option("--events", default=200_000, show_default=True, type=click.IntRange(min=1_000), help="Demo events.")
@click.option("--users", default=2_000, show_default=True, type=click.IntRange(min=10), help="Demo users.")
@click.option("--days", default=14, show_default=True, type=click.IntRange(min=8), help="Days of history.")
@friendly
def quickstart(directory: Path, events: int, users: int, days: int) -> None:
    """Run the whole loop on embedded defaults (no Kafka, Redis or Docker needed): demo
    repo, data, ingest, Dask backfill, materialize, the Bytewax stream job, training
    export, online lookups, a parity check, then a model trained (ONNX), deployed and
    asked for predictions through the model server, in DIRECTORY (default
    ./tenx-quickstart). With TENX_REDIS_URL the online store is Redis; with
    TENX_KAFKA_BOOTSTRAP the recent events go through a Kafka topic of the run (deleted
    afterwards) and the Kafka stream job reads them, else it replays them from a file."""

    from featurestore.config import kafka_options
    from tenx.quickstart import run_quickstart

    began = time.perf_counter()
    console.print(f"[bold]tenx quickstart[/] in {directory}/\n")
    summary = run_quickstart(
        directory.resolve(),
        events=events,
        users=users,
        days=days,
        redis_url=os.environ.get("TENX_REDIS_URL"),
        kafka_bootstrap=os.environ.get("TENX_KAFKA_BOOTSTRAP"),
        kafka_options=kafka_options(os.environ),
        say=lambda line: console.print(line, highlight=False),
    )
    facts = summary.facts
    table = Table(title=f"quickstart done in {time.perf_counter() - began:.0f} s", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    freshness = facts.get("freshness_s")
    for what, value in (
        ("events ingested", f"{facts['events']:,}"),
        ("features", str(facts["features"])),
        ("changelog rows", f"{facts['changelog_rows']:,}"),
        ("dead letters (stream)", str(facts["dead_letters"])),
        ("freshest online value", f"{freshness:.0f} s old" if freshness is not None else "-"),
        ("online fetch p50, 5 users", f"{facts['fetch_p50_ms']:.2f} ms"),
        ("model held-out AUC", f"{facts['auc']:.3f}"),
        ("online == offline", "yes" if facts["verify_ok"] else "NO"),
    ):
        table.add_row(what, value)
    console.print()
    console.print(table)
    prediction = facts["prediction"]
    console.print(
        f"\nPrediction from the model server ({prediction.served_by}, {prediction.precision} on {prediction.device}):"
    )
    for user, score, status, age in zip(
        facts["predicted_users"], prediction.scores, prediction.status, prediction.age_s, strict=True
    ):
        shown = f"{score:.3f}" if score is not None else "none"
        fresh = f"{age:.0f} s old" if age is not None else "no value"
        console.print(f"  user {user}: P(buys within 6 h) = {shown}  (features {status}, {fresh})", highlight=False)
    console.print(
        f"\nExplore: cd {directory} && tenx plan | tenx serve (then POST /features) | "
        "tenx models show buys | tenx serve-models (then POST /predict) | tenx verify"
    )
    if not facts["verify_ok"]:
        sys.exit(EXIT_FAILURE)


main.add_command(stream)
main.add_command(train)
main.add_command(models)
main.add_command(serve_models)
main.add_command(predict)
main.add_command(cost)
main.add_command(top)
main.add_command(loadtest)


if __name__ == "__main__":  # pragma: no cover
    main()
