"""Errors raised by serving.

TenxError (schemas.errors)
├── TerminalError
│   ├── UnknownFeatureError     a requested view or feature is not in the plan
│   └── FeatureReferenceError   a `view:feature` reference is malformed or names another view (a ValueError)
└── TransientError              the online store did not answer in time (retry)
"""

from __future__ import annotations

from featurestore.errors import TerminalError, TransientError

__all__ = ["FeatureReferenceError", "TransientError", "UnknownFeatureError"]


class UnknownFeatureError(TerminalError, KeyError):
    """A requested feature view or feature does not exist in the loaded plan."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown feature"


class FeatureReferenceError(TerminalError, ValueError):
    """A feature reference is not `view:feature`, or one request names several views:
    the request is malformed, whatever the plan holds."""
