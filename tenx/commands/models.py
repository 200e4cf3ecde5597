"""`tenx train`, `tenx models add|list|show|deploy` and `tenx serve-models`: models
trained on exported training sets, kept in the model registry, served on lookups."""

from __future__ import annotations

import getpass
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from featurestore.errors import ConfigError
from featurestore.models import (
    MAX_AUC_DROP,
    FeatureRef,
    MissingPolicy,
    ModelCard,
    ModelRegistry,
    Precision,
    StalePolicy,
    check_views,
    parse_model_ref,
)
from featurestore.registry import FileRegistry
from tenx.commands.common import (
    applied_plan,
    check_port_free,
    config_option,
    console,
    friendly,
    read_token,
    settings_of,
    store_name,
    token_options,
)

KINDS = ("logistic", "gbdt", "mlp")


def model_registry(settings: Any) -> ModelRegistry:
    return ModelRegistry(Path(settings.registry_dir) / "models")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@click.command()
@click.option(
    "--training-set",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="Parquet file written by `tenx export --out` (its .manifest.json names the features and plan).",
)
@click.option("--label", required=True, help="Binary label column (true/false or 0/1).")
@click.option("--model", "name", required=True, help="Model name in the registry (a new version is added).")
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    default="logistic",
    show_default=True,
    help="logistic: imputer + scaler + logistic regression; gbdt: gradient-boosted trees; mlp: 2 hidden layers of 64.",
)
@click.option("--time-column", default="timestamp", show_default=True, help="Label time column (orders the holdout).")
@click.option(
    "--holdout",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.01, 0.9),
    help="Share of the latest rows (by --time-column) held out for AUC / log loss.",
)
@config_option
@friendly
def train(
    training_set: Path, label: str, name: str, kind: str, time_column: str, holdout: float, config_file: Path | None
) -> None:
    """Train a model on an exported training set (time-ordered holdout), export it to
    ONNX and add it to the model registry with its card. `tenx models deploy NAME` then
    serves it."""
    from featurestore.models import check_name
    from training.train import ModelKind, read_manifest, train_model

    settings = settings_of(config_file)
    check_name(name)
    manifest = read_manifest(training_set)
    plans = FileRegistry(settings.registry_dir)
    plan_version = manifest.get("plan_version")
    plan = plans.get(plan_version) if plan_version else applied_plan(settings)
    with console.status(f"training {kind} on {training_set.name}"):
        result = train_model(
            plan, training_set, label=label, kind=ModelKind(kind), time_column=time_column, holdout_fraction=holdout
        )
    card = model_registry(settings).add(name, result.onnx, result.card, holdout=result.holdout)
    metrics = card.metrics
    console.print(
        f"{card.ref}: {kind} on {len(card.features)} features, {result.rows_train:,} rows trained, "
        f"{result.rows_holdout:,} held out (the latest by {time_column}): "
        f"AUC {metrics['auc']:.4f}, log loss {metrics['log_loss']:.4f} ({result.seconds:.1f} s)"
    )
    for warning in result.warnings:
        console.print(f"  note: {warning}", highlight=False, markup=False)
    console.print(f"next: tenx models deploy {card.ref}")


@click.group()
def models() -> None:
    """The model registry: add, list, show and deploy model versions."""


@models.command("add")
@click.argument("name")
@click.argument("model_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--features",
    required=True,
    help="The model's inputs in order, as view:feature names separated by commas (`tenx plan --list` shows them).",
)
@click.option("--output", default=None, help="Output to read scores from (default: `probabilities`, else the first).")
@click.option(
    "--output-index",
    type=int,
    default=None,
    help="Column of a (rows x classes) output holding the score (default: 1 when it has 2 columns).",
)
@click.option(
    "--holdout",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Parquet of holdout rows (feature columns named as in the training export, plus --label): lets deploy "
    "check FP16/INT8 variants.",
)
@click.option("--label", default=None, help="Label column of --holdout.")
@click.option(
    "--on-missing",
    type=click.Choice([p.value for p in MissingPolicy]),
    default="empty_window",
    show_default=True,
    help="An entity without online values: score it on empty-window values (as the export gave), or refuse "
    "(null score).",
)
@click.option(
    "--on-stale",
    type=click.Choice([p.value for p in StalePolicy]),
    default="serve",
    show_default=True,
    help="A value older than its view's ttl: score it (status `stale`), or refuse (null score).",
)
@config_option
@friendly
def add(
    name: str,
    model_file: Path,
    features: str,
    output: str | None,
    output_index: int | None,
    holdout: Path | None,
    label: str | None,
    on_missing: str,
    on_stale: str,
    config_file: Path | None,
) -> None:
    """Register an ONNX model trained elsewhere: NAME MODEL.onnx --features view:f,..."""
    from featurestore.models import check_name

    settings = settings_of(config_file)
    check_name(name)
    plan = applied_plan(settings)
    references = [f.strip() for f in features.split(",") if f.strip()]
    refs = []
    for reference in references:
        view, sep, feature = reference.partition(":")
        if not sep:
            raise ConfigError(f"--features: {reference!r} must be view:feature")
        try:
            spec = plan.view(view)
            spec.feature(feature)
        except KeyError as error:
            raise ConfigError(f"--features: {error.args[0]}") from error
        refs.append(FeatureRef(view, feature, spec.version))
    model = model_file.read_bytes()
    input_name, output_name, index = inspect_onnx(model, len(refs), output=output, output_index=output_index)
    holdout_table = None
    if holdout is not None:
        holdout_table = _holdout(holdout, references, label)
    elif label is not None:
        raise ConfigError("--label goes with --holdout FILE")
    card = ModelCard(
        name=name,
        version=0,
        kind="onnx",
        features=tuple(refs),
        label=label,
        content_hash="",
        created_at="",
        input_name=input_name,
        output_name=output_name,
        output_index=index,
        plan_version=plan.version,
        on_missing=MissingPolicy(on_missing),
        on_stale=StalePolicy(on_stale),
        source=f"tenx models add {model_file.name}",
    )
    if holdout_table is not None:
        from training.train import log_loss, roc_auc, score_onnx

        x = _matrix(holdout_table, references)
        y = holdout_table.column(label).to_numpy(zero_copy_only=False).astype("int64")
        scores = score_onnx(model, x, output=output_name, index=index)
        card = _with_metrics(card, {"auc": roc_auc(y, scores), "log_loss": log_loss(y, scores), "rows_holdout": len(y)})
    added = model_registry(settings).add(name, model, card, holdout=holdout_table)
    console.print(f"{added.ref}: input `{input_name}` ({len(refs)} features), scores from `{output_name}`"
                  + (f"[:, {index}]" if index is not None else ""))  # fmt: skip
    console.print(f"next: tenx models deploy {added.ref}")


def _with_metrics(card: ModelCard, metrics: dict[str, float]) -> ModelCard:
    from dataclasses import replace

    return replace(card, metrics={k: float(v) for k, v in metrics.items()})


def _matrix(table: Any, references: list[str]) -> Any:
    import numpy as np

    return np.column_stack(
        [np.asarray(table.column(r).to_numpy(zero_copy_only=False), dtype=np.float32) for r in references]
    )


def _holdout(path: Path, references: list[str], label: str | None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.train import feature_columns

    if label is None:
        raise ConfigError("--holdout needs --label: the column holding each row's outcome")
    table = pq.read_table(path)
    if label not in table.column_names:
        raise ConfigError(f"--label {label}: no such column in {path} (columns: {', '.join(table.column_names)})")
    try:
        columns = feature_columns(references, table.column_names)
    except Exception as error:
        raise ConfigError(f"--holdout {path}: {error}") from error
    data = {r: table.column(c).cast(pa.float32()) for r, c in zip(references, columns, strict=True)}
    data[label] = table.column(label).cast(pa.int8())
    return pa.table(data)


def inspect_onnx(
    model: bytes, width: int, *, output: str | None, output_index: int | None
) -> tuple[str, str, int | None]:
    """(input, output, column) of a model that takes one float matrix of `width` columns;
    checked by running it on one row of zeros."""
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ConfigError(f"ONNX Runtime cannot load the model: {error}") from error
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        shown = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ConfigError(f"the model must take one float tensor [rows, {width}]; it takes {shown}")
    shape = inputs[0].shape
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != width):
        raise ConfigError(f"the model's input {inputs[0].name} has shape {shape}; --features names {width} columns")
    outputs = {o.name: o for o in session.get_outputs()}
    if output is None:
        output = "probabilities" if "probabilities" in outputs else next(iter(outputs))
    if output not in outputs:
        raise ConfigError(f"--output {output}: the model's outputs are {', '.join(outputs)}")
    try:
        (result,) = session.run([output], {inputs[0].name: np.zeros((2, width), dtype=np.float32)})
    except Exception as error:
        raise ConfigError(f"the model fails on a batch of zeros: {error}") from error
    result = np.asarray(result)
    if result.dtype.kind != "f":
        raise ConfigError(f"output {output} holds {result.dtype}, not scores; pick a float output with --output")
    if result.ndim == 2 and result.shape[1] > 1:
        index = output_index if output_index is not None else (1 if result.shape[1] == 2 else None)
        if index is None or not 0 <= index < result.shape[1]:
            raise ConfigError(
                f"output {output} has {result.shape[1]} columns: say which is the score with --output-index"
            )
        return inputs[0].name, output, index
    return inputs[0].name, output, None


@models.command("list")
@config_option
@friendly
def list_models(config_file: Path | None) -> None:
    """Every model with its versions and the one deployed."""
    registry = model_registry(settings_of(config_file))
    names = registry.names()
    if not names:
        console.print("no models yet: `tenx train` or `tenx models add` one")
        return
    table = Table("model", "deployed", "versions", "kind", "holdout AUC", "precision", "features")
    for name in names:
        deployment = registry.deployment(name)
        card = registry.card(name)
        auc = card.metrics.get("auc")
        table.add_row(
            name,
            f"@{deployment.version}" if deployment else "-",
            ", ".join(map(str, registry.versions(name))),
            card.kind,
            f"{auc:.4f}" if auc is not None else "-",
            (deployment.precision.value if deployment and deployment.precision else "auto") if deployment else "-",
            str(len(card.features)),
        )
    console.print(table)


@models.command("show")
@click.argument("model_ref", metavar="NAME[@VERSION]")
@click.option("--json", "as_json", is_flag=True, help="Print the card, variants and deployments as JSON.")
@config_option
@friendly
def show(model_ref: str, as_json: bool, config_file: Path | None) -> None:
    """A version's card: features with their view versions, training range, holdout
    metrics, precision variants, and the deploy history."""
    registry = model_registry(settings_of(config_file))
    name, version = parse_model_ref(model_ref)
    card = registry.card(name, version)
    variants = registry.variants(name, card.version)
    deployment = registry.deployment(name)
    if as_json:
        data = {
            "card": card.to_dict(),
            "variants": {p.value: v.to_dict() for p, v in variants.items()},
            "deployed": deployment.to_dict() if deployment else None,
        }
        click.echo(json.dumps(data, indent=2))
        return
    console.print(f"[bold]{card.ref}[/] ({card.kind}, {card.source}; {card.created_at})")
    console.print(f"  content sha256 {card.content_hash}")
    if card.label:
        console.print(f"  label {card.label}; trained on {card.training_range[0]} .. {card.training_range[1]}")
    if card.metrics:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) and v < 10 else f"{k} {v:,.0f}"
                          for k, v in card.metrics.items())  # fmt: skip
        console.print(f"  holdout: {shown}")
    console.print(f"  missing values: {card.on_missing.value}; stale values: {card.on_stale.value}")
    table = Table("#", "feature", "view version")
    for index, ref in enumerate(card.features):
        table.add_row(str(index), ref.reference, ref.view_version)
    console.print(table)
    if variants:
        variant_table = Table("precision", "accepted", "AUC delta", "max |diff|", "why")
        for variant in variants.values():
            variant_table.add_row(
                variant.precision.value,
                "yes" if variant.accepted else "no",
                f"{variant.auc_delta:+.4f}" if variant.auc_delta is not None else "-",
                f"{variant.max_abs_diff:.2e}" if variant.max_abs_diff is not None else "-",
                variant.reason,
            )
        console.print(variant_table)
    if deployment:
        console.print(
            f"deployed: {name}@{deployment.version} ({deployment.precision.value if deployment.precision else 'auto'})"
            f" since {deployment.deployed_at} by {deployment.deployed_by}"
        )


@models.command("deploy")
@click.argument("model_ref", metavar="NAME[@VERSION]")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "int8"]),
    default="auto",
    show_default=True,
    help="auto: FP16 on a GPU when its variant passed, else FP32. fp16/int8 are refused when their variant failed.",
)
@click.option(
    "--max-auc-drop",
    type=float,
    default=MAX_AUC_DROP,
    show_default=True,
    help="A variant losing more holdout AUC than this against FP32 is refused.",
)
@config_option
@friendly
def deploy(model_ref: str, precision: str, max_auc_drop: float, config_file: Path | None) -> None:
    """Serve NAME@VERSION (default: the newest) under NAME. FP16 and INT8 variants are
    made and checked on the holdout first; running servers switch once the new session
    is warm."""
    from training.variants import make_variants

    settings = settings_of(config_file)
    registry = model_registry(settings)
    name, version = parse_model_ref(model_ref)
    version = version if version is not None else registry.versions(name)[-1] if registry.versions(name) else None
    card = registry.card(name, version)
    check_views(card, FileRegistry(settings.registry_dir).current())
    with console.status(f"making and checking FP16 / INT8 variants of {card.ref}"):
        variants = make_variants(registry, name, card.version, max_auc_drop=max_auc_drop)
    for variant in variants:
        mark = "ok" if variant.accepted else "--"
        console.print(f"  {variant.precision.value}: {mark} {variant.reason}", highlight=False)
    chosen = None if precision == "auto" else Precision(precision)
    deployment = registry.deploy(name, card.version, precision=chosen, by=_user())
    previous = f" (was @{deployment.previous})" if deployment.previous else ""
    console.print(f"deployed {card.ref} as `{name}`{previous}, precision {precision}; running servers pick it up")


@click.command("serve-models")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8081, show_default=True, type=click.IntRange(1, 65535), help="Port.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Worker processes (uvicorn).")
@click.option(
    "--model", "names", multiple=True, help="Serve only this model (repeatable; default: every deployed one)."
)
@click.option(
    "--max-batch-rows",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    help="Most rows per inference batch (a batch grows toward it only under load).",
)
@click.option(
    "--max-wait-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1000),
    help="Wait up to this long for a batch to fill (0: a batch leaves when the runtime is free; it fills under load).",
)
@click.option(
    "--queue-rows",
    default=8192,
    show_default=True,
    type=click.IntRange(1),
    help="Hard bound on queued rows per model (the adaptive bound stays below it).",
)
@click.option(
    "--deadline-ms",
    default=1000.0,
    show_default=True,
    type=click.FloatRange(1, 600_000),
    help="Deadline of a request that gives none.",
)
@click.option(
    "--min-batch-rows",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Floor of the adaptive batch limit (set it to --max-batch-rows to fix the batch size).",
)
@click.option(
    "--latency-tolerance",
    default=1.5,
    show_default=True,
    type=click.FloatRange(1, min_open=True),
    help="Adaptive batch limit: a batch may take this many times a one-row batch's time.",
)
@click.option(
    "--queue-delay-ms",
    default=50.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Adaptive queue bound: admit the rows the model serves in this long (sheddable up to 50%, default 80%).",
)
@click.option(
    "--loop-lag-target-ms",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Past this event-loop lag, sheddable and default work lose headroom until the loop keeps up (sheddable "
    "work all of it, default work down to one batch).",
)
@click.option(
    "--loop-busy-target",
    default=0.8,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Past this share of the event loop thread's time spent working, the same, and only a fraction of "
    "sheddable requests is let in at all (the fraction that keeps the loop this busy): a loop busy all the time "
    "keeps every new request waiting, critical ones too.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="TENX_LOG_FORMAT",
    help="Server logs on stderr: text, or one JSON object per line; each names its request id ($TENX_LOG_FORMAT).",
)
@click.option(
    "--no-shedding",
    is_flag=True,
    help="Turn priorities, shedding and the adaptive limits off: one FIFO queue of --queue-rows, batches of "
    "--max-batch-rows, no quotas (the baseline bench/overload.py compares with).",
)
@click.option("--cpu", "cpu_only", is_flag=True, help="Run on the CPU even where a GPU provider is available.")
@click.option(
    "--front",
    "with_front",
    is_flag=True,
    help="Put tenx-front (Go; `make front` builds it) on --host:--port, with this server behind it on a loopback "
    "port: it refuses the requests the server would shed, from their X-Priority header, without spending the "
    "server's event loop on them, and forwards the rest. Its refusals count in this server's /metrics. Under 10x "
    "load from clients that do not throttle themselves, that CPU is what critical requests need.",
)
@click.option(
    "--inline-run-us",
    default=200.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="A model on the CPU whose last 32 runs each took under this many microseconds runs on the event loop, "
    "where a small model costs less than the hand-off to its own thread; one slow run sends it back to its "
    "thread. 0: always its own thread (a model that may stall should have it: only there does the inference "
    "timeout free the server of it).",
)
@click.option(
    "--fault-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Fault injection for tests: while this file names a model (one per line), its batches fail as a crashed "
    "model's would (`tenx loadtest --fault model@15s --fault-file PATH`). Leave it out in production.",
)
@token_options
@config_option
@friendly
def serve_models(
    host: str,
    port: int,
    workers: int,
    names: tuple[str, ...],
    max_batch_rows: int,
    max_wait_ms: float,
    queue_rows: int,
    deadline_ms: float,
    min_batch_rows: int,
    latency_tolerance: float,
    queue_delay_ms: float,
    loop_lag_target_ms: float,
    loop_busy_target: float,
    log_format: str,
    no_shedding: bool,
    cpu_only: bool,
    with_front: bool,
    inline_run_us: float,
    fault_file: Path | None,
    token: str | None,
    token_file: Path | None,
    config_file: Path | None,
) -> None:
    """Run the model server: POST /predict {"model", "entities", "priority", "tenant",
    "deadline_ms", "context"}, GET /models, /health/live, /health/ready, /metrics (with
    a token set, /predict and /models need it; /health* and /metrics never do). It
    looks the model's features up in the online store, batches rows across requests and
    runs ONNX Runtime (CUDA/TensorRT when present, else the CPU).

    Under load it admits critical work first (sheddable only while the queue is below
    half its adaptive bound, default below 80%), refuses a tenant over its quota
    (model_server.tenants in tenx.yaml) with 429, opens a circuit per dependency that
    keeps failing, and answers along the routes the feature repo declares
    (`featurestore.route`: a cheaper model, the prediction cache, a rule)."""
    import uvicorn

    from featurestore.plan.collect import collect_routes
    from serving.models import front as front_module
    from serving.models.config import breaker_settings, cost_rates, tenant_policies
    from serving.models.protocol import PredictProtocol

    settings = settings_of(config_file)
    applied_plan(settings)
    registry = model_registry(settings)
    deployed = registry.deployments()
    for name in names:
        registry.resolve(name, None)
        if name not in deployed:
            raise ConfigError(f"model `{name}` is not deployed: `tenx models deploy {name}` first")
    if settings.config_file is not None:
        os.environ["TENX_CONFIG"] = str(settings.config_file)
    os.environ["TENX_LOG_FORMAT"] = log_format  # read by each worker
    token = read_token(token, token_file)
    if token:
        os.environ["TENX_API_TOKEN"] = token  # the workers' environment, not their command line
    os.environ["TENX_MODEL_SERVER"] = json.dumps(
        {
            "models": list(names),
            "max_batch_rows": max_batch_rows,
            "max_wait_ms": max_wait_ms,
            "queue_rows": queue_rows,
            "default_deadline_ms": deadline_ms,
            "min_batch_rows": min(min_batch_rows, max_batch_rows),
            "latency_tolerance": latency_tolerance,
            "queue_delay_ms": queue_delay_ms,
            "loop_lag_target_ms": loop_lag_target_ms,
            "loop_busy_target": loop_busy_target,
            "shedding": not no_shedding,
            "prefer_gpu": not cpu_only,
            "inline_run_us": inline_run_us,
            "fault_file": str(fault_file.resolve()) if fault_file else None,
        }
    )
    routes = collect_routes(settings.features_path, settings.modules) if settings.features_path.is_dir() else {}
    for spec in routes.values():
        for model in spec.models:
            if model not in deployed:
                role = "primary" if model == spec.primary else "fallback"
                console.print(
                    f"[yellow]route `{spec.name}`: {role} model `{model}` is not deployed; it is skipped "
                    f"(`tenx models deploy {model}`)"
                )
    tenant_policies(settings.model_server)  # a mistake in tenx.yaml stops here, not in every worker
    breaker_settings(settings.model_server)
    cost_rates(settings.model_server)
    if workers > 1:
        # Each worker writes its metric values here; /metrics in any of them merges all.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tenx-metrics-")
    check_port_free(host, port)
    front = None
    inner_host, inner_port = host, port
    if with_front:
        front_binary = front_module.front_binary()
        inner_host, inner_port = "127.0.0.1", front_module.free_port()
        secret = secrets.token_hex(16)
        os.environ["TENX_FRONT_SECRET"] = secret  # the workers trust the front's headers by it
        front = front_module.Front(front_binary, host=host, port=port, upstream_port=inner_port, secret=secret)
    served = ", ".join(names or tuple(sorted(deployed))) or "none deployed yet"
    if routes:
        served += "; routes " + ", ".join(sorted(routes))
    mode = "" if not no_shedding else "; shedding OFF"
    if front is not None:
        mode += f"; tenx-front on {host}:{port}, the server on {inner_host}:{inner_port}"
    console.print(f"tenx model server on http://{host}:{port} ({served}; features from {store_name(settings)}{mode})")
    if front is not None:
        front.start()
    try:
        _run_uvicorn(uvicorn, PredictProtocol, inner_host, inner_port, workers)
    finally:
        if front is not None:
            front.stop()


def _run_uvicorn(uvicorn: Any, protocol: Any, host: str, port: int, workers: int) -> None:
    uvicorn.run(
        "serving.models.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http=protocol,  # PredictProtocol: httptools, refusing shed requests from their headers
        # Per-request work uvicorn would do for every prediction: X-Forwarded-* rewriting
        # (a proxy in front sets its own), and the Server and Date headers.
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )


@click.command()
@click.argument("model")
@click.argument("entities", nargs=-1, required=True)
@click.option("--url", default="http://127.0.0.1:8081", show_default=True, envvar="TENX_MODEL_SERVER_URL",
              help="Model server ($TENX_MODEL_SERVER_URL).")  # fmt: skip
@click.option("--priority", type=click.Choice(["critical", "default", "sheddable"]), default=None, help="Class.")
@click.option("--tenant", default=None, help="Tenant the request is for.")
@click.option("--deadline-ms", type=click.FloatRange(1, 600_000), default=None, help="Deadline of the request.")
@click.option(
    "--context",
    "context_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A field for the route's routing function and rules, e.g. --context amount=120 (repeatable).",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, 600),
    default=0,
    show_default=True,
    help="Wait up to this many seconds for the server to be ready (e.g. just after `tenx serve-models &`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@click.option("--token", envvar="TENX_API_TOKEN", default=None, help="Bearer token ($TENX_API_TOKEN).")
@friendly
def predict(
    model: str,
    entities: tuple[str, ...],
    url: str,
    priority: str | None,
    tenant: str | None,
    deadline_ms: float | None,
    context_pairs: tuple[str, ...],
    wait_s: float,
    as_json: bool,
    token: str | None,
) -> None:
    """Ask a running model server (`tenx serve-models`) to score ENTITIES with MODEL (a
    model or a route), e.g. `tenx predict buys 17 42`. Prints each score with its
    features' status and age, and what answered (with the reason when degraded)."""
    import time
    from dataclasses import asdict

    from serving.errors import ModelUnavailable
    from serving.models import ModelClient

    keys: list[Any] = [int(e) if e.lstrip("-").isdigit() else e for e in entities]
    context = dict(_context_pair(pair) for pair in context_pairs)
    give_up = time.monotonic() + wait_s
    with ModelClient(url, token=token) as client:
        while True:
            try:
                prediction = client.predict(
                    model, keys, priority=priority, tenant=tenant, deadline_ms=deadline_ms, context=context
                )
                break
            except ModelUnavailable as error:
                if time.monotonic() >= give_up:
                    hint = "" if wait_s else " (start it with `tenx serve-models`, or pass --wait SECONDS)"
                    raise ModelUnavailable(f"{error}{hint}") from error
                time.sleep(0.2)
    if as_json:
        click.echo(json.dumps(asdict(prediction)))
        return
    where = f" ({prediction.precision} on {prediction.device})" if prediction.model is not None else ""
    degraded = f" [degraded: {prediction.reason}]" if prediction.degraded else ""
    console.print(f"{prediction.served_by}{where}{degraded}", highlight=False)
    table = Table("entity", "score", "features", "age")
    for entity, score, status, age in zip(
        entities, prediction.scores, prediction.status, prediction.age_s, strict=True
    ):
        table.add_row(
            entity,
            f"{score:.4f}" if score is not None else "-",
            status,
            f"{age:,.0f} s" if age is not None else "-",
        )
    console.print(table)


def _context_pair(pair: str) -> tuple[str, Any]:
    name, sep, value = pair.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{pair!r}: expected NAME=VALUE, e.g. amount=120", param_hint="--context")
    try:
        return name, json.loads(value)  # numbers and true/false as such
    except json.JSONDecodeError:
        return name, value
