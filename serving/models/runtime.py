"""ONNX Runtime sessions: one per deployed model version, run on a dedicated thread.

The provider is chosen from what this ONNX Runtime build has: TensorRT (with FP16),
then CUDA, then the CPU. The precision is the deployment's (`tenx models deploy
--precision`), else FP16 on a GPU when the version has an accepted FP16 variant, else
FP32. Every run reports its device time (CPU time of the runtime thread on the CPU,
wall time on a GPU): the per-batch figure cost attribution splits over requests.

A run goes to the session's own thread so that a model that stalls holds up only its
own batches: the server stops waiting at the inference timeout and answers from the
fallbacks while the event loop serves everyone else. That hand-off costs about 140 us
of CPU per batch on the server's 2-core bench machine (a thread wake-up each way, the
futures, the loop's wake-up), while the bench's 20-64-64-1 MLP runs 10 rows in 9 us.
So a session on the CPU whose last `QUICK_RUNS` runs each took under `inline_run_s`
(200 us by default) runs on the caller's thread instead (`quick`), batches no bigger
than the largest of its last 32-64 runs; one slow run sends it back to its thread until
`QUICK_RUNS` quick runs there again. The streak is counted as runs end, so asking costs
a few attribute reads per batch. A GPU session always keeps its thread (a device
can hang), as does any session with `inline_run_s` 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.models import ModelCard, Precision, Variant
from serving.errors import ModelUnavailable

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
QUICK_RUNS = 32  # runs a session must have kept under inline_run_s before it runs inline
INLINE_RUN_S = 0.0002  # about what the hand-off to the session's thread costs


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
        inline_run_s: float = INLINE_RUN_S,
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
        self.inline_run_s = inline_run_s  # inline runs (the module docstring): the CPU provider only
        # The verdict `quick` reads, kept as runs end: how many runs in a row were quick
        # (under inline_run_s of CPU and ten times that of wall time), and the most rows
        # one of them had in this block of QUICK_RUNS runs and in the block before (so
        # the evidence is the last 32-64 runs: the warm-up's max-size batch drops out).
        # Either thread may update them; a lost update only delays the verdict by a run.
        self._quick_streak = 0
        self._rows_now = 0
        self._rows_before = 0
        self.inline_batches = 0

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
        started = time.perf_counter()
        began = time.thread_time() if on_cpu else started
        (output,) = self.session.run(self._outputs, {self._input: matrix})
        ended = time.perf_counter()
        spent = (time.thread_time() if on_cpu else ended) - began
        scores = np.asarray(output)
        scores = scores[:, self._index] if self._index is not None else scores.reshape(len(matrix))
        self.device_seconds += spent
        self.batches += 1
        limit = self.inline_run_s
        if spent < limit and ended - started < 10 * limit:
            self._quick_streak += 1
            self._rows_now = max(self._rows_now, len(matrix))
            if self._quick_streak % QUICK_RUNS == 0:
                self._rows_before, self._rows_now = self._rows_now, 0
        else:
            self._quick_streak = self._rows_now = self._rows_before = 0
        return scores, spent

    def quick(self, rows: int) -> bool:
        """Whether a run of `rows` rows may go on the caller's thread: a CPU session whose
        last QUICK_RUNS runs (at least) each took under `inline_run_s` of CPU and under ten
        times that of wall time (a run that waited, for the GIL or anything else, counts
        against it), one of them with at least this many rows."""
        if (
            self.inline_run_s <= 0 or self.placement.device != "cpu"
        ):  # a device can hang: a GPU session keeps its thread
            return False
        return self._quick_streak >= QUICK_RUNS and rows <= max(self._rows_before, self._rows_now)

    def score_inline(self, matrix: np.ndarray) -> tuple[np.ndarray, float]:
        """`score` on the caller's thread (the server asks `quick` first)."""
        self.inline_batches += 1
        return self.score(matrix)

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


async def on_thread(submitted: concurrent.futures.Future[Any], timeout_s: float) -> Any:
    """The result of work running on another thread, or TimeoutError after `timeout_s`
    (the work goes on; nothing waits for it). What `wait_for(shield(wrap_future(f)))`
    does, in one hand-off to the loop instead of four chained futures: under load each
    hand-off waits a whole turn of a busy loop (measured: 58 -> 25 us of loop CPU and
    138 -> 98 us from submit to result, idle)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()

    def settle(done: concurrent.futures.Future[Any]) -> None:
        if waiter.done():
            return
        if done.cancelled():
            waiter.set_exception(ModelUnavailable("the model's run was cancelled"))
        elif (error := done.exception()) is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(done.result())

    def expire() -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    def relay(done: concurrent.futures.Future[Any]) -> None:  # on the runtime's thread
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, done)

    submitted.add_done_callback(relay)
    timer = loop.call_later(timeout_s, expire)
    try:
        return await waiter
    finally:
        timer.cancel()


class ThreadDemand:
    """How long the thread that made it wanted a CPU, in seconds: its time running plus
    its time waiting on the run queue (Linux's /proc/.../schedstat), or its CPU time
    alone where there is no schedstat.

    CPU time over wall time says how busy an event loop is only while it has a core to
    itself. When other processes on the machine (a front, Redis, the load) take the
    cores, the loop waits runnable with a queue of ready work, and its CPU share falls
    as the wait grows: a busy share read from CPU time alone would then let more work
    in exactly when the loop is furthest behind (measured: 3x load behind tenx-front)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            self._fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
            self._read(self._fd)

    @staticmethod
    def _read(fd: int) -> float:
        running_ns, waiting_ns = os.pread(fd, 128, 0).split()[:2]
        return (int(running_ns) + int(waiting_ns)) / 1e9

    def seconds(self) -> float:
        fd = self._fd
        if fd is None:
            return time.thread_time()
        return self._read(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
