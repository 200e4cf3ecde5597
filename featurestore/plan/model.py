"""The compiled Plan: frozen, JSON-serialisable, versioned by its content hash.

Only the Plan crosses from definitions to engines, training and serving. Every value is
normalised (durations in microseconds, types by name, code as canonical source), so the
same repo compiles to the same bytes in any process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import pyarrow as pa

from featurestore.durations import format_duration
from schemas.dtypes import TIMESTAMP_UTC, parse_dtype
from schemas.schema import EventSchema

PLAN_FORMAT = 1
AS_OF = "as_of"  # changelog / online column: the vector holds from this time on
SEQUENCE = "_seq"  # events column: log order (Kafka offset / ingest order), the tie-break for Last


def content_hash(data: Any) -> str:
    """16 hex digits of SHA-256 over canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WindowSpec:
    length: int  # microseconds
    every: int  # tile size, microseconds; length % every == 0

    @property
    def label(self) -> str:
        return format_duration(self.length)

    def to_dict(self) -> dict[str, Any]:
        return {"length": self.length, "every": self.every}


@dataclass(frozen=True)
class FeatureSpec:
    """One output value: aggregation `kind` of `column` over `window`, typed `dtype`.
    `Latest` features have no window (None): the newest event's value, however old."""

    name: str
    kind: str
    column: str | None
    window: WindowSpec | None
    dtype: str

    @property
    def span(self) -> WindowSpec:
        """The window of a windowed feature (engines call it where a window is needed)."""
        if self.window is None:
            raise ValueError(f"feature `{self.name}` ({self.kind}) has no window")
        return self.window

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "column": self.column,
            "window": None if self.window is None else self.window.to_dict(),
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        window = data["window"]
        return cls(
            name=data["name"],
            kind=data["kind"],
            column=data["column"],
            window=None if window is None else WindowSpec(**window),
            dtype=data["dtype"],
        )


@dataclass(frozen=True)
class CodeSpec:
    """A user function shipped as source: a `def` or a `lambda`, the modules and
    attributes it imports and the literal constants it reads, nothing else."""

    name: str
    kind: str  # "def" | "lambda"
    source: str
    imports: tuple[tuple[str, str, str | None], ...]  # (alias, module, attribute)
    constants: tuple[tuple[str, str], ...]  # (name, canonical Python literal)
    location: str = ""  # file:line, informational; not part of the version

    def to_dict(self, *, with_location: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "imports": [list(item) for item in self.imports],
            "constants": [list(item) for item in self.constants],
        }
        if with_location:
            data["location"] = self.location
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodeSpec:
        return cls(
            name=data["name"],
            kind=data["kind"],
            source=data["source"],
            imports=tuple((a, m, attr) for a, m, attr in data["imports"]),
            constants=tuple((n, v) for n, v in data["constants"]),
            location=data.get("location", ""),
        )


@dataclass(frozen=True)
class EntitySpec:
    name: str
    key: str
    dtype: str
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "dtype": self.dtype, "description": self.description}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_IDLE_TIMEOUT = 30_000_000  # 30 s
DEFAULT_MAX_FUTURE = 300_000_000  # 5 min


@dataclass(frozen=True)
class SourceSpec:
    name: str
    schema: EventSchema
    topic: str
    table: str
    allowed_lateness: int  # microseconds
    description: str = ""
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT  # microseconds
    max_future: int = DEFAULT_MAX_FUTURE  # microseconds

    @property
    def event_time(self) -> str:
        return self.schema.event_time

    def future_limit(self, now_us: int) -> int:
        """The latest event time accepted when the clock says `now_us` (`max_future`)."""
        return now_us + self.max_future

    def future_reason(self, event_time_us: int) -> str:
        """Why an event beyond `future_limit` is refused: the stream's dead letter and
        ingest's reject say the same."""
        moment = (_EPOCH + timedelta(microseconds=event_time_us)).isoformat()
        return (
            f"field `{self.event_time}`: {moment} is more than {format_duration(self.max_future)} ahead of the "
            f"processing clock (max_future of source `{self.name}`); check the producer's clock"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "schema": self.schema.to_dict(),
            "topic": self.topic,
            "table": self.table,
            "allowed_lateness": self.allowed_lateness,
            "idle_timeout": self.idle_timeout,
            "max_future": self.max_future,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceSpec:
        return cls(
            name=data["name"],
            schema=EventSchema.from_dict(data["schema"]),
            topic=data["topic"],
            table=data["table"],
            allowed_lateness=data["allowed_lateness"],
            description=data["description"],
            # plans recorded before these options existed ran with these values' rules absent
            idle_timeout=data.get("idle_timeout", DEFAULT_IDLE_TIMEOUT),
            max_future=data.get("max_future", DEFAULT_MAX_FUTURE),
        )


@dataclass(frozen=True)
class ViewSpec:
    """A compiled feature view. `version` hashes what determines its values (entity,
    source schema, derived columns, code, features), not metadata such as ttl or
    description: online keys carry it, so a metadata edit keeps serving the same keys."""

    name: str
    entity: EntitySpec
    source: SourceSpec
    columns: tuple[tuple[str, str], ...]  # derived columns (name, dtype)
    transform: CodeSpec
    where: CodeSpec | None
    features: tuple[FeatureSpec, ...]
    ttl: int | None  # microseconds
    online: bool
    offline: bool
    description: str = ""
    owner: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    location: str = ""

    @property
    def entity_key(self) -> str:
        return self.entity.key

    @property
    def event_time(self) -> str:
        return self.source.schema.event_time

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def windowed(self) -> tuple[FeatureSpec, ...]:
        """The features over a window (all but `Latest`)."""
        return tuple(f for f in self.features if f.window is not None)

    @property
    def latest(self) -> tuple[FeatureSpec, ...]:
        """The `Latest` features: no window, the newest event's value."""
        return tuple(f for f in self.features if f.window is None)

    @property
    def windows(self) -> tuple[WindowSpec, ...]:
        """Distinct windows, longest first (none for a view of `Latest` features only)."""
        unique = {(f.span.length, f.span.every): f.span for f in self.windowed}
        return tuple(sorted(unique.values(), key=lambda w: (-w.length, w.every)))

    @property
    def input_columns(self) -> tuple[str, ...]:
        """The columns the features aggregate, sorted (Count() reads none)."""
        return tuple(sorted({f.column for f in self.features if f.column is not None}))

    @property
    def longest_window(self) -> int:
        """The longest window (0 without windowed features)."""
        return max((f.span.length for f in self.windowed), default=0)

    @property
    def coarsest_tile(self) -> int:
        """The largest granularity among the view's windows (0 without any)."""
        return max((f.span.every for f in self.windowed), default=0)

    @property
    def reach(self) -> int | None:
        """How far before a time its values look: the longest window plus a tile, or
        None (all history) when the view has `Latest` features."""
        if self.latest:
            return None
        return self.longest_window + self.coarsest_tile

    def feature(self, name: str) -> FeatureSpec:
        for candidate in self.features:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def compute_dict(self) -> dict[str, Any]:
        """The part of the view that determines its values; hashed into `version`."""
        return {
            "name": self.name,
            "entity": {"key": self.entity.key, "dtype": self.entity.dtype},
            "schema": {
                "fields": [[f.name, f.to_dict()["dtype"], f.nullable] for f in self.source.schema.fields],
                "event_time": self.source.schema.event_time,
            },
            "columns": [list(c) for c in self.columns],
            "transform": self.transform.to_dict(with_location=False),
            "where": self.where.to_dict(with_location=False) if self.where else None,
            "features": [f.to_dict() for f in self.features],
        }

    @cached_property
    def version(self) -> str:
        # Cached: online keys are built from it on every lookup (hashing costs ~50 us).
        return content_hash(self.compute_dict())

    def changelog_schema(self) -> pa.Schema:
        """Entity key, `as_of`, then one column per feature, in declaration order."""
        fields = [
            pa.field(self.entity.key, parse_dtype(self.entity.dtype), nullable=False),
            pa.field(AS_OF, TIMESTAMP_UTC, nullable=False),
        ]
        for feature in self.features:
            fields.append(
                pa.field(
                    feature.name,
                    parse_dtype(feature.dtype),
                    nullable=feature.kind not in ("count", "sum"),
                )
            )
        return pa.schema(fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "entity": self.entity.to_dict(),
            "source": self.source.name,
            "columns": [list(c) for c in self.columns],
            "transform": self.transform.to_dict(),
            "where": self.where.to_dict() if self.where else None,
            "features": [f.to_dict() for f in self.features],
            "ttl": self.ttl,
            "online": self.online,
            "offline": self.offline,
            "description": self.description,
            "owner": self.owner,
            "tags": dict(self.tags),
            "location": self.location,
        }


@dataclass(frozen=True)
class Plan:
    """A whole compiled feature repo. `version` is the hash of its content."""

    project: str
    entities: tuple[EntitySpec, ...]
    sources: tuple[SourceSpec, ...]
    views: tuple[ViewSpec, ...]

    def view(self, name: str) -> ViewSpec:
        for candidate in self.views:
            if candidate.name == name:
                return candidate
        known = ", ".join(v.name for v in self.views) or "none"
        raise KeyError(f"no feature view `{name}` in plan {self.version}; views: {known}")

    def source(self, name: str) -> SourceSpec:
        for candidate in self.sources:
            if candidate.name == name:
                return candidate
        raise KeyError(f"no source `{name}` in plan {self.version}")

    def content_dict(self) -> dict[str, Any]:
        """Everything but locations (moving a definition down a line changes nothing)."""
        data = self.to_dict(with_version=False)
        for view in data["views"]:
            view.pop("location", None)
            view["transform"].pop("location", None)
            if view["where"]:
                view["where"].pop("location", None)
        return data

    @cached_property
    def version(self) -> str:
        return content_hash(self.content_dict())

    def to_dict(self, *, with_version: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "project": self.project,
            "entities": [e.to_dict() for e in self.entities],
            "sources": [s.to_dict() for s in self.sources],
            "views": [v.to_dict() for v in self.views],
        }
        if with_version:
            data["version"] = self.version
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"plan format {data.get('format')!r} is not supported by this tenx "
                f"(expected {PLAN_FORMAT}); upgrade tenx or re-apply the plan"
            )
        entities = {e["name"]: EntitySpec(**e) for e in data["entities"]}
        sources = {s["name"]: SourceSpec.from_dict(s) for s in data["sources"]}
        views = []
        for v in data["views"]:
            views.append(
                ViewSpec(
                    name=v["name"],
                    entity=entities[v["entity"]["name"]],
                    source=sources[v["source"]],
                    columns=tuple((c[0], c[1]) for c in v["columns"]),
                    transform=CodeSpec.from_dict(v["transform"]),
                    where=CodeSpec.from_dict(v["where"]) if v["where"] else None,
                    features=tuple(FeatureSpec.from_dict(f) for f in v["features"]),
                    ttl=v["ttl"],
                    online=v["online"],
                    offline=v["offline"],
                    description=v["description"],
                    owner=v["owner"],
                    tags=tuple(sorted(v["tags"].items())),
                    location=v.get("location", ""),
                )
            )
        plan = cls(
            project=data["project"],
            entities=tuple(entities.values()),
            sources=tuple(sources.values()),
            views=tuple(views),
        )
        recorded = data.get("version")
        if recorded is not None and recorded != plan.version:
            raise ValueError(
                f"plan content does not match its recorded version {recorded} "
                f"(computed {plan.version}); the file was edited or corrupted"
            )
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))
