"""Event schemas: named, typed fields with an event-time column and entity-key columns."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from schemas.dtypes import TIMESTAMP_UTC, dtype_name, parse_dtype
from schemas.errors import SchemaError
from schemas.source_location import SourceLocation, caller_location
from schemas.timestamps import from_micros, to_micros

# Event times outside these bounds are "absurd" (a seconds/ms mix-up, a zero default)
# and rejected by validation; a schema may widen them.
DEFAULT_MIN_TIME = datetime(2000, 1, 1, tzinfo=UTC)
DEFAULT_MAX_TIME = datetime(2100, 1, 1, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Field:
    """One column of an event: its name, Arrow type and whether it may be null.

    >>> Field("amount", "float64").dtype
    DataType(double)
    """

    name: str
    dtype: pa.DataType
    nullable: bool = False
    description: str = ""

    def __init__(
        self,
        name: str,
        dtype: str | pa.DataType | type,
        *,
        nullable: bool = False,
        description: str = "",
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", parse_dtype(dtype))
        object.__setattr__(self, "nullable", nullable)
        object.__setattr__(self, "description", description)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": dtype_name(self.dtype),
            "nullable": self.nullable,
            "description": self.description,
        }


@dataclass(frozen=True)
class EventSchema:
    """The shape of one kind of event, defined once and used by every engine.

    Construction only records; `problems()` says what is wrong (the Plan compiler calls
    it so that every mistake is reported at once).
    """

    name: str
    fields: tuple[Field, ...]
    event_time: str
    entity_keys: tuple[str, ...] = ()
    min_time: datetime = DEFAULT_MIN_TIME
    max_time: datetime = DEFAULT_MAX_TIME
    description: str = ""
    location: SourceLocation = field(default_factory=SourceLocation.unknown, compare=False)

    def __init__(
        self,
        name: str,
        fields: Iterable[Field],
        *,
        event_time: str,
        entity_keys: Iterable[str] = (),
        min_time: datetime = DEFAULT_MIN_TIME,
        max_time: datetime = DEFAULT_MAX_TIME,
        description: str = "",
        location: SourceLocation | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fields", tuple(fields))
        object.__setattr__(self, "event_time", event_time)
        object.__setattr__(self, "entity_keys", tuple(entity_keys))
        object.__setattr__(self, "min_time", min_time)
        object.__setattr__(self, "max_time", max_time)
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "location", location or caller_location())

    # -- lookups ------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for candidate in self.fields:
            if candidate.name == name:
                return candidate
        raise SchemaError(f"schema `{self.name}` has no field `{name}`; fields: {', '.join(self.names)}")

    def has_field(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(f.name, f.dtype, nullable=f.nullable) for f in self.fields])

    @property
    def min_time_us(self) -> int:
        return to_micros(self.min_time)

    @property
    def max_time_us(self) -> int:
        return to_micros(self.max_time)

    # -- checks -------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Everything wrong with this schema, as messages (empty when it is fine)."""
        found: list[str] = []
        seen: set[str] = set()
        for f in self.fields:
            if f.name in seen:
                found.append(f"field `{f.name}` is defined twice")
            seen.add(f.name)
            if f.name == self.event_time:
                continue  # checked below, with a message about what it must be
            try:
                dtype_name(f.dtype)
            except SchemaError as error:
                found.append(f"field `{f.name}`: {error}")
        if not self.has_field(self.event_time):
            found.append(f"event-time column `{self.event_time}` is not a field; fields: {', '.join(self.names)}")
        else:
            time_type = self.field(self.event_time).dtype
            if not TIMESTAMP_UTC.equals(time_type):
                found.append(
                    f"event-time column `{self.event_time}` must be timestamp[us, UTC], "
                    f"got {time_type}; declare it as Field({self.event_time!r}, "
                    f"'timestamp[us, UTC]')"
                )
            elif self.field(self.event_time).nullable:
                found.append(f"event-time column `{self.event_time}` must not be nullable")
        for key in self.entity_keys:
            if not self.has_field(key):
                found.append(f"entity-key column `{key}` is not a field")
        for bound_name, bound in (("min_time", self.min_time), ("max_time", self.max_time)):
            if bound.tzinfo is None or bound.utcoffset() != UTC.utcoffset(None):
                found.append(f"{bound_name} {bound.isoformat()} must be a UTC datetime")
            elif bound_name == "min_time" and bound < EPOCH:
                # The online store orders values by an unsigned `as_of` (so that its bytes
                # compare as numbers): an earlier event could be ingested and backfilled,
                # then crashed materialize.
                found.append(
                    f"min_time {bound.isoformat()} is before 1970-01-01T00:00:00+00:00, the earliest time tenx "
                    "stores online (its as_of is unsigned microseconds since 1970); use min_time=datetime(1970, 1, "
                    "1, tzinfo=UTC) or later"
                )
        return found

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fields": [f.to_dict() for f in self.fields],
            "event_time": self.event_time,
            "entity_keys": list(self.entity_keys),
            "min_time_us": self.min_time_us,
            "max_time_us": self.max_time_us,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EventSchema:
        return cls(
            data["name"],
            [
                Field(f["name"], f["dtype"], nullable=f["nullable"], description=f["description"])
                for f in data["fields"]
            ],
            event_time=data["event_time"],
            entity_keys=data["entity_keys"],
            min_time=from_micros(data["min_time_us"]),
            max_time=from_micros(data["max_time_us"]),
            description=data["description"],
            location=SourceLocation.unknown(),
        )
