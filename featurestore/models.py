"""The model registry: ONNX model versions with their cards, beside the plan registry.

Layout under `<registry>/models/<name>/`:

    versions/<n>/model.onnx       the FP32 model, as trained or added; immutable
    versions/<n>/card.json        what it was trained on and how well it did; immutable
    versions/<n>/holdout.parquet  the holdout rows (features + label), when known
    versions/<n>/variants.json    FP16 / INT8 variants made at deploy, with their checks
    versions/<n>/model.<p>.onnx   those variants' files
    deployed.json                 the version (and precision) served under the name
    history.jsonl                 one line per deploy

Versions are numbered 1, 2, ... per name. Adding a model whose ONNX bytes are already
a version of that name returns that version (idempotent). A card names each feature
with the view version it was trained on: a server refuses to serve it from a plan
holding another version (the training/serving skew guard, `check_views`). Servers
watch `deployed.json` and switch to a new version once its session is warm.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from featurestore.errors import RegistryError, TerminalError
from featurestore.plan.model import Plan
from featurestore.registry import atomic_write

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
MAX_AUC_DROP = 0.005  # a precision variant losing more holdout AUC than this is refused


class SkewError(TerminalError):
    """A model was trained on feature view versions the applied plan no longer holds."""


class Precision(Enum):
    FP32 = "fp32"
    FP16 = "fp16"  # for GPU providers (CUDA, TensorRT)
    INT8 = "int8"  # ONNX Runtime dynamic quantization, for the CPU provider


class MissingPolicy(Enum):
    """What the server does with an entity the online store has no value for."""

    EMPTY_WINDOW = "empty_window"  # score it on empty-window values (Count/Sum 0, others NaN), as the export did
    REFUSE = "refuse"  # no score for that entity


class StalePolicy(Enum):
    """What the server does with a value older than its view's ttl."""

    SERVE = "serve"  # score it; the entity's status says `stale`
    REFUSE = "refuse"  # no score for that entity


@dataclass(frozen=True)
class FeatureRef:
    view: str
    feature: str
    view_version: str

    @property
    def reference(self) -> str:
        return f"{self.view}:{self.feature}"


@dataclass(frozen=True)
class ModelCard:
    """What a model version is: its inputs in order and where they came from, its
    training range and holdout metrics, and how the server treats missing values."""

    name: str
    version: int
    kind: str  # logistic | gbdt | mlp | onnx (added)
    features: tuple[FeatureRef, ...]
    label: str | None
    content_hash: str  # sha256 of model.onnx
    created_at: str
    input_name: str
    output_name: str
    output_index: int | None  # column of a (rows x classes) output; None: the output is the score
    plan_version: str | None = None
    training_range: tuple[str | None, str | None] = (None, None)
    metrics: Mapping[str, float] = field(default_factory=dict)  # holdout: auc, log_loss, rows
    on_missing: MissingPolicy = MissingPolicy.EMPTY_WINDOW
    on_stale: StalePolicy = StalePolicy.SERVE
    source: str = "tenx train"
    # The training set's `--max-age` (microseconds): values older than that were blanked
    # (null) and marked stale in training, so the server blanks them the same way.
    max_age_us: int | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def feature_references(self) -> list[str]:
        return [f.reference for f in self.features]

    def views(self) -> dict[str, str]:
        """view -> the version the model was trained on, in first-use order."""
        return {f.view: f.view_version for f in self.features}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["features"] = [asdict(f) for f in self.features]
        data["training_range"] = list(self.training_range)
        data["metrics"] = dict(self.metrics)
        data["on_missing"] = self.on_missing.value
        data["on_stale"] = self.on_stale.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        values = dict(data)
        values["features"] = tuple(FeatureRef(**f) for f in data["features"])
        values["training_range"] = tuple(data.get("training_range") or (None, None))
        values["on_missing"] = MissingPolicy(data.get("on_missing", "empty_window"))
        values["on_stale"] = StalePolicy(data.get("on_stale", "serve"))
        return cls(**values)


@dataclass(frozen=True)
class Variant:
    """A lower-precision copy of a model version and how far it is from FP32 on the holdout."""

    precision: Precision
    accepted: bool
    reason: str
    auc: float | None = None
    auc_delta: float | None = None  # variant AUC - FP32 AUC
    max_abs_diff: float | None = None  # largest |score - FP32 score| over the holdout
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["precision"] = self.precision.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Variant:
        return cls(**{**data, "precision": Precision(data["precision"])})


@dataclass(frozen=True)
class Deployment:
    name: str
    version: int
    precision: Precision | None  # None: the server picks (FP16 on a GPU when accepted, else FP32)
    deployed_at: str
    deployed_by: str
    previous: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["precision"] = self.precision.value if self.precision else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployment:
        precision = data.get("precision")
        return cls(**{**data, "precision": Precision(precision) if precision else None})


@dataclass(frozen=True)
class CanaryLimits:
    """When a canary is rolled back automatically (checked once it has `min_requests`)."""

    min_requests: int = 200  # canary requests before any verdict
    max_error_rate_delta: float = 0.02  # canary error rate minus the baseline's, same window
    max_p99_ratio: float = 2.0  # canary scoring p99 over the baseline's
    max_psi: float = 0.25  # population stability index of canary scores against the baseline's

    def __post_init__(self) -> None:
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be at least 1, got {self.min_requests}")
        for name in ("max_error_rate_delta", "max_p99_ratio", "max_psi"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Canary:
    """A new version taking `percent` of a model's traffic (sticky by entity), or scoring
    a copy of it without answering (`shadow`), until promoted or rolled back."""

    name: str
    version: int
    percent: float
    shadow: bool
    started_at: str
    started_by: str
    limits: CanaryLimits = CanaryLimits()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Canary:
        return cls(**{**data, "limits": CanaryLimits(**data.get("limits", {}))})


def parse_model_ref(text: str) -> tuple[str, int | None]:
    """`fraud` -> ("fraud", None); `fraud@3` -> ("fraud", 3)."""
    name, sep, version = text.partition("@")
    if sep and not version.isdigit():
        raise RegistryError(f"model reference {text!r}: the version after @ must be a number, e.g. {name}@2")
    return name, int(version) if sep else None


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise RegistryError(
            f"model name {name!r} must start with a lowercase letter and hold only a-z, 0-9 and _ (at most 63)"
        )


def check_views(card: ModelCard, plan: Plan | None) -> None:
    """The skew guard: every view the model reads must be in `plan` at the version the
    model was trained on; SkewError says which differ and what to re-run."""
    if plan is None:
        raise SkewError(f"model {card.ref} needs feature views, but no plan is applied: run `tenx apply`")
    problems = []
    for view, version in card.views().items():
        try:
            applied = plan.view(view).version
        except KeyError:
            problems.append(f"view `{view}` is not in the applied plan {plan.version}")
            continue
        if applied != version:
            problems.append(f"view `{view}` is at version {applied}, the model was trained on {version}")
        elif not plan.view(view).online:
            # Neither materialize nor the stream write it: every entity would read as missing.
            problems.append(f"view `{view}` is offline only (online=False): nothing serves its values")
    if problems:
        raise SkewError(
            f"model {card.ref} will not serve: {'; '.join(problems)}. Its features would differ from training. "
            "Export a training set from the applied plan and `tenx train` a new version (then `tenx models deploy`), "
            "or `tenx apply` the plan it was trained on" + (f" ({card.plan_version})" if card.plan_version else "")
        )


def _serving_identity(card: ModelCard) -> tuple[Any, ...]:
    """What, beside the bytes, decides how a model version is served."""
    return (
        card.features,
        card.on_missing,
        card.on_stale,
        card.max_age_us,
        card.input_name,
        card.output_name,
        card.output_index,
    )


class ModelRegistry:
    """Model versions and deployments in a folder. Writes are atomic renames."""

    def __init__(self, root: Path, *, clock: type[datetime] = datetime) -> None:
        self.root = Path(root)
        self._clock = clock

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r})"

    def folder(self, name: str, version: int) -> Path:
        return self.root / name / "versions" / str(version)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "versions").is_dir())

    def versions(self, name: str) -> list[int]:
        folder = self.root / name / "versions"
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "card.json").exists())

    def add(
        self,
        name: str,
        model: bytes,
        card: ModelCard,
        *,
        holdout: Any = None,  # pyarrow Table of features + label
    ) -> ModelCard:
        """Store a new version (numbered next) of `name`; `card`'s name, version, hash and
        time are filled in here. The same bytes added again return the existing version."""
        check_name(name)
        digest = hashlib.sha256(model).hexdigest()
        for version in self.versions(name):
            existing = self.card(name, version)
            # The same model served the same way; other policies or tensor names are a new
            # version (returning the old card dropped a new --on-missing without a word).
            if existing.content_hash == digest and _serving_identity(existing) == _serving_identity(card):
                return existing
        known = self.versions(name)
        version = (known[-1] if known else 0) + 1
        card = replace(
            card,
            name=name,
            version=version,
            content_hash=digest,
            created_at=self._clock.now(UTC).isoformat(timespec="seconds"),
        )
        staging = Path(tempfile.mkdtemp(dir=self._ensure(self.root / name / "versions"), prefix=".new-"))
        try:
            (staging / "model.onnx").write_bytes(model)
            if holdout is not None:
                import pyarrow.parquet as pq

                pq.write_table(holdout, staging / "holdout.parquet")
            (staging / "card.json").write_text(json.dumps(card.to_dict(), indent=2) + "\n")
            os.rename(staging, self.folder(name, version))  # two adders racing: one rename fails, nothing mixed
        except OSError as error:
            _remove(staging)
            raise RegistryError(f"could not add {name}@{version} to {self.root}: {error}") from error
        return card

    def card(self, name: str, version: int | None = None) -> ModelCard:
        """A version's card (the deployed one, else the newest, when version is None)."""
        version = self.resolve(name, version)
        path = self.folder(name, version) / "card.json"
        try:
            card = ModelCard.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RegistryError(f"model card {path} is unreadable: {error}") from error
        digest = hashlib.sha256(self.model_path(name, version).read_bytes()).hexdigest()
        if digest != card.content_hash:
            raise RegistryError(
                f"model file of {name}@{version} does not match its card's content hash (edited by hand?): "
                "refusing it; add the model again as a new version"
            )
        return card

    def resolve(self, name: str, version: int | None) -> int:
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(
                f"no model `{name}` in the registry at {self.root} (known: {known}); "
                "`tenx train` or `tenx models add` one"
            )
        if version is None:
            deployed = self.deployment(name)
            return deployed.version if deployed else versions[-1]
        if version not in versions:
            raise RegistryError(f"model `{name}` has no version {version} (versions: {', '.join(map(str, versions))})")
        return version

    def model_path(self, name: str, version: int, precision: Precision = Precision.FP32) -> Path:
        suffix = "onnx" if precision is Precision.FP32 else f"{precision.value}.onnx"
        return self.folder(name, version) / f"model.{suffix}"

    def holdout_path(self, name: str, version: int) -> Path | None:
        path = self.folder(name, version) / "holdout.parquet"
        return path if path.exists() else None

    def variants(self, name: str, version: int) -> dict[Precision, Variant]:
        path = self.folder(name, version) / "variants.json"
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        return {Precision(key): Variant.from_dict(value) for key, value in data.items()}

    def write_variants(self, name: str, version: int, variants: Sequence[Variant]) -> None:
        merged = self.variants(name, version)
        merged.update({v.precision: v for v in variants})
        text = json.dumps({p.value: v.to_dict() for p, v in merged.items()}, indent=2) + "\n"
        atomic_write(self.folder(name, version) / "variants.json", text)

    def deployment(self, name: str) -> Deployment | None:
        path = self.root / name / "deployed.json"
        try:
            return Deployment.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:
            raise RegistryError(f"{path} is unreadable: {error}") from error

    def deployments(self) -> dict[str, Deployment]:
        return {name: d for name in self.names() if (d := self.deployment(name)) is not None}

    def deploy(self, name: str, version: int, *, precision: Precision | None, by: str) -> Deployment:
        """Make `version` the one served under `name`; running servers pick it up."""
        self.resolve(name, version)
        if precision not in (None, Precision.FP32):
            variant = self.variants(name, version).get(precision)
            if variant is None or not variant.accepted:
                why = variant.reason if variant else "it was not made"
                raise RegistryError(f"{name}@{version} has no accepted {precision.value} variant: {why}")
        current = self.deployment(name)
        deployment = Deployment(
            name=name,
            version=version,
            precision=precision,
            deployed_at=self._clock.now(UTC).isoformat(timespec="seconds"),
            deployed_by=by,
            previous=current.version if current else None,
        )
        with (self.root / name / "history.jsonl").open("a") as handle:
            handle.write(json.dumps(deployment.to_dict()) + "\n")
        atomic_write(self.root / name / "deployed.json", json.dumps(deployment.to_dict(), indent=2) + "\n")
        return deployment

    def canary(self, name: str) -> Canary | None:
        path = self.root / name / "canary.json"
        try:
            return Canary.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:
            raise RegistryError(f"{path} is unreadable: {error}") from error

    def canaries(self) -> dict[str, Canary]:
        return {name: c for name in self.names() if (c := self.canary(name)) is not None}

    def start_canary(
        self, name: str, version: int, *, percent: float, shadow: bool, by: str, limits: CanaryLimits | None = None
    ) -> Canary:
        """Send `percent` of `name`'s traffic to `version` (or a copy of it, `shadow`)."""
        self.resolve(name, version)
        current = self.deployment(name)
        if current is None:
            raise RegistryError(f"`{name}` is not deployed: a canary needs a baseline (`tenx models deploy {name}`)")
        if current.version == version:
            raise RegistryError(f"{name}@{version} is already the deployed version; canary another one")
        if not 0 < percent <= 100:
            raise RegistryError(f"--percent must be in (0, 100], got {percent}")
        running = self.canary(name)
        if running is not None:
            raise RegistryError(
                f"{name}@{running.version} is already a canary: `tenx models promote {name}` or "
                f"`tenx models rollback {name}` first"
            )
        canary = Canary(
            name, version, float(percent), shadow, self._clock.now(UTC).isoformat(timespec="seconds"), by,
            limits or CanaryLimits(),
        )  # fmt: skip
        self._canary_event(name, {"event": "started", **canary.to_dict()})
        atomic_write(self.root / name / "canary.json", json.dumps(canary.to_dict(), indent=2) + "\n")
        return canary

    def promote(self, name: str, *, by: str) -> Deployment:
        """Make the canary the deployed version; running servers switch to it warm."""
        canary = self._running(name)
        deployment = self.deploy(name, canary.version, precision=None, by=by)
        self._end_canary(name, canary, "promoted", f"promoted by {by}", by)
        return deployment

    def rollback(self, name: str, *, by: str, reason: str, version: int | None = None) -> Canary:
        """End the canary; the deployed version takes all the traffic again. With
        `version`, only if that version is the canary running (a server judging a canary
        that has since ended must not end the next one with its verdict)."""
        canary = self._running(name)
        if version is not None and canary.version != version:
            raise RegistryError(f"the canary of `{name}` is @{canary.version} now, not @{version}; nothing rolled back")
        self._end_canary(name, canary, "rolled_back", reason, by)
        return canary

    def canary_history(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name / "canary_history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _running(self, name: str) -> Canary:
        canary = self.canary(name)
        if canary is None:
            raise RegistryError(f"`{name}` has no canary running (`tenx models canary {name}@N --percent 5`)")
        return canary

    def _end_canary(self, name: str, canary: Canary, outcome: str, reason: str, by: str) -> None:
        when = self._clock.now(UTC).isoformat(timespec="seconds")
        self._canary_event(name, {"event": outcome, "version": canary.version, "reason": reason, "by": by, "at": when})
        (self.root / name / "canary.json").unlink(missing_ok=True)

    def _canary_event(self, name: str, event: Mapping[str, Any]) -> None:
        with (self.root / name / "canary_history.jsonl").open("a") as handle:
            handle.write(json.dumps(event) + "\n")

    def history(self, name: str) -> list[Deployment]:
        path = self.root / name / "history.jsonl"
        if not path.exists():
            return []
        return [Deployment.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

    def _ensure(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _remove(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink(missing_ok=True)
    folder.rmdir()
