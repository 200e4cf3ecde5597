"""Overload benchmark: `tenx serve-models` offered 1x to 10x its base rate, with and without shedding.

The data and model are bench/serving.py's (its `prepare`: N entities x 20 float32 features
in Redis, the MLP 20-64-64-1 deployed; TENX_REDIS_URL required: `eval "$(scripts/services
up --only redis)"`). The server runs as `tenx serve-models` (1 worker, CPU, serving only
the MLP; `--front`: behind tenx-front, its Go admission front, built by `make front`); the
load is open-loop (serving/loadgen.py: Poisson send times fixed in advance from a seed,
latency from each request's intended send time; sent by tenx-loadgen, its native engine,
when `make loadgen` built it, else by its Python engine: `--generator`), POST /predict with
`--entities-per-request` random entities each (default 10: the generator then offers
several times the server's capacity on 2 shared cores), every request labelled with its
class and a deadline:

    {"model": "mlp", "entities": [...], "priority": "critical" | "sheddable",
     "tenant": "bench", "deadline_ms": 1000}

with the class and tenant also as X-Priority / X-Tenant headers, as ModelClient sends
them (an overloaded server refuses a sheddable request from its header, unread).

`--critical-share` (20%) of the pre-encoded requests are critical, the rest sheddable.

1. Capacity: the offered rate of the same requests, every one critical, is stepped up
   (x`--factor` from `--start-rate`, then `--refine` geometric bisections) against the
   server as it ships (a shedding server admits critical work up to its whole bound, so
   it serves up to its real limit; with the mix it would refuse sheddable work well
   below it), as `tenx loadtest --find-capacity` does; capacity
   is the highest rate it served: 2xx >= 99% of the requests, p99 <= `--max-p99-ms`, no
   request waiting for a connection (all `--connections` busy: the server stopped
   reading), and the generator offering the load itself (below).
2. 1x = `--base-share` (0.4) x capacity. Why 0.4: with 20% critical traffic, critical
   alone at 10x is 2x the base rate, so the base must be below half the capacity for
   critical success at 10x to be possible at all, and above a third of it for 3x to
   overload the server. Then `--step-s` at 1x, 3x, 5x and 10x (`--multiples`) against
   (a) the server as it ships (priorities, admission by class, shedding) and (b) the same
   server restarted with `--no-shedding` (one FIFO queue with only its row bound, every
   class alike): the baseline, measured in the same run. Each server's steps run in
   `--rounds` interleaved rounds (1x 3x 5x 10x, again, ...) of `--step-s / rounds` each,
   and each step's figures are taken over all its rounds' requests: this machine's speed
   drifts over minutes (the same 1x load: 6.7 ms p99, then 13.1 ms), and rounds spread
   every step over the same stretch of time instead of comparing one minute with the
   next. Each round's critical p99 and the 3x/1x ratio of each pair stay in the JSON.
3. Per step and class: offered rate, p50/p99 of 2xx answers, the shares of the requests
   answered 2xx (success), 503 (shed), 429 (over quota), 504 (deadline passed before
   scoring), anything else (no answer within the drain, a broken connection); the share
   answered 2xx within the request's deadline counted from its intended send time (a
   request the server answers in time may have waited in a socket before it), and that
   count per second: goodput, also / capacity; the share of 2xx answers marked
   `"degraded": true`. From the server's /metrics, where it exports them: the
   `tenx_model_fallbacks_total` and `tenx_model_shed_total` (by reason) deltas, and its
   adaptive limits after the step (`tenx_model_queue_bound_rows`,
   `tenx_model_batch_limit_rows`). The CPU the server, Redis and the generator used.

The generator runs on the same cores as the server and Redis. It stands in for clients
on other machines, so it runs at `--generator-nice` (10): the server's threads get the
cores first, as they would with the clients elsewhere (at nice 0 its one thread took an
equal share beside the server's event loop: the same 10x step, at a capacity of 3,668
req/s, lost 1-12% of critical requests in 3 runs of 6 that way, none in 6 at nice 10).
Its lateness is still measured, and each step carries two verdicts on it (the p99 lag
of its hand-offs, not counting waits for a busy connection, which are the server's doing
and count in the latency):
- its latency figures are judged only when that lag is <= `--max-lag-ms` (2 ms: the
  critical p99 at 1x is a few milliseconds); marked `*` otherwise;
- its shares (success, shed, goodput) are judged only when the lag is <=
  `--max-offer-lag-ms` (50 ms, 5% of the default deadline: it still offered the step's
  load at the step's rate); marked `**` otherwise.
A step whose verdict its target needs is run once more (`--retries`) before it is given up.

Targets (stated as met/MISSED, never asserted), with shedding on: critical p99 at 3x <=
1.5x its p99 at 1x; critical success (2xx) >= 99.9% at 10x. Beside them: what the server
without shedding does to critical traffic at 10x (p99, success, share in time). Written to
bench/results/overload.json (or --out). Only localhost traffic; every loop is bounded by a
count or a clock; every key written is deleted.

    eval "$(scripts/services up --only redis)"
    python bench/overload.py                    # about 5 minutes on 2 cores
    python bench/overload.py --skip-baseline    # the shedding server alone (no --no-shedding run)
    python bench/overload.py --capacity 3500    # no search: the same rates in runs that compare builds
    python bench/overload.py --front            # both servers behind tenx-front (`make front`)
    python bench/overload.py --smoke            # under a minute; JSON in a temp folder (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# `python bench/overload.py` puts bench/ first on sys.path, where bench/serving.py would
# shadow the `serving` package: import from the repo root instead.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench import _smoke  # noqa: E402
from bench._harness import proc_cpu_s, redis_cpu_s  # noqa: E402
from bench._redis_keys import unlink_matching  # noqa: E402
from bench.serving import (  # noqa: E402
    MLP,
    WIDTH,
    Setup,
    check,
    clean_environment,
    free_port,
    http_get,
    http_post,
    prepare,
    process,
    table,
)
from serving.loadgen import ENGINES, LoadGenerator, LoadPlan, post_request  # noqa: E402
from serving.loadresults import LabelResult, LoadResult, merge_results  # noqa: E402
from tenx.loadtest.steps import Target, round_ratios, wait_idle  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CLASSES = ("critical", "sheddable")
BODIES = 2_000  # distinct pre-encoded requests, sent in turn
DEGRADED = b'"degraded":true'  # as the server's orjson writes it (no spaces)
NO_SHEDDING = "--no-shedding"
TARGET_MULTIPLES = (1.0, 3.0, 10.0)  # critical p99 at 3x vs 1x; critical success at 10x
LATENCY_JUDGED = TARGET_MULTIPLES[:2]  # the steps whose latency a target reads


def base_share_reason(critical_share: float) -> str:
    _, middle, top = TARGET_MULTIPLES
    return (
        f"with {critical_share:.0%} critical traffic, critical alone at {top:g}x is {critical_share * top:g}x the "
        f"base rate: the base must be below 1/{critical_share * top:g} of the capacity for critical success at "
        f"{top:g}x to be possible at all, and above 1/{middle:g} of it for {middle:g}x to overload the server"
    )


# -- the request mix ----------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    requests: tuple[bytes, ...]
    labels: tuple[str, ...]
    deadlines_ms: tuple[float, ...]


def request_mix(
    *, entities: int, per_request: int, critical_share: float, deadlines_ms: dict[str, float], tenant: str, seed: int
) -> Mix:
    """BODIES requests, exactly `critical_share` of them critical (placed at random, from
    `seed`), the rest sheddable, each with its class's deadline."""
    rng = np.random.default_rng(seed)
    critical = round(critical_share * BODIES)
    classes = np.array([CLASSES[0]] * critical + [CLASSES[1]] * (BODIES - critical))
    rng.shuffle(classes)
    picks = rng.integers(1, entities + 1, (BODIES, per_request)).tolist()
    requests, labels = [], []
    for row, label in zip(picks, classes.tolist(), strict=True):
        body = {"model": MLP, "entities": row, "priority": label, "tenant": tenant, "deadline_ms": deadlines_ms[label]}
        headers = (("X-Priority", label), ("X-Tenant", tenant))  # what ModelClient sends: refusable unread
        requests.append(post_request("/predict", json.dumps(body).encode(), headers=headers))
        labels.append(label)
    return Mix(tuple(requests), tuple(labels), tuple(deadlines_ms[label] for label in labels))


# -- one step -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSettings:
    step_s: float
    warmup_s: float
    connections: int
    max_lag_ms: float  # the generator's own p99 lag up to which a step's latency is judged
    max_offer_lag_ms: float  # ... up to which it offered the step's load (its shares are judged)
    max_p99_ms: float
    pause_s: float
    retries: int
    client_throttle: bool = False  # sheddable requests through ModelClient's adaptive throttle


@dataclass(frozen=True)
class Server:
    port: int
    pid: int


_NAMED = (429, 503, 504)  # the statuses with a column of their own


def class_figures(part: LabelResult, duration_s: float, capacity_per_s: float | None) -> dict[str, Any]:
    """One class's figures in a step (shares of the requests scheduled in the window)."""
    scheduled = part.scheduled

    def share(count: int) -> float | None:
        return count / scheduled if scheduled else None

    goodput = part.within_deadline / duration_s if part.within_deadline is not None else None
    return {
        "offered_per_s": scheduled / duration_s,
        "scheduled": scheduled,
        "p50_ms": part.latency.p50_ms if part.latency.count else None,
        "p99_ms": part.latency.p99_ms if part.latency.count else None,
        "success": share(part.ok),
        "shed": share(part.statuses.get(503, 0)),
        "throttled": share(part.throttled),  # refused by the client's throttle, never sent
        "over_quota": share(part.statuses.get(429, 0)),
        "deadline": share(part.statuses.get(504, 0)),
        "other": share(
            part.errors + part.unfinished + sum(n for s, n in part.statuses.items() if s >= 300 and s not in _NAMED)
        ),  # connection errors, no answer within the drain, other statuses
        "degraded": part.marked / part.ok if part.marked is not None and part.ok else None,
        "in_time": share(part.within_deadline) if part.within_deadline is not None else None,
        "goodput_per_s": goodput,
        "goodput_vs_capacity": goodput / capacity_per_s if goodput is not None and capacity_per_s else None,
    }


def total_figures(result: LoadResult, capacity_per_s: float | None) -> dict[str, Any]:
    parts = list(result.by_label.values())
    within = sum(part.within_deadline or 0 for part in parts)
    goodput = within / result.duration_s
    return {
        "offered_per_s": result.scheduled / result.duration_s,
        "success": result.ok / result.scheduled if result.scheduled else None,
        "goodput_per_s": goodput,
        "goodput_vs_capacity": goodput / capacity_per_s if capacity_per_s else None,
    }


def generator_verdicts(result: LoadResult, settings: StepSettings) -> dict[str, Any]:
    """Whether the generator was punctual enough for the step's latency figures, and for
    its shares (it offered the load), by its own p99 hand-off lag."""
    lag = result.schedule_lag_p99_ms
    latency_judged = lag <= settings.max_lag_ms
    load_offered = lag <= settings.max_offer_lag_ms
    why = []
    if not latency_judged:
        why.append(f"own p99 lag {lag:.2f} ms > {settings.max_lag_ms:g} ms: latency not judged")
    if not load_offered:
        why.append(f"> {settings.max_offer_lag_ms:g} ms: it did not offer the step's load, shares not judged")
    return {
        "latency_judged": latency_judged,
        "load_offered": load_offered,
        "generator_lag_p99_ms": lag,
        "generator_note": "the load generator's " + "; ".join(why) if why else None,
    }


SERVER_COUNTERS = {  # counter -> the label its delta per step is split by ("" : the total)
    "tenx_model_fallbacks_total": "",
    "tenx_model_shed_total": "reason",
}
SERVER_GAUGES = {  # the adaptive limits, read once the step's answers are in
    "tenx_model_queue_bound_rows": "",
    "tenx_model_batch_limit_rows": "",
}


def scrape(port: int, wanted: dict[str, str]) -> dict[str, dict[str, float]]:
    """The metrics `wanted` from GET /metrics, each summed by its label (name -> label;
    "": the total); a metric the server does not export is absent."""
    status, text = http_get(port, "/metrics")
    if status != 200:
        return {}
    found: dict[str, dict[str, float]] = {}
    for line in text.decode().splitlines():
        name, _, rest = line.partition("{")
        if name not in wanted or not rest:
            continue
        labels, _, value = rest.rpartition("} ")
        label = wanted[name]
        key = ""
        if label:
            at = labels.find(f'{label}="')
            key = labels[at + len(label) + 2 : labels.find('"', at + len(label) + 2)] if at >= 0 else "?"
        totals = found.setdefault(name, {})
        totals[key] = totals.get(key, 0.0) + float(value)
    return found


def counter_deltas(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {
        name: {key: value - before.get(name, {}).get(key, 0.0) for key, value in values.items()}
        for name, values in after.items()
    }


def run_step(
    generator: LoadGenerator,
    server: Server,
    mix: Mix,
    rate: float,
    settings: StepSettings,
    admin: Any,
    *,
    seed: int,
    capacity_per_s: float | None,
    keep_result: bool = False,
) -> dict[str, Any]:
    """One open-loop run of the mix at `rate`, split by class (with `keep_result`, the
    LoadResult itself under "_result", for `merge_rounds`; it is not JSON)."""
    plan = LoadPlan(
        host="127.0.0.1",
        port=server.port,
        requests=mix.requests,
        labels=mix.labels,
        deadlines_ms=mix.deadlines_ms,
        marker=DEGRADED,
        rate=rate,
        duration_s=settings.step_s,
        warmup_s=settings.warmup_s,
        seed=seed,
        max_connections=settings.connections,
        initial_connections=16,
        drain_s=3.0,
        max_p99_lag_s=settings.max_offer_lag_ms / 1000,
        throttled=("sheddable",) if settings.client_throttle else (),
    )
    counted = scrape(server.port, SERVER_COUNTERS)
    server_cpu, redis_cpu, began = proc_cpu_s(server.pid), redis_cpu_s(admin), time.perf_counter()
    result = generator.run(plan)
    wall = time.perf_counter() - began
    cpu = {
        "server_pct": 100 * (proc_cpu_s(server.pid) - server_cpu) / wall,
        "redis_pct": 100 * (redis_cpu_s(admin) - redis_cpu) / wall,
        "generator_pct": 100 * result.generator_cpu_s / result.wall_s,
    }
    server_counts = counter_deltas(counted, scrape(server.port, SERVER_COUNTERS))
    gauges = scrape(server.port, SERVER_GAUGES)
    time.sleep(settings.pause_s)
    # The next step (after 10x, the next round's 1x) starts on empty queues: the FIFO
    # baseline still held seconds of 10x work after the pause.
    drained_s = wait_idle(Target("model-server", f"http://127.0.0.1:{server.port}", "-"))
    classes = {label: class_figures(part, result.duration_s, capacity_per_s) for label, part in result.by_label.items()}
    return {
        "rate": rate,
        **generator_verdicts(result, settings),
        "classes": classes,
        "all": total_figures(result, capacity_per_s),
        "fallbacks": server_counts.get("tenx_model_fallbacks_total", {}).get(""),  # None: not exported
        "server_shed_by_reason": server_counts.get("tenx_model_shed_total"),
        "server_limits_after": {name.removeprefix("tenx_model_"): values.get("") for name, values in gauges.items()},
        "send_rate": result.lag.send_rate,
        "waited_for_connection": result.waited_for_connection,
        "connections": result.connections,
        "cpu": cpu,
        "drained_s": drained_s,
        "result": result.to_dict(),
        **({"_result": result} if keep_result else {}),
    }


def merge_rounds(dones: list[dict[str, Any]], settings: StepSettings, capacity_per_s: float) -> dict[str, Any]:
    """One step from its rounds (`run_step(..., keep_result=True)` each): figures over all
    their requests together (percentiles of the pooled latencies), the server's counters
    summed, the generator's worst lag, and each round's own critical figures."""
    result = merge_results([done.pop("_result") for done in dones])
    for done in dones:
        for void in done["void_runs"]:
            void.pop("_result", None)
    shed: dict[str, float] = {}
    for done in dones:
        for reason, count in (done["server_shed_by_reason"] or {}).items():
            shed[reason] = shed.get(reason, 0.0) + count
    fallbacks = [done["fallbacks"] for done in dones]
    return {
        "rate": dones[0]["rate"],
        **generator_verdicts(result, settings),
        "classes": {
            label: class_figures(part, result.duration_s, capacity_per_s) for label, part in result.by_label.items()
        },
        "all": total_figures(result, capacity_per_s),
        "fallbacks": None if any(f is None for f in fallbacks) else sum(fallbacks),
        "server_shed_by_reason": shed if any(done["server_shed_by_reason"] is not None for done in dones) else None,
        "server_limits_after": dones[-1]["server_limits_after"],
        "drained_s": max(done["drained_s"] for done in dones),
        "send_rate": result.lag.send_rate,
        "waited_for_connection": result.waited_for_connection,
        "connections": result.connections,
        "cpu": {key: float(np.mean([done["cpu"][key] for done in dones])) for key in dones[0]["cpu"]},
        "result": result.to_dict(),
        "rounds": [
            {
                "latency_judged": done["latency_judged"],
                "classes": {
                    label: {key: figures[key] for key in ("p50_ms", "p99_ms", "success")}
                    for label, figures in done["classes"].items()
                },
            }
            for done in dones
        ],
        "void_runs": [void for done in dones for void in done["void_runs"]],
    }


def judged_step(
    generator: LoadGenerator,
    server: Server,
    mix: Mix,
    rate: float,
    settings: StepSettings,
    admin: Any,
    *,
    name: str,
    seeds: Callable[[], int],
    capacity_per_s: float | None,
    accept: Callable[[dict[str, Any]], bool],
    keep_result: bool = False,
) -> dict[str, Any]:
    """`run_step`, run again (up to `settings.retries` times) until `accept` takes it: a
    generator verdict a target needs failed, or a capacity-search step was refused (one
    stall of a busy machine would otherwise decide the capacity). The runs not taken are
    kept in the JSON."""
    void: list[dict[str, Any]] = []
    for attempt in range(settings.retries + 1):
        done = run_step(
            generator, server, mix, rate, settings, admin, seed=seeds(), capacity_per_s=capacity_per_s,
            keep_result=keep_result,
        )  # fmt: skip
        print(describe_step(name + (" (again)" if attempt else ""), done), file=sys.stderr)
        if accept(done):
            break
        void.append(done)
    else:
        void.pop()  # the last run is the step's
    return {**done, "void_runs": void}


def describe_step(name: str, done: dict[str, Any]) -> str:
    parts = []
    for label, figures in done["classes"].items():
        parts.append(
            f"{label} ok {percent(figures['success'])}% 503 {percent(figures['shed'])}% 504 "
            f"{percent(figures['deadline'])}% p99 {number(figures['p99_ms'])} ms"
        )
    cpu = done["cpu"]
    return (
        f"    {name} {done['rate']:,.0f}/s: " + "; ".join(parts) + f"; CPU server {cpu['server_pct']:.0f}% "
        f"redis {cpu['redis_pct']:.0f}% loadgen {cpu['generator_pct']:.0f}%"
        + "".join(f"; {name} {value:,.0f}" for name, value in done["server_limits_after"].items() if value is not None)
        + (f" -- {done['generator_note']}" if done["generator_note"] else "")
    )


# -- capacity -----------------------------------------------------------------------------


def served_all(done: dict[str, Any], settings: StepSettings) -> tuple[bool | None, str]:
    """Whether a capacity-search step was served (True), refused by the server (False) or
    not judged (None: the generator did not offer the load), and why not. Too few 2xx
    answers refuse it even from a late generator: late, it offered less, not more."""
    result = done["result"]
    if result["ok"] < 0.99 * result["scheduled"]:
        answers = ", ".join(f"{status}: {count}" for status, count in result["statuses"].items())
        return False, (
            f"{result['ok']} of {result['scheduled']} requests answered 2xx ({answers}; {result['errors']} errors, "
            f"{result['unfinished']} unanswered)"
        )
    if not done["load_offered"]:
        return None, done["generator_note"]
    if result["waited_for_connection"]:
        return False, (
            f"all {settings.connections} connections busy {result['waited_for_connection']:,} times: the server "
            "stopped reading"
        )
    if result["latency"]["p99_ms"] > settings.max_p99_ms:
        return False, f"p99 {result['latency']['p99_ms']:.1f} ms > {settings.max_p99_ms:g} ms"
    return True, ""


def find_capacity(
    generator: LoadGenerator,
    server: Server,
    mix: Mix,
    settings: StepSettings,
    admin: Any,
    *,
    start_rate: float,
    factor: float,
    refine: int,
    max_steps: int,
    seeds: Callable[[], int],
) -> dict[str, Any]:
    """The highest offered rate served (ramp x`factor`, then geometric bisection)."""
    steps: list[dict[str, Any]] = []

    def run(rate: float) -> dict[str, Any]:
        def served(done: dict[str, Any]) -> bool:
            done["served"], done["why"] = served_all(done, settings)
            if not done["served"]:
                print(f"      {'refused' if done['served'] is False else 'not judged'}: {done['why']}", file=sys.stderr)
            return done["served"] is True

        done = judged_step(
            generator, server, mix, rate, settings, admin, name="capacity", seeds=seeds, capacity_per_s=None,
            accept=served,
        )  # fmt: skip
        steps.append(done)
        return done

    best: dict[str, Any] | None = None
    refused: dict[str, Any] | None = None
    rate = start_rate
    for _ in range(max_steps):
        done = run(rate)
        if not done["served"]:
            refused = done
            if best is not None or done["served"] is None:
                break
            rate /= factor**2  # the first step was already too much: start lower
            continue
        best = done
        rate *= factor
    if best is not None and refused is not None and refused["served"] is False:
        for _ in range(refine):
            done = run(math.sqrt(best["rate"] * refused["rate"]))
            if done["served"]:
                best = done
            elif done["served"] is False:
                refused = done
            else:
                break  # the generator, not the server, stopped here
    return {
        "offered_per_s": best["rate"] if best else None,
        "requests_per_s": best["result"]["ok_rate"] if best else None,
        "refused_at": refused["rate"] if refused else None,
        "stopped_by": refused["why"] if refused else "no step refused: capacity is at least the last rate tried",
        "generator_bound": bool(refused and refused["served"] is None),  # capacity is at least the max found
        "steps": steps,
    }


# -- the runs -----------------------------------------------------------------------------


def serve_command(setup: Setup, port: int, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "tenx", "serve-models", "--port", str(port), "--cpu", "--workers", "1"]
    return [*command, "--model", MLP, "--config", str(setup.config), *extra]


def has_option(option: str) -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "tenx", "serve-models", "--help"],
        cwd=ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    check(done.returncode == 0, f"tenx serve-models --help failed:\n{done.stdout}\n{done.stderr}")
    return option in done.stdout


def front_flags() -> list[str]:
    """["--front"], once `tenx serve-models` has it and tenx-front is built."""
    from featurestore.errors import ConfigError
    from serving.models.front import front_binary

    check(has_option("--front"), "--front: this tenx serve-models has no --front")
    try:
        front_binary()
    except ConfigError as error:
        raise SystemExit(f"--front: {error}") from None
    return ["--front"]


def generator_engines(generator: LoadGenerator, *, client_throttle: bool) -> list[str]:
    """The engines the runs will use: the capacity search's (never throttled) and the
    steps'; SystemExit when the engine asked for cannot run them."""
    probe = LoadPlan(host="127.0.0.1", port=1, requests=(b"-",), labels=("sheddable",), rate=1.0, duration_s=1.0)
    plans = [probe, replace(probe, throttled=("sheddable",))] if client_throttle else [probe]
    try:
        return sorted({generator.engine_for(plan) for plan in plans})
    except ValueError as error:
        raise SystemExit(f"--generator {generator.engine}: {error}") from None


def check_answer(server: Server, mix: Mix, per_request: int) -> None:
    status, answer = http_post(server.port, "/predict", mix.requests[0].split(b"\r\n\r\n", 1)[1])
    check(status == 200, f"POST /predict answered {status}: {answer[:300]!r}")
    scores = json.loads(answer)["scores"]
    check(len(scores) == per_request and all(isinstance(s, float) for s in scores), f"unexpected answer {answer!r}")


def run_multiples(
    generator: LoadGenerator,
    server: Server,
    mix: Mix,
    base_rate: float,
    multiples: tuple[float, ...],
    settings: StepSettings,
    admin: Any,
    *,
    name: str,
    seeds: Callable[[], int],
    capacity_per_s: float,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """Every multiple, in `rounds` interleaved rounds of `settings.step_s / rounds`, each
    multiple's rounds merged (`merge_rounds`)."""
    each = replace(settings, step_s=settings.step_s / rounds)
    ran: dict[float, list[dict[str, Any]]] = {multiple: [] for multiple in multiples}
    for number in range(1, rounds + 1):
        for multiple in multiples:
            verdict = "latency_judged" if multiple in LATENCY_JUDGED else "load_offered"  # what its target reads
            label = f"{name} {multiple:g}x" + (f" (round {number}/{rounds})" if rounds > 1 else "")
            done = judged_step(
                generator, server, mix, multiple * base_rate, each, admin, name=label, seeds=seeds,
                capacity_per_s=capacity_per_s, accept=operator.itemgetter(verdict), keep_result=True,
            )  # fmt: skip
            ran[multiple].append(done)
    return {
        f"{multiple:g}x": {**merge_rounds(ran[multiple], each, capacity_per_s), "multiple": multiple}
        for multiple in multiples
    }


# -- report -------------------------------------------------------------------------------


def percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def number(value: float | None, form: str = "{:.1f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else form.format(value)


def step_mark(done: dict[str, Any]) -> str:
    return "" if done["latency_judged"] else " *" if done["load_offered"] else " **"


def run_table(title: str, steps: dict[str, dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [
        (title, "class", "offered/s", "p50 ms", "p99 ms", "2xx %", "in time %", "503 %", "throttled %", "429 %",
         "504 %", "other %", "degraded %", "goodput/s", "/capacity", "CPU srv/redis/gen"),
    ]  # fmt: skip
    for key, done in steps.items():
        mark = step_mark(done)
        cpu = "/".join(f"{done['cpu'][k]:.0f}%" for k in ("server_pct", "redis_pct", "generator_pct"))
        for label, figures in done["classes"].items():
            rows.append(
                (
                    f"{key}{mark}",
                    label,
                    number(figures["offered_per_s"], "{:,.0f}"),
                    number(figures["p50_ms"]),
                    number(figures["p99_ms"]),
                    percent(figures["success"], 2),
                    percent(figures["in_time"], 2),
                    percent(figures["shed"]),
                    percent(figures["throttled"]),
                    percent(figures["over_quota"]),
                    percent(figures["deadline"]),
                    percent(figures["other"]),
                    percent(figures["degraded"]),
                    number(figures["goodput_per_s"], "{:,.0f}"),
                    number(figures["goodput_vs_capacity"], "{:.2f}"),
                    "",
                )
            )
        total = done["all"]
        rows.append(
            (
                f"{key}{mark}",
                "all",
                number(total["offered_per_s"], "{:,.0f}"),
                "", "", percent(total["success"], 2), "", "", "", "", "", "", "",
                number(total["goodput_per_s"], "{:,.0f}"),
                number(total["goodput_vs_capacity"], "{:.2f}"),
                cpu,
            )
        )  # fmt: skip
    return table(rows)


def critical(steps: dict[str, dict[str, Any]] | None, key: str, figure: str, *, needs: str | None) -> float | None:
    """A critical-class figure of step `key` (None: not run, no such figure, or the
    generator's verdict `needs` failed)."""
    done = (steps or {}).get(key)
    if done is None or (needs is not None and not done[needs]):
        return None
    value = done["classes"].get("critical", {}).get(figure)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=20_000, help="Entities written to Redis.")
    parser.add_argument("--entities-per-request", type=int, default=10, help="Entities per POST /predict.")
    parser.add_argument("--critical-share", type=float, default=0.2, help="Share of requests that are critical.")
    parser.add_argument("--base-share", type=float, default=0.4, help="1x as a share of the measured capacity.")
    parser.add_argument(
        "--multiples",
        default="1,3,5,10",
        help="Offered rates, as multiples of 1x (comma-separated; the targets read 1x, 3x and 10x).",
    )
    parser.add_argument("--critical-deadline-ms", type=float, default=1000.0, help="deadline_ms of critical requests.")
    parser.add_argument(
        "--sheddable-deadline-ms", type=float, default=1000.0, help="deadline_ms of sheddable requests."
    )
    parser.add_argument("--tenant", default="bench", help="The tenant every request names.")
    parser.add_argument(
        "--step-s", type=float, default=15.0, help="Seconds of each step at a multiple of 1x (all its rounds)."
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="Interleaved rounds each step is split into and pooled over."
    )
    parser.add_argument("--search-s", type=float, default=2.0, help="Seconds of each step of the capacity search.")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="Seconds sent but not counted before each step.")
    parser.add_argument("--pause-s", type=float, default=1.0, help="Idle seconds after each step (queues drain).")
    parser.add_argument("--start-rate", type=float, default=250.0, help="First rate of the capacity search, req/s.")
    parser.add_argument(
        "--capacity",
        type=float,
        default=None,
        metavar="REQ_PER_S",
        help="Skip the capacity search and take this rate as the capacity (1x = --base-share of it): the same "
        "offered rates for runs that compare two builds or settings; the search is noisier than their difference.",
    )
    parser.add_argument("--factor", type=float, default=2.0, help="Rate multiplier between capacity-search steps.")
    parser.add_argument("--refine", type=int, default=3, help="Bisections between the last served rate and the next.")
    parser.add_argument("--max-steps", type=int, default=10, help="Most ramp steps of the capacity search.")
    parser.add_argument(
        "--max-p99-ms", type=float, default=100.0, help="A capacity-search step with a higher p99 was not served."
    )
    parser.add_argument(
        "--max-lag-ms",
        type=float,
        default=2.0,
        help="The load generator's own p99 scheduling lag beyond which a step's latency is not judged.",
    )
    parser.add_argument(
        "--max-offer-lag-ms",
        type=float,
        default=50.0,
        help="... beyond which it did not offer the step's load: nothing of the step is judged.",
    )
    parser.add_argument(
        "--retries", type=int, default=1, help="Runs more of a step whose generator verdict its target needs failed."
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=4096,
        help="The generator's connection cap (one request in flight each): above what the server may hold (its "
        "queue bound in requests, 8192 rows / 10 entities by default, and the batches in flight), so that the "
        "server, not a wait for a free connection, decides what is queued and what is shed.",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="An extra argument for both `tenx serve-models` runs (repeatable), e.g. --server-arg=--queue-rows=2048.",
    )
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help=f"Measure the shedding server only (no `tenx serve-models {NO_SHEDDING}` run): for a server without "
        "that flag. Without the baseline no figure has its comparison.",
    )
    parser.add_argument(
        "--client-throttle",
        action="store_true",
        help="Send sheddable requests through ModelClient's adaptive throttle (Google SRE client-side throttling), "
        "as tenx's clients and `tenx loadtest` do; by default every request is sent, as a raw client would.",
    )
    parser.add_argument(
        "--front",
        action="store_true",
        help="Run both servers behind tenx-front (`tenx serve-models --front`, built by `make front`): the Go "
        "admission front that refuses from the X-Priority header outside the Python event loop.",
    )
    parser.add_argument(
        "--generator",
        choices=ENGINES,
        default="auto",
        help="The load generator's engine: native (tenx-loadgen, Go, built by `make loadgen`: about a fifth of the "
        "Python engine's CPU a request, which the server on the same cores then has), python (serving/loadgen.py's "
        "asyncio engine; the only one with --client-throttle), auto (native when built and not throttling).",
    )
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=10,
        choices=range(20),
        metavar="0-19",
        help="The load generator's niceness (Linux nice; default 10): it shares the cores with the server it "
        "measures, standing in for clients on other machines, so the server's threads get them first; 0 gives "
        "it an equal share. Its lateness is judged either way (--max-lag-ms, --max-offer-lag-ms).",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "overload.json", help="Results JSON file.")
    args = _smoke.parse_arguments(
        parser,
        lambda folder: {
            "entities": 2_000,
            "step_s": 1.0,
            "rounds": 2,
            "search_s": 0.8,
            "warmup_s": 0.2,
            "pause_s": 0.3,
            "start_rate": 400.0,
            "factor": 3.0,
            "refine": 0,
            "max_steps": 3,
            "retries": 0,
            "out": folder / "overload.json",
        },
    )
    url = os.environ.get("TENX_REDIS_URL")
    if not url:
        raise SystemExit('TENX_REDIS_URL is not set; start Redis with: eval "$(scripts/services up --only redis)"')
    engines = generator_engines(LoadGenerator(engine=args.generator), client_throttle=args.client_throttle)
    try:
        multiples = tuple(sorted({float(m) for m in args.multiples.split(",") if m.strip()}))
    except ValueError:
        raise SystemExit(f"--multiples: expected numbers separated by commas, got {args.multiples!r}") from None
    problems = []
    if args.entities < 200 or not 1 <= args.entities_per_request <= 1000:
        problems.append("--entities >= 200 and 1 <= --entities-per-request <= 1000")
    if not 0 < args.critical_share < 1 or not 0 < args.base_share <= 1:
        problems.append("0 < --critical-share < 1 and 0 < --base-share <= 1")
    if not multiples or min(multiples) <= 0:
        problems.append("--multiples must be positive")
    if args.rounds < 1:
        problems.append("--rounds >= 1")
    if min(args.step_s, args.search_s, args.critical_deadline_ms, args.sheddable_deadline_ms) <= 0:
        problems.append("--step-s, --search-s and the deadlines must be positive")
    if args.factor <= 1 or args.start_rate <= 0:
        problems.append("--factor > 1 and --start-rate > 0")
    if args.capacity is not None and args.capacity <= 0:
        problems.append("--capacity > 0")
    if args.retries < 0 or not 0 < args.max_lag_ms <= args.max_offer_lag_ms:
        problems.append("--retries >= 0 and 0 < --max-lag-ms <= --max-offer-lag-ms")
    if problems:
        raise SystemExit("; ".join(problems))
    baseline = not args.skip_baseline
    if baseline and not has_option(NO_SHEDDING):
        raise SystemExit(
            f"`tenx serve-models` has no {NO_SHEDDING} option yet (issue #17: priorities and shedding off, one FIFO "
            "queue with only its row bound), so the baseline run cannot start. Pass --skip-baseline to measure the "
            "shedding server alone (its figures then have no baseline)."
        )
    # Thousands of keep-alive connections: the generator and the server inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.connections + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))

    import redis

    settings = StepSettings(
        args.step_s, args.warmup_s, args.connections, args.max_lag_ms, args.max_offer_lag_ms, args.max_p99_ms,
        args.pause_s, args.retries, args.client_throttle,
    )  # fmt: skip
    search_settings = replace(settings, step_s=args.search_s, client_throttle=False)
    deadlines = {"critical": args.critical_deadline_ms, "sheddable": args.sheddable_deadline_ms}
    admin = redis.Redis.from_url(url, socket_timeout=10)
    redis_version = admin.info("server").get("redis_version", "?")
    folder = Path(tempfile.mkdtemp(prefix="tenx-bench-overload-"))
    setup: Setup | None = None
    seed_counter = iter(range(args.seed * 1000, args.seed * 1000 + 10_000))
    capacity: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    base_rate: float | None = None
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        print(f"preparing {args.entities:,} entities x {WIDTH} float32 features and the model ...", file=sys.stderr)
        setup = prepare(url, folder, args.entities, args.seed)
        mix = request_mix(
            entities=args.entities,
            per_request=args.entities_per_request,
            critical_share=args.critical_share,
            deadlines_ms=deadlines,
            tenant=args.tenant,
            seed=args.seed,
        )
        # The capacity is the shipping server's, found with critical-only requests: a
        # shedding server admits critical work up to its whole bound, so it serves up to
        # its real limit instead of refusing sheddable work early. (Measured on the
        # FIFO baseline instead, with its 1,024-row batches, it came out at 5,187 req/s
        # where the shedding server, whose batches stay small for latency, serves
        # about 3,000: "1x" was then 70-90% of what the server under test can do.)
        everything_critical = request_mix(
            entities=args.entities,
            per_request=args.entities_per_request,
            critical_share=1.0,
            deadlines_ms=deadlines,
            tenant=args.tenant,
            seed=args.seed,
        )
        front = front_flags() if args.front else []
        modes: list[tuple[str, list[str]]] = [("shedding", [])]
        if baseline:
            modes.append(("no_shedding", [NO_SHEDDING]))
        with LoadGenerator(engine=args.generator, nice=args.generator_nice) as generator:
            print(f"load generator: {' and '.join(engines)} engine at nice {args.generator_nice}")
            for mode, flags in modes:
                port = free_port()
                extra = [*flags, *front, *args.server_arg]
                with process(
                    f"tenx serve-models {' '.join(extra)}".strip(),
                    serve_command(setup, port, extra),
                    cwd=setup.repo,
                    env=clean_environment(TENX_REDIS_URL=url),
                    port=port,
                    log=folder / f"serve-models-{mode}.log",
                ) as pid:
                    server = Server(port, pid)
                    check_answer(server, mix, args.entities_per_request)
                    if base_rate is None and args.capacity is not None:
                        capacity = {
                            "server": mode,
                            "offered_per_s": args.capacity,
                            "requests_per_s": None,
                            "refused_at": None,
                            "stopped_by": "given (--capacity), not searched",
                            "generator_bound": False,
                            "steps": {},
                        }
                        base_rate = args.base_share * args.capacity
                    if base_rate is None:
                        print(f"capacity search ({mode} server) ...", file=sys.stderr)
                        capacity = find_capacity(
                            generator, server, everything_critical, search_settings, admin, start_rate=args.start_rate,
                            factor=args.factor, refine=args.refine, max_steps=args.max_steps,
                            seeds=lambda: next(seed_counter),
                        )  # fmt: skip
                        capacity["server"] = mode
                        if capacity["offered_per_s"] is None:
                            raise SystemExit(
                                f"no capacity-search step was served (first refused: {capacity['stopped_by']}); "
                                "try a lower --start-rate"
                            )
                        base_rate = args.base_share * capacity["offered_per_s"]
                    assert base_rate is not None
                    print(f"{mode}: steps at {', '.join(f'{m:g}x' for m in multiples)} of {base_rate:,.0f}/s ...",
                          file=sys.stderr)  # fmt: skip
                    runs[mode] = {
                        "server_args": extra,
                        "steps": run_multiples(
                            generator, server, mix, base_rate, multiples, settings, admin, name=mode,
                            seeds=lambda: next(seed_counter), capacity_per_s=capacity["offered_per_s"],
                            rounds=args.rounds,
                        ),
                    }  # fmt: skip
    finally:
        if setup is not None:
            unlink_matching(admin, f"{setup.key_base}*")
        admin.close()
        shutil.rmtree(folder, ignore_errors=True)
    if not baseline:
        runs["no_shedding"] = {"skipped": f"--skip-baseline (no `tenx serve-models {NO_SHEDDING}` run)"}
    elapsed = time.perf_counter() - started
    assert base_rate is not None

    # -- judge and print ------------------------------------------------------------------
    shedding = runs["shedding"]["steps"]
    without = runs["no_shedding"].get("steps")
    low_key, middle_key, top_key = (f"{m:g}x" for m in TARGET_MULTIPLES)  # a step not run: not judged
    # p99s at 1x and 3x are milliseconds: they need a punctual generator; the 10x figures
    # (shares, and p99s of seconds) only need the load offered.
    p99_low = critical(shedding, low_key, "p99_ms", needs="latency_judged")
    p99_middle = critical(shedding, middle_key, "p99_ms", needs="latency_judged")
    success_top = critical(shedding, top_key, "success", needs="load_offered")

    def judged(value: float | None, passes: Callable[[float], bool]) -> bool | None:
        return None if value is None else passes(value)  # None: not measured (the JSON says why)

    targets = {
        f"critical_p99_at_{middle_key}_le_1.5x_{low_key}": (
            judged(p99_middle, lambda p: p99_low is not None and p <= 1.5 * p99_low) if p99_low is not None else None
        ),
        f"critical_success_at_{top_key}_ge_99.9pct": judged(success_top, lambda s: s >= 0.999),
    }
    figures = {
        "capacity_per_s": capacity["offered_per_s"],
        "base_rate_per_s": base_rate,
        "shedding": {
            f"critical_p99_ms_at_{low_key}": p99_low,
            f"critical_p99_ms_at_{middle_key}": p99_middle,
            f"critical_p99_{middle_key}_vs_{low_key}": p99_middle / p99_low if p99_middle and p99_low else None,
            f"critical_p99_{middle_key}_vs_{low_key}_per_round": round_ratios(
                shedding.get(low_key), shedding.get(middle_key)
            ),
            f"critical_success_at_{top_key}": success_top,
            f"critical_in_time_at_{top_key}": critical(shedding, top_key, "in_time", needs="load_offered"),
            f"critical_p99_ms_at_{top_key}": critical(shedding, top_key, "p99_ms", needs="load_offered"),
            f"goodput_vs_capacity_at_{top_key}": (shedding.get(top_key) or {})
            .get("all", {})
            .get("goodput_vs_capacity"),
        },
        "no_shedding": {
            f"critical_p99_ms_at_{low_key}": critical(without, low_key, "p99_ms", needs="latency_judged"),
            f"critical_p99_ms_at_{top_key}": critical(without, top_key, "p99_ms", needs="load_offered"),
            f"critical_success_at_{top_key}": critical(without, top_key, "success", needs="load_offered"),
            f"critical_in_time_at_{top_key}": critical(without, top_key, "in_time", needs="load_offered"),
            f"goodput_vs_capacity_at_{top_key}": ((without or {}).get(top_key) or {})
            .get("all", {})
            .get("goodput_vs_capacity"),
        }
        if without
        else None,
    }

    def mark(value: bool | None, why_missing: str) -> str:
        return {True: "met", False: "MISSED", None: f"not judged ({why_missing})"}[value]

    not_measured = "a step not run, not judged or without critical 2xx answers"
    target_lines = [
        f"  critical p99 at {middle_key}: {number(p99_middle, '{:.2f}')} ms vs 1.5 x {number(p99_low, '{:.2f}')} ms "
        f"at {low_key} (target <= 1.5x): "
        + mark(targets[f"critical_p99_at_{middle_key}_le_1.5x_{low_key}"], not_measured)
        + (
            f"; round by round {', '.join(number(r, '{:.2f}') for r in per_round)}"
            if (per_round := figures["shedding"][f"critical_p99_{middle_key}_vs_{low_key}_per_round"])
            else ""
        ),
        f"  critical success (2xx) at {top_key}: {percent(success_top, 2)}% (target >= 99.9%): "
        + mark(targets[f"critical_success_at_{top_key}_ge_99.9pct"], not_measured)
        + f"; within the deadline: {percent(figures['shedding'][f'critical_in_time_at_{top_key}'], 2)}%",
    ]
    if without:
        no = figures["no_shedding"]
        assert no is not None
        target_lines.append(
            f"  without shedding, critical at {top_key}: p99 {number(no[f'critical_p99_ms_at_{top_key}'], '{:.1f}')} "
            f"ms (was {number(no[f'critical_p99_ms_at_{low_key}'], '{:.1f}')} ms at {low_key}), success "
            f"{percent(no[f'critical_success_at_{top_key}'], 2)}%, within the deadline "
            f"{percent(no[f'critical_in_time_at_{top_key}'], 2)}%; goodput/capacity "
            f"{number(no[f'goodput_vs_capacity_at_{top_key}'], '{:.2f}')} vs "
            f"{number(figures['shedding'][f'goodput_vs_capacity_at_{top_key}'], '{:.2f}')} with shedding"
        )
    else:
        target_lines.append("  without shedding: not measured (--skip-baseline)")

    side: list[tuple[str, ...]] = [
        (
            "critical, shedding on | off",
            "p99 ms on",
            "off",
            "2xx % on",
            "off",
            "in time % on",
            "off",
            "goodput/capacity (all) on",
            "off",
        )
    ]
    for key in shedding:
        off = (without or {}).get(key)

        def fig(steps: dict[str, Any] | None, figure: str, k: str = key) -> float | None:
            return critical(steps, k, figure, needs=None)  # shown, marked; judged only above

        marks = [step_mark(done).strip() for done in (shedding[key], off) if done is not None]
        side.append(
            (
                key + (" " + "/".join(m or "ok" for m in marks) if any(marks) else ""),
                number(fig(shedding, "p99_ms")),
                number(fig(without, "p99_ms")),
                percent(fig(shedding, "success"), 2),
                percent(fig(without, "success"), 2),
                percent(fig(shedding, "in_time"), 2),
                percent(fig(without, "in_time"), 2),
                number(shedding[key]["all"]["goodput_vs_capacity"], "{:.2f}"),
                number(off["all"]["goodput_vs_capacity"] if off else None, "{:.2f}"),
            )
        )
    fallbacks = [
        f"{mode} {key}: {done['fallbacks']:.0f}"
        for mode, run in runs.items()
        for key, done in run.get("steps", {}).items()
        if done["fallbacks"] is not None
    ]
    unjudged = [
        f"  {mode} {key}: {done['generator_note']}"
        for mode, run in runs.items()
        for key, done in run.get("steps", {}).items()
        if done["generator_note"]
    ]
    print(
        f"\noverload benchmark: MLP {WIDTH}-64-64-1 on ONNX Runtime (CPU), {args.entities_per_request} entities per "
        f"request, {args.critical_share:.0%} critical / {1 - args.critical_share:.0%} sheddable, deadlines "
        f"{args.critical_deadline_ms:g} / {args.sheddable_deadline_ms:g} ms; Redis {redis_version}; "
        f"{os.cpu_count()} CPUs shared by the server, Redis and the load generator (at nice {args.generator_nice}; "
        "load average before: "
        f"{load_before:.2f}); {elapsed:.0f} s; "
        + ("admission front: tenx-front (--front)\n" if front else "no admission front (the Python server alone)\n")
    )
    print(
        f"capacity ({capacity['server']} server, 2xx >= 99%, p99 <= {args.max_p99_ms:g} ms"
        + (", given" if args.capacity is not None else "")
        + "): "
        f"{capacity['offered_per_s']:,.0f} "
        f"req/s ({capacity['offered_per_s'] * args.entities_per_request:,.0f} predictions/s); refused at "
        f"{number(capacity['refused_at'], '{:,.0f}')}/s: {capacity['stopped_by']}"
    )
    print(
        f"1x = {args.base_share:g} x capacity = {base_rate:,.0f} req/s: "
        + base_share_reason(args.critical_share)
        + "\n"
    )
    print(run_table("shedding on", shedding) + "\n")
    if without:
        print(run_table(f"{NO_SHEDDING}", without) + "\n")
    print(table(side) + "\n")
    print(
        "shares of the requests scheduled in each class; p50/p99 of 2xx answers from the intended send time; "
        "goodput: 2xx within the request's deadline per second; degraded: share of 2xx answers marked degraded"
        + (f"; server fallbacks (tenx_model_fallbacks_total): {', '.join(fallbacks)}" if fallbacks else "")
    )
    shed_reasons = [
        f"  {mode} {key}: "
        + ", ".join(
            f"{reason} {count:,.0f}" for reason, count in sorted(done["server_shed_by_reason"].items()) if count
        )
        for mode, run in runs.items()
        for key, done in run.get("steps", {}).items()
        if done["server_shed_by_reason"] and any(done["server_shed_by_reason"].values())
    ]
    if shed_reasons:
        print(
            "the server's count of requests refused before any work (tenx_model_shed_total), by reason:\n"
            + "\n".join(shed_reasons)
        )
    capped = [
        f"  {mode} {key}: {done['waited_for_connection']:,} requests waited"
        for mode, run in runs.items()
        for key, done in run.get("steps", {}).items()
        if done["waited_for_connection"]
    ]
    if capped:
        print(
            f"all {args.connections} connections were busy (the server held that many requests, or stopped reading; "
            "the wait counts in the latency):\n" + "\n".join(capped)
        )
    if unjudged:
        print(
            f"* latency not judged, ** nothing judged (after up to {args.retries} more runs): the load generator "
            "itself was late\n" + "\n".join(unjudged)
        )
    print("\ntargets:\n" + "\n".join(target_lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "entities": args.entities,
                "entities_per_request": args.entities_per_request,
                "critical_share": args.critical_share,
                "base_share": args.base_share,
                "base_share_reason": base_share_reason(args.critical_share),
                "deadlines_ms": deadlines,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "redis": redis_version,
                    "load_average_before": load_before,  # others' work on the same cores skews every figure
                },
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "front": bool(front),
                "generator_engines": engines,
                "capacity": capacity,
                "base_rate": base_rate,
                "runs": runs,
                "figures": figures,
                "targets": targets,
                "elapsed_s": elapsed,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
