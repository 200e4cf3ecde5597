"""GPU tests run only where a GPU is present; elsewhere they skip, saying why.

Two levels: most tests need CuPy and a device (the kernel's array code on GPU, pandas
frames on the host: what the lent GPU machines' images hold); tests marked `cudf` need
RAPIDS cuDF as well (the full `--backend cudf` path)."""

from __future__ import annotations

import pytest


def _missing(check: str) -> str | None:
    try:
        if check == "cudf":
            import cudf  # noqa: F401
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # any failure means the test cannot run here
        return f"{type(error).__name__}: {error}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reasons: dict[str, str | None] = {}
    for item in items:
        if "tests/gpu/" not in str(item.fspath).replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.gpu)
        if item.path.name == "test_model_runtime_gpu.py":
            continue  # needs onnxruntime-gpu, not CuPy: the module skips itself, saying so
        check = "cudf" if item.get_closest_marker("cudf") else "cupy"
        if check not in reasons:
            reasons[check] = _missing(check)
        if reasons[check]:
            need = "an NVIDIA GPU with cuDF (pip install 'tenx[gpu]')" if check == "cudf" else "an NVIDIA GPU with CuPy"
            item.add_marker(pytest.mark.skip(reason=f"needs {need}: {reasons[check]}"))
