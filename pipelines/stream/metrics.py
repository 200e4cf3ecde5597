"""Prometheus metrics of the stream job (served by `tenx stream --metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram


class _StreamMetrics:
    def __init__(self) -> None:
        self.events_in = Counter("tenx_stream_events_in_total", "Messages read.", ["source"])
        self.rows_out = Counter("tenx_stream_rows_out_total", "Changelog rows written online.", ["view"])
        self.dead_letters = Counter("tenx_stream_dead_letters_total", "Invalid records sent to the DLQ.", ["source"])
        self.late = Counter("tenx_stream_late_total", "Events older than the watermark (not applied).", ["view"])
        self.freshness = Histogram(
            "tenx_stream_freshness_seconds",
            "Online write time minus the row's as_of time.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600, 86400),
        )


METRICS = _StreamMetrics()
