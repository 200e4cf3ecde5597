"""`tenx loadtest`: the 10x litmus test of a running stack (tenx/loadtest/)."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from featurestore.errors import ConfigError, TransientError
from tenx.commands.common import console, friendly
from tenx.loadtest.steps import CLASSES, DEFAULT_SLOS, Slo, Target

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


def seconds(text: str, *, what: str) -> float:
    """`30s`, `1.5m`, `500ms` or a plain number of seconds."""
    found = _DURATION.match(text.strip().lower())
    if found is None:
        raise ConfigError(f"{what} {text!r}: write a duration such as 30s, 2m or 500ms")
    value = float(found[1])
    return value / 1000 if found[2] == "ms" else value * 60 if found[2] == "m" else value


def multiples(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    increasing = all(low < high for low, high in itertools.pairwise(values))
    if not values or any(not 0 < v < math.inf for v in values) or not increasing:
        raise ConfigError(f"--steps {text!r}: give increasing positive multiples of the base rate, e.g. 1,3,5,10")
    return values


def entity_keys(text: str) -> tuple[Any, ...]:
    """`1-20000` (a range of integer keys) or `a,b,c` (keys as given; digits become integers)."""
    low, dash, high = text.partition("-")
    if dash and low.strip().isdigit() and high.strip().isdigit():
        first, last = int(low), int(high)
        if last < first:
            raise ConfigError(f"--entities {text!r}: the range ends before it starts")
        return tuple(range(first, last + 1))
    keys = tuple(int(k) if k.strip().isdigit() else k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise ConfigError(f"--entities {text!r}: give a range such as 1-20000 or keys separated by commas")
    return keys


def slo_overrides(values: tuple[str, ...]) -> dict[str, Slo]:
    """`critical:p99=50,success=99.9` (p99 in ms, success in percent)."""
    slos = dict(DEFAULT_SLOS)
    for value in values:
        label, colon, rest = value.partition(":")
        if not colon or label not in CLASSES:
            raise ConfigError(
                f"--slo {value!r}: write CLASS:p99=MS,success=PERCENT with CLASS one of {', '.join(CLASSES)}"
            )
        fields = dict(slos[label].__dict__)
        for part in rest.split(","):
            key, _, number = part.partition("=")
            try:
                parsed = float(number)
            except ValueError:
                raise ConfigError(f"--slo {value!r}: {part!r} is not KEY=NUMBER (keys: p99, success)") from None
            if key == "p99":
                fields["p99_ms"] = parsed
            elif key == "success":
                fields["success"] = round(parsed / 100, 12)  # 99.9 -> 0.999, not 0.9990000000000001
            else:
                raise ConfigError(f"--slo {value!r}: unknown key {key!r} (keys: p99 in ms, success in percent)")
        slos[label] = Slo(**fields)
    return slos


def served_model(url: str, token: str | None) -> str:
    """The one route or model the server answers for (GET /models)."""
    import httpx

    try:
        answer = httpx.get(
            f"{url.rstrip('/')}/models", timeout=10, headers={"authorization": f"Bearer {token}"} if token else {}
        )
    except httpx.TransportError as error:
        raise TransientError(f"nothing answers at {url} ({error}); is `tenx serve-models` running there?") from None
    if answer.status_code != 200:
        raise ConfigError(f"{url}/models answered {answer.status_code}; pass --model NAME")
    names = sorted({model["model"] for model in answer.json().get("models", [])})
    if len(names) != 1:
        raise ConfigError(f"the server at {url} serves {', '.join(names) or 'no model'}: pass --model NAME")
    return str(names[0])


@click.command()
@click.option("--target", "url", default=None,
              help="The server to load: a model server (default http://127.0.0.1:8081, $TENX_MODEL_SERVER_URL) or, "
              "with --api features, a feature API (default http://127.0.0.1:8080).")  # fmt: skip
@click.option("--api", type=click.Choice(["model", "features"]), default="model", show_default=True,
              help="model: POST /predict to `tenx serve-models`; features: POST /features to `tenx serve`.",
              )  # fmt: skip
@click.option("--model", default=None, help="Model or route to predict with (default: the one the server serves).")
@click.option("--view", default=None, help="With --api features: the feature view to look up.")
@click.option("--base-rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Requests/s at 1x. Without it, the capacity is found first (--find-capacity).")  # fmt: skip
@click.option("--find-capacity", is_flag=True,
              help="Find the highest rate served (99% answered, p99 under --capacity-p99-ms), then 1x = "
              "--base-share x that (the default when no --base-rate).")  # fmt: skip
@click.option("--base-share", type=click.FloatRange(0, 1, min_open=True), default=0.4, show_default=True,
              help="1x as a share of the capacity found: at 0.4 and 20% critical traffic, critical work alone at 10x "
              "is 80% of the capacity, so the server can still serve all of it.")  # fmt: skip
@click.option("--capacity-p99-ms", type=click.FloatRange(0, min_open=True), default=100.0, show_default=True,
              help="A capacity-search rate counts as served only with its p99 below this.")  # fmt: skip
@click.option("--capacity-step", "capacity_step_text", default="3s", show_default=True,
              help="Length of each capacity-search rate (after up to 1 s of warm-up).")  # fmt: skip
@click.option("--steps", "steps_text", default="1,3,5,10", show_default=True,
              help="Load steps, as multiples of the base rate.")  # fmt: skip
@click.option("--duration", "duration_text", default="30s", show_default=True,
              help="Length of each step (all its rounds together).")  # fmt: skip
@click.option("--rounds", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Run the steps this many times, interleaved (1x 3x 5x 10x, 1x 3x 5x 10x, ...), each for "
              "--duration / ROUNDS, and take each step's figures over all its rounds: a machine whose speed drifts "
              "over minutes then slows every step alike instead of whichever ran last. The report keeps each "
              "round's p99s.")  # fmt: skip
@click.option("--warmup", "warmup_text", default="2s", show_default=True,
              help="Sent before each step's window, not counted.")  # fmt: skip
@click.option("--mix", "mix_text", default="critical=0.2,sheddable=0.8", show_default=True,
              help="Share of requests per priority class (critical, default, sheddable).")  # fmt: skip
@click.option("--tenants", "tenants_text", default=None,
              help="Tenants and their share of requests, e.g. acme=0.7,globex=0.3 (default: none named).")  # fmt: skip
@click.option("--entities", "entities_text", default="1-1000", show_default=True,
              help="Entity keys to request: a range (1-20000) or keys separated by commas.")  # fmt: skip
@click.option("--entities-per-request", "per_request", type=click.IntRange(1, 10_000), default=10, show_default=True)
@click.option("--deadline-ms", type=click.FloatRange(0, min_open=True), default=1000.0, show_default=True,
              help="Every request's deadline; goodput counts 2xx answers within it.")  # fmt: skip
@click.option("--slo", "slo_texts", multiple=True,
              help="A class's SLO, e.g. critical:p99=50,success=99.9 (repeatable). Defaults: critical p99 100 ms, "
              "99.9%; default 250 ms, 99%; sheddable 1000 ms, no success floor.")  # fmt: skip
@click.option("--no-client-throttle", is_flag=True,
              help="Send every request (with tenx-loadgen, the native generator, where `make loadgen` built it). By "
              "default default and sheddable requests go through ModelClient's adaptive throttle (Google SRE's "
              "client-side throttling), as tenx's clients do; critical ones never do.",
              )  # fmt: skip
@click.option("--fault", "fault_spec", default=None,
              help="COMPONENT@SECONDS (redis@15s, kafka@15s, model@15s): stop it that far into an extra step at "
              "--fault-step and restart it --fault-for later; the report shows what each class saw.")  # fmt: skip
@click.option(
    "--fault-for", "fault_for_text", default="5s", show_default=True, help="How long the component stays down."
)
@click.option("--fault-step", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="The load (multiple of the base rate) during the fault.")  # fmt: skip
@click.option("--fault-stop", default=None, help="Shell command that stops the component (default: scripts/services).")
@click.option("--fault-start", default=None, help="Shell command that starts it again.")
@click.option("--fault-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="For --fault model@...: the model server's --fault-file.")  # fmt: skip
@click.option(
    "--pipelines",
    is_flag=True,
    help="Also run the batch backfill and the stream job on demo data at 1x and --pipeline-scale x events.",
)
@click.option("--pipelines-only", is_flag=True, help="Only the pipeline part: no server is loaded.")
@click.option("--pipeline-events", type=click.IntRange(1_000), default=100_000, show_default=True,
              help="Demo events at 1x (100,000: about a minute for both sizes on 2 cores; the online store is "
              "$TENX_REDIS_URL's Redis when set, else an embedded one).")  # fmt: skip
@click.option("--pipeline-scale", type=click.IntRange(2, 100), default=10, show_default=True)
@click.option("--max-generator-lag-ms", "max_lag_ms", type=click.FloatRange(0, min_open=True), default=10.0,
              show_default=True,
              help="A step where the generator's own p99 send lag passes this is run again, then not reported.",
              )  # fmt: skip
@click.option("--generator-nice", type=click.IntRange(0, 19), default=10, show_default=True,
              help="The load generator's niceness (Linux nice): on the server's own machine it stands in for "
              "clients elsewhere, so the server's threads get the cores first; alone on its machine it makes no "
              "difference. Its lateness is judged either way (--max-generator-lag-ms).")  # fmt: skip
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              envvar="TENX_API_TOKEN_FILE", help="Bearer token for the target ($TENX_API_TOKEN_FILE).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("loadtest-report"),
              show_default=True, help="Folder for report.json and report.html.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of send times, requests and throttles.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the tables.")
@friendly
def loadtest(
    url: str | None, api: str, model: str | None, view: str | None, base_rate: float | None, find_capacity: bool,
    base_share: float, capacity_p99_ms: float, capacity_step_text: str, steps_text: str, duration_text: str,
    rounds: int, warmup_text: str, mix_text: str, tenants_text: str | None, entities_text: str, per_request: int,
    deadline_ms: float, slo_texts: tuple[str, ...], no_client_throttle: bool, fault_spec: str | None,
    fault_for_text: str, fault_step: float, fault_stop: str | None, fault_start: str | None, fault_file: Path | None,
    pipelines: bool, pipelines_only: bool, pipeline_events: int, pipeline_scale: int, max_lag_ms: float,
    generator_nice: int, token_file: Path | None, out: Path, seed: int, as_json: bool,
) -> None:  # fmt: skip
    """The 10x litmus test: open-loop load at 1x, 3x, 5x and 10x of a base rate against a
    running model server (or feature API), per priority class: p50/p99/p99.9, success,
    shed, throttled, deadline drops, degraded answers, goodput and cost per 1k
    predictions; the p99 growth per class and the first step that breaks its SLO; the
    projected monthly cost at 1x and 10x. With --fault, one component is stopped in an
    extra step and restarted (blast radius and recovery); with --pipelines, the batch and
    stream jobs run at 1x and 10x events. Writes report.json and a self-contained
    report.html with plots to --out.

    The generator runs in a process of its own; latency counts from each request's
    intended send time, and a step where the generator fell behind is not reported.
    The steps run in interleaved rounds (--rounds), so drift in the machine's speed
    does not pass for the effect of load.

    \b
    tenx serve-models &                       # Redis from `eval "$(scripts/services up --only redis)"`
    tenx loadtest --find-capacity --steps 1,3,5,10
    tenx loadtest --base-rate 800 --duration 20s --fault redis@10s
    tenx loadtest --pipelines-only --pipeline-events 20000
    """
    from tenx.loadtest.report import terminal_table
    from tenx.loadtest.run import FaultOptions, Options, parse_shares, run_loadtest, stderr_say, write_outputs

    if base_rate is not None and find_capacity:
        raise ConfigError("give --base-rate or --find-capacity, not both")
    token = token_file.read_text().strip() if token_file else None
    command = "tenx loadtest " + " ".join(shlex.quote(arg) for arg in sys.argv[2:])
    duration, warmup = seconds(duration_text, what="--duration"), seconds(warmup_text, what="--warmup")
    if pipelines_only:
        report = _pipelines_report(command, pipeline_events, pipeline_scale, seed, os.environ.get("TENX_REDIS_URL"))
    else:
        if api == "model":
            url = url or os.environ.get("TENX_MODEL_SERVER_URL") or "http://127.0.0.1:8081"
            what = model or served_model(url, token)
            kind = "model-server"
        else:
            url = url or "http://127.0.0.1:8080"
            if not view:
                raise ConfigError("--api features needs --view NAME (the feature view to look up)")
            what, kind = view, "feature-api"
        fault = None
        if fault_spec:
            fault = FaultOptions(
                spec=fault_spec, down_s=seconds(fault_for_text, what="--fault-for"), multiple=fault_step,
                stop=fault_stop, start=fault_start, fault_file=fault_file, redis_url=os.environ.get("TENX_REDIS_URL"),
            )  # fmt: skip
        options = Options(
            target=Target(kind, url, what, token),
            steps=multiples(steps_text),
            base_rate=base_rate,
            base_share=base_share,
            duration_s=duration,
            rounds=rounds,
            warmup_s=warmup,
            classes=parse_shares(mix_text, what="--mix", allowed=CLASSES),
            tenants=parse_shares(tenants_text, what="--tenants") if tenants_text else {},
            entities=entity_keys(entities_text),
            per_request=per_request,
            deadlines_ms=dict.fromkeys(CLASSES, deadline_ms),
            slos=slo_overrides(slo_texts),
            throttle=not no_client_throttle,
            max_lag_ms=max_lag_ms,
            generator_nice=generator_nice,
            capacity_p99_ms=capacity_p99_ms,
            capacity_step_s=seconds(capacity_step_text, what="--capacity-step"),
            fault=fault,
            pipelines_events=pipeline_events if pipelines else None,
            pipelines_scale=pipeline_scale,
            pipelines_redis_url=os.environ.get("TENX_REDIS_URL"),
            seed=seed,
            command=command,
        )
        report = run_loadtest(options, say=stderr_say)
    paths = write_outputs(report, out)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        console.print(terminal_table(report), highlight=False, markup=False, soft_wrap=True)
    console.print(f"report: {paths['html']} (JSON: {paths['json']})", highlight=False)


def _pipelines_report(command: str, events: int, scale: int, seed: int, redis_url: str | None) -> dict[str, Any]:
    import tempfile

    from tenx.loadtest.pipelines import run_pipelines
    from tenx.loadtest.run import report_header, stderr_say

    with tempfile.TemporaryDirectory(prefix="tenx-loadtest-") as work:
        pipelines = run_pipelines(
            Path(work), events=events, scale=scale, redis_url=redis_url, progress=stderr_say, seed=seed
        )
    return {
        **report_header(command),
        "target": None,
        "settings": {"pipeline_events": events, "pipeline_scale": scale, "seed": seed},
        "capacity": None,
        "steps": [],
        "verdict": {},
        "overload_bar": None,
        "cost": None,
        "fault": None,
        "pipelines": pipelines,
    }
