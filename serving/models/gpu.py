"""GPU utilisation and memory for /metrics, through NVIDIA's management library
(nvidia-ml-py, `pip install nvidia-ml-py`) when it and a GPU are there; nothing otherwise.
Read at scrape time, once per device: a few microseconds each."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tenx.models")


class GpuMonitor:
    def __init__(self, nvml: Any = None) -> None:
        """`nvml`: the pynvml module (tests pass a stand-in); imported when None."""
        self.nvml = nvml
        self.handles: list[Any] = []
        if nvml is None:
            try:
                import pynvml as nvml  # type: ignore[import-not-found, no-redef]
            except ImportError:
                return
            self.nvml = nvml
        try:
            self.nvml.nvmlInit()
            self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self.nvml.nvmlDeviceGetCount())]
        except Exception as error:  # noqa: BLE001 - NVMLError: no driver, no device
            log.info("no GPU metrics: %s", error)
            self.handles = []

    def export(self, metrics: Any) -> None:
        for index, handle in enumerate(self.handles):
            try:
                utilization = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as error:  # noqa: BLE001 - a device that went away: skip it this scrape
                log.debug("GPU %d not read: %s", index, error)
                continue
            gpu = str(index)
            metrics.gpu_utilization.labels(gpu).set(utilization.gpu / 100)
            metrics.gpu_memory_used.labels(gpu).set(memory.used)
            metrics.gpu_memory_total.labels(gpu).set(memory.total)


class NoNvml:
    """No GPU metrics (`--cpu`)."""

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's name
        raise RuntimeError("the server runs on the CPU (--cpu)")
