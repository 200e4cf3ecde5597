"""Sources: one event schema bound to a Kafka topic and a Delta table of raw events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from schemas.schema import EventSchema
from schemas.source_location import SourceLocation, caller_location


@dataclass(frozen=True, init=False)
class Source:
    """Where events of one schema live: a Kafka `topic` (stream) and a Delta `table`
    (offline). Both default to the source's name, and each is one source's alone (a
    source reads all of its topic and table; several views may share one source).

    `allowed_lateness` bounds how far behind the stream's watermark an event may arrive
    and still be applied; older events go to the late topic. The watermark follows the
    slowest partition of the topic; a partition caught up and without a message for
    `idle_timeout` stops holding it back (the watermark then follows the clock, so
    windows expire on a quiet stream). An event more than `max_future` ahead of the
    processing clock is refused (dead-lettered by the stream job, rejected by ingest).
    """

    name: str
    schema: EventSchema
    topic: str
    table: str
    allowed_lateness: str | timedelta | int
    idle_timeout: str | timedelta | int
    max_future: str | timedelta | int
    description: str
    location: SourceLocation = field(compare=False, repr=False)

    def __init__(
        self,
        name: str,
        schema: EventSchema,
        *,
        topic: str | None = None,
        table: str | None = None,
        allowed_lateness: str | timedelta | int = "5m",
        idle_timeout: str | timedelta | int = "30s",
        max_future: str | timedelta | int = "5m",
        description: str = "",
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "topic", topic or name)
        object.__setattr__(self, "table", table or name)
        object.__setattr__(self, "allowed_lateness", allowed_lateness)
        object.__setattr__(self, "idle_timeout", idle_timeout)
        object.__setattr__(self, "max_future", max_future)
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "location", caller_location())

    @property
    def event_time(self) -> str:
        return self.schema.event_time
