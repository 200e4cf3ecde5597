"""Load steps against one target: the request mix, one open-loop step and its figures,
the capacity search, the per-class verdicts and the cost of each step.

Every step is one `serving.loadgen` run (its own process; send times fixed in advance
from a seed; latency from the intended send time) of a fixed set of pre-encoded
requests, each labelled with its priority class and carrying its class's deadline. The
figures of a step are judged only when the generator kept to its schedule (`reported`).

A step may be run in rounds (`combine_rounds`): the same rate run several times through
the test, interleaved with the other steps, and its figures taken over all the rounds'
requests together. On a machine whose speed drifts over minutes (a shared VM: the same
1x load measured 6.7 ms and then 13.1 ms p99 two minutes apart), one long window per step
compares the machine's minutes, not the load; rounds spread every step over the
same stretch of time. Each round's own figures stay in the report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from serving.loadgen import LoadGenerator, LoadPlan, post_request
from serving.loadresults import LabelResult, LoadResult, merge_results
from serving.models.batcher import Priority

BODIES = 2_000  # distinct pre-encoded requests, sent in turn
DEGRADED = b'"degraded":true'  # as the model server's orjson writes it
SECONDS_PER_MONTH = 30 * 24 * 3600
CLASSES = tuple(priority.name.lower() for priority in Priority)  # critical, default, sheddable


# -- what to load --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A model server (POST /predict for `what`, a model or route) or a feature API
    (POST /features for the view `what`)."""

    kind: str  # "model-server" | "feature-api"
    url: str
    what: str
    token: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def path(self) -> str:
        return "/predict" if self.kind == "model-server" else "/features"


@dataclass(frozen=True)
class Slo:
    """What a class needs: p99 at most `p99_ms` and at least `success` of its requests
    answered 2xx (0: no floor: a sheddable class is meant to be shed)."""

    p99_ms: float
    success: float


DEFAULT_SLOS = {
    "critical": Slo(p99_ms=100.0, success=0.999),
    "default": Slo(p99_ms=250.0, success=0.99),
    "sheddable": Slo(p99_ms=1000.0, success=0.0),
}


@dataclass(frozen=True)
class Mix:
    """The pre-encoded requests of every step, with each one's class and deadline."""

    requests: tuple[bytes, ...]
    labels: tuple[str, ...]
    deadlines_ms: tuple[float, ...]
    entities_per_request: int


def request_mix(
    target: Target,
    *,
    classes: Mapping[str, float],
    tenants: Mapping[str, float],
    entities: Sequence[Any],
    per_request: int,
    deadlines_ms: Mapping[str, float],
    seed: int,
) -> Mix:
    """BODIES requests: each class's share of them exactly (placed at random from
    `seed`), tenants drawn by weight, `per_request` entities drawn from `entities`. The
    class and tenant also go in X-Priority / X-Tenant, as ModelClient sends them (an
    overloaded server refuses a sheddable request from its header, unread)."""
    rng = np.random.default_rng(seed)
    counts = _shares_to_counts(classes, BODIES)
    labels = np.array([name for name, count in counts.items() for _ in range(count)])
    rng.shuffle(labels)
    tenant_names = list(tenants)
    weights = np.array([tenants[name] for name in tenant_names], dtype=np.float64)
    tenant_of = rng.choice(len(tenant_names), size=BODIES, p=weights / weights.sum()) if tenant_names else None
    picks = rng.integers(0, len(entities), (BODIES, per_request))
    requests = []
    for index, label in enumerate(labels.tolist()):
        keys = [entities[i] for i in picks[index].tolist()]
        headers = [("X-Priority", label)]
        body: dict[str, Any] = {"entities": keys}
        if target.kind == "model-server":
            body.update(model=target.what, priority=label, deadline_ms=deadlines_ms[label])
        else:
            body["view"] = target.what
        if tenant_of is not None:
            tenant = tenant_names[int(tenant_of[index])]
            body["tenant"] = tenant
            headers.append(("X-Tenant", tenant))
        headers.append(("X-Deadline-Ms", f"{deadlines_ms[label]:g}"))
        if target.token:
            headers.append(("Authorization", f"Bearer {target.token}"))
        requests.append(post_request(target.path, json.dumps(body).encode(), host=target.host, headers=headers))
    label_list = tuple(labels.tolist())
    return Mix(tuple(requests), label_list, tuple(deadlines_ms[label] for label in label_list), per_request)


def _shares_to_counts(shares: Mapping[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding: the counts add up to `total`."""
    exact = {name: share * total for name, share in shares.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def critical_only(mix: Mix) -> Mix:
    """The same requests, every one critical: what the capacity search sends, so that a
    shedding server serves up to its real limit instead of refusing sheddable work
    early (critical work is admitted up to the whole queue bound)."""
    swaps = [(b"X-Priority: " + label.encode(), b"X-Priority: critical") for label in CLASSES]
    requests = []
    for request in mix.requests:
        head, _, body = request.partition(b"\r\n\r\n")
        for old, new in swaps:
            head = head.replace(old, new)
        data = json.loads(body)
        if "priority" in data:
            data["priority"] = "critical"
        encoded = json.dumps(data).encode()
        head = head.rsplit(b"\r\nContent-Length: ", 1)[0] + f"\r\nContent-Length: {len(encoded)}".encode()
        requests.append(head + b"\r\n\r\n" + encoded)
    return Mix(tuple(requests), ("critical",) * len(requests), mix.deadlines_ms, mix.entities_per_request)


# -- one step ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSettings:
    duration_s: float
    warmup_s: float
    connections: int = 2_048
    max_lag_ms: float = 10.0  # the generator's own p99 hand-off lag beyond which a step is not reported
    retries: int = 1  # a step the generator fell behind on is run again this many times
    throttle: bool = True  # sheddable and default work goes through ModelClient's adaptive throttle
    timeline_s: float = 0.0
    pause_s: float = 2.0  # after each run: the server's queues drain and its limits settle before the next


@dataclass
class Step:
    """One step's figures (the JSON report's shape: see `as_dict`)."""

    name: str
    multiple: float
    result: LoadResult
    reported: bool
    note: str | None
    cost: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    deadlines_ms: Mapping[str, float] = field(default_factory=dict)
    counters: Samples = field(default_factory=dict)  # the server's counters' increase over the step
    rounds: list[dict[str, Any]] = field(default_factory=list)  # each round's own figures (`combine_rounds`)

    def classes(self) -> dict[str, dict[str, Any]]:
        return {label: class_figures(part, self.result.duration_s) for label, part in self.result.by_label.items()}

    def as_dict(self) -> dict[str, Any]:
        result = self.result
        return {
            "name": self.name,
            "multiple": self.multiple,
            "offered_per_s": result.scheduled / result.duration_s,
            "completed_per_s": result.completed_rate,
            "reported": self.reported,
            "generator": {
                "lag_p99_ms": result.schedule_lag_p99_ms,
                "send_lag_p99_ms": result.lag.p99_ms,  # with waits for a free connection (the server's doing)
                "fell_behind": not self.reported,
                "note": self.note,
                "cpu_pct": 100 * result.generator_cpu_s / result.wall_s if result.wall_s else None,
                "connections": result.connections,
                "nice": result.nice,  # as the generator read its own back
                "engine": result.engine,
            },
            "classes": self.classes(),
            "all": all_figures(result),
            "cost": self.cost,
            "server": self.server,
            "rounds": self.rounds or [round_figures(self)],
        }


def round_figures(step: Step) -> dict[str, Any]:
    """What the report keeps of one round: per class p50, p99 and success."""
    keep = ("p50_ms", "p99_ms", "success")
    return {
        "reported": step.reported,
        "classes": {label: {key: figures[key] for key in keep} for label, figures in step.classes().items()},
    }


def combine_rounds(rounds: Sequence[Step]) -> Step:
    """One step from its rounds: figures over all their requests together (percentiles
    of the pooled latencies), the server's counters summed, reported only when every
    round was, and each round's own figures in `rounds`."""
    if not rounds:
        raise ValueError("combine_rounds: no rounds")
    if len(rounds) == 1:
        return rounds[0]
    first = rounds[0]
    counters: Samples = {}
    for one in rounds:
        for key, value in one.counters.items():
            counters[key] = counters.get(key, 0.0) + value
    notes = [f"round {number}: {one.note}" for number, one in enumerate(rounds, 1) if one.note]
    result = merge_results([one.result for one in rounds])
    step = Step(
        first.name, first.multiple, result, all(one.reported for one in rounds), "; ".join(notes) or None,
        deadlines_ms=first.deadlines_ms, counters=counters, rounds=[round_figures(one) for one in rounds],
    )  # fmt: skip
    step.cost, step.server = step_costs({}, counters, result), server_counts({}, counters)
    return step


def class_figures(part: LabelResult, duration_s: float) -> dict[str, Any]:
    """One class's figures in a step: shares of the requests scheduled in the window."""
    scheduled = part.scheduled

    def share(count: int) -> float | None:
        return count / scheduled if scheduled else None

    named = (429, 503, 504)
    answered_other = sum(n for status, n in part.statuses.items() if status >= 300 and status not in named)
    latency = part.latency
    return {
        "offered_per_s": scheduled / duration_s,
        "completed_per_s": sum(part.statuses.values()) / duration_s,
        "p50_ms": latency.p50_ms if latency.count else None,
        "p99_ms": latency.p99_ms if latency.count else None,
        "p999_ms": latency.p999_ms if latency.count else None,
        "success": share(part.ok),
        "shed": share(part.statuses.get(503, 0)),
        "client_throttled": share(part.throttled),
        "over_quota": share(part.statuses.get(429, 0)),
        "deadline": share(part.statuses.get(504, 0)),
        "other": share(part.errors + part.unfinished + answered_other),
        "degraded": part.marked / part.ok if part.marked is not None and part.ok else None,
        "goodput_per_s": part.within_deadline / duration_s if part.within_deadline is not None else None,
    }


def all_figures(result: LoadResult) -> dict[str, Any]:
    """The step's figures over every class together."""
    parts = list(result.by_label.values())
    total = LabelResult(
        scheduled=result.scheduled,
        sent=result.sent,
        ok=result.ok,
        statuses=result.statuses,
        errors=result.errors,
        unfinished=result.unfinished,
        latency=result.latency,
        within_deadline=sum(part.within_deadline or 0 for part in parts) if parts else None,
        marked=result.marked,
        throttled=result.throttled,
    )
    return class_figures(total, result.duration_s)


def run_step(
    generator: LoadGenerator,
    target: Target,
    mix: Mix,
    rate: float,
    settings: StepSettings,
    *,
    name: str,
    multiple: float,
    seeds: Callable[[], int],
    around: Callable[[], Any] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Step:
    """One open-loop run of `mix` at `rate`, run again (up to `settings.retries` times)
    while the generator fell behind its own schedule. `around`, when given, is a context
    manager factory entered for the run (a fault). Costs and server counters come from
    the target's /metrics before and after (a model server's; absent elsewhere)."""
    for attempt in range(settings.retries + 1):
        plan = LoadPlan(
            host=target.host,
            port=target.port,
            requests=mix.requests,
            labels=mix.labels,
            deadlines_ms=mix.deadlines_ms,
            marker=DEGRADED,
            rate=rate,
            duration_s=settings.duration_s,
            warmup_s=settings.warmup_s,
            seed=seeds(),
            max_connections=settings.connections,
            initial_connections=16,
            drain_s=3.0,
            max_p99_lag_s=0.05,  # waits for a busy connection count in latency, not against the generator
            throttled=tuple(label for label in dict.fromkeys(mix.labels) if label != "critical")
            if settings.throttle
            else (),
            timeline_s=settings.timeline_s,
        )
        before = server_samples(target)
        if around is not None:
            with around():
                result = generator.run(plan)
        else:
            result = generator.run(plan)
        after = server_samples(target)
        time.sleep(settings.pause_s)
        wait_idle(target)
        lag = result.schedule_lag_p99_ms
        reported = lag <= settings.max_lag_ms
        note = None if reported else f"p99 send lag {lag:.1f} ms > {settings.max_lag_ms:g} ms"
        step = Step(
            name, multiple, result, reported, note, deadlines_ms=dict(zip(mix.labels, mix.deadlines_ms, strict=True))
        )
        step.cost, step.server = step_costs(before, after, result), server_counts(before, after)
        step.counters = {key: value - before.get(key, 0.0) for key, value in after.items()}
        say(describe(step) + (" (again)" if attempt else ""))
        if reported or around is not None:  # a fault step is not repeated: the fault already happened
            return step
    return step


# -- the server's counters -----------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def wait_idle(target: Target, *, timeout_s: float = 30.0) -> float:
    """Seconds until the model server's queues are empty (every model's `queued_rows` in
    GET /health/ready) and none of its circuits is open, at most `timeout_s`; 0 for a
    feature API. The next step (in rounds, a 1x right after a 10x) must not inherit the
    last one's backlog: a FIFO server still held seconds of 10x work after the pause,
    and the circuit its slow 10x batches had opened refused a third of the next 1x
    round's critical requests (an open circuit turns half-open after its wait, and
    readiness with it)."""
    if target.kind != "model-server":
        return 0.0
    import httpx

    headers = {"authorization": f"Bearer {target.token}"} if target.token else {}
    began = time.monotonic()
    while (waited := time.monotonic() - began) < timeout_s:
        try:
            ready = httpx.get(f"{target.url.rstrip('/')}/health/ready", headers=headers, timeout=5).json()
            circuits = ready.get("circuits") or {}
            if not any(state == "open" for state in circuits.values()):
                models = ready["models"]
                if not any(model.get("queued_rows") for model in models):
                    return waited
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return waited  # no readiness figures to wait on: the pause is all there is
        time.sleep(0.2)
    return waited


def server_samples(target: Target) -> Samples:
    """The model server's /metrics samples ({} from a feature API or a failed scrape)."""
    if target.kind != "model-server":
        return {}
    from tenx.commands.top import scrape

    try:
        return scrape(target.url)
    except Exception:  # a scrape is a figure, not a reason to lose the step  # noqa: BLE001
        return {}


def _delta(before: Samples, after: Samples, name: str, by: str | None = None) -> dict[str, float]:
    """The increase of every sample `name`, summed by label `by` ("" : the total)."""
    totals: dict[str, float] = {}
    for (sample, labels), value in after.items():
        if sample != name:
            continue
        key = dict(labels).get(by, "?") if by else ""
        totals[key] = totals.get(key, 0.0) + value - before.get((sample, labels), 0.0)
    return totals


def server_counts(before: Samples, after: Samples) -> dict[str, Any]:
    if not after:
        return {}
    rows = _delta(before, after, "tenx_model_batch_rows_sum").get("")
    batches = _delta(before, after, "tenx_model_batch_rows_count").get("")
    return {
        "shed_by_reason": _delta(before, after, "tenx_model_shed_total", "reason"),
        "fallbacks": _delta(before, after, "tenx_model_fallbacks_total").get(""),
        "rows_per_batch": rows / batches if rows is not None and batches else None,
    }


def step_costs(before: Samples, after: Samples, result: LoadResult) -> dict[str, Any]:
    """Cost per 1,000 predictions over the step, in total and by what answered (a model,
    cache:<model>, rule:<name>), from the cost counters; and per second of the step."""
    if not after:
        return {}
    dollars = _delta(before, after, "tenx_model_cost_dollars_total", "model")
    predictions = _delta(before, after, "tenx_model_served_predictions_total", "served_by")
    spent, served = sum(dollars.values()), sum(predictions.values())
    device_s = sum(_delta(before, after, "tenx_model_cost_device_seconds_total").values())
    return {
        "per_1k_predictions": 1000 * spent / served if served else None,
        "device_ms_per_1k": 1e6 * device_s / served if served else None,  # model time per 1k predictions
        "dollars": spent,
        "predictions": served,
        "dollars_per_s": spent / result.wall_s if result.wall_s else None,
        "by_source": {
            source: 1000 * dollars.get(source, 0.0) / count for source, count in predictions.items() if count > 0
        },
        "share_by_source": {source: count / served for source, count in predictions.items() if served},
    }


# -- capacity ------------------------------------------------------------------------------


def served(step: Step, *, max_p99_ms: float) -> tuple[bool | None, str]:
    """Whether a capacity-search step was served (True), refused (False) or not judged
    (None: the generator did not keep to its schedule, or the window held no request),
    and why not. Too few 2xx answers refuse it even from a late generator: late, it
    offered less, not more."""
    result = step.result
    if result.scheduled == 0:
        return None, "no request fell in the window: the rate is too low for the step's length"
    if result.ok < 0.99 * result.scheduled:
        answers = ", ".join(f"{status}: {count}" for status, count in sorted(result.statuses.items()))
        return False, (
            f"{result.ok} of {result.scheduled} requests answered 2xx ({answers or 'none'}; {result.errors} errors, "
            f"{result.unfinished} unanswered)"
        )
    if not step.reported:
        return None, step.note or ""
    if result.waited_for_connection:
        return False, f"all connections busy {result.waited_for_connection:,} times: the server stopped reading"
    if not result.latency.p99_ms <= max_p99_ms:  # NaN: no 2xx latency to judge
        return False, f"p99 {result.latency.p99_ms:.1f} ms > {max_p99_ms:g} ms"
    return True, ""


def find_capacity(
    attempt: Callable[[float], Step],
    *,
    start_rate: float,
    max_p99_ms: float,
    factor: float = 2.0,
    refine: int = 3,
    max_steps: int = 12,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The highest offered rate served (ramp x`factor` from `start_rate`, then
    geometric bisection between the last served and the first refused rate)."""
    search: list[dict[str, Any]] = []
    best: float | None = None
    refused: float | None = None

    def run(rate: float) -> bool | None:
        verdict, why = served(attempt(rate), max_p99_ms=max_p99_ms)
        search.append({"rate": rate, "served": verdict, "why": why})
        if verdict is not True:
            say(f"  {rate:,.0f}/s {'refused' if verdict is False else 'not judged'}: {why}")
        return verdict

    rate = start_rate
    for _ in range(max_steps):
        verdict = run(rate)
        if verdict is True:
            best, rate = rate, rate * factor
            continue
        if verdict is None:
            refused = None
            break
        refused = rate
        if best is not None:
            break
        rate /= factor**2  # the first rate was already too much: start lower
    if best is not None and refused is not None:
        for _ in range(refine):
            rate = math.sqrt(best * refused)
            verdict = run(rate)
            if verdict is True:
                best = rate
            elif verdict is False:
                refused = rate
            else:
                break  # the generator, not the server, stopped here
    return {
        "per_s": best,
        "refused_at": refused,
        "generator_bound": bool(search and search[-1]["served"] is None),
        "search": search,
    }


# -- verdicts ------------------------------------------------------------------------------


def verdicts(steps: Sequence[dict[str, Any]], slos: Mapping[str, Slo]) -> dict[str, Any]:
    """Per class: p99 growth p99(kx) / p99(first step) and the first reported step that
    broke the class's SLO, with why."""
    out: dict[str, Any] = {}
    if not steps:
        return out
    labels = list(dict.fromkeys(label for step in steps for label in step["classes"]))
    for label in labels:
        slo = slos.get(label)
        first = steps[0]["classes"].get(label, {}).get("p99_ms") if steps[0]["reported"] else None
        growth: dict[str, float | None] = {}
        broken = why = None
        for step in steps:
            figures = step["classes"].get(label, {})
            p99 = figures.get("p99_ms") if step["reported"] else None
            growth[step["name"]] = p99 / first if p99 is not None and first else None
            if broken is None and step["reported"] and slo is not None:
                reason = _slo_broken(figures, slo)
                if reason:
                    broken, why = step["name"], reason
        out[label] = {
            "p99_growth": growth,
            "first_broken_step": broken,
            "why": why,
            "slo": slo.__dict__ if slo else None,
        }
    return out


def _slo_broken(figures: Mapping[str, Any], slo: Slo) -> str | None:
    success, p99 = figures.get("success"), figures.get("p99_ms")
    if success is not None and success < slo.success:
        return f"success {100 * success:.2f}% < SLO {100 * slo.success:g}%"
    if p99 is not None and p99 > slo.p99_ms:
        return f"p99 {p99:.1f} ms > SLO {slo.p99_ms:g} ms"
    if success == 0 and slo.success > 0:
        return "no request answered"
    return None


def overload_bar(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The overload issue's bar, read off the steps: critical p99 at 3x <= 1.5x its 1x
    value, critical success >= 99.9% at 10x (None: a step it needs was not run or not
    reported)."""
    by_name = {step["name"]: step for step in steps if step["reported"]}

    def critical(name: str, figure: str) -> float | None:
        value = by_name.get(name, {}).get("classes", {}).get("critical", {}).get(figure)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    p99_1x, p99_3x, success_10x = critical("1x", "p99_ms"), critical("3x", "p99_ms"), critical("10x", "success")
    ratio = p99_3x / p99_1x if p99_1x and p99_3x is not None else None
    return {
        "critical_p99_3x_over_1x": ratio,
        "p99_met": None if ratio is None else ratio <= 1.5,
        "critical_success_10x": success_10x,
        "success_met": None if success_10x is None else success_10x >= 0.999,
        "per_round_p99_3x_over_1x": round_ratios(by_name.get("1x"), by_name.get("3x")) if ratio is not None else [],
    }


def round_ratios(low: Mapping[str, Any] | None, high: Mapping[str, Any] | None) -> list[float | None]:
    """Critical p99 of round i at the high step over round i at the low step (the rounds
    ran side by side: the machine's drift between them is small), when there were rounds."""
    lows, highs = (low or {}).get("rounds") or [], (high or {}).get("rounds") or []
    if len(lows) < 2 or len(lows) != len(highs):
        return []
    ratios: list[float | None] = []
    for a, b in zip(lows, highs, strict=True):
        p99_low = a.get("classes", {}).get("critical", {}).get("p99_ms")
        p99_high = b.get("classes", {}).get("critical", {}).get("p99_ms")
        ratios.append(p99_high / p99_low if p99_low and p99_high is not None else None)
    return ratios


def cost_summary(steps: Sequence[dict[str, Any]], per_request: int) -> dict[str, Any]:
    """Cost per 1k predictions at each step, the projected monthly cost of serving the
    first and the last step's offered load at that step's cost per prediction, and
    whether cost grows linearly with load (per-prediction cost flat within 10%),
    sub-linearly (falls) or worse, with what explains it."""
    per_1k = {step["name"]: step["cost"].get("per_1k_predictions") for step in steps}
    priced = [step for step in steps if step["cost"].get("per_1k_predictions") is not None]
    monthly = {  # serving all of the step's offered load at its cost per prediction
        step["name"]: step["cost"]["per_1k_predictions"]
        * step["offered_per_s"]
        * per_request
        * SECONDS_PER_MONTH
        / 1000
        for step in priced
    }
    summary: dict[str, Any] = {
        "per_1k": per_1k,
        "monthly": monthly,
        "monthly_at_1x": monthly.get("1x"),
        "monthly_at_10x": monthly.get("10x"),
        "growth": None,
        "reason": None if priced else "no cost counters on the target (a model server exports them)",
    }
    if len(priced) < 2:
        return summary
    low, high = priced[0], priced[-1]
    summary["low_step"], summary["high_step"] = low["name"], high["name"]
    ratio = high["cost"]["per_1k_predictions"] / low["cost"]["per_1k_predictions"]
    summary["per_prediction_ratio"] = ratio
    summary["growth"] = "sub-linear" if ratio < 0.9 else "linear" if ratio <= 1.1 else "super-linear"
    summary["reason"] = _cost_reason(low, high)
    return summary


def _cost_reason(low: Mapping[str, Any], high: Mapping[str, Any]) -> str:
    parts = []
    rows = low["server"].get("rows_per_batch"), high["server"].get("rows_per_batch")
    if None not in rows:
        parts.append(f"rows per batch {rows[0]:.1f} at {low['name']} -> {rows[1]:.1f} at {high['name']}")
    device = low["cost"].get("device_ms_per_1k"), high["cost"].get("device_ms_per_1k")
    if None not in device:
        parts.append(
            f"model time per 1k predictions {device[0]:.1f} -> {device[1]:.1f} ms (lookups, priced per entity, "
            "cost the same at any load)"
        )

    def share(step: Mapping[str, Any], prefix: str) -> float:
        return float(sum(v for k, v in step["cost"].get("share_by_source", {}).items() if k.startswith(prefix)))

    for prefix, what in (("cache:", "cache hits"), ("rule:", "rule answers")):
        shares = share(low, prefix), share(high, prefix)
        if any(shares):
            parts.append(f"{what} {100 * shares[0]:.0f}% -> {100 * shares[1]:.0f}%")
    models = [k for k in high["cost"].get("share_by_source", {}) if ":" not in k]
    if len(models) > 1:
        parts.append(
            "answered by " + ", ".join(f"{k} {100 * high['cost']['share_by_source'][k]:.0f}%" for k in sorted(models))
        )
    shed = high["all"].get("shed") or 0.0
    if shed:
        parts.append(f"{100 * shed:.0f}% shed at {high['name']} (refusals cost no device time)")
    return "; ".join(parts) or "no batching, cache or routing change between the steps"


def describe(step: Step) -> str:
    parts = []
    for label, figures in step.classes().items():
        p99 = figures["p99_ms"]
        parts.append(
            f"{label} ok {_pct(figures['success'])} shed {_pct(figures['shed'])} "
            f"throttled {_pct(figures['client_throttled'])} p99 {'-' if p99 is None else f'{p99:.1f} ms'}"
        )
    mark = "" if step.reported else f" -- the load generator fell behind ({step.note}): not reported"
    return f"  {step.name} {step.result.offered_rate:,.0f}/s: " + "; ".join(parts) + mark


def _pct(value: float | None) -> str:  # also run.py's
    return "-" if value is None else f"{100 * value:.1f}%"
