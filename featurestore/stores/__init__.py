"""Stores: the offline store (Delta Lake) and, later, online stores behind small Protocols."""

from featurestore.stores.offline import DeltaOfflineStore, IngestRecord

__all__ = ["DeltaOfflineStore", "IngestRecord"]
