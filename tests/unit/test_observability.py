"""The observability files stay true to the code: every metric the Grafana dashboard
queries is one the code exports (and every label it groups by is one of its labels),
Prometheus scrapes every compose service that serves /metrics, Grafana's provisioning
files exist where compose mounts them and name the Prometheus service, and
docs/metrics.md lists every metric with its type and labels."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from pipelines.stream.metrics import METRICS as STREAM_METRICS
from serving.api import _Metrics as ApiMetrics  # the feature API's metrics have no public holder
from serving.models.metrics import ModelMetrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DASHBOARD = json.loads((ROOT / "deploy" / "observability" / "dashboards" / "tenx.json").read_text())


@dataclass(frozen=True)
class Family:
    """One exported metric: its name as queried (a counter's with `_total`), its type
    and label names."""

    name: str
    kind: str
    labels: frozenset[str]

    def series(self) -> set[str]:
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


def exported() -> dict[str, Family]:
    """Every tenx metric the code defines: the feature API's, the model server's and the
    stream job's (prometheus_client keeps label names in `_labelnames` only)."""
    found: dict[str, Family] = {}
    for holder in (ApiMetrics(), ModelMetrics(), STREAM_METRICS):
        for metric in vars(holder).values():
            if isinstance(metric, MetricWrapperBase):
                name, kind, labels = metric._name, metric._type, metric._labelnames
            elif hasattr(metric, "collect") and not isinstance(metric, CollectorRegistry):  # the stream's collectors
                (family,) = metric.collect()
                name, kind, labels = family.name, family.type, family._labelnames
            else:
                continue
            name += "_total" if kind == "counter" else ""
            found[name] = Family(name, kind, frozenset(labels))
    return found


EXPORTED = exported()

# -- PromQL ---------------------------------------------------------------------------------

_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def references(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses. Enough PromQL for
    dashboards: strings, label matchers, grouping clauses and ranges are taken out;
    an identifier left that is not followed by `(` (a function or aggregation) and is
    not a keyword names a metric."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels: set[str] = set()
    for block in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for block in re.findall(_GROUPING, text):
        labels |= set(re.findall(r"[A-Za-z_]\w*", block))
    text = re.sub(_GROUPING, " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries, $__rate_interval
    names = {name for name in re.findall(r"\b[A-Za-z_:][\w:]*\b(?!\s*\()", text) if name.lower() not in _KEYWORDS}
    return names, labels


def unknown_references(queries: list[tuple[str, str]], families: dict[str, Family]) -> list[str]:
    """What the (panel title, query) pairs name that `families` do not export: metric
    series, and labels none of the query's metrics has."""
    owner = {series: family for family in families.values() for series in family.series()}
    problems = []
    for title, expr in queries:
        names, labels = references(expr)
        problems += [f"panel {title!r}: {name} is not exported (query: {expr})" for name in sorted(names - set(owner))]
        known = {"instance", "job"}  # Prometheus adds them to every series it scrapes
        for name in names & set(owner):
            known |= owner[name].labels | ({"le"} if name.endswith("_bucket") else set())
        problems += [f"panel {title!r}: no metric of `{expr}` has a label {label}" for label in sorted(labels - known)]
    return problems


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield item
        yield from panels(item.get("panels", []))  # a collapsed row holds its panels


QUERIES = [
    (panel["title"], target["expr"]) for panel in panels(DASHBOARD["panels"]) for target in panel.get("targets", [])
]


def test_references_finds_the_metrics_and_labels_of_a_query() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, priority) (rate(tenx_model_request_seconds_bucket{model=~"b.*"}[1m])))'
        " / ignoring(x) 1000 * time() - max without (view) (tenx_stream_watermark_seconds offset 5m)"
    )
    assert references(expr) == (
        {"tenx_model_request_seconds_bucket", "tenx_stream_watermark_seconds"},
        {"le", "priority", "model", "x", "view"},
    )


def test_a_panel_naming_what_the_code_does_not_export_is_reported() -> None:
    queries = [
        ("typo", "sum(rate(tenx_model_shed[1m]))"),
        ("histogram without a suffix", "rate(tenx_model_request_seconds[1m])"),
        ("label", "sum by (prority) (rate(tenx_model_shed_total[1m]))"),
        ("fine", "histogram_quantile(0.5, sum by (le, job) (rate(tenx_api_request_seconds_bucket[1m])))"),
    ]
    assert unknown_references(queries, EXPORTED) == [
        "panel 'typo': tenx_model_shed is not exported (query: sum(rate(tenx_model_shed[1m])))",
        "panel 'histogram without a suffix': tenx_model_request_seconds is not exported "
        "(query: rate(tenx_model_request_seconds[1m]))",
        "panel 'label': no metric of `sum by (prority) (rate(tenx_model_shed_total[1m]))` has a label prority",
    ]


def test_every_metric_and_label_the_dashboard_queries_is_exported() -> None:
    assert QUERIES
    assert unknown_references(QUERIES, EXPORTED) == []


def test_the_dashboard_shows_what_an_operator_looks_for() -> None:
    used = set().union(*(references(expr)[0] for _, expr in QUERIES))
    assert {
        "tenx_model_request_seconds_bucket",  # latency by class
        "tenx_model_served_predictions_total",  # throughput, and cost per 1k predictions
        "tenx_model_shed_total",
        "tenx_model_fallbacks_total",
        "tenx_model_breaker_state",
        "tenx_model_cost_dollars_total",
        "tenx_model_batch_limit_rows",
        "tenx_model_queue_bound_rows",
        "tenx_api_request_seconds_bucket",
        "tenx_stream_consumer_lag",
        "tenx_stream_read_event_time_seconds",
        "tenx_stream_written_event_time_seconds",  # freshness
        "tenx_stream_events_in_total",
        "tenx_stream_dead_letters_total",
    } <= used
    by_class = [expr for _, expr in QUERIES if "tenx_model_request_seconds_bucket" in expr]
    assert by_class
    assert all("priority" in references(expr)[1] for expr in by_class)
    ids = [panel["id"] for panel in panels(DASHBOARD["panels"])]
    assert len(ids) == len(set(ids))


def test_the_metric_holders_hold_every_tenx_metric_the_registries_export() -> None:
    # `exported` reads the holders' attributes; the registries are what /metrics serves.
    names = set()
    for registry in (ApiMetrics().registry, ModelMetrics().registry, REGISTRY):
        for family in registry.collect():
            if family.name.startswith("tenx_"):
                names.add(family.name + ("_total" if family.type == "counter" else ""))
    assert names == set(EXPORTED)


# -- docs/metrics.md ------------------------------------------------------------------------


def test_the_metrics_page_lists_every_metric_with_its_type_and_labels() -> None:
    rows = re.findall(r"^\| `(tenx_\w+)` \| (\w+) \| ([^|]*) \|", (ROOT / "docs" / "metrics.md").read_text(), re.M)
    documented = {name: (kind, frozenset(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}
    assert len(documented) == len(rows), "a metric is listed twice"
    assert documented == {family.name: (family.kind, family.labels) for family in EXPORTED.values()}


# -- compose: Prometheus and Grafana --------------------------------------------------------


def metrics_endpoints() -> dict[str, str]:
    """Compose service -> the host:port of its /metrics, read from the command it runs."""
    found = {}
    for name, service in SERVICES.items():
        command = service.get("command")
        if not isinstance(command, list):
            continue
        if command[:2] in (["tenx", "serve"], ["tenx", "serve-models"]):
            found[name] = f"{name}:{command[command.index('--port') + 1]}"
        elif command[:2] == ["tenx", "stream"] and "--metrics-port" in command:
            found[name] = f"{name}:{command[command.index('--metrics-port') + 1]}"
        elif command[:2] == ["dask", "scheduler"]:  # Dask serves /metrics on its dashboard
            found[name] = f"{name}:{command[command.index('--dashboard-address') + 1].rsplit(':', 1)[1]}"
    return found


def mounts(service: str) -> dict[str, str]:
    """A service's bind mounts from this repository: container path -> repository path."""
    found = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = source[2:]
    return found


def prometheus_config() -> dict[str, Any]:
    """The file compose mounts where the prometheus service's --config.file points."""
    (flag,) = [arg for arg in SERVICES["prometheus"]["command"] if arg.startswith("--config.file=")]
    return dict(yaml.safe_load((ROOT / mounts("prometheus")[flag.split("=", 1)[1]]).read_text()))


def test_prometheus_scrapes_every_service_that_serves_metrics() -> None:
    endpoints = metrics_endpoints()
    assert {"feature-api", "model-server", "stream"} <= set(endpoints)
    scraped = {
        target: job.get("metrics_path", "/metrics")
        for job in prometheus_config()["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    for service, target in endpoints.items():
        assert scraped.get(target) == "/metrics", f"Prometheus does not scrape {service}'s /metrics at {target}"
    assert set(scraped) - set(endpoints.values()) == {"localhost:9090"}, "a target no compose service serves"


def test_every_file_compose_mounts_into_prometheus_and_grafana_exists() -> None:
    for service in ("prometheus", "grafana"):
        assert mounts(service), service
        for target, source in mounts(service).items():
            assert (ROOT / source).exists(), f"{service} mounts ./{source} at {target}: no such file"
        assert SERVICES[service]["restart"] == "unless-stopped"
        assert "healthcheck" in SERVICES[service]


def test_grafana_provisions_the_prometheus_service_and_the_dashboard_folder() -> None:
    grafana = mounts("grafana")
    provisioning = ROOT / grafana["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    published = SERVICES["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{published}"
    assert datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tenx.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    assert (ROOT / grafana[folder] / "tenx.json").exists()
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/tenx.json"
    uids = {
        source["uid"] for panel in panels(DASHBOARD["panels"]) for source in [panel.get("datasource")] if source
    } | {target["datasource"]["uid"] for panel in panels(DASHBOARD["panels"]) for target in panel.get("targets", [])}
    assert uids == {datasource["uid"]}


def test_grafana_has_no_credentials_in_the_compose_file() -> None:
    environment = SERVICES["grafana"]["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"  # anonymous visitors only look
    assert not {"GF_SECURITY_ADMIN_PASSWORD", "GF_SECURITY_ADMIN_USER"} & set(environment)
    # The admin's password is generated once per volume and read from a file.
    script = SERVICES["grafana"]["entrypoint"][2]
    assert "/dev/urandom" in script
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE" in script
    assert script.rstrip().endswith("exec /run.sh")


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_prometheus_and_grafana_images_are_pinned(service: str) -> None:
    image = SERVICES[service]["image"]
    assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+\.\d+", image), image
