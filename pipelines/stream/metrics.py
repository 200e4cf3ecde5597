"""Prometheus metrics of the stream job (served by `tenx stream --metrics-port`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily

FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600, 86400)


class BatchHistogram:
    """A Prometheus histogram observed a whole array at a time (one numpy pass, not one
    call per row), exposed as a standard histogram (`_bucket`, `_sum`, `_count`)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.array([*buckets, np.inf])
        self.counts = np.zeros(len(self.bounds), dtype=np.int64)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray) -> None:
        # A value v falls in the first bucket whose upper bound is >= v (Prometheus `le`).
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.bounds))
        with self._lock:
            self.counts += counts[: len(self.bounds)]
            self.total += float(np.sum(values))

    def collect(self) -> Iterator[Any]:
        with self._lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.total
        labels = [("+Inf" if np.isinf(b) else repr(float(b))) for b in self.bounds.tolist()]
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=list(zip(labels, cumulative, strict=True)), sum_value=total
        )


class SlowestWatermark:
    """Per view the watermark of its slowest shard in this process (seconds since the
    epoch): what the status line's watermark age and `tenx_stream_watermark_seconds`
    show. Shards report under a token of their own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._values: dict[str, dict[int, int]] = {}
        self._lock = threading.Lock()

    def set(self, view: str, shard: int, watermark_us: int) -> None:
        with self._lock:
            self._values.setdefault(view, {})[shard] = watermark_us

    def slowest(self) -> dict[str, int]:
        """View -> the lowest shard watermark (µs)."""
        with self._lock:
            return {view: min(shards.values()) for view, shards in self._values.items() if shards}

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            self.name, "Event-time watermark of the view's slowest shard (seconds since the epoch).", labels=["view"]
        )
        for view, value in sorted(self.slowest().items()):
            family.add_metric([view], value / 1e6)
        yield family


class _StreamMetrics:
    def __init__(self) -> None:
        self.events_in = Counter("tenx_stream_events_in_total", "Messages read.", ["source"])
        self.rows_out = Counter("tenx_stream_rows_out_total", "Changelog rows written online.", ["view"])
        self.dead_letters = Counter("tenx_stream_dead_letters_total", "Invalid records sent to the DLQ.", ["source"])
        self.late = Counter("tenx_stream_late_total", "Events older than the watermark (not applied).", ["view"])
        self.lag = Gauge("tenx_stream_consumer_lag", "Messages behind the partition's end.", ["topic", "partition"])
        self.freshness = BatchHistogram(
            "tenx_stream_freshness_seconds", "Online write time minus the row's as_of time.", FRESHNESS_BUCKETS
        )
        REGISTRY.register(self.freshness)
        self.watermarks = SlowestWatermark("tenx_stream_watermark_seconds")
        REGISTRY.register(self.watermarks)


METRICS = _StreamMetrics()
