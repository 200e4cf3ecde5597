"""Event times as integer microseconds since the Unix epoch, UTC, and back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(value: datetime) -> int:
    """Microseconds since the epoch of a timezone-aware datetime (exact, no float)."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    """The UTC datetime `value` microseconds after the epoch."""
    return EPOCH + timedelta(microseconds=value)
