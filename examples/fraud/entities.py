"""Entities and sources shared by every view of the fraud repo."""

from featurestore import Entity, Source
from schemas import TRANSACTIONS

user = Entity("user", key="user_id", dtype="int64", description="A card holder.")
merchant = Entity("merchant", key="merchant_id", dtype="int64", description="A merchant.")

transactions = Source("transactions", TRANSACTIONS, allowed_lateness="2m")
