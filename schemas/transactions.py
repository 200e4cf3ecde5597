"""The demo event schema: card transactions."""

from __future__ import annotations

from schemas.schema import EventSchema, Field
from schemas.source_location import SourceLocation

TRANSACTIONS = EventSchema(
    "transactions",
    [
        Field("transaction_id", "string", description="Unique id of the transaction."),
        Field("user_id", "int64", description="Card holder."),
        Field("merchant_id", "int64", description="Merchant charged."),
        Field("amount", "float64", description="Amount in `currency`; negative for refunds."),
        Field("currency", "string", description="ISO-4217 code."),
        Field("category", "string", description="Merchant category."),
        Field("country", "string", description="ISO-3166 alpha-2 country of the merchant."),
        Field("event_time", "timestamp[us, UTC]", description="When the card was charged."),
    ],
    event_time="event_time",
    entity_keys=("user_id", "merchant_id"),
    description="Card transactions, one event per charge or refund.",
    location=SourceLocation("schemas/transactions.py", 8),
)
