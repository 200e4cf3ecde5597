"""Online/offline parity on a sample: the online value of an entity must equal the last
changelog row at or before its online `as_of` (DESIGN.md section 3)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from featurestore.plan.model import AS_OF, ViewSpec
from featurestore.semantics import values_match
from featurestore.stores.codec import TIMESTAMP, decode, timestamp_micros
from featurestore.stores.offline import DeltaOfflineStore, micros_to_datetime
from featurestore.stores.online import OnlineStore


@dataclass(frozen=True)
class Mismatch:
    entity: Any
    as_of: str
    feature: str
    online: Any
    offline: Any

    def __str__(self) -> str:
        return f"{self.entity} @ {self.as_of}: {self.feature} online={self.online!r} offline={self.offline!r}"


@dataclass
class VerifyReport:
    view: str
    checked: int = 0
    missing_online: int = 0
    missing_offline: int = 0  # online value with no changelog row at or before it
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def nothing_online(self) -> bool:
        """Entities were sampled and none had an online value: nothing was compared."""
        return self.checked == 0 and self.missing_online > 0

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.missing_offline and not self.nothing_online


STEPS = 4  # reported through `progress`: keys read, rows read, online read, compared


def verify_view(
    view: ViewSpec,
    offline: DeltaOfflineStore,
    online: OnlineStore,
    *,
    sample: int = 200,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Compare `sample` random entities of the view (those with a changelog).
    `progress(step)` is called as each of the STEPS is done."""
    report = VerifyReport(view.name)
    done = progress or (lambda step: None)
    dataset = offline.changelog_dataset(view)
    keys = pc.unique(dataset.to_table(columns=[view.entity_key]).column(view.entity_key)).to_pylist()
    chosen = random.Random(seed).sample(keys, min(sample, len(keys)))
    done(f"{len(keys):,} entities in the changelog")
    if not chosen:
        return report
    rows = dataset.to_table(filter=ds.field(view.entity_key).isin(chosen))
    done(f"{rows.num_rows:,} changelog rows of {len(chosen):,} sampled entities")
    by_entity: dict[Any, list[dict[str, Any]]] = {}
    for row in rows.to_pylist():
        by_entity.setdefault(row[view.entity_key], []).append(row)
    stored = online.read(view, chosen)
    done("online values read")
    for entity, raw in zip(chosen, stored, strict=True):
        if raw is None:
            report.missing_online += 1
            continue
        as_of, values = decode(view, raw)
        moment = micros_to_datetime(as_of)
        candidates = [r for r in by_entity.get(entity, []) if r[AS_OF] <= moment]
        if not candidates:
            report.missing_offline += 1
            continue
        expected = max(candidates, key=lambda r: r[AS_OF])
        report.checked += 1
        for feature, value in zip(view.features, values, strict=True):
            wanted = expected[feature.name]
            if feature.dtype == TIMESTAMP:  # the offline table's datetime; stored online as microseconds
                wanted = timestamp_micros(wanted)
            if not values_match(wanted, value, kind=feature.kind, dtype=feature.dtype):
                report.mismatches.append(
                    Mismatch(entity, moment.isoformat(), feature.name, value, expected[feature.name])
                )
    done("compared")
    return report


__all__ = ["Mismatch", "VerifyReport", "verify_view"]
