"""The `tenx` command line. Settings are read here, once, and passed down."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import click
from rich.table import Table

from featurestore.config import ENVIRONMENT, Settings
from featurestore.durations import format_duration
from featurestore.errors import ConfigError, RegistryError
from featurestore.plan import Plan, diff_plans
from featurestore.registry import FileRegistry
from tenx import __version__
from tenx.commands import canary as _canary  # noqa: F401 - registers models canary/promote/rollback/status
from tenx.commands.common import (
    EXIT_FAILURE,
    applied_plan,
    check_port_free,
    compile_plan,
    config_option,
    console,
    errors,
    friendly,
    progress_bar,
    read_token,
    settings_of,
    store_name,
    token_options,
)
from tenx.commands.cost import cost
from tenx.commands.loadtest import loadtest
from tenx.commands.models import models, predict, serve_models, train
from tenx.commands.offline import backfill, export, ingest, materialize, rejects, verify
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


for command in (ingest, rejects, backfill, export, materialize, verify):
    main.add_command(command)
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
