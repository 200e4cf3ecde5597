"""`tenx top`: a running model server at a glance, in the terminal, for people without
Grafana. Every --interval it reads /metrics and shows what happened since the last
read: requests and predictions per second by route, p99 by class, sheds by reason,
fallbacks, the circuits, the adaptive limits and the event loop's lag."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import click
from rich.console import Group
from rich.table import Table

from featurestore.errors import TransientError
from tenx.commands.common import console, friendly

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

STATE_NAMES = {0: "closed", 1: "half-open", 2: "OPEN"}


def scrape(url: str, *, timeout_s: float = 5.0) -> Samples:
    """Every sample of a server's /metrics, by sample name and labels."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout_s)
    except httpx.TransportError as error:
        raise TransientError(
            f"model server at {url} did not answer: {error}; is `tenx serve-models` running?"
        ) from None
    if response.status_code != 200:
        raise TransientError(f"model server at {url} answered HTTP {response.status_code} on /metrics")
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """The q-quantile of a histogram's cumulative bucket counts (le -> count), linearly
    interpolated within the bucket as Prometheus' histogram_quantile does.

    >>> quantile({0.001: 50.0, 0.01: 100.0, math.inf: 100.0}, 0.5)
    0.001
    """
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width else 1.0)
        lower, below = bound, count
    return lower


@dataclass
class Frame:
    seconds: float
    requests: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # route -> req/s
    errors: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # route -> non-2xx/s
    predictions: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # served_by -> /s
    p99_ms: dict[tuple[str, str], float | None] = field(default_factory=dict)  # (route, class) -> ms
    shed: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # reason -> /s
    fallbacks: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # served_by -> /s
    circuits: dict[str, str] = field(default_factory=dict)
    limits: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))  # model -> gauge -> value
    loop_lag_ms: float | None = None
    admit_share: float | None = None


def frame(before: Samples, after: Samples, seconds: float) -> Frame:
    """What changed between two scrapes `seconds` apart."""
    out = Frame(seconds)
    buckets: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
    for (name, labels), value in after.items():
        tags = dict(labels)
        delta = value - before.get((name, labels), 0.0)
        rate = delta / seconds if seconds > 0 else 0.0
        if name == "tenx_model_requests_total":
            out.requests[tags.get("model", "?")] += rate
            if tags.get("outcome") != "ok":
                out.errors[tags.get("model", "?")] += rate
        elif name == "tenx_model_served_predictions_total":
            out.predictions[tags.get("served_by", "?")] += rate
        elif name == "tenx_model_shed_total":
            out.shed[tags.get("reason", "?")] += rate
        elif name == "tenx_model_fallbacks_total":
            out.fallbacks[tags.get("served_by", "?")] += rate
        elif name == "tenx_model_request_seconds_bucket":
            key = (tags.get("model", "?"), tags.get("priority", "-"))
            bound = float(tags.get("le", "inf"))
            buckets[key][bound] = buckets[key].get(bound, 0.0) + delta
        elif name == "tenx_model_breaker_state":
            out.circuits[tags.get("dependency", "?")] = STATE_NAMES.get(int(value), str(value))
        elif name in ("tenx_model_batch_limit_rows", "tenx_model_queue_bound_rows", "tenx_model_queued_rows"):
            short = name.removeprefix("tenx_model_").removesuffix("_rows")
            model = tags.get("model", "?")
            out.limits[model][short] = out.limits[model].get(short, 0.0) + value
        elif name == "tenx_model_loop_lag_seconds":
            out.loop_lag_ms = value * 1000
        elif name == "tenx_model_admit_share":
            out.admit_share = value
    for key, counts in buckets.items():
        p99 = quantile(counts, 0.99)
        out.p99_ms[key] = None if p99 is None else p99 * 1000
    return out


def render(data: Frame, urls: list[str]) -> Group:
    routes = Table(title=f"tenx top - {', '.join(urls)} - last {data.seconds:.1f} s", title_justify="left")
    for column in ("route", "req/s", "errors/s", "p99 critical", "p99 default", "p99 sheddable"):
        routes.add_column(column, justify="left" if column == "route" else "right")
    for route in sorted(set(data.requests) - {"-"}) or ["(no requests yet)"]:
        cells = []
        for name in ("critical", "default", "sheddable"):
            p99 = data.p99_ms.get((route, name))
            cells.append(f"{p99:.1f} ms" if p99 is not None else "-")
        routes.add_row(route, f"{data.requests.get(route, 0):,.1f}", f"{data.errors.get(route, 0):,.1f}", *cells)
    served = Table(title="answered by", title_justify="left")
    for column in ("served by", "predictions/s", "of which fallbacks/s"):
        served.add_column(column, justify="left" if column == "served by" else "right")
    for source, rate in sorted(data.predictions.items(), key=lambda item: -item[1]):
        served.add_row(source, f"{rate:,.1f}", f"{data.fallbacks.get(source, 0):,.1f}")
    health = Table(title="shedding, circuits, limits", title_justify="left")
    health.add_column("what")
    health.add_column("now", justify="right")
    for reason, rate in sorted(data.shed.items()):
        health.add_row(f"shed: {reason}", f"{rate:,.1f}/s")
    for dependency, state in sorted(data.circuits.items()):
        health.add_row(f"circuit {dependency}", state)
    for model, values in sorted(data.limits.items()):
        health.add_row(
            f"{model}: batch limit / queue bound / queued",
            f"{values.get('batch_limit', 0):,.0f} / {values.get('queue_bound', 0):,.0f} / "
            f"{values.get('queued', 0):,.0f} rows",
        )
    if data.loop_lag_ms is not None:
        share = f", lower classes get {data.admit_share:.0%} of their headroom" if data.admit_share is not None else ""
        health.add_row("event loop lag", f"{data.loop_lag_ms:.1f} ms{share}")
    return Group(routes, served, health)


@click.command()
@click.option("--url", "urls", multiple=True, envvar="TENX_MODEL_SERVER_URL",
              help="A model server (repeatable; default $TENX_MODEL_SERVER_URL or http://127.0.0.1:8081).")  # fmt: skip
@click.option(
    "--interval", "interval_s", type=click.FloatRange(0.1, 60), default=1.0, show_default=True, help="Seconds."
)
@click.option("--once", is_flag=True, help="Print one frame (after one interval) and exit: for scripts and logs.")
@friendly
def top(urls: tuple[str, ...], interval_s: float, once: bool) -> None:
    """A live view of running model servers (Ctrl-C to quit): requests/s and p99 by
    route and class, predictions/s by what answered (models, cache, rules), sheds by
    reason, fallbacks, circuit states, the adaptive limits and the event loop's lag,
    over the last --interval seconds. Reads each server's /metrics; with several
    --url, their figures are added up."""
    from rich.live import Live

    servers = list(urls) or ["http://127.0.0.1:8081"]

    def read() -> Samples:
        merged: Samples = {}
        for url in servers:
            for key, value in scrape(url).items():
                merged[key] = merged.get(key, 0.0) + value
        return merged

    before, at = read(), time.monotonic()
    if once:
        time.sleep(interval_s)
        after, now = read(), time.monotonic()
        console.print(render(frame(before, after, now - at), servers))
        return
    try:
        with Live(render(frame(before, before, 0.0), servers), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval_s)
                after, now = read(), time.monotonic()
                live.update(render(frame(before, after, now - at), servers))
                before, at = after, now
    except KeyboardInterrupt:
        return
