"""Serving: lookups of precomputed feature values (client, HTTP API). Nothing is computed here."""

__all__: list[str] = []
