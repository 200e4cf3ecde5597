"""Where a model runs, decided from the providers ONNX Runtime has (the GPU path's
choices, rehearsed on the CPU; tests/gpu runs them on a device)."""

from __future__ import annotations

from featurestore.models import Precision, Variant
from serving.models.runtime import place

ACCEPTED = {Precision.FP16: Variant(Precision.FP16, accepted=True, reason="ok")}
REFUSED = {Precision.FP16: Variant(Precision.FP16, accepted=False, reason="refused: ...")}


def test_tensorrt_then_cuda_then_cpu() -> None:
    trt = place(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], requested=None,
                variants=ACCEPTED)  # fmt: skip
    assert trt.device == "tensorrt"
    assert trt.providers[0] == ("TensorrtExecutionProvider", {"trt_fp16_enable": True})
    assert trt.precision is Precision.FP16
    cuda = place(["CUDAExecutionProvider", "CPUExecutionProvider"], requested=None, variants=ACCEPTED)
    assert (cuda.device, cuda.providers, cuda.precision) == (
        "cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), Precision.FP16
    )  # fmt: skip
    cpu = place(["CPUExecutionProvider"], requested=None, variants=ACCEPTED)
    assert (cpu.device, cpu.precision) == ("cpu", Precision.FP32)


def test_fp16_only_when_its_variant_passed_and_an_explicit_precision_wins() -> None:
    assert place(["CUDAExecutionProvider"], requested=None, variants=REFUSED).precision is Precision.FP32
    assert place(["CUDAExecutionProvider"], requested=Precision.FP32, variants=ACCEPTED).precision is Precision.FP32
    assert place(["CPUExecutionProvider"], requested=Precision.INT8, variants={}).precision is Precision.INT8
    assert place(["CUDAExecutionProvider"], requested=None, variants=ACCEPTED, prefer_gpu=False).device == "cpu"
