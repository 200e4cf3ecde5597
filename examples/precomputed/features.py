"""Features computed elsewhere (a warehouse job, a notebook), served as they are.

`user_scores` is a latest-value view: twenty columns of the newest row per user, stored
as float32 (half the bytes per lookup), served as `stale` once older than two days.
`score_trend` beside it is a windowed view over the same rows.
"""

import pandas as pd

from featurestore import Count, Entity, Latest, Max, Mean, Source, feature_view
from schemas import EventSchema, Field

SCORES = EventSchema(
    "user_scores",
    [
        Field("user_id", "int64", description="The user the row describes."),
        *[Field(f"f{i}", "float64", nullable=True, description=f"Precomputed feature {i}.") for i in range(20)],
        Field("computed_at", "timestamp[us, UTC]", description="When the upstream job computed the row."),
    ],
    event_time="computed_at",
    entity_keys=["user_id"],
)

user = Entity("user", key="user_id", dtype="int64", description="A user of the product.")
scores = Source("user_scores", SCORES, allowed_lateness="1h")


@feature_view(
    entity=user,
    source=scores,
    aggregations=[Latest(f"f{i}") for i in range(20)],
    float_dtype="float32",
    ttl="2d",
)
def user_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """The newest precomputed row per user, column by column."""
    return rows[[]]


@feature_view(
    entity=user,
    source=scores,
    aggregations=[Count(), Mean("f0"), Max("f0")],
    windows=["7d"],
)
def score_trend(rows: pd.DataFrame) -> pd.DataFrame:
    """How f0 moved over the last week of rows."""
    return rows[[]]
