"""What users write: entities, sources, windows, aggregations and `@feature_view`."""

from featurestore.definitions.aggregations import (
    AGGREGATIONS,
    Aggregation,
    Count,
    Last,
    Latest,
    Max,
    Mean,
    Min,
    Std,
    Sum,
    Window,
)
from featurestore.definitions.entity import Entity
from featurestore.definitions.source import Source
from featurestore.definitions.view import FeatureView, feature_view

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "Count",
    "Entity",
    "FeatureView",
    "Last",
    "Latest",
    "Max",
    "Mean",
    "Min",
    "Source",
    "Std",
    "Sum",
    "Window",
    "feature_view",
]
