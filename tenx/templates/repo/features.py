"""Demo features over card transactions: spend and activity per user and per merchant."""

import pandas as pd

from featurestore import Count, Entity, Last, Max, Mean, Min, Source, Std, Sum, feature_view, route
from schemas import TRANSACTIONS

user = Entity("user", key="user_id", dtype="int64", description="A card holder.")
merchant = Entity("merchant", key="merchant_id", dtype="int64", description="A merchant.")

transactions = Source("transactions", TRANSACTIONS, allowed_lateness="5m")

# Rough rates to EUR: a literal dict, shipped inside the plan with the transform.
EUR_RATES = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "JPY": 0.0061}


@feature_view(
    entity=user,
    source=transactions,
    columns={"amount_eur": "float64", "foreign_eur": "float64"},
    windows=["1h", "1d", "7d"],
    aggregations=[
        Count(),
        Sum("amount_eur"),
        Mean("amount_eur"),
        Max("amount_eur"),
        Std("amount_eur"),
        Sum("foreign_eur"),
        Min("amount_eur", windows=["7d"]),
        Last("amount_eur", windows=["1d"]),
    ],
    ttl="2d",
    owner="risk-team",
)
def user_spend(tx: pd.DataFrame) -> pd.DataFrame:
    """Spend per card holder, in euros; `foreign_eur` counts only abroad (not FR)."""
    # Only pandas API that cuDF also has, so the GPU backend runs it unchanged.
    amount_eur = tx["amount"] * tx["currency"].map(EUR_RATES).fillna(1.0)
    foreign_eur = amount_eur.where(tx["country"] != "FR", 0.0)
    return tx.assign(amount_eur=amount_eur, foreign_eur=foreign_eur)[["amount_eur", "foreign_eur"]]


@feature_view(
    entity=merchant,
    source=transactions,
    windows=["1h", "1d"],
    aggregations=[Count(), Sum("amount"), Max("amount")],
    where=lambda tx: tx["amount"] > 0,
    ttl="1d",
)
def merchant_sales(tx: pd.DataFrame) -> pd.DataFrame:
    """Sales per merchant: charges only, refunds filtered out."""
    return tx[[]]


def buys_by_recent_spend(features, request):
    """The `buys` route's last resort: a plain rule, used only when the model and the
    cache cannot answer. `features` holds one dict per entity (None when the online
    store is down: then every entity gets the base rate)."""
    if features is None:
        return [0.05 for _ in request.entities]
    return [0.3 if (f.get("user_spend:count_1h") or 0) > 0 else 0.05 for f in features]


# Clients ask for `buys`; when the model fails, its cached score for the same features
# answers, then the rule (each answer says which, and `degraded`).
buys = route("buys", primary="buys", fallbacks=["cache", buys_by_recent_spend])
