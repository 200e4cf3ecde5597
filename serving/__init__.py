"""Serving: lookups of precomputed feature values (client, HTTP API). Nothing is computed here."""

from serving.client import AsyncFeatureClient, FeatureClient, FeatureResult, Status
from serving.errors import FeatureReferenceError, UnknownFeatureError

__all__ = [
    "AsyncFeatureClient",
    "FeatureClient",
    "FeatureReferenceError",
    "FeatureResult",
    "Status",
    "UnknownFeatureError",
]
