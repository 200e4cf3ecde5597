"""The stream's batch-observed freshness histogram exposes exactly what a standard
prometheus_client Histogram exposes for the same observations."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
from hypothesis import given
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pipelines.stream.metrics import FRESHNESS_BUCKETS, METRICS, BatchHistogram


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
