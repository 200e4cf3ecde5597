"""Compiling feature definitions into a frozen, versioned, JSON-serialisable Plan."""

from featurestore.plan.code import load as load_code
from featurestore.plan.compile import compile_definitions, compile_repo
from featurestore.plan.diff import Change, ChangeKind, diff_plans
from featurestore.plan.model import (
    AS_OF,
    CodeSpec,
    EntitySpec,
    FeatureSpec,
    Plan,
    SourceSpec,
    ViewSpec,
    WindowSpec,
)

__all__ = [
    "AS_OF",
    "Change",
    "ChangeKind",
    "CodeSpec",
    "EntitySpec",
    "FeatureSpec",
    "Plan",
    "SourceSpec",
    "ViewSpec",
    "WindowSpec",
    "compile_definitions",
    "compile_repo",
    "diff_plans",
    "load_code",
]
