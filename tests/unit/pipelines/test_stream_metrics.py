"""The stream job's metrics: the batch-observed freshness histogram exposes exactly what
a standard prometheus_client Histogram exposes for the same observations; running the
real dataflow in process moves every counter and gauge by what it did; the exporter
serves them over HTTP."""

from __future__ import annotations

import math
import socket
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import orjson
import pytest
from bytewax import operators as op
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import given
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest

from featurestore.errors import ConfigError
from featurestore.plan import Plan, compile_repo
from pipelines.stream.dataflow import OnlineSink, Outputs, StoreFactory, build_dataflow
from pipelines.stream.metrics import (
    FRESHNESS_BUCKETS,
    METRICS,
    BatchHistogram,
    DeadLetterReason,
    start_metrics_server,
)
from pipelines.stream.state import Emit
from schemas.timestamps import to_micros
from tenx.demo_data import DemoConfig, generate

ROOT = Path(__file__).resolve().parents[3]


def exposition(collector: object) -> list[str]:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    return [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")]


@given(st.lists(st.lists(st.floats(0, 1e6), max_size=20), max_size=4))
def test_batch_histogram_matches_prometheus_histogram(batches: list[list[float]]) -> None:
    ours = BatchHistogram("fresh_seconds", "doc", FRESHNESS_BUCKETS)
    registry = CollectorRegistry()
    theirs = Histogram("fresh_seconds", "doc", buckets=FRESHNESS_BUCKETS, registry=registry)
    for batch in batches:
        ours.observe_many(np.array(batch, dtype=np.float64))
        for value in batch:
            theirs.observe(value)
    expected = [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")]
    expected = [line for line in expected if "_created" not in line]
    got = exposition(ours)
    assert [line.split()[0] for line in got] == [line.split()[0] for line in expected]
    for a, b in zip(got, expected, strict=True):
        assert math.isclose(float(a.split()[1]), float(b.split()[1]), rel_tol=1e-9, abs_tol=1e-9), (a, b)


def test_the_stream_metrics_are_registered_once() -> None:
    assert METRICS.freshness.name == "tenx_stream_freshness_seconds"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def plan() -> Plan:
    return compile_repo(ROOT / "tenx" / "templates" / "repo", project="demo", modules=["features"])


def test_running_the_job_moves_the_stream_metrics(plan: Plan, tmp_path: Path) -> None:
    # Events ending now: newer than any other test's (the gauges keep the newest time).
    # (The consumer lag comes from Kafka partitions only: tests/compose checks it.)
    now = datetime.now(UTC)
    config = DemoConfig(events=300, users=20, merchants=5, days=1, start=now - timedelta(days=1), chunk_rows=300)
    events = next(generate(config)).sort_by("event_time")
    log: list[tuple[int, int, bytes | None]] = []
    for offset, row in enumerate(events.to_pylist()):
        log.append((0, offset, orjson.dumps({**row, "event_time": row["event_time"].isoformat()})))
    first = events.slice(0, 1).to_pylist()[0]
    ahead = {**first, "event_time": (now + timedelta(days=10)).isoformat()}
    log += [
        (0, len(log), b"{not json"),
        (0, len(log) + 1, None),  # a tombstone
        (0, len(log) + 2, orjson.dumps({"user_id": "abc"})),
        (0, len(log) + 3, orjson.dumps(ahead)),
        (0, len(log) + 4, orjson.dumps({**first, "event_time": first["event_time"].isoformat()})),  # a day late
        (-1, -1, orjson.dumps({"kafka_error": "Broker: Not leader for partition"})),
    ]
    reasons = [r.value for r in DeadLetterReason]
    dead_before = {r: sample("tenx_stream_dead_letters_total", source="transactions", reason=r) for r in reasons}
    events_before = sample("tenx_stream_events_in_total", source="transactions")
    rows_before = sample("tenx_stream_rows_out_total", view="user_spend")
    writes_before = sample("tenx_stream_online_write_seconds_count", view="user_spend")
    fresh_before = sample("tenx_stream_freshness_seconds_count")
    late_before = sample("tenx_stream_late_total", view="user_spend")
    dlq: list[dict[str, object]] = []
    flow = build_dataflow(
        plan,
        lambda flow, source: op.input("in", flow, TestingSource(log, batch_size=50)),
        Outputs(
            OnlineSink(StoreFactory(None, tmp_path / "online.sqlite"), plan.views), TestingSink(dlq), TestingSink([])
        ),
        views=["user_spend"],
        emit=Emit.LATEST,
        drain=False,
    )
    run_main(flow)

    assert len(dlq) == 5
    dead = {
        r: sample("tenx_stream_dead_letters_total", source="transactions", reason=r) - dead_before[r] for r in reasons
    }
    assert dead == {"invalid_json": 2, "invalid_record": 1, "future_event": 1, "kafka_error": 1}
    assert sample("tenx_stream_events_in_total", source="transactions") - events_before == len(log)
    assert sample("tenx_stream_late_total", view="user_spend") - late_before == 1
    rows = sample("tenx_stream_rows_out_total", view="user_spend") - rows_before
    assert rows >= len(set(events.column("user_id").to_pylist()))  # every user's value, at least once
    assert sample("tenx_stream_online_write_seconds_count", view="user_spend") > writes_before
    assert sample("tenx_stream_freshness_seconds_count") - fresh_before == rows
    newest = max(to_micros(t) for t in events.column("event_time").to_pylist()) / 1e6
    assert sample("tenx_stream_written_event_time_seconds", view="user_spend") == pytest.approx(newest)
    assert sample("tenx_stream_read_event_time_seconds", source="transactions", partition="0") == pytest.approx(newest)


def test_the_exporter_serves_the_stream_metrics_over_http() -> None:
    server = start_metrics_server(0, address="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.close()
    for name, kind in [
        ("tenx_stream_events_in_total", "counter"),
        ("tenx_stream_dead_letters_total", "counter"),
        ("tenx_stream_consumer_lag", "gauge"),
        ("tenx_stream_freshness_seconds", "histogram"),
        ("tenx_stream_online_write_seconds", "histogram"),
        ("tenx_stream_written_event_time_seconds", "gauge"),
        ("tenx_stream_read_event_time_seconds", "gauge"),
        ("tenx_stream_watermark_seconds", "gauge"),
    ]:
        assert f"# TYPE {name} {kind}\n" in text, name


def test_a_taken_port_is_a_config_error_naming_the_option() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as raised:
            start_metrics_server(port, address="127.0.0.1")
    assert str(raised.value) == (
        f"stream metrics: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "pick a free port with --metrics-port"
    )
