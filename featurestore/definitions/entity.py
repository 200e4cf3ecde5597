"""Entities: what features are about (a user, a merchant), named by a key column."""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.source_location import SourceLocation, caller_location


@dataclass(frozen=True)
class Entity:
    """An entity keyed by one column, e.g. ``Entity("user", key="user_id", dtype="int64")``.

    Keys are `int64` or `string`; they become online-store keys and Delta partitions.
    """

    name: str
    key: str
    dtype: str = "int64"
    description: str = ""
    location: SourceLocation = field(default_factory=caller_location, compare=False, repr=False)
