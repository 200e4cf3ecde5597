"""Feature vectors from packed online values: the missing and stale policies per row."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pandas as pd
import pytest

from featurestore import Last, feature_view
from featurestore.models import FeatureRef, MissingPolicy, ModelCard, StalePolicy
from featurestore.plan.compile import compile_definitions
from featurestore.stores.codec import encode
from serving.models.vectors import STATUS_NAMES, FeatureAssembler
from tests.unit.pipelines.test_reference import SOURCE, USER, W10

HOUR = 3_600_000_000
NOW = 1_767_225_600_000_000


def assembler(
    on_missing: MissingPolicy, on_stale: StalePolicy, max_age_us: int | None = None
) -> tuple[FeatureAssembler, Any, Any]:
    """A model reading `fresh` (a ttl of one hour) and `kept` (no ttl)."""

    @feature_view(entity=USER, source=SOURCE, aggregations=[Last("value")], windows=(W10,), ttl=timedelta(hours=1))
    def fresh(events: pd.DataFrame) -> pd.DataFrame:
        return events[[]]

    @feature_view(entity=USER, source=SOURCE, aggregations=[Last("value")], windows=(W10,))
    def kept(events: pd.DataFrame) -> pd.DataFrame:
        return events[[]]

    plan = compile_definitions("test", views=[fresh, kept])
    views = [plan.view("fresh"), plan.view("kept")]
    card = ModelCard(
        name="m",
        version=1,
        kind="mlp",
        features=tuple(FeatureRef(v.name, v.feature_names[0], v.version) for v in views),
        label=None,
        content_hash="",
        created_at="",
        input_name="features",
        output_name="score",
        output_index=None,
        plan_version=plan.version,
        source="test",
        on_missing=on_missing,
        on_stale=on_stale,
        max_age_us=max_age_us,
    )
    return FeatureAssembler(card, plan), views[0], views[1]


@pytest.mark.parametrize("on_missing", list(MissingPolicy))
def test_a_stale_view_is_refused_even_when_another_view_of_the_row_is_missing(on_missing: MissingPolicy) -> None:
    """The row's status is the worst of its views (missing beats stale), but the stale
    policy is about the stale view: hidden behind the missing one, it was scored."""
    made, fresh, kept = assembler(on_missing, StalePolicy.REFUSE)
    stale = encode(fresh, NOW - 2 * HOUR, [5.0])
    current = encode(fresh, NOW, [5.0])
    vectors = made.assemble([[stale, stale, current], [None, encode(kept, NOW, [1.0]), None]], NOW)
    assert [STATUS_NAMES[s] for s in vectors.status] == ["missing", "stale", "missing"]
    refuse_missing = on_missing is MissingPolicy.REFUSE
    assert vectors.scored.tolist() == [False, False, not refuse_missing]


def test_a_model_trained_with_max_age_gets_old_values_blanked_as_its_training_set_had() -> None:
    """`tenx export --max-age` blanks values older than that (the model learned NaN for
    them); the server fed the real old values, marked found."""
    made, fresh, kept = assembler(MissingPolicy.EMPTY_WINDOW, StalePolicy.SERVE, max_age_us=3 * HOUR)
    old = encode(kept, NOW - 4 * HOUR, [7.0])  # kept has no ttl: only max_age ages it
    vectors = made.assemble([[encode(fresh, NOW, [5.0])] * 2, [old, encode(kept, NOW - HOUR, [1.0])]], NOW)
    assert vectors.matrix[0, 0] == 5.0
    assert math.isnan(vectors.matrix[0, 1])  # blanked, as the export did
    assert vectors.matrix[1].tolist() == [5.0, 1.0]
    assert [STATUS_NAMES[s] for s in vectors.status] == ["stale", "found"]
    assert vectors.scored.tolist() == [True, True]  # on_stale=serve: scored on the blanked vector, as trained
