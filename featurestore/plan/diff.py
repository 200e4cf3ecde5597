"""What changes between the applied plan and a new one, and which changes break serving."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from featurestore.plan.model import EntitySpec, Plan, SourceSpec, ViewSpec


class ChangeKind(Enum):
    ADDED = "+"
    REMOVED = "-"
    CHANGED = "~"


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    subject: str  # "feature view `user_spend`"
    detail: str
    breaking: bool = False

    def __str__(self) -> str:
        mark = "  BREAKING" if self.breaking else ""
        return f"{self.kind.value} {self.subject}: {self.detail}{mark}"


def diff_plans(old: Plan | None, new: Plan) -> list[Change]:
    """Changes from `old` (None: nothing applied yet) to `new`: the project first, then
    views, entities and sources, each sorted by name (entities and sources only against
    an applied plan: from nothing, the views added say it all).

    Breaking: anything that makes an online feature disappear or take new values, i.e.
    a removed online view or feature, a changed view version or a renamed project (new
    online keys: values must be backfilled and materialized before clients see them again).
    """
    old_views = {v.name: v for v in old.views} if old else {}
    new_views = {v.name: v for v in new.views}
    changes: list[Change] = []
    if old is not None and old.project != new.project:
        changes.append(
            Change(
                ChangeKind.CHANGED,
                "project",
                f"{old.project} -> {new.project}: online keys change; re-run tenx materialize",
                breaking=any(view.online for view in new.views),
            )
        )
    for name in sorted(old_views.keys() | new_views.keys()):
        subject = f"feature view `{name}`"
        before, after = old_views.get(name), new_views.get(name)
        if before is None and after is not None:
            changes.append(
                Change(ChangeKind.ADDED, subject, f"{len(after.features)} features, version {after.version}")
            )
        elif after is None and before is not None:
            changes.append(Change(ChangeKind.REMOVED, subject, "removed", breaking=before.online))
        elif before is not None and after is not None:
            changes.extend(_view_changes(subject, before, after))
    if old is not None:
        changes.extend(_named_changes("entity", old.entities, new.entities))
        changes.extend(_named_changes("source", old.sources, new.sources))
    return changes


def _named_changes(
    kind: str, before: Sequence[EntitySpec | SourceSpec], after: Sequence[EntitySpec | SourceSpec]
) -> list[Change]:
    """Entities or sources added, removed or edited. Never breaking on their own: a view
    using one reports the change (and whether it breaks) as its own."""
    old = {item.name: item for item in before}
    new = {item.name: item for item in after}
    changes: list[Change] = []
    for name in sorted(old.keys() | new.keys()):
        subject = f"{kind} `{name}`"
        if name not in old:
            changes.append(Change(ChangeKind.ADDED, subject, "added"))
        elif name not in new:
            changes.append(Change(ChangeKind.REMOVED, subject, "removed"))
        elif old[name].to_dict() != new[name].to_dict():
            changes.append(Change(ChangeKind.CHANGED, subject, "definition" + _repointed(old[name], new[name])))
    return changes


def _repointed(before: EntitySpec | SourceSpec, after: EntitySpec | SourceSpec) -> str:
    """What a source now reads from, when that moved: its views keep their versions (the
    values' definition did not change), so what was computed from the old table or topic
    stays until it is recomputed. Said here, or it goes unnoticed."""
    if not isinstance(before, SourceSpec) or not isinstance(after, SourceSpec):
        return ""
    moved = [
        f"{what} `{new}` (was `{old}`)"
        for what, old, new in (("table", before.table, after.table), ("topic", before.topic, after.topic))
        if old != new
    ]
    if not moved:
        if _columns(before) != _columns(after):
            return (
                f": its fields changed; an events table `{after.table}` ingested already keeps the fields it was "
                f"made with (ingest and backfill refuse it then): give the source a new table "
                f'(table="{after.table}_v2"), `tenx ingest` its events there and `tenx backfill` its views'
            )
        return ""
    return (
        f": now reads {' and '.join(moved)}; its views keep their versions and the values computed from the old "
        "events: `tenx ingest` the new table's events and `tenx backfill` the views over their whole history, "
        "then `tenx materialize`"
    )


def _view_changes(subject: str, before: ViewSpec, after: ViewSpec) -> list[Change]:
    changes: list[Change] = []
    online = before.online and after.online
    recomputed = before.version != after.version
    old_features = {f.name: f for f in before.features}
    new_features = {f.name: f for f in after.features}
    for name in sorted(new_features.keys() - old_features.keys()):
        changes.append(Change(ChangeKind.ADDED, subject, f"feature `{name}`"))
    for name in sorted(old_features.keys() - new_features.keys()):
        changes.append(Change(ChangeKind.REMOVED, subject, f"feature `{name}`", breaking=online))
    for name in sorted(old_features.keys() & new_features.keys()):
        if old_features[name] != new_features[name]:
            changes.append(Change(ChangeKind.CHANGED, subject, f"feature `{name}` definition", breaking=online))
    if before.transform.source != after.transform.source or before.transform.constants != after.transform.constants:
        changes.append(Change(ChangeKind.CHANGED, subject, "row transform", breaking=online))
    if before.where != after.where and (
        before.where is None or after.where is None or before.where.source != after.where.source
    ):
        changes.append(Change(ChangeKind.CHANGED, subject, "where= filter", breaking=online))
    if before.columns != after.columns:
        changes.append(Change(ChangeKind.CHANGED, subject, "derived columns"))
    if (before.entity.name, before.entity.key, before.entity.dtype) != (
        after.entity.name,
        after.entity.key,
        after.entity.dtype,
    ):
        # What keys the values; an entity's description is documentation only.
        changes.append(Change(ChangeKind.CHANGED, subject, "entity", breaking=online))
    if before.source.schema.to_dict()["fields"] != after.source.schema.to_dict()["fields"]:
        changes.append(Change(ChangeKind.CHANGED, subject, "source schema"))
    if before.ttl != after.ttl:
        changes.append(Change(ChangeKind.CHANGED, subject, f"ttl {before.ttl} -> {after.ttl} (microseconds)"))
    if before.online != after.online:
        changes.append(
            Change(
                ChangeKind.CHANGED,
                subject,
                f"online {before.online} -> {after.online}",
                breaking=before.online,
            )
        )
    if before.offline != after.offline:
        changes.append(Change(ChangeKind.CHANGED, subject, f"offline {before.offline} -> {after.offline}"))
    if (before.description, before.owner, before.tags) != (after.description, after.owner, after.tags):
        changes.append(Change(ChangeKind.CHANGED, subject, "description/owner/tags"))
    if recomputed:
        changes.append(
            Change(
                ChangeKind.CHANGED,
                subject,
                f"version {before.version} -> {after.version}: backfill and materialize before serving",
                breaking=online,
            )
        )
    return changes


def _columns(source: SourceSpec) -> list[tuple[str, str]]:
    """What a source's events table holds: its fields' names and types (a description or
    a nullable flag changes no table)."""
    return [(field["name"], field["dtype"]) for field in source.schema.to_dict()["fields"]]
