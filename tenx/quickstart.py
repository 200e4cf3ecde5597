"""`tenx quickstart`: the whole loop on one machine, embedded defaults, in a few minutes.

Scaffold a feature repo -> compile and apply the plan -> generate two weeks of demo
card transactions -> ingest into Delta -> backfill with Dask -> materialize the online
store -> replay the most recent events through the real Bytewax job -> ingest and
backfill that slice -> export a point-in-time training set -> train a model to ONNX
(`tenx train`) -> fetch online features -> verify online/offline parity -> deploy the
model and ask the model server for predictions over HTTP. Every step is real: the
same code the CLI commands run.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.config import load_settings
from featurestore.errors import ConfigError
from featurestore.plan import compile_repo
from featurestore.redact import redact_url
from featurestore.registry import FileRegistry
from featurestore.stores.offline import DeltaOfflineStore, datetime_to_micros
from featurestore.stores.online import open_online_store
from featurestore.verify import verify_view
from pipelines.batch.engine import backfill
from pipelines.ingest import ingest_file
from pipelines.materialize import materialize
from serving.client import FeatureClient
from tenx.demo_data import DemoConfig, demo_labels, write_demo_data
from tenx.scaffold import init_repo

FEATURES = [
    "count_1h", "count_1d", "count_7d", "sum_amount_eur_1d", "sum_amount_eur_7d",
    "mean_amount_eur_7d", "max_amount_eur_7d", "std_amount_eur_7d", "sum_foreign_eur_7d",
]  # fmt: skip


@dataclass
class Step:
    name: str
    seconds: float
    detail: str


@dataclass
class QuickstartSummary:
    repo: Path
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


MARKER = ".tenx-quickstart"  # the folder is quickstart's own: a re-run may clear its data


def _prepare_folder(target: Path) -> str:
    """A new feature repo in `target`, or the one a previous quickstart made there with
    its data cleared (a re-run starts clean: events of two runs would overlap). Any other
    non-empty folder is refused: quickstart adds demo events and overwrites online values."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} is a file; pass a new or empty folder")
    if not target.exists() or not any(target.iterdir()):
        init_repo(target, project="quickstart")
        (target / MARKER).write_text("Made by `tenx quickstart`; running it again clears data/ and .tenx/.\n")
        return f"{target} (new)"
    if not (target / MARKER).exists():
        raise ConfigError(
            f"{target} is not empty and was not made by `tenx quickstart`: it would add demo events and "
            "overwrite online values there. Pass a new folder (default ./tenx-quickstart)."
        )
    if not (target / "tenx.yaml").exists():
        init_repo(target, project="quickstart")
    settings = load_settings(target / "tenx.yaml", environ={})
    cleared = []
    for path in (settings.offline_dir, settings.online_path, settings.registry_dir, target / "data"):
        inside = path.resolve().is_relative_to(target.resolve()) and path.resolve() != target.resolve()
        if inside and path.is_dir():
            shutil.rmtree(path)
        elif inside and path.exists():
            path.unlink()
        else:
            continue
        cleared.append(str(path.relative_to(target)))
    return f"{target} (again: cleared {', '.join(sorted(set(cleared))) or 'nothing'})"


def run_quickstart(
    target: Path,
    *,
    events: int = 200_000,
    users: int = 2_000,
    days: int = 14,
    redis_url: str | None = None,
    kafka_bootstrap: str | None = None,
    kafka_options: dict[str, str] | None = None,
    say: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
    now: datetime | None = None,
) -> QuickstartSummary:
    summary = QuickstartSummary(repo=target)
    clock = now or datetime.now(UTC).replace(microsecond=0)

    @contextmanager
    def step(name: str) -> Iterator[list[str]]:
        began = time.perf_counter()
        detail: list[str] = []
        yield detail
        seconds = time.perf_counter() - began
        summary.steps.append(Step(name, seconds, "; ".join(detail)))
        say(f"  {name:<34} {seconds:6.1f} s   {'; '.join(detail)}")

    with step("scaffold feature repo") as detail:
        detail.append(_prepare_folder(target))
        settings = load_settings(target / "tenx.yaml", environ={})
    redis_url = redis_url or settings.redis_url

    with step("compile + apply plan") as detail:
        plan = compile_repo(settings.features_path, project=settings.project, modules=settings.modules)
        FileRegistry(settings.registry_dir).apply(plan)
        detail.append(
            f"plan {plan.version}: {sum(len(v.features) for v in plan.views)} features in {len(plan.views)} views"
        )
    view = plan.view("user_spend")
    source = plan.source("transactions")

    data = target / "data"
    recent_start = clock - timedelta(hours=1)
    with step("generate demo transactions") as detail:
        history = data / "history.parquet"
        start = (clock - timedelta(days=days)).replace(hour=0, minute=0, second=0)
        hist = write_demo_data(
            history, DemoConfig(events=events, users=users, merchants=max(10, users // 10), days=days, start=start)
        )
        table = pq.read_table(history)
        keep = pc.less(table.column("event_time"), pa.scalar(recent_start, pa.timestamp("us", tz="UTC")))
        pq.write_table(table.filter(keep), history)
        recent = data / "recent.jsonl"
        write_demo_data(
            recent,
            DemoConfig(
                events=max(500, events // (days * 24)),
                users=users,
                merchants=max(10, users // 10),
                days=1,
                start=recent_start,
                seed=7,
                malformed=5,
            ),
        )
        _clip_to(recent, clock)
        detail.append(
            f"{hist.events:,} events over {days} days, {users:,} users; a recent slice with malformed records"
        )

    offline = DeltaOfflineStore(settings.offline_dir)
    with step("ingest into Delta") as detail:
        ingested = ingest_file(offline, source, history)
        detail.append(f"{ingested.ingested:,} events -> {offline.events_path(source)}")
        summary.facts["events"] = ingested.ingested

    with step("backfill with Dask") as detail:
        done = backfill(plan, offline, workers=2, progress=progress)
        rows = sum(s.rows_written for s in done)
        detail.append(f"{rows:,} changelog rows for {len(done)} views")
        summary.facts["changelog_rows"] = rows

    online = open_online_store(redis_url=redis_url, sqlite_path=settings.online_path, project=plan.project)
    with step("materialize online store") as detail:
        loaded = [
            materialize(v, offline, online, as_of=datetime_to_micros(recent_start)) for v in plan.views if v.online
        ]
        detail.append(f"{sum(m.written for m in loaded):,} entities into {_store(redis_url, settings.online_path)}")

    with step("stream recent events (Bytewax)") as detail:
        replay = data / "replay.jsonl"
        replayed = _replay_file(history, recent, replay, since=recent_start - timedelta(days=8))
        if kafka_bootstrap:
            # Kafka configured: the events go through a topic of this run (3 partitions,
            # keyed by user, as `demo-data --to-kafka` sends them) and the real Kafka
            # stream job reads it; the topic is deleted afterwards.
            topic, outputs = _run_kafka_stream(
                plan, replay, kafka_bootstrap, kafka_options or {}, redis_url, settings.online_path, data / "stream"
            )
            how = f"published to Kafka topic {topic} at {kafka_bootstrap} (3 partitions) and read by the Kafka job"
        else:
            outputs = _run_stream(plan, _file_messages(replay), redis_url, settings.online_path, data / "stream")
            how = "replayed from a file (no Kafka configured: set TENX_KAFKA_BOOTSTRAP to go through Kafka)"
        detail.append(f"{replayed:,} events {how}; {outputs['dead_letters']} dead letters, {outputs['late']} late")
        summary.facts["dead_letters"] = outputs["dead_letters"]
        summary.facts["stream_input"] = "kafka" if kafka_bootstrap else "file"

    with step("ingest + backfill the new slice") as detail:
        newer = ingest_file(offline, source, recent)
        backfill(plan, offline, start=datetime_to_micros(recent_start), workers=2)
        detail.append(f"{newer.ingested:,} events, {newer.rejected} rejected with reasons (Delta rejects table)")

    with step("export training set") as detail:
        labels = _labels(offline, source)
        from training import export_training_set

        train_path = data / "training.parquet"
        export_training_set(plan, offline, labels, [f"user_spend:{f}" for f in FEATURES], out=train_path)
        detail.append(f"{labels.num_rows:,} labels x {len(FEATURES)} features -> {train_path.name}")

    with step("train a model (tenx train)") as detail:
        from featurestore.models import ModelRegistry
        from training.train import ModelKind, train_model

        trained = train_model(plan, train_path, label="buys_within_6h", kind=ModelKind.LOGISTIC)
        models = ModelRegistry(settings.registry_dir / "models")
        card = models.add("buys", trained.onnx, trained.card, holdout=trained.holdout)
        auc = card.metrics["auc"]
        detail.append(
            f"{card.ref}: logistic regression to ONNX, held-out AUC {auc:.3f} on the latest "
            f"{trained.rows_holdout:,} labels (predicts a purchase in the next 6 h)"
        )
        summary.facts["auc"] = auc
        summary.facts["model"] = card.ref

    client = FeatureClient(online, plan)
    with step("fetch online features") as detail:
        sample_users = random.Random(1).sample(range(1, users + 1), 5)
        result = client.get("user_spend", sample_users, features=["count_1d", "sum_amount_eur_7d"])
        timings = []
        for _ in range(300):
            began = time.perf_counter()
            client.get("user_spend", sample_users)
            timings.append(time.perf_counter() - began)
        p50 = float(np.percentile(timings, 50)) * 1000
        ages = [a for i in range(len(sample_users)) if (a := result.age_seconds(i)) is not None]
        detail.append(f"5 users, p50 {p50:.2f} ms; statuses {[s.value for s in result.statuses]}")
        summary.facts["fetch_p50_ms"] = p50
        summary.facts["freshness_s"] = min(ages) if ages else None
        summary.facts["sample"] = result.to_dicts()

    with step("verify online == offline") as detail:
        report = verify_view(view, offline, online, sample=200)
        detail.append(
            f"{report.checked} entities checked, {len(report.mismatches)} mismatches, "
            f"{report.missing_offline} without an offline row"
        )
        summary.facts["verify_ok"] = report.ok
        summary.facts["verify"] = report
    with step("deploy + predict (model server)") as detail:
        from training.variants import make_variants

        make_variants(models, card.name, card.version)
        models.deploy(card.name, card.version, precision=None, by="tenx quickstart")
        from featurestore.plan.collect import collect_routes

        routes = collect_routes(settings.features_path, settings.modules)
        prediction = _predict(settings.registry_dir, redis_url, settings.online_path, plan, sample_users[:3], routes)
        ages = [a for a in prediction.age_s if a is not None]
        detail.append(
            f"POST /predict {card.name} for 3 users -> {prediction.served_by} on {prediction.device} "
            f"({prediction.precision}); features {min(ages):.0f}-{max(ages):.0f} s old"
            if ages
            else "no features"
        )
        summary.facts["prediction"] = prediction
        summary.facts["predicted_users"] = sample_users[:3]
    online.close()
    summary.facts["features"] = sum(len(v.features) for v in plan.views)
    return summary


def _predict(
    registry_dir: Path, redis_url: str | None, sqlite_path: Path, plan: Any, users: list[int], routes: Any
) -> Any:
    """Start the model server on a free local port (uvicorn, in a thread), ask it for
    predictions with the HTTP client, stop it."""
    import socket
    import threading

    import uvicorn

    from featurestore.stores.online import open_online_store
    from serving.models import ModelClient, ModelServerSettings, create_model_app

    store = open_online_store(redis_url=redis_url, sqlite_path=sqlite_path, project=plan.project)
    app = create_model_app(ModelServerSettings(registry_dir=registry_dir, models=("buys",)), store, routes=routes)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="tenx-model-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the model server did not start")
            time.sleep(0.05)
        with ModelClient(f"http://127.0.0.1:{port}") as client:
            return client.predict("buys", users, priority="critical", deadline_ms=2000)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _store(redis_url: str | None, path: Path) -> str:
    return f"Redis {redact_url(redis_url)}" if redis_url else f"embedded {path.name}"


def _clip_to(path: Path, clock: datetime) -> None:
    """Keep the recent slice in the past (a demo day starts at `recent_start`)."""
    limit = clock.isoformat().replace("+00:00", "Z")
    lines = []
    for line in path.read_bytes().splitlines():
        try:
            moment = orjson.loads(line).get("event_time")
        except (orjson.JSONDecodeError, AttributeError):
            moment = None
        if not isinstance(moment, str) or moment <= limit:
            lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")


def _replay_file(history: Path, recent: Path, out: Path, *, since: datetime) -> int:
    """The stream's input: the last days of history (to warm its windows, as a cold
    start reads Kafka from now - longest window) followed by the recent slice."""
    table = pq.read_table(history)
    table = table.filter(pc.greater_equal(table.column("event_time"), pa.scalar(since, pa.timestamp("us", tz="UTC"))))
    count = 0
    with out.open("wb") as handle:
        for batch in table.to_batches(50_000):
            for row in batch.to_pylist():
                row["event_time"] = row["event_time"].isoformat()
                handle.write(orjson.dumps(row) + b"\n")
                count += 1
        for line in recent.read_bytes().splitlines():
            if line.strip():
                handle.write(line + b"\n")
                count += 1
    return count


def _run_stream(
    plan: Any, messages: Callable[[Any, Any], Any], redis_url: str | None, sqlite: Path, outputs: Path
) -> dict[str, int]:
    """The stream job as `tenx stream` builds it, on `messages(flow, source)`, to the end
    of its input; dead letters and late events into JSON-lines files, counted."""
    from bytewax.testing import run_main

    from pipelines.stream.dataflow import JsonLinesSink, OnlineSink, Outputs, StoreFactory, build_dataflow
    from pipelines.stream.state import Emit

    flow = build_dataflow(
        plan,
        messages,
        Outputs(
            OnlineSink(StoreFactory(redis_url, sqlite, project=plan.project), plan.views),
            JsonLinesSink(outputs / "dead_letters.jsonl"),
            JsonLinesSink(outputs / "late.jsonl"),
        ),
        views=["user_spend"],
        drain=False,
        emit=Emit.LATEST,
    )
    run_main(flow)
    counts = {}
    for kind in ("dead_letters", "late"):
        counts[kind] = sum(len(p.read_bytes().splitlines()) for p in outputs.glob(f"{kind}.*.jsonl"))
    return counts


def _file_messages(replay: Path) -> Callable[[Any, Any], Any]:
    from bytewax import operators as op

    from pipelines.stream.dataflow import JsonLinesSource

    return lambda flow, source: op.input(f"file_{source.name}", flow, JsonLinesSource(replay))


def _run_kafka_stream(
    plan: Any,
    replay: Path,
    bootstrap: str,
    options: dict[str, str],
    redis_url: str | None,
    sqlite: Path,
    outputs: Path,
) -> tuple[str, dict[str, int]]:
    """The replay file through a fresh 3-partition topic and the Kafka stream job
    (bounded: it stops at the end of the topic); the topic goes afterwards."""
    import dataclasses
    import uuid

    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic  # .admin re-exports it implicitly; strict mypy objects

    from pipelines.stream.dataflow import check_topics, kafka_messages
    from pipelines.stream.health import kafka_client_config
    from tenx.demo_data import produce_to_kafka

    topic = f"tenx-quickstart-{uuid.uuid4().hex[:8]}"
    check_topics(bootstrap, [], options=options)  # reachable, settings valid: one clear line if not
    admin = AdminClient(kafka_client_config(bootstrap, **options))
    admin.create_topics([NewTopic(topic, num_partitions=3)])[topic].result(timeout=30)
    try:
        produce_to_kafka(replay, bootstrap, topic, options=options)
        bound = dataclasses.replace(plan.source("transactions"), topic=topic)
        counts = _run_stream(
            plan,
            lambda flow, _: kafka_messages(flow, bound, bootstrap, tail=False, options=options),
            redis_url,
            sqlite,
            outputs,
        )
    finally:
        # Waited for: the process may end right after, and an unsent request deletes nothing.
        for future in admin.delete_topics([topic], operation_timeout=30).values():
            future.result(timeout=60)
    return topic, counts


def _labels(offline: DeltaOfflineStore, source: Any) -> pa.Table:
    """Random (user, time) pairs over the history; label: the user buys again within 6 h."""
    return demo_labels(offline.read_events(source), count=20_000)
