"""GPU tests run only where cuDF and a GPU are present; elsewhere they skip, saying why."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    try:
        import cudf  # noqa: F401
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        reason = None
    except Exception as error:  # any failure means no usable GPU
        reason = f"needs an NVIDIA GPU with cuDF (pip install 'tenx[gpu]'): {type(error).__name__}: {error}"
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
