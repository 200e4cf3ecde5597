"""Merchant risk: refund share and ticket sizes per merchant."""

from entities import merchant, transactions
from featurestore import Count, Mean, Std, Sum, feature_view


@feature_view(
    entity=merchant,
    source=transactions,
    columns={"refund": "float64"},
    windows=["1d", "30d"],
    aggregations=[Count(), Sum("refund", name="refunds"), Mean("amount"), Std("amount")],
    ttl="2d",
)
def merchant_risk(tx):
    return tx.assign(refund=(tx["amount"] < 0).astype("float64"))[["refund"]]
