"""`tenx cost`: what predictions cost, by model, tenant and route, from running model
servers' /metrics (the tenx_model_cost_* and tenx_model_served_predictions_total
counters). Without --window: since each server started; with it: over that window (two
scrapes, the difference)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click
from rich.table import Table

from tenx.commands.common import console, friendly
from tenx.commands.top import scrape as scrape_all

_WANTED = {
    "tenx_model_served_predictions": ("route", "served_by", "tenant"),
    "tenx_model_cost_device_seconds": ("route", "model", "tenant"),
    "tenx_model_cost_dollars": ("route", "model", "tenant"),
}


@dataclass
class Line:
    predictions: float = 0.0
    device_s: float = 0.0
    dollars: float = 0.0

    def per_1k(self) -> float | None:
        return self.dollars / self.predictions * 1000 if self.predictions else None


@dataclass
class Costs:
    by: dict[str, dict[str, Line]] = field(default_factory=lambda: {"model": {}, "tenant": {}, "route": {}})

    def line(self, dimension: str, key: str) -> Line:
        return self.by[dimension].setdefault(key, Line())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """The cost counters of one server, by name (without `_total`) and labels."""
    return {
        (name.removesuffix("_total"), labels): value
        for (name, labels), value in scrape_all(url).items()
        if name.removesuffix("_total") in _WANTED and name.endswith("_total")
    }


def tally(samples: Iterable[Samples], before: Iterable[Samples] = ()) -> Costs:
    """Costs by model, tenant and route from scraped counters (minus `before`)."""
    earlier: Samples = {}
    for part in before:
        for key, value in part.items():
            earlier[key] = earlier.get(key, 0.0) + value
    now: Samples = {}
    for part in samples:
        for key, value in part.items():
            now[key] = now.get(key, 0.0) + value
    costs = Costs()
    for (name, labels), value in now.items():
        delta = value - earlier.get((name, labels), 0.0)
        tags = dict(labels)
        for dimension in ("model", "tenant", "route"):
            source = "served_by" if dimension == "model" and name == "tenx_model_served_predictions" else dimension
            line = costs.line(dimension, tags.get(source, "?"))
            if name == "tenx_model_served_predictions":
                line.predictions += delta
            elif name == "tenx_model_cost_device_seconds":
                line.device_s += delta
            else:
                line.dollars += delta
    return costs


def _table(title: str, lines: Mapping[str, Line]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in (title, "predictions", "device s", "USD", "USD / 1k predictions"):
        table.add_column(column, justify="left" if column == title else "right")
    for key, line in sorted(lines.items(), key=lambda item: -item[1].dollars):
        per_1k = line.per_1k()
        table.add_row(
            key, f"{line.predictions:,.0f}", f"{line.device_s:,.3f}", f"{line.dollars:,.6f}",
            f"{per_1k:,.6f}" if per_1k is not None else "-",
        )  # fmt: skip
    return table


@click.command()
@click.option("--url", "urls", multiple=True, envvar="TENX_MODEL_SERVER_URL",
              help="A model server (repeatable; default $TENX_MODEL_SERVER_URL or http://127.0.0.1:8081).")  # fmt: skip
@click.option(
    "--window",
    "window_s",
    type=click.FloatRange(0, 86_400, min_open=True),
    default=None,
    help="Seconds to measure over (scrape, wait, scrape again); default: since each server started.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@friendly
def cost(urls: tuple[str, ...], window_s: float | None, as_json: bool) -> None:
    """What predictions cost, by model, tenant and route: each batch's device time is
    split over its requests by rows and priced at model_server.costs' rates (cpu_hour,
    gpu_hour, lookups_per_million in tenx.yaml); cached and rule answers cost no device
    time. `model` is what answered (a model, cache:<model>, rule:<name>)."""
    servers = list(urls) or ["http://127.0.0.1:8081"]
    before: list[Samples] = []
    if window_s is not None:
        before = [scrape(url) for url in servers]
        with console.status(f"measuring for {window_s:g} s"):
            time.sleep(window_s)
    costs = tally([scrape(url) for url in servers], before)
    if as_json:
        data: dict[str, Any] = {
            dimension: {key: {**line.__dict__, "usd_per_1k": line.per_1k()} for key, line in lines.items()}
            for dimension, lines in costs.by.items()
        }
        click.echo(json.dumps(data, indent=2))
        return
    span = f"over {window_s:g} s" if window_s is not None else "since the server(s) started"
    console.print(f"cost {span} ({', '.join(servers)})", highlight=False)
    for dimension, lines in costs.by.items():
        console.print(_table(dimension, lines))
