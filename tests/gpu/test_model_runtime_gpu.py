"""The model server's runtime on a GPU: the CUDA (and TensorRT, where built in)
provider chosen over the CPU, FP32 scores equal to the CPU's, FP16 within the variant
tolerance. Needs onnxruntime-gpu with a CUDA provider; skips saying so elsewhere. The
same code runs on the CPU provider in tests/unit/serving (the rehearsal)."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip(
        f"needs onnxruntime-gpu with the CUDA provider (available: {', '.join(ort.get_available_providers())})",
        allow_module_level=True,
    )

from featurestore.models import FeatureRef, ModelCard, Precision, Variant  # noqa: E402
from serving.models.runtime import Runtime, place  # noqa: E402
from training.variants import to_float16  # noqa: E402

WIDTH = 20


def mlp() -> bytes:
    """A 20-64-64-1 MLP with sigmoid output, weights seeded."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        rng.normal(size=s).astype(np.float32) * 0.3 for s in ((WIDTH, 64), (64,), (64, 64), (64,), (64, 1), (1,))
    ]
    names = ["w1", "b1", "w2", "b2", "w3", "b3"]
    nodes = [
        helper.make_node("MatMul", ["features", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["h3"]),
        helper.make_node("Add", ["h3", "b3"], ["a3"]),
        helper.make_node("Sigmoid", ["a3"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, names, strict=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


CARD = ModelCard(
    name="gpu",
    version=1,
    kind="mlp",
    features=tuple(FeatureRef("v", f"f{i}", "0") for i in range(WIDTH)),
    label=None,
    content_hash="",
    created_at="",
    input_name="features",
    output_name="score",
    output_index=None,
)


def test_cuda_is_chosen_and_fp32_scores_equal_the_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.onnx"
    path.write_bytes(mlp())
    x = np.random.default_rng(1).normal(size=(256, WIDTH)).astype(np.float32)
    gpu_place = place(ort.get_available_providers(), requested=Precision.FP32, variants={})
    assert gpu_place.device in ("cuda", "tensorrt")
    gpu = Runtime(CARD, path, gpu_place)
    cpu = Runtime(CARD, path, place(["CPUExecutionProvider"], requested=None, variants={}))
    gpu.warm(256)
    assert gpu.session.get_providers()[0] != "CPUExecutionProvider"
    scores, spent = gpu.submit(x).result()
    expected, _ = cpu.submit(x).result()
    assert np.max(np.abs(scores - expected)) <= 1e-5
    assert spent > 0


def test_fp16_on_the_gpu_is_within_the_variant_tolerance(tmp_path) -> None:  # type: ignore[no-untyped-def]
    half = to_float16(mlp())
    assert half is not None
    (tmp_path / "model.onnx").write_bytes(mlp())
    (tmp_path / "model.fp16.onnx").write_bytes(half)
    accepted = {Precision.FP16: Variant(Precision.FP16, accepted=True, reason="test")}
    placement = place(ort.get_available_providers(), requested=None, variants=accepted)
    assert placement.precision is Precision.FP16  # auto: FP16 on a GPU when its variant passed
    gpu = Runtime(CARD, tmp_path / "model.fp16.onnx", placement)
    cpu = Runtime(CARD, tmp_path / "model.onnx", place(["CPUExecutionProvider"], requested=None, variants={}))
    x = np.random.default_rng(2).normal(size=(128, WIDTH)).astype(np.float32)
    scores, _ = gpu.submit(x).result()
    expected, _ = cpu.submit(x).result()
    assert np.max(np.abs(scores - expected)) <= 1e-2
