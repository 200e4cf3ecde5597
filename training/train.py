"""`tenx train`: a scikit-learn model on an exported training set, held out by time,
exported to ONNX and scored by ONNX Runtime (what the server will run) on the holdout.

    result = train_model(plan, Path("train.parquet"), label="buys_within_6h", kind=ModelKind.MLP)
    registry.add("buys", result.onnx, result.card, holdout=result.holdout)

The training set's manifest (written by `tenx export`) names the features and the plan
they came from; the card records them with their view versions. Missing values stay
NaN and are imputed inside the model (the medians of the training rows), so the ONNX
file is the whole model: nothing is computed outside it at serving time.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.models import FeatureRef, ModelCard
from featurestore.plan.model import Plan
from training.errors import TrainingError

INPUT = "features"
OUTPUT = "probabilities"
HOLDOUT_FRACTION = 0.2
MIN_ROWS = 50


class ModelKind(Enum):
    LOGISTIC = "logistic"  # imputer + scaler + logistic regression
    GBDT = "gbdt"  # imputer + gradient-boosted trees
    MLP = "mlp"  # imputer + scaler + 2 hidden layers of 64 (ReLU)


@dataclass(frozen=True)
class TrainResult:
    onnx: bytes
    card: ModelCard  # name, version and hash are filled in by the registry
    holdout: pa.Table  # feature columns named view:feature, then the label
    seconds: float
    rows_train: int
    rows_holdout: int
    warnings: tuple[str, ...] = field(default=())


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = Path(f"{path}.manifest.json")
    if not manifest.exists():
        raise TrainingError(
            f"{manifest} is missing: train on a file written by `tenx export --out {path.name}` "
            "(its manifest names the features and the plan they came from)"
        )
    try:
        data: dict[str, Any] = json.loads(manifest.read_text())
    except ValueError as error:
        raise TrainingError(f"{manifest} is not valid JSON: {error}") from error
    return data


def feature_columns(features: list[str], columns: list[str], exported: dict[str, str] | None = None) -> list[str]:
    """Where each `view:feature` sits in an exported file: the column its manifest names
    (`exported`), or for a manifest without that, `view__feature` when there is such a
    column, else `feature`."""
    found = []
    for reference in features:
        if exported is not None:
            column = exported.get(reference)
            if column is None or column not in columns:
                raise TrainingError(
                    f"feature {reference} is not a column of the training set (its manifest says "
                    f"{column!r}; columns: {columns}): export it again"
                )
            found.append(column)
            continue
        view, _, name = reference.partition(":")
        for candidate in (f"{view}__{name}", name):
            if candidate in columns:
                found.append(candidate)
                break
        else:
            raise TrainingError(f"feature {reference} is not a column of the training set (columns: {columns})")
    return found


def train_model(
    plan: Plan,
    training_set: Path,
    *,
    label: str,
    kind: ModelKind = ModelKind.LOGISTIC,
    time_column: str = "timestamp",
    holdout_fraction: float = HOLDOUT_FRACTION,
    seed: int = 0,
) -> TrainResult:
    """Fit on the earliest (1 - holdout_fraction) of the rows by `time_column`, evaluate
    on the latest: the holdout is the future the model will meet, never a random sample."""
    began = time.perf_counter()
    manifest = read_manifest(training_set)
    exported = manifest.get("plan_version")
    if exported is not None and exported != plan.version:
        # The card takes its view versions from `plan`: another plan's would let a model
        # trained on one definition of a view pass the skew check against another.
        raise TrainingError(
            f"{training_set.name} was exported from plan {exported}, not {plan.version}: train it with the plan "
            f"it came from (`FileRegistry(...).get({exported!r})`; `tenx train` does so), or export it again"
        )
    references: list[str] = manifest["features"]
    table = pq.read_table(training_set)
    columns = feature_columns(references, table.column_names, manifest.get("feature_columns"))
    for name, what in ((label, "label"), (time_column, "time")):
        if name not in table.column_names:
            raise TrainingError(
                f"{what} column `{name}` is not in {training_set.name} (columns: {', '.join(table.column_names)})"
            )
    if table.num_rows < MIN_ROWS:
        raise TrainingError(f"{training_set.name} has {table.num_rows} rows; training needs at least {MIN_ROWS}")
    if not 0 < holdout_fraction < 1:
        raise TrainingError(f"holdout fraction must be between 0 and 1, got {holdout_fraction}")
    order = pc.sort_indices(table, [(time_column, "ascending")])
    table = table.take(order)
    x = np.column_stack([_floats(table.column(c), c) for c in columns]).astype(np.float32)
    y = _binary(table.column(label), label)
    split = int(len(y) * (1 - holdout_fraction))
    times = table.column(time_column)
    for part, labels in (("training", y[:split]), ("holdout", y[split:])):
        if len(set(labels.tolist())) < 2:
            raise TrainingError(
                f"the {part} rows (split by `{time_column}`) hold only label {labels[0] if len(labels) else '-'}; "
                "both classes must appear in each: add labels, or change --holdout"
            )
    pipeline = _pipeline(kind, seed)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        pipeline.fit(x[:split], y[:split])
        model = _to_onnx(pipeline, x.shape[1])
    caught = sorted({f"{w.category.__name__}: {w.message}" for w in recorded})
    scores = score_onnx(model, x[split:])
    metrics = {
        "auc": roc_auc(y[split:], scores),
        "log_loss": log_loss(y[split:], scores),
        "rows_train": float(split),
        "rows_holdout": float(len(y) - split),
        "positive_rate": float(y.mean()),
    }
    refs = []
    for reference in references:
        view, _, name = reference.partition(":")
        try:
            refs.append(FeatureRef(view, name, plan.view(view).version))
        except KeyError as error:
            raise TrainingError(f"feature {reference}: view `{view}` is not in plan {plan.version}") from error
    card = ModelCard(
        name="",
        version=0,
        kind=kind.value,
        features=tuple(refs),
        label=label,
        content_hash="",
        created_at="",
        input_name=INPUT,
        output_name=OUTPUT,
        output_index=1,
        plan_version=plan.version,
        training_range=(_iso(times[0].as_py()), _iso(times[split - 1].as_py())),
        metrics=metrics,
        max_age_us=manifest.get("max_age_us"),
    )
    holdout = pa.table(
        {**{r: pa.array(x[split:, i]) for i, r in enumerate(references)}, label: pa.array(y[split:].astype(np.int8))}
    )
    return TrainResult(
        onnx=model,
        card=card,
        holdout=holdout,
        seconds=time.perf_counter() - began,
        rows_train=split,
        rows_holdout=len(y) - split,
        warnings=tuple(caught),
    )


def _iso(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else None if value is None else str(value)


def _floats(column: pa.ChunkedArray, name: str) -> np.ndarray:
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        raise TrainingError(f"feature column `{name}` is {column.type}; models take numbers (int, float or bool)")
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _binary(column: pa.ChunkedArray, name: str) -> np.ndarray:
    if column.null_count:
        raise TrainingError(f"label column `{name}` has {column.null_count} nulls; drop or fill those rows")
    values = np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False))
    distinct = set(np.unique(values).tolist())
    if not distinct <= {0.0, 1.0}:
        shown = sorted(distinct)[:5]
        raise TrainingError(f"label column `{name}` must be binary (true/false or 0/1); it holds {shown}")
    return values.astype(np.int64)


def _pipeline(kind: ModelKind, seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    impute = SimpleImputer(strategy="median", keep_empty_features=True)
    if kind is ModelKind.LOGISTIC:
        return make_pipeline(impute, StandardScaler(), LogisticRegression(max_iter=2000))
    if kind is ModelKind.GBDT:
        return make_pipeline(impute, GradientBoostingClassifier(n_estimators=150, max_depth=3, random_state=seed))
    return make_pipeline(
        impute,
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(64, 64), early_stopping=True, max_iter=300, random_state=seed),
    )


def _to_onnx(pipeline: Any, width: int) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    classifier = pipeline.steps[-1][1]
    model = to_onnx(
        pipeline,
        initial_types=[(INPUT, FloatTensorType([None, width]))],
        options={id(classifier): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return bytes(model.SerializeToString())


def score_onnx(model: bytes | str, x: np.ndarray, *, output: str = OUTPUT, index: int | None = 1) -> np.ndarray:
    """Scores of `x` by ONNX Runtime on the CPU (what `tenx train` and the variant checks measure)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    (result,) = session.run([output], {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})
    result = np.asarray(result, dtype=np.float64)
    return result[:, index] if index is not None else result.reshape(len(x))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is absent."""
    labels = np.asarray(labels)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(labels: np.ndarray, scores: np.ndarray) -> float:
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-15, 1 - 1e-15)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
