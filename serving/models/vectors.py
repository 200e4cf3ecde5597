"""Feature vectors for a model: packed online values -> a float32 matrix in the card's
order, with each entity's status and the policy for missing and stale values applied.

Pure: the server reads the bytes (one round trip for every view the model needs) and
hands them here. Nothing is defaulted silently: a missing entity is scored on the
empty-window values only when the card says so (that is what the training export gave
such rows), and its status says `missing` either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurestore.models import MissingPolicy, ModelCard, StalePolicy
from featurestore.plan.model import Plan, ViewSpec
from featurestore.semantics import empty_value
from featurestore.stores.codec import decode_matrix

FOUND, STALE, MISSING = 0, 1, 2
STATUS_NAMES = ("found", "stale", "missing")


@dataclass(frozen=True)
class _ViewPart:
    view: ViewSpec
    positions: tuple[int, ...]  # within the view's vector
    columns: tuple[int, ...]  # within the model's input
    empty: tuple[float, ...]  # empty-window value of each feature (NaN: null)


@dataclass(frozen=True)
class Vectors:
    matrix: np.ndarray  # float32, rows x model inputs
    status: np.ndarray  # int8 per row: FOUND, STALE or MISSING (the worst over the model's views)
    as_of_us: np.ndarray  # int64 per row: the oldest as_of over the views; -1 when a view has none
    scored: np.ndarray  # bool per row: the policy lets the model score it


class FeatureAssembler:
    """Built once per model version and plan; `assemble` runs once per batch."""

    def __init__(self, card: ModelCard, plan: Plan) -> None:
        self.card = card
        parts: dict[str, tuple[ViewSpec, list[int], list[int], list[float]]] = {}
        for column, ref in enumerate(card.features):
            view = plan.view(ref.view)
            entry = parts.setdefault(ref.view, (view, [], [], []))
            feature = view.feature(ref.feature)
            if feature.dtype == "string":
                raise ValueError(f"feature {ref.reference} is a string; models take numbers")
            entry[1].append(view.feature_names.index(ref.feature))
            entry[2].append(column)
            empty = empty_value(feature.kind, feature.dtype)
            entry[3].append(np.nan if empty is None else float(empty))
        self.parts = tuple(
            _ViewPart(view, tuple(positions), tuple(columns), tuple(empty))
            for view, positions, columns, empty in parts.values()
        )
        self.views = tuple(part.view for part in self.parts)
        self.entity_keys = tuple(dict.fromkeys(view.entity_key for view in self.views))
        self.width = len(card.features)

    def requests(self, entities: Sequence[Any]) -> list[tuple[ViewSpec, Sequence[Any]]]:
        """What to read: each view with its entity keys (`entities` are scalars when the
        model has one entity key, else mappings key -> value)."""
        if len(self.entity_keys) == 1:
            return [(part.view, entities) for part in self.parts]
        return [(part.view, [entity[part.view.entity_key] for entity in entities]) for part in self.parts]

    def assemble(self, raws: Sequence[Sequence[bytes | None]], now_us: int) -> Vectors:
        rows = len(raws[0]) if raws else 0
        matrix = np.empty((rows, self.width), dtype=np.float32)
        status = np.zeros(rows, dtype=np.int8)
        oldest = np.full(rows, np.iinfo(np.int64).max, dtype=np.int64)
        any_stale = np.zeros(rows, dtype=bool)  # apart from `status`: a missing view must not hide a stale one
        for part, values in zip(self.parts, raws, strict=True):
            as_of, block = decode_matrix(part.view, values, part.positions)
            missing = as_of < 0
            if missing.any():
                block[missing] = part.empty  # what the training export gave an entity without a row
            ttl = part.view.ttl
            stale = ~missing & (now_us - as_of > ttl) if ttl is not None else np.zeros(rows, dtype=bool)
            max_age = self.card.max_age_us
            if max_age is not None:  # trained on a set exported with --max-age: blank as it did
                aged = ~missing & (now_us - as_of > max_age)
                if aged.any():
                    block[aged] = np.nan
                    stale |= aged
            any_stale |= stale
            status = np.maximum(status, np.where(missing, MISSING, np.where(stale, STALE, FOUND)).astype(np.int8))
            oldest = np.minimum(oldest, np.where(missing, -1, as_of))
            matrix[:, part.columns] = block
        scored = np.ones(rows, dtype=bool)
        if self.card.on_missing is MissingPolicy.REFUSE:
            scored &= status != MISSING
        if self.card.on_stale is StalePolicy.REFUSE:
            scored &= ~any_stale
        return Vectors(matrix=matrix, status=status, as_of_us=oldest, scored=scored)


def as_of_ms(as_of_us: np.ndarray) -> list[int | None]:
    """as_of in ms per row, None where a view had no value: once per batch in numpy."""
    as_of_ms: list[int | None] = (as_of_us // 1000).tolist()
    missing = as_of_us < 0
    if missing.any():
        for row in np.flatnonzero(missing).tolist():
            as_of_ms[row] = None
    return as_of_ms


def slice_rows(vectors: Vectors, start: int, end: int) -> Vectors:
    """Rows `start` to `end` of a batch's vectors (one request's share)."""
    return Vectors(vectors.matrix[start:end], vectors.status[start:end], vectors.as_of_us[start:end],
                   vectors.scored[start:end])  # fmt: skip
