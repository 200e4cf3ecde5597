"""tenx feature store core: definitions, the compiled Plan, registry and settings.

Users write definitions with the names exported here; `tenx plan` compiles them.
"""

from featurestore.definitions import (
    Count,
    Entity,
    FeatureView,
    Last,
    Latest,
    Max,
    Mean,
    Min,
    Source,
    Std,
    Sum,
    Window,
    feature_view,
)
from featurestore.definitions.route import CACHE, Route, route
from featurestore.errors import CompileError, CompileProblem, ConfigError, TenxError
from featurestore.plan import Plan, compile_definitions, compile_repo

__all__ = [
    "CACHE",
    "CompileError",
    "CompileProblem",
    "ConfigError",
    "Count",
    "Entity",
    "FeatureView",
    "Last",
    "Latest",
    "Max",
    "Mean",
    "Min",
    "Plan",
    "Route",
    "Source",
    "Std",
    "Sum",
    "TenxError",
    "Window",
    "compile_definitions",
    "compile_repo",
    "feature_view",
    "route",
]
