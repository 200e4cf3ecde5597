"""Prometheus metrics of the stream job, and the HTTP exporter that serves them
(`start_metrics_server`, behind `tenx stream --metrics-port`). docs/metrics.md lists
every metric with its labels."""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily

from featurestore.errors import ConfigError

FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600, 86400)
WRITE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class DeadLetterReason(enum.Enum):
    """Why a message became a dead letter: the `reason` label of
    `tenx_stream_dead_letters_total` (the dead letter itself carries the full message)."""

    INVALID_JSON = "invalid_json"  # not JSON, or a tombstone (no value)
    KAFKA_ERROR = "kafka_error"  # the consumer reported an error in place of a message
    INVALID_RECORD = "invalid_record"  # JSON that does not match the source's schema
    FUTURE_EVENT = "future_event"  # an event time beyond the source's max_future


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


class NewestTime:
    """A gauge of the newest event time (µs in, seconds since the epoch out) seen per
    label set: it only moves forward, whichever worker thread reports. What freshness
    and event-time lag are computed from in PromQL (`time() - metric`), so the age is
    as of the scrape, not as of the last write."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._values: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def advance(self, labels: tuple[str, ...], time_us: int) -> None:
        with self._lock:
            current = self._values.get(labels)
            if current is None or time_us > current:
                self._values[labels] = time_us

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        with self._lock:
            values = sorted(self._values.items())
        for labels, value in values:
            family.add_metric(list(labels), value / 1e6)
        yield family


class _StreamMetrics:
    def __init__(self) -> None:
        self.events_in = Counter("tenx_stream_events_in_total", "Messages read.", ["source"])
        self.rows_out = Counter("tenx_stream_rows_out_total", "Changelog rows written online.", ["view"])
        self.dead_letters = Counter(
            "tenx_stream_dead_letters_total",
            "Messages sent to the dead-letter output, by source and reason (DeadLetterReason).",
            ["source", "reason"],
        )
        self.late = Counter("tenx_stream_late_total", "Events older than the watermark (not applied).", ["view"])
        self.lag = Gauge("tenx_stream_consumer_lag", "Messages behind the partition's end.", ["topic", "partition"])
        self.freshness = BatchHistogram(
            "tenx_stream_freshness_seconds", "Online write time minus the row's as_of time.", FRESHNESS_BUCKETS
        )
        REGISTRY.register(self.freshness)
        self.watermarks = SlowestWatermark("tenx_stream_watermark_seconds")
        REGISTRY.register(self.watermarks)
        self.online_write_seconds = Histogram(
            "tenx_stream_online_write_seconds",
            "One write of a view's rows to the online store (Redis: one pipelined round trip per 2,000 keys).",
            ["view"],
            buckets=WRITE_BUCKETS,
        )
        self.written_event_time = NewestTime(
            "tenx_stream_written_event_time_seconds",
            "Newest as_of (event time) written online per view, seconds since the epoch; freshness = time() - this.",
            ("view",),
        )
        REGISTRY.register(self.written_event_time)
        self.read_event_time = NewestTime(
            "tenx_stream_read_event_time_seconds",
            "Newest valid event time read per source partition, seconds since the epoch; "
            "event-time lag = time() - this.",
            ("source", "partition"),
        )
        REGISTRY.register(self.read_event_time)


METRICS = _StreamMetrics()


@dataclass(frozen=True)
class MetricsServer:
    """A running exporter: `port` it listens on (the one asked for, or the free one
    picked for 0), `close()` to stop it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# Every interface by default, as `tenx stream --metrics-port` always listened: in the
# compose stack Prometheus scrapes it from another container. The page holds counts and
# view, source and topic names, nothing secret; pass address="127.0.0.1" to keep it local.
def start_metrics_server(port: int, *, address: str = "0.0.0.0") -> MetricsServer:  # noqa: S104
    """Serve this process's metrics (the stream job's `tenx_stream_*` and the process's
    own `process_*`/`python_*`) at `http://<address>:<port>/metrics`, from a daemon
    thread; port 0 picks a free port. Every process of a multi-process job serves its
    own (its workers' counts); Prometheus sums them.

        server = start_metrics_server(9100)
        ...  # run the dataflow
        server.close()
    """
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=address, registry=REGISTRY)
    except OSError as error:
        raise ConfigError(
            f"stream metrics: cannot listen on {address}:{port} ({error.strerror or error}); "
            "pick a free port with --metrics-port"
        ) from error
    return MetricsServer(server, thread)
