"""Cost attribution: each batch's device time split over its requests by rows, and
priced with their online-store reads at the configured rates (`model_server.costs`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serving.models.batcher import Pending
from serving.models.metrics import ModelMetrics

if TYPE_CHECKING:
    from serving.models.served import Loaded, Work


@dataclass(frozen=True)
class CostRates:
    """What device time and lookups cost, from tenx.yaml (`model_server.costs`)."""

    cpu_hour: float = 0.04  # USD per CPU-hour (one core)
    gpu_hour: float = 2.50  # USD per GPU-hour
    lookups_per_million: float = 0.02  # USD per million online-store reads (one per entity)

    def device_hour(self, device: str) -> float:
        return self.cpu_hour if device == "cpu" else self.gpu_hour


def split_by_rows(total: float, rows: Sequence[int]) -> list[float]:
    """`total` shared out in proportion to `rows` (a batch's device time over its requests).

    >>> split_by_rows(1.0, [1, 3])
    [0.25, 0.75]
    """
    count = sum(rows)
    return [total * r / count for r in rows] if count else [0.0 for _ in rows]


class CostMeter:
    """Charges batches to the cost counters, by model version, route, tenant and class."""

    def __init__(self, metrics: ModelMetrics, rates: CostRates) -> None:
        self.metrics = metrics
        self.rates = rates
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def counters(self, loaded: Loaded, work: Work) -> tuple[Any, Any]:
        """The device-seconds and dollars counters of one (model version, route, tenant, class)."""
        key = (loaded.card.name, str(loaded.card.version), loaded.runtime.device, work.route, work.tenant,
               work.priority.name.lower())  # fmt: skip
        children = self._children.get(key)
        if children is None:
            if len(self._children) > 50_000:
                self._children.clear()
            children = self._children[key] = (
                self.metrics.cost_device_seconds.labels(*key),
                self.metrics.cost_dollars.labels(key[0], key[1], key[3], key[4], key[5]),
            )
        return children

    def charge_lookups(self, loaded: Loaded, items: list[Pending], views: int) -> None:
        """Each request's online-store reads (one per entity and view), at the lookup rate."""
        rate = self.rates.lookups_per_million / 1e6 * views
        if rate:
            for item in items:
                self.counters(loaded, item.payload)[1].inc(item.rows * rate)

    def charge_device(self, loaded: Loaded, items: list[Pending], spent: float) -> None:
        """A batch's device time, split over its requests by rows, and its price."""
        per_second = self.rates.device_hour(loaded.runtime.device) / 3600
        for item, share in zip(items, split_by_rows(spent, [item.rows for item in items]), strict=True):
            device, dollars = self.counters(loaded, item.payload)
            device.inc(share)
            dollars.inc(share * per_second)
