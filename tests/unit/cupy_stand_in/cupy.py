"""`import cupy` for dry runs without a GPU: `tests.unit.pipelines.cupy_like` (numpy that
refuses what CuPy refuses) plus the few `cupy.cuda` calls the GPU scripts make. Put this
folder first on PYTHONPATH; never installed, never imported by the test suite itself."""

import sys
import types

from tests.unit.pipelines import cupy_like

cupy_like.__version__ = "cpu-stand-in"  # type: ignore[attr-defined]
cupy_like.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
    runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 1, getDeviceProperties=lambda index: {"name": b"CPU stand-in (no GPU)"}
    ),
    Device=lambda index=0: types.SimpleNamespace(synchronize=lambda: None),
)
sys.modules[__name__] = cupy_like
