"""`tenx stream`: the Bytewax stream job as users run it (Kafka or a file in, the online
store out), with its status line, clean stop and final counts."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from featurestore.errors import ConfigError
from tenx.commands.common import (
    applied_plan,
    config_option,
    console,
    errors,
    friendly,
    settings_of,
    store_name,
    view_or_error,
)


@click.command()
@click.option("--view", "views", multiple=True, help="Feature view to run (repeatable; default: all online views).")
@click.option("-w", "--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Worker threads.")
@click.option(
    "--from-file",
    "from_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Replay a JSON-lines file (one event object per line, of one source: with views of several "
    "sources, pick one source's with --view) instead of Kafka; ends at the end of the file. Dead letters "
    "and late events then go to data/stream/dead_letters.*.jsonl and late.*.jsonl.",
)
@click.option("--bounded", is_flag=True, help="Stop at the end of the Kafka topic instead of tailing it.")
@click.option(
    "--from-beginning",
    is_flag=True,
    help="Without a recovery snapshot, read the topic from its first message instead of from "
    "now minus the longest window and the allowed lateness (Kafka offsets for times).",
)
@click.option(
    "--shards",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="State shards per view, spread over workers (at least the worker count; keep it fixed "
    "for a recovery directory: state is snapshotted per shard).",
)
@click.option(
    "--recovery-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Bytewax recovery store: a restarted job resumes from its last snapshot.",
)
@click.option(
    "--process-id",
    "-i",
    type=int,
    default=None,
    help="This process's index in a Bytewax cluster (omit it for one process).",
)
@click.option("--addresses", "-a", default=None, help="Cluster processes, host:port;host:port (Bytewax -a).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="Serve Prometheus metrics here.")
@click.option("--drain", is_flag=True, help="At the end of a bounded input, emit every pending window expiry.")
@click.option(
    "--snapshot-interval",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between recovery snapshots (with --recovery-dir).",
)
@click.option(
    "--status-interval",
    default=None,
    type=click.FloatRange(min=0.5),
    help="Seconds between status lines (events/s, lag, late, dead letters, watermark age) "
    "[default: 2 on a terminal, rewritten in place; 30 otherwise].",
)
@config_option
@friendly
def stream(
    views: tuple[str, ...],
    workers: int,
    from_file: Path | None,
    bounded: bool,
    from_beginning: bool,
    shards: int,
    recovery_dir: Path | None,
    process_id: int | None,
    addresses: str | None,
    metrics_port: int | None,
    drain: bool,
    snapshot_interval: float,
    status_interval: float | None,
    config_file: Path | None,
) -> None:
    """Run the Bytewax stream job: events from Kafka (TENX_KAFKA_BOOTSTRAP) or a file,
    validated, aggregated in event time and written to the online store as they change.
    Events reach the source's topic (`tenx plan` lists each source's) as one JSON object
    per message, e.g. `tenx demo-data events.parquet --to-kafka transactions`.
    Invalid records go, with the reason, to the dead-letter topic `<topic>.dead-letters`
    (an event more than the source's max_future ahead of the clock too); events older
    than the watermark to `<topic>.late` (with --from-file: JSON-lines files under
    data/stream/).

    \b
    The watermark is the slowest partition's newest event time minus the source's
    allowed_lateness; a partition caught up and quiet for the source's idle_timeout
    follows the clock instead, so windows expire on a quiet stream.

    A cold start (no recovery snapshot) rebuilds the state from the topic: from the first
    message at or after now minus the longest window plus the allowed lateness of the
    views run (by Kafka message time), or from the beginning with --from-beginning.
    Ctrl-C stops after the current batch (exit 130; with --recovery-dir the next start
    resumes there)."""
    from bytewax.run import cli_main

    from pipelines.stream.dataflow import (
        JsonLinesSink,
        JsonLinesSource,
        KafkaJsonSink,
        OnlineSink,
        Outputs,
        StoreFactory,
        build_dataflow,
        check_topics,
        kafka_messages,
    )
    from pipelines.stream.state import Emit
    from tenx.stream_status import Counts, StatusReporter, Stopper, summary

    settings = settings_of(config_file)
    plan = applied_plan(settings)
    for name in views:
        view_or_error(plan, name)
    if shards < workers:
        raise ConfigError(
            f"--shards {shards} is below -w {workers}: some workers would hold no state; "
            f"pass --shards {workers} or more"
        )
    if drain and recovery_dir is not None:
        raise ConfigError(
            "--drain and --recovery-dir do not go together: --drain takes the end of the input for the end of "
            "time (every window expires, with rows dated past the last event), and a resumed job would start "
            "from that emptied state and have its rows refused behind those; drop one of them"
        )
    if from_file is None and not settings.kafka_bootstrap:
        raise ConfigError("no Kafka configured: set TENX_KAFKA_BOOTSTRAP (or kafka.bootstrap), or pass --from-file")
    if from_file is not None:
        _check_json_lines(from_file)
    outputs_dir = settings.repo_dir / "data" / "stream"
    run = [plan.view(n) for n in views] if views else [v for v in plan.views if v.online]
    read = sorted({view.source.name for view in run})
    if from_file is not None and len(read) > 1:
        # Every source would replay the same file: a record another source's schema also
        # accepts (extra fields are ignored) would count in that source's views too.
        first = next(view.name for view in run if view.source.name == read[0])
        raise ConfigError(
            f"--from-file replays one source's events, and the views run read {len(read)} sources "
            f"({', '.join(read)}): run one source's views with --view (e.g. --view {first})"
        )
    if from_file is not None:
        from bytewax import operators as op

        def messages(flow: Any, source: Any) -> Any:
            return op.input(f"file_{source.name}", flow, JsonLinesSource(from_file))

        dead: Any = JsonLinesSink(outputs_dir / "dead_letters.jsonl")
        late: Any = JsonLinesSink(outputs_dir / "late.jsonl")
    else:
        bootstrap = str(settings.kafka_bootstrap)
        options = dict(settings.kafka_options)
        check_topics(bootstrap, sorted({v.source.topic for v in run}), options=options)
        reach = max((v.longest_window + v.source.allowed_lateness for v in run), default=0)
        start_us = None if from_beginning else int(time.time() * 1_000_000) - reach

        def messages(flow: Any, source: Any) -> Any:
            return kafka_messages(flow, source, bootstrap, tail=not bounded, start_time_us=start_us, options=options)

        dead = KafkaJsonSink(bootstrap, suffix=".dead-letters", **options)  # `<each source's topic>.dead-letters`
        late = KafkaJsonSink(bootstrap, suffix=".late", **options)
    factory = StoreFactory(settings.redis_url, settings.online_path, project=plan.project)
    flow = build_dataflow(
        plan,
        messages,
        Outputs(OnlineSink(factory, plan.views), dead, late),
        views=list(views) or None,
        shards=shards,
        drain=drain,
        emit=Emit.LATEST,
    )
    recovery = None
    if recovery_dir is not None:
        from bytewax.recovery import RecoveryConfig, init_db_dir

        if not recovery_dir.exists():
            recovery_dir.mkdir(parents=True)
            init_db_dir(recovery_dir, workers)
        bind_recovery_dir(recovery_dir, run, shards)
        recovery = RecoveryConfig(recovery_dir)
    if metrics_port is not None:
        from pipelines.stream.metrics import start_metrics_server

        start_metrics_server(metrics_port)  # a taken port is a ConfigError that says so
    console.print(
        f"tenx stream: {', '.join(views) or 'all online views'} from "
        f"{from_file or settings.kafka_bootstrap} into {store_name(settings)}, {workers} worker(s)",
        highlight=False,
    )
    if from_file is None:
        topics = sorted({source.topic for source in plan.sources})
        console.print(
            "dead letters -> Kafka topic "
            + ", ".join(f"{t}.dead-letters" for t in topics)
            + ", late events -> "
            + ", ".join(f"{t}.late" for t in topics),
            highlight=False,
        )
    before = {kind: _lines(outputs_dir, kind) for kind in ("dead_letters", "late")}
    live = errors.is_terminal
    reporter = StatusReporter(errors, interval=status_interval or (2.0 if live else 30.0), live=live)
    stopper = Stopper(lambda line: reporter.print(line))
    stopper.install()
    reporter.start()
    try:
        cli_main(
            flow,
            workers_per_process=workers,
            process_id=process_id,
            addresses=addresses.split(";") if addresses else None,
            recovery_config=recovery,
            epoch_interval=timedelta(seconds=snapshot_interval),
        )
    finally:
        reporter.stop()
        stopper.restore()
    if stopper.signal_number is not None:
        resume = (
            f"the next start with --recovery-dir {recovery_dir} resumes there"
            if recovery_dir is not None
            else "without --recovery-dir the next start rebuilds its state from the topic"
        )
        errors.print(f"{summary(reporter.start_counts, Counts.now(), how='stopped')}; {resume}", highlight=False)
        sys.exit(128 + stopper.signal_number)
    console.print(summary(reporter.start_counts, Counts.now()), highlight=False)
    if from_file is not None:  # a file ends: say what did not reach the online store
        dead, late_count = (_lines(outputs_dir, kind) - before[kind] for kind in ("dead_letters", "late"))
        console.print(
            f"written: {dead:,} dead letters ({outputs_dir}/dead_letters.*.jsonl), {late_count:,} late events "
            f"({outputs_dir}/late.*.jsonl)",
            highlight=False,
        )


def _check_json_lines(path: Path) -> None:
    """--from-file replays JSON lines (one event object per line), as Kafka would carry
    them: a Parquet or CSV file would become one dead letter per line."""
    if not path.exists():
        raise ConfigError(f"--from-file {path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(4096)
    first = next((line.strip() for line in head.splitlines() if line.strip()), b"")
    if head.startswith(b"PAR1") or path.suffix.lower() in (".parquet", ".csv", ".tsv") or not first.startswith(b"{"):
        raise ConfigError(
            f"--from-file {path}: expected JSON lines (one event object per line, like the Kafka messages); "
            "load Parquet or CSV files with `tenx ingest`, or write JSON lines with "
            "`tenx demo-data events.jsonl`"
        )


def _lines(folder: Path, kind: str) -> int:
    total = 0
    for path in folder.glob(f"{kind}.*.jsonl"):
        with path.open("rb") as handle:
            total += sum(1 for _ in handle)
    return total


RECOVERY_MANIFEST = "tenx-recovery.json"


def bind_recovery_dir(folder: Path, run: list[Any], shards: int) -> None:
    """Refuse a recovery directory made for another job; record the job in a new one.

    A snapshot computes the view definition it was taken with, keyed by view name, and
    its state is split by entity over `--shards`. Resumed under a changed view version it
    wrote the old definition's values under the new version's keys (a 1h count as
    count_10m); with other shards, entities meet a shard that never saw their history;
    with a view added or left out, the source offsets resume past events that view's
    state never saw (or will not see)."""
    versions = {view.name: view.version for view in run}
    path = folder / RECOVERY_MANIFEST
    if not path.exists():  # a new directory (or one from before this file)
        path.write_text(json.dumps({"views": versions, "shards": shards}, indent=2, sort_keys=True))
        return
    kept = json.loads(path.read_text())
    problems = []
    if kept.get("shards") != shards:
        problems.append(f"its state is split over --shards {kept.get('shards')}, not {shards}")
    kept_views: dict[str, str] = kept.get("views", {})
    for name, version in sorted(versions.items()):
        if name not in kept_views:
            problems.append(f"it holds no state of view `{name}`")
        elif kept_views[name] != version:
            problems.append(f"it holds view `{name}` version {kept_views[name]}; the plan has {version}")
    problems += [
        f"it holds view `{name}`, which this run leaves out" for name in sorted(set(kept_views) - set(versions))
    ]
    if problems:
        raise ConfigError(
            f"--recovery-dir {folder} was made for another job: {'; '.join(problems)}. Resuming it would "
            "compute wrong values; start with a new --recovery-dir (a cold start rebuilds the state from the "
            "topic), or run the job it was made for."
        )
