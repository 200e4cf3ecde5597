"""The whole litmus test: capacity, the load steps, the fault, the pipelines, the report."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from featurestore.errors import ConfigError, TransientError
from serving.loadgen import LoadGenerator
from tenx.loadtest import faults
from tenx.loadtest.report import REPORT_VERSION
from tenx.loadtest.steps import (
    DEFAULT_SLOS,
    Mix,
    Slo,
    Step,
    StepSettings,
    Target,
    _pct,
    combine_rounds,
    cost_summary,
    critical_only,
    describe,
    find_capacity,
    overload_bar,
    request_mix,
    run_step,
    verdicts,
)


@dataclass(frozen=True)
class FaultOptions:
    spec: str  # redis@15s
    down_s: float = 5.0
    multiple: float = 1.0  # the load step (multiple of the base rate) the fault runs in
    stop: str | None = None
    start: str | None = None
    fault_file: Path | None = None
    redis_url: str | None = None


@dataclass(frozen=True)
class Options:
    target: Target
    steps: tuple[float, ...] = (1.0, 3.0, 5.0, 10.0)
    base_rate: float | None = None  # None: find the capacity and take base_share of it
    base_share: float = 0.4
    duration_s: float = 30.0  # each step's, split over its rounds
    rounds: int = 3  # the steps run this many times, interleaved; each step's rounds pooled
    warmup_s: float = 2.0
    classes: Mapping[str, float] = field(default_factory=lambda: {"critical": 0.2, "sheddable": 0.8})
    tenants: Mapping[str, float] = field(default_factory=dict)
    entities: tuple[Any, ...] = tuple(range(1, 1_001))
    per_request: int = 10
    deadlines_ms: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(DEFAULT_SLOS, 1000.0))
    slos: Mapping[str, Slo] = field(default_factory=lambda: dict(DEFAULT_SLOS))
    throttle: bool = True
    max_lag_ms: float = 10.0
    generator_nice: int = 10  # the generator yields the cores to a server on the same machine
    capacity_p99_ms: float = 100.0
    start_rate: float = 500.0
    capacity_step_s: float = 3.0  # each capacity-search step: short, the search runs many
    fault: FaultOptions | None = None
    pipelines_events: int | None = None  # None: no pipeline part
    pipelines_scale: int = 10
    pipelines_redis_url: str | None = None  # None: the embedded online store
    seed: int = 0
    command: str = ""


def check_target(target: Target, probe: bytes) -> None:
    """One request before any load: a clear error when nothing answers, or answers
    with an error (an unknown model, a wrong token), instead of a report of failures.
    A server still loading its models (503) is waited for, up to 30 s."""
    import httpx

    head, _, body = probe.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
    headers.pop("Content-Length", None)
    what = "`tenx serve-models`" if target.kind == "model-server" else "`tenx serve`"
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = httpx.post(f"{target.url.rstrip('/')}{target.path}", content=body, headers=headers, timeout=10)
        except httpx.TransportError as error:
            raise TransientError(f"nothing answers at {target.url} ({error}); is {what} running there?") from None
        if answer.status_code < 300:
            return
        if answer.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
            continue
        raise ConfigError(
            f"{target.url}{target.path} answered {answer.status_code} to a first request: {answer.text[:300]}"
        )


def report_header(command: str) -> dict[str, Any]:
    """The fields every report starts with: format version, start time, command, machine."""
    return {
        "tenx_loadtest": REPORT_VERSION,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }


def run_loadtest(options: Options, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run it all and return the report (see docs/loadtest.md for its fields)."""
    mix = request_mix(
        options.target,
        classes=options.classes,
        tenants=options.tenants,
        entities=options.entities,
        per_request=options.per_request,
        deadlines_ms=options.deadlines_ms,
        seed=options.seed,
    )
    fault = _fault(options, options.fault) if options.fault is not None else None  # a mistake stops here, not later
    check_target(options.target, mix.requests[0])
    seeds = itertools.count(options.seed * 1_000 + 1).__next__
    settings = StepSettings(
        duration_s=options.duration_s,
        warmup_s=options.warmup_s,
        max_lag_ms=options.max_lag_ms,
        throttle=options.throttle,
    )
    report: dict[str, Any] = {
        **report_header(options.command),
        "target": {"kind": options.target.kind, "url": options.target.url, "what": options.target.what},
        "settings": {
            "steps": list(options.steps),
            "duration_s": options.duration_s,
            "rounds": options.rounds,
            "warmup_s": options.warmup_s,
            "mix": dict(options.classes),
            "tenants": dict(options.tenants),
            "entities_per_request": options.per_request,
            "deadlines_ms": dict(options.deadlines_ms),
            "client_throttle": options.throttle,
            "generator_nice": options.generator_nice,
            "slo": {label: slo.__dict__ for label, slo in options.slos.items()},
            "seed": options.seed,
        },
        "fault": None,
        "pipelines": None,
    }
    # The native engine (tenx-loadgen, where `make loadgen` built it) sends the same load for
    # a fraction of the CPU; only the Python engine throttles like ModelClient (the default).
    with LoadGenerator(engine="auto", nice=options.generator_nice) as generator:
        report["capacity"] = _base_rate(generator, options, mix, settings, seeds, say)
        base = report["capacity"]["base_rate"]
        steps = [step.as_dict() for step in _run_steps(generator, options, mix, settings, base, seeds, say)]
        if options.fault is not None and fault is not None:
            report["fault"] = _fault_step(generator, options, options.fault, fault, mix, settings, base, seeds, say)
    report["steps"] = steps
    report["verdict"] = verdicts(steps, options.slos)
    report["overload_bar"] = overload_bar(steps)
    report["cost"] = cost_summary(steps, options.per_request)
    if options.pipelines_events is not None:
        import tempfile

        from tenx.loadtest.pipelines import run_pipelines

        with tempfile.TemporaryDirectory(prefix="tenx-loadtest-") as work:
            report["pipelines"] = run_pipelines(
                Path(work),
                events=options.pipelines_events,
                scale=options.pipelines_scale,
                redis_url=options.pipelines_redis_url,
                progress=say,
                seed=options.seed,
            )
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return report


def _run_steps(
    generator: LoadGenerator,
    options: Options,
    mix: Mix,
    settings: StepSettings,
    base: float,
    seeds: Callable[[], int],
    say: Callable[[str], None],
) -> list[Step]:
    """Every step, in `options.rounds` interleaved rounds (1x 3x 5x 10x, 1x 3x 5x 10x, ...)
    of `duration_s / rounds` each, each step's rounds pooled (`combine_rounds`)."""
    rounds = options.rounds
    each = replace(settings, duration_s=settings.duration_s / rounds)
    ran: dict[float, list[Step]] = {multiple: [] for multiple in options.steps}
    for number in range(1, rounds + 1):
        suffix = "" if rounds == 1 else f" (round {number}/{rounds})"
        for multiple in options.steps:
            step = run_step(
                generator, options.target, mix, multiple * base, each,
                name=f"{multiple:g}x", multiple=multiple, seeds=seeds, say=lambda line: say(line + suffix),  # noqa: B023
            )  # fmt: skip
            ran[multiple].append(step)
    steps = [combine_rounds(ran[multiple]) for multiple in options.steps]
    if rounds > 1:
        say(f"each step over its {rounds} rounds:")
        for step in steps:
            say(describe(step))
    return steps


def _base_rate(
    generator: LoadGenerator,
    options: Options,
    mix: Mix,
    settings: StepSettings,
    seeds: Callable[[], int],
    say: Callable[[str], None],
) -> dict[str, Any]:
    if options.base_rate is not None:
        return {"per_s": None, "base_rate": options.base_rate, "how": "given", "search": []}
    say("finding the capacity (critical-only requests, so a shedding server serves up to its limit)")
    probe = critical_only(mix)
    search_settings = replace(
        settings, duration_s=options.capacity_step_s, warmup_s=min(1.0, options.capacity_step_s), throttle=False
    )

    def attempt(rate: float) -> Any:
        return run_step(
            generator, options.target, probe, rate, search_settings,
            name="capacity", multiple=0.0, seeds=seeds, say=say,
        )  # fmt: skip

    found = find_capacity(attempt, start_rate=options.start_rate, max_p99_ms=options.capacity_p99_ms, say=say)
    if found["per_s"] is None:
        raise TransientError(
            f"the target served none of the capacity search's rates (down to {found['search'][-1]['rate']:,.0f}/s): "
            f"{found['search'][-1]['why']}"
        )
    base = options.base_share * found["per_s"]
    say(f"capacity {found['per_s']:,.0f} requests/s; 1x = {options.base_share:g} x capacity = {base:,.0f}/s")
    return {**found, "base_rate": base, "base_share": options.base_share, "how": "found"}


def _fault(options: Options, fault_options: FaultOptions) -> faults.Fault:
    """The fault to inject, its commands resolved (a ConfigError before any load)."""
    component, at_s = faults.parse_fault(fault_options.spec)
    stop, start = fault_options.stop, fault_options.start
    if stop is None or start is None:
        default_stop, default_start = faults.default_commands(
            component, redis_url=fault_options.redis_url, fault_file=fault_options.fault_file,
            model=options.target.what,
        )  # fmt: skip
        stop, start = stop or default_stop, start or default_start
    return faults.Fault(
        component,
        at_s,
        fault_options.down_s,
        stop,
        start,
        redis_password=faults.redis_password(fault_options.redis_url),
    )


def _fault_step(
    generator: LoadGenerator,
    options: Options,
    fault_options: FaultOptions,
    fault: faults.Fault,
    mix: Mix,
    settings: StepSettings,
    base: float,
    seeds: Callable[[], int],
    say: Callable[[str], None],
) -> dict[str, Any]:
    component, at_s, stop = fault.component, fault.at_s, fault.stop
    duration = max(settings.duration_s, at_s + fault_options.down_s + 15.0)  # 15 s to see the recovery
    fault_settings = replace(settings, duration_s=duration, timeline_s=0.5, retries=0)
    name = f"fault {fault_options.multiple:g}x"
    say(f"{name}: stopping {component} {at_s:g} s into the window for {fault_options.down_s:g} s ({stop})")
    window_starts_in_s = fault_settings.warmup_s + 0.5  # the generator's process start, roughly; aligned below
    scheduled = time.time() + window_starts_in_s
    step = run_step(
        generator, options.target, mix, fault_options.multiple * base, fault_settings,
        name=name, multiple=fault_options.multiple, seeds=seeds, say=say,
        around=lambda: faults.injected(fault, window_starts_in_s=window_starts_in_s),
    )  # fmt: skip
    faults.align(fault, step.result.started_epoch_s, scheduled)
    assert step.result.timeline is not None
    block = faults.summarize(fault, step.result.timeline, step=name)
    block["step_figures"] = step.as_dict()
    for label, figures in block["summary"].items():
        recovery = figures["recovery_s"]
        say(
            f"  {label}: success before/during/after "
            + "/".join(_pct(figures[phase]["success"]) for phase in ("before", "during", "after"))
            + ", degraded during " + _pct(figures["during"]["degraded"])
            + (f", recovered {recovery:.1f} s after the restart" if recovery is not None else ", did not recover")
        )  # fmt: skip
    return block


def write_outputs(report: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """report.json and report.html under `out` (created)."""
    from tenx.loadtest.report import write_html

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    write_html(dict(report), paths["html"])
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def parse_shares(text: str, *, what: str, allowed: Sequence[str] | None = None) -> dict[str, float]:
    """`critical=0.2,sheddable=0.8` -> {"critical": 0.2, "sheddable": 0.8} (shares sum to 1)."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (piece.strip() for piece in part.partition("="))
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or not name or not 0 <= number < math.inf:
            raise ConfigError(
                f"{what} {text!r}: write NAME=SHARE pairs separated by commas, e.g. critical=0.2,sheddable=0.8"
            )
        if allowed is not None and name not in allowed:
            raise ConfigError(f"{what}: unknown class {name!r} (classes: {', '.join(allowed)})")
        shares[name] = number
    total = sum(shares.values())
    if not shares or total <= 0:
        raise ConfigError(f"{what} {text!r}: give at least one positive share")
    return {name: value / total for name, value in shares.items()}


def stderr_say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
