"""numpy behaving like CuPy where CPU tests can tell: an array module to pass as the
kernel's `xp`, so the cuDF backend's array code is checked without a GPU.

Modelled from CuPy's sources and behaviour:
- its arrays refuse to mix with host numpy arrays (a ufunc or function given both
  raises TypeError); `.get()` copies to the host (so do `tolist()` and iteration, as in
  CuPy; `np.asarray` of a CuPy array raises there but cannot be refused here);
- `ufunc.accumulate` exists on every ufunc but supports only add and multiply;
- `repeat` refuses an array of repeat counts (before CuPy 14).

Everything else is numpy, so results must equal the numpy kernel's exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ACCUMULATING = (np.add, np.multiply)


def _host_mixing(name: str) -> TypeError:
    return TypeError(f"Unsupported type <class 'numpy.ndarray'>: a host array mixed with a device array in {name}")


class ndarray(np.ndarray):  # noqa: N801 (CuPy's name)
    """A "device" array: numpy underneath."""

    def get(self) -> np.ndarray:
        return np.array(self.view(np.ndarray))

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method == "accumulate" and ufunc not in ACCUMULATING:
            raise NotImplementedError(f"`cupy_{ufunc.__name__}.accumulate` is not supported yet")
        if any(type(x) is np.ndarray for x in inputs):
            raise _host_mixing(ufunc.__name__)
        if "out" in kwargs:
            kwargs["out"] = tuple(_host(o) for o in kwargs["out"])
        return _device(getattr(ufunc, method)(*_host(inputs), **kwargs))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        _refuse_host(args, func.__name__)
        return _device(func(*_host(args), **_host(kwargs)))


def _refuse_host(value: Any, name: str) -> None:
    if type(value) is np.ndarray:
        raise _host_mixing(name)
    if isinstance(value, list | tuple):
        for item in value:
            _refuse_host(item, name)


def _host(value: Any) -> Any:
    if isinstance(value, ndarray):
        return value.view(np.ndarray)
    if isinstance(value, list | tuple):
        return type(value)(_host(item) for item in value)
    if isinstance(value, dict):
        return {key: _host(item) for key, item in value.items()}
    return value


def _device(value: Any) -> Any:
    if type(value) is np.ndarray:
        return value.view(ndarray)
    if isinstance(value, tuple):
        return tuple(_device(item) for item in value)
    return value


class _Ufunc:
    def __init__(self, ufunc: np.ufunc) -> None:
        self.ufunc = ufunc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _device(self.ufunc(*_host(args), **_host(kwargs)))

    def accumulate(self, *args: Any, **kwargs: Any) -> Any:
        if self.ufunc not in ACCUMULATING:
            raise NotImplementedError(f"`cupy_{self.ufunc.__name__}.accumulate` is not supported yet")
        return _device(self.ufunc.accumulate(*_host(args), **_host(kwargs)))

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return _device(self.ufunc.reduce(*_host(args), **_host(kwargs)))


def _function(name: str) -> Any:
    function = getattr(np, name)

    def on_device(*args: Any, **kwargs: Any) -> Any:
        return _device(function(*_host(args), **_host(kwargs)))

    on_device.__name__ = name
    return on_device


def __getattr__(name: str) -> Any:
    value = getattr(np, name)
    if isinstance(value, np.ufunc):
        return _Ufunc(value)
    if callable(value) and not isinstance(value, type):
        return _function(name)
    return value  # dtypes, constants


def asarray(value: Any, dtype: Any = None) -> ndarray:
    if isinstance(value, ndarray):
        return value if dtype is None else value.astype(dtype)
    return np.array(value, dtype=dtype).view(ndarray)


array = asarray


def asnumpy(value: Any) -> np.ndarray:
    return value.get() if isinstance(value, ndarray) else np.asarray(value)


def repeat(value: Any, repeats: Any, axis: int | None = None) -> Any:
    if isinstance(repeats, np.ndarray):
        raise ValueError("cupy.ndarray cannot be specified as `repeats` argument.")
    return _device(np.repeat(_host(value), repeats, axis))
