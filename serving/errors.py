"""Errors raised by serving.

TenxError (schemas.errors)
├── TerminalError
│   ├── UnknownFeatureError     a requested view or feature is not in the plan
│   ├── FeatureReferenceError   a `view:feature` reference is malformed or names another view (a ValueError)
│   ├── UnknownModelError       the model server serves no model of that name (HTTP 404)
│   └── SkewError               the model was trained on other view versions than the plan holds (HTTP 409;
│                               featurestore.models)
└── TransientError              the online store did not answer in time (retry)
    ├── ModelUnavailable        the model is loading, or its load failed (HTTP 503)
    ├── Overloaded              shed: no room for the request's class, or pushed out by critical work
    │                           (HTTP 503, Retry-After)
    ├── QuotaExceeded           the tenant is over its quota (HTTP 429, Retry-After)
    └── DeadlineExceeded        the request's deadline passed before it was scored (HTTP 504)
"""

from __future__ import annotations

from featurestore.errors import TerminalError, TransientError
from featurestore.models import SkewError

__all__ = [
    "DeadlineExceeded",
    "FeatureReferenceError",
    "ModelUnavailable",
    "Overloaded",
    "QuotaExceeded",
    "SkewError",
    "TransientError",
    "UnknownFeatureError",
    "UnknownModelError",
]


class UnknownFeatureError(TerminalError, KeyError):
    """A requested feature view or feature does not exist in the loaded plan."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown feature"


class FeatureReferenceError(TerminalError, ValueError):
    """A feature reference is not `view:feature`, or one request names several views:
    the request is malformed, whatever the plan holds."""


class UnknownModelError(TerminalError):
    """No model of that name is served; the message names the ones that are."""


class ModelUnavailable(TransientError):
    """The model is not ready to score (loading, or its last load failed)."""


class Overloaded(TransientError):
    """Shed before any work: the model's queue has no room for the request's priority
    class (or the tenant's fair share of it), or critical work pushed it out."""


class QuotaExceeded(TransientError):
    """The tenant is over its quota; `retry_after_s` says when its bucket holds enough."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TransientError):
    """The request's deadline passed before it was scored; no work was spent on it."""
