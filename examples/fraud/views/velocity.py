"""Velocity features: how fast a card is being used, the classic card-testing signal."""

import numpy as np

from entities import transactions, user
from featurestore import Count, Max, Window, feature_view

# Card testers probe with tiny amounts before a large charge.
SMALL_AMOUNT = 2.0


@feature_view(
    entity=user,
    source=transactions,
    columns={"is_small": "float64", "log_amount": "float64"},
    aggregations=[
        Count(windows=[Window("10m", every="1m"), Window("1h")]),
        Count("is_small", name="small_charges", windows=[Window("10m", every="1m")]),
        Max("log_amount", windows=["1h"]),
    ],
    where=lambda tx: tx["amount"] > 0,
    ttl="1h",
    owner="fraud-team",
    tags={"tier": "realtime"},
)
def card_velocity(tx):
    """Charges per card; small charges count in `is_small` (null otherwise)."""
    is_small = (tx["amount"] < SMALL_AMOUNT).astype("float64").where(tx["amount"] < SMALL_AMOUNT)
    return tx.assign(is_small=is_small, log_amount=np.log1p(tx["amount"]))[["is_small", "log_amount"]]
