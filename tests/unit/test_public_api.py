"""The public API of each package is its `__all__`; changing it is a decision, made here."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "schemas": [
        "SUPPORTED",
        "TIMESTAMP_UTC",
        "TRANSACTIONS",
        "BatchValidation",
        "EventSchema",
        "Field",
        "Problem",
        "RecordsValidation",
        "SchemaError",
        "SourceLocation",
        "ValidationError",
        "dtype_name",
        "parse_dtype",
        "validate_batch",
        "validate_record",
        "validate_records",
    ],
    "featurestore": [
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
    ],
    "featurestore.plan": [
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
    ],
    "pipelines": ["reference_changelog"],
    "serving.models": [
        "AdaptiveThrottle",
        "AsyncModelClient",
        "ModelClient",
        "ModelServer",
        "ModelServerSettings",
        "Prediction",
        "Priority",
        "create_model_app",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_pinned(module: str) -> None:
    imported = importlib.import_module(module)
    assert sorted(imported.__all__) == sorted(PUBLIC[module])
    for name in imported.__all__:
        assert hasattr(imported, name), f"{module}.{name} is exported but missing"


def test_importing_does_no_work() -> None:
    """Nothing happens at import time: no GPU, Kafka, Redis or Dask module is loaded."""
    import subprocess
    import sys

    code = (
        "import sys, featurestore, pipelines, schemas, serving, serving.models, training, tenx.cli\n"
        "heavy = [m for m in ('cudf', 'torch', 'confluent_kafka', 'redis', 'distributed', 'bytewax', 'onnxruntime',"
        " 'sklearn', 'onnx')"
        " if m in sys.modules]\n"
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
