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
from featurestore.errors import CompileError, CompileProblem, ConfigError, TenxError
from featurestore.plan import Plan, compile_definitions, compile_repo

__all__ = [
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
    "Source",
    "Std",
    "Sum",
    "TenxError",
    "Window",
    "compile_definitions",
    "compile_repo",
    "feature_view",
]
