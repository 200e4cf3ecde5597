"""Precision variants of a model version, made at deploy time and checked on its holdout.

FP16 (for GPU providers): the float arithmetic of the graph (MatMul, Gemm, Add, ...)
runs in half precision; inputs, outputs and the ML-domain operators (imputer, scaler,
tree ensembles) stay FP32, with casts at the borders. INT8 (for the CPU provider): ONNX
Runtime's dynamic quantization of the weights of MatMul/Gemm.

Each variant's holdout AUC and its largest absolute score difference from FP32 are
measured with ONNX Runtime and stored on the version; a variant whose AUC drops by
more than `max_auc_drop` (default 0.005) is refused with the numbers. A graph with
nothing to lower (a tree ensemble, a linear classifier in the ML domain) gets no
variant, and says so.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from featurestore.models import MAX_AUC_DROP, ModelCard, ModelRegistry, Precision, Variant
from training.train import roc_auc, score_onnx

# Operators whose FP16 kernels exist on CUDA and the CPU provider alike.
_HALF_SAFE = frozenset({"MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh"})
_QUANTIZED = frozenset({"MatMul", "Gemm"})


def to_float16(model: bytes) -> bytes | None:
    """The model with its half-safe float operators in FP16; None when none qualifies."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph_model = onnx.shape_inference.infer_shapes(onnx.load_from_string(model))
    graph = graph_model.graph
    types: dict[str, int] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        types[info.name] = info.type.tensor_type.elem_type
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    floating = TensorProto.FLOAT

    def lowerable(node: Any) -> bool:
        return (
            node.domain in ("", "ai.onnx")
            and node.op_type in _HALF_SAFE
            and all(types.get(name) == floating for name in [*node.input, *node.output] if name)
        )

    region = [node for node in graph.node if lowerable(node)]
    if not any(node.op_type in _QUANTIZED for node in region):
        return None
    inside = {id(node) for node in region}
    renamed = {output: f"{output}__fp16" for node in region for output in node.output}
    consumers_outside = {name for node in graph.node if id(node) not in inside for name in node.input}
    graph_outputs = {output.name for output in graph.output}
    halved: dict[str, str] = {}
    new_initializers = []
    nodes = []
    for node in graph.node:
        if id(node) not in inside:
            nodes.append(node)
            continue
        inputs = []
        for name in node.input:
            if not name or name in renamed:
                inputs.append(renamed.get(name, name))
                continue
            if name not in halved:
                halved[name] = f"{name}__fp16"
                if name in initializers:
                    array = numpy_helper.to_array(initializers[name]).astype(np.float16)
                    new_initializers.append(numpy_helper.from_array(array, halved[name]))
                else:
                    nodes.append(helper.make_node("Cast", [name], [halved[name]], to=TensorProto.FLOAT16))
            inputs.append(halved[name])
        lowered = helper.make_node(
            node.op_type, inputs, [renamed[o] for o in node.output], name=node.name, domain=node.domain
        )
        lowered.attribute.extend(node.attribute)
        nodes.append(lowered)
        for output in node.output:
            if output in consumers_outside or output in graph_outputs:
                nodes.append(helper.make_node("Cast", [renamed[output]], [output], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    used = {name for node in graph.node for name in node.input}
    keep = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    onnx.checker.check_model(graph_model)
    return bytes(graph_model.SerializeToString())


def to_int8(model: bytes) -> bytes | None:
    """Dynamic INT8 quantization of MatMul/Gemm weights; None when the graph has none."""
    import onnx

    if not any(
        n.op_type in _QUANTIZED and n.domain in ("", "ai.onnx") for n in onnx.load_from_string(model).graph.node
    ):
        return None
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tenx-int8-") as folder, _without_preprocessing_advice():
        source, target = Path(folder, "model.onnx"), Path(folder, "model.int8.onnx")
        source.write_bytes(model)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=sorted(_QUANTIZED))
        return target.read_bytes()


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """ONNX Runtime's quantizer logs, on the root logger, advice to pre-process image
    models; for these small tabular graphs it does not apply, and the AUC check says
    whether the variant is good. Only that record is dropped."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


_MAKERS = {Precision.FP16: to_float16, Precision.INT8: to_int8}


def check_variant(
    precision: Precision,
    variant: bytes | None,
    *,
    baseline: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    card: ModelCard,
    max_auc_drop: float = MAX_AUC_DROP,
) -> Variant:
    """Score the variant on the holdout and judge it against the FP32 scores."""
    if variant is None:
        return Variant(precision, accepted=False, reason="nothing to lower in this graph (no MatMul/Gemm)")
    try:
        scores = score_onnx(variant, x, output=card.output_name, index=card.output_index)
    except Exception as error:  # noqa: BLE001 - a variant ONNX Runtime cannot run is refused, with why
        return Variant(precision, accepted=False, reason=f"ONNX Runtime cannot run it on this machine: {error}")
    auc, base_auc = roc_auc(y, scores), roc_auc(y, baseline)
    delta = auc - base_auc
    diff = float(np.max(np.abs(scores - baseline))) if len(x) else 0.0
    accepted = bool(delta >= -max_auc_drop)
    reason = (
        f"holdout AUC {auc:.4f} vs {base_auc:.4f} in FP32 (delta {delta:+.4f}, limit -{max_auc_drop}); "
        f"max |score difference| {diff:.2e} over {len(x):,} rows"
    )
    return Variant(
        precision,
        accepted=accepted,
        reason=reason if accepted else "refused: " + reason,
        auc=auc,
        auc_delta=delta,
        max_abs_diff=diff,
    )


def make_variants(
    registry: ModelRegistry,
    name: str,
    version: int,
    *,
    precisions: Sequence[Precision] = (Precision.FP16, Precision.INT8),
    max_auc_drop: float = MAX_AUC_DROP,
) -> list[Variant]:
    """Make, check and store each variant of `name@version` (its file only when accepted)."""
    card = registry.card(name, version)
    holdout_path = registry.holdout_path(name, version)
    results = []
    if holdout_path is None:
        for precision in precisions:
            results.append(
                Variant(
                    precision,
                    accepted=False,
                    reason="no holdout to check it on (add the model with --holdout FILE --label COLUMN)",
                )
            )
        registry.write_variants(name, version, results)
        return results
    holdout = pq.read_table(holdout_path)
    x = np.column_stack(
        [
            np.asarray(holdout.column(r).to_numpy(zero_copy_only=False), dtype=np.float32)
            for r in card.feature_references
        ]
    )
    y = np.asarray(holdout.column(card.label).to_numpy(zero_copy_only=False), dtype=np.int64) if card.label else None
    model = registry.model_path(name, version).read_bytes()
    baseline = score_onnx(model, x, output=card.output_name, index=card.output_index)
    for precision in precisions:
        variant_bytes = _MAKERS[precision](model)
        if y is None:
            result = Variant(precision, accepted=False, reason="the holdout has no label column to measure AUC")
        else:
            result = check_variant(
                precision, variant_bytes, baseline=baseline, x=x, y=y, card=card, max_auc_drop=max_auc_drop
            )
        if result.accepted and variant_bytes is not None:
            path = registry.model_path(name, version, precision)
            path.write_bytes(variant_bytes)
            result = Variant(**{**result.__dict__, "file": path.name})
        results.append(result)
    registry.write_variants(name, version, results)
    return results
