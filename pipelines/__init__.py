"""Engines that turn events into changelogs: the reference, batch (Dask) and stream (Bytewax)."""

from pipelines.reference import reference_changelog

__all__ = ["reference_changelog"]
