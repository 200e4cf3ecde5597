"""ONNX Runtime sessions: one per deployed model version, run on a dedicated thread.

The provider is chosen from what this ONNX Runtime build has: TensorRT (with FP16),
then CUDA, then the CPU. The precision is the deployment's (`tenx models deploy
--precision`), else FP16 on a GPU when the version has an accepted FP16 variant, else
FP32. Every run reports its device time (CPU time of the runtime thread on the CPU,
wall time on a GPU): the per-batch figure cost attribution splits over requests.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.models import ModelCard, Precision, Variant

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" | "cuda" | "tensorrt"
    providers: tuple[Any, ...]
    precision: Precision


def place(
    available: list[str],
    *,
    requested: Precision | None,
    variants: dict[Precision, Variant],
    prefer_gpu: bool = True,
) -> Placement:
    """Pure: the device, providers and precision for a model version."""
    fp16_ok = Precision.FP16 in variants and variants[Precision.FP16].accepted
    if prefer_gpu and "TensorrtExecutionProvider" in available:
        precision = requested or (Precision.FP16 if fp16_ok else Precision.FP32)
        trt = ("TensorrtExecutionProvider", {"trt_fp16_enable": precision is Precision.FP16})
        return Placement("tensorrt", (trt, "CUDAExecutionProvider", "CPUExecutionProvider"), precision)
    if prefer_gpu and "CUDAExecutionProvider" in available:
        precision = requested or (Precision.FP16 if fp16_ok else Precision.FP32)
        return Placement("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), precision)
    return Placement("cpu", ("CPUExecutionProvider",), requested or Precision.FP32)


class Runtime:
    """A warm ONNX Runtime session and the one thread that runs it."""

    def __init__(
        self,
        card: ModelCard,
        model_path: Path,
        placement: Placement,
        *,
        intra_op_threads: int = 1,
    ) -> None:
        import onnxruntime as ort

        self.card = card
        self.placement = placement
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=list(placement.providers))
        used = self.session.get_providers()
        if placement.device != "cpu" and used[0] == "CPUExecutionProvider":
            self.placement = Placement("cpu", ("CPUExecutionProvider",), placement.precision)
        self._input = card.input_name
        self._outputs = [card.output_name]
        self._index = card.output_index
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnx-{card.ref}")
        self.device_seconds = 0.0
        self.batches = 0

    @property
    def device(self) -> str:
        return self.placement.device

    @property
    def precision(self) -> Precision:
        return self.placement.precision

    def score(self, matrix: np.ndarray) -> tuple[np.ndarray, float]:
        """Scores of `matrix` (rows x inputs, float32) and the device seconds spent;
        runs on the caller's thread (the server calls it through `submit`)."""
        on_cpu = self.placement.device == "cpu"
        began = time.thread_time() if on_cpu else time.perf_counter()
        (output,) = self.session.run(self._outputs, {self._input: matrix})
        spent = (time.thread_time() if on_cpu else time.perf_counter()) - began
        scores = np.asarray(output)
        scores = scores[:, self._index] if self._index is not None else scores.reshape(len(matrix))
        self.device_seconds += spent
        self.batches += 1
        return scores, spent

    def submit(self, matrix: np.ndarray) -> concurrent.futures.Future[tuple[np.ndarray, float]]:
        return self._thread.submit(self.score, matrix)

    def warm(self, max_rows: int) -> None:
        """Run every batch size class once so the first requests pay no allocation or
        kernel selection (CUDA/TensorRT build engines on first use)."""
        width = len(self.card.features)
        for rows in sorted({1, 8, 32, max_rows}):
            self.submit(np.zeros((rows, width), dtype=np.float32)).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
