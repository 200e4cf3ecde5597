"""The model server: entity ids in, predictions out, on precomputed feature lookups.

The path of a request, one module each: `app` (HTTP) -> `server` (routes, queues, batch
loops, watcher) -> `batcher` (per-class bounded queue) -> `vectors` (packed values ->
model inputs, missing/stale policy) -> `runtime` (ONNX Runtime session on its own
thread). Around it: `admission` (who gets in: headroom by class, adaptive limits,
quotas), `breaker` (a circuit per dependency), `cache` (exact prediction cache),
`canary` (sticky split and the judge), `policies` (the Guard protocol), `metrics`
(Prometheus, multi-process), `client` (ModelClient, with client-side throttling).
"""

from serving.models.app import create_model_app
from serving.models.batcher import Priority
from serving.models.client import AdaptiveThrottle, AsyncModelClient, ModelClient, Prediction
from serving.models.server import ModelServer, ModelServerSettings

__all__ = [
    "AdaptiveThrottle",
    "AsyncModelClient",
    "ModelClient",
    "ModelServer",
    "ModelServerSettings",
    "Prediction",
    "Priority",
    "create_model_app",
]
