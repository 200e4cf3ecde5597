"""The model server's Prometheus metrics, correct with several worker processes.

With `PROMETHEUS_MULTIPROC_DIR` set (`tenx serve-models --workers N` sets it to a fresh
folder before the workers start), every process writes its values to files there and
`/metrics` in any worker merges them all (prometheus_client's multiprocess mode); else
the process's own registry is served.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_FAST = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)


class ModelMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tenx_model_requests_total",
            "Prediction requests, by route, outcome and class.",
            ["model", "outcome", "priority"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "tenx_model_request_seconds", "Time from a request's arrival to its answer, by route and class.",
            ["model", "priority"], registry=r,
            buckets=_LATENCY,
        )  # fmt: skip
        self.predictions = Counter("tenx_model_predictions_total", "Rows scored.", ["model", "version"], registry=r)
        self.entities = Counter(
            "tenx_model_entities_total", "Entities looked up, by feature status.", ["model", "status"], registry=r
        )
        self.batch_rows = Histogram(
            "tenx_model_batch_rows", "Rows per inference batch.", ["model"], registry=r, buckets=_ROWS
        )
        self.queue_wait = Histogram(
            "tenx_model_queue_wait_seconds", "Time a request waited for its batch.", ["model"], registry=r,
            buckets=_LATENCY,
        )  # fmt: skip
        self.lookup_seconds = Histogram(
            "tenx_model_lookup_seconds", "Online store read per batch (every view, one round trip).", ["model"],
            registry=r, buckets=_LATENCY,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "tenx_model_inference_seconds", "ONNX Runtime run per batch (device time).", ["model", "device"],
            registry=r, buckets=_FAST,
        )  # fmt: skip
        self.device_seconds = Counter(
            "tenx_model_device_seconds_total", "Device time spent in inference.", ["model", "version", "device"],
            registry=r,
        )  # fmt: skip
        self.shed = Counter(
            "tenx_model_shed_total",
            "Requests refused or dropped before any work, by reason (overload, evicted, fair_share, quota, "
            "deadline), class and tenant.",
            ["model", "reason", "priority", "tenant"], registry=r,
        )  # fmt: skip
        self.served = Counter(
            "tenx_model_served_total",
            "Answers by route and what served them (a model, cache:<model>, rule:<name>): the traffic share per model.",
            ["route", "served_by", "priority", "tenant"], registry=r,
        )  # fmt: skip
        self.served_predictions = Counter(
            "tenx_model_served_predictions_total", "Predictions (entities) answered, by route, source, class, tenant.",
            ["route", "served_by", "priority", "tenant"], registry=r,
        )  # fmt: skip
        self.cost_device_seconds = Counter(
            "tenx_model_cost_device_seconds_total",
            "Device time attributed to requests: each batch's inference time split over its requests by rows.",
            ["model", "version", "device", "route", "tenant", "priority"], registry=r,
        )  # fmt: skip
        self.cost_dollars = Counter(
            "tenx_model_cost_dollars_total",
            "Cost attributed to requests (device time and lookups at model_server.costs' rates), in USD.",
            ["model", "version", "route", "tenant", "priority"], registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "tenx_model_fallbacks_total", "Answers served by a fallback step because the step before it failed.",
            ["route", "served_by", "priority", "tenant"], registry=r,
        )  # fmt: skip
        self.unanswered = Counter(
            "tenx_model_unanswered_total", "Requests every step of their route failed to answer.",
            ["route", "priority", "tenant"], registry=r,
        )  # fmt: skip
        self.dead_batches = Counter(
            "tenx_model_dead_batches_total",
            "Batches not run: every request's deadline passed while its features were read.",
            ["model"], registry=r,
        )  # fmt: skip
        self.breaker_state = Gauge(
            "tenx_model_breaker_state", "Circuit state per dependency: 0 closed, 1 half-open, 2 open.",
            ["dependency"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.breaker_transitions = Counter(
            "tenx_model_breaker_transitions_total", "Circuit breaker transitions per dependency.",
            ["dependency", "from_state", "to_state"], registry=r,
        )  # fmt: skip
        self.batch_limit = Gauge(
            "tenx_model_batch_limit_rows", "The adaptive batch limit (rows per batch).", ["model"], registry=r,
            multiprocess_mode="max",
        )  # fmt: skip
        self.queue_bound = Gauge(
            "tenx_model_queue_bound_rows", "The adaptive queue bound (rows).", ["model"], registry=r,
            multiprocess_mode="max",
        )  # fmt: skip
        self.queued = Gauge(
            "tenx_model_queued_rows", "Rows queued now, by class.", ["model", "priority"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.loop_lag = Gauge(
            "tenx_model_loop_lag_seconds", "Event-loop lag (smoothed): how late a 10 ms timer fires.", registry=r,
            multiprocess_mode="max",
        )  # fmt: skip
        self.loop_busy = Gauge(
            "tenx_model_loop_busy_ratio", "Share of the event loop thread's time spent working (smoothed, 0-1).",
            registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.admit_share = Gauge(
            "tenx_model_admit_share", "Share of their headroom sheddable and default work gets (1: all).",
            registry=r, multiprocess_mode="min",
        )  # fmt: skip
        self.sheddable_passing = Gauge(
            "tenx_model_sheddable_passing", "Fraction of sheddable requests let in while the loop is past its busy "
            "target (1: all).", registry=r, multiprocess_mode="min",
        )  # fmt: skip
        self.canary_requests = Counter(
            "tenx_model_canary_requests_total",
            "Requests scored during a canary, by side (baseline, canary) and outcome.",
            ["model", "side", "outcome"], registry=r,
        )  # fmt: skip
        self.canary_decisions = Counter(
            "tenx_model_canary_decisions_total", "Automatic canary decisions (rolled_back), by model.",
            ["model", "decision"], registry=r,
        )  # fmt: skip
        self.shadow_diff = Histogram(
            "tenx_model_shadow_score_diff", "|served score - shadow canary score| per entity.", ["model"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
        )  # fmt: skip
        self.gpu_utilization = Gauge(
            "tenx_model_gpu_utilization_ratio", "Share of time the GPU was busy (NVML), 0-1.", ["gpu"], registry=r,
            multiprocess_mode="max",
        )  # fmt: skip
        self.gpu_memory_used = Gauge(
            "tenx_model_gpu_memory_used_bytes",
            "GPU memory in use (NVML).",
            ["gpu"],
            registry=r,
            multiprocess_mode="max",
        )
        self.gpu_memory_total = Gauge(
            "tenx_model_gpu_memory_total_bytes", "GPU memory (NVML).", ["gpu"], registry=r, multiprocess_mode="max"
        )
        self.ready = Gauge(
            "tenx_model_ready", "1 when the model's session is loaded and warm.", ["model"], registry=r,
            multiprocess_mode="livemin",
        )  # fmt: skip


def exposition(metrics: ModelMetrics) -> bytes:
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return bytes(generate_latest(metrics.registry))
    from prometheus_client import multiprocess

    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=folder)  # type: ignore[no-untyped-call]
    return bytes(generate_latest(merged))
