"""The dynamic batcher's queue: bounded per priority class, taken by class then
deadline, expired requests dropped before any work is spent on them.

A plain class with an injected clock and no I/O (the server's batch loop wires it to
asyncio), so its behaviour is tested in virtual time. Bounds count rows, not requests:
one 100-entity request weighs what 100 single-entity ones do.

    queue = BatchQueue(bounds={Priority.CRITICAL: 4096, ...}, clock=time.monotonic)
    queue.offer(Pending(rows=1, priority=Priority.DEFAULT, deadline=now + 0.5, payload=...))
    batch = queue.take(max_rows=128)  # batch.items, batch.expired
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Priority(IntEnum):
    """Lower value, served first."""

    CRITICAL = 0
    DEFAULT = 1
    SHEDDABLE = 2

    @classmethod
    def parse(cls, text: str) -> Priority:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"priority {text!r}: expected critical, default or sheddable") from None


@dataclass(order=True)
class Pending:
    """One request waiting for a batch. `deadline` and `enqueued` are clock seconds."""

    deadline: float
    sequence: int = field(init=False, default=0)
    rows: int = field(compare=False, default=1)
    priority: Priority = field(compare=False, default=Priority.DEFAULT)
    enqueued: float = field(compare=False, default=0.0)
    tenant: str = field(compare=False, default="default")
    payload: Any = field(compare=False, default=None)


@dataclass(frozen=True)
class Batch:
    items: list[Pending]
    expired: list[Pending]  # past their deadline at take time: answer 504, do no work

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.items)


class QueueFull(Exception):
    """The class's queue has no room for the request's rows."""

    def __init__(self, priority: Priority, queued: int, bound: int) -> None:
        super().__init__(f"{priority.name.lower()} queue holds {queued} of {bound} rows")
        self.priority = priority
        self.queued = queued
        self.bound = bound


class BatchQueue:
    def __init__(self, *, bounds: Mapping[Priority, int], clock: Callable[[], float]) -> None:
        self.bounds = {priority: bounds.get(priority, 0) for priority in Priority}
        self._clock = clock
        self._heaps: dict[Priority, list[Pending]] = {priority: [] for priority in Priority}
        self._rows = dict.fromkeys(Priority, 0)
        self._tenant_rows: dict[str, int] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return sum(len(heap) for heap in self._heaps.values())

    def rows(self, priority: Priority | None = None) -> int:
        if priority is not None:
            return self._rows[priority]
        return sum(self._rows.values())

    def tenant_rows(self, tenant: str) -> int:
        return self._tenant_rows.get(tenant, 0)

    def tenants(self) -> list[str]:
        """Tenants with rows queued now."""
        return list(self._tenant_rows)

    def offer(self, item: Pending) -> None:
        """Queue `item`, or raise QueueFull. A request bigger than the whole bound is
        taken when its queue is empty (it would otherwise never run)."""
        queued = self._rows[item.priority]
        bound = self.bounds[item.priority]
        if queued + item.rows > bound and queued > 0:
            raise QueueFull(item.priority, queued, bound)
        item.sequence = next(self._counter)
        heapq.heappush(self._heaps[item.priority], item)
        self._rows[item.priority] = queued + item.rows
        self._tenant_rows[item.tenant] = self._tenant_rows.get(item.tenant, 0) + item.rows

    def _removed(self, item: Pending) -> None:
        self._rows[item.priority] -= item.rows
        left = self._tenant_rows[item.tenant] - item.rows
        if left:
            self._tenant_rows[item.tenant] = left
        else:
            del self._tenant_rows[item.tenant]

    def evict(self, rows: int, *, below: Priority, tenant: str | None = None) -> list[Pending]:
        """Remove queued requests of classes lower than `below` (of `tenant` only, when
        given) until at least `rows` rows are freed or none are left: the lowest class
        first, latest deadline first within it (the work most able to wait elsewhere).
        Returns what was removed; its callers are answered as shed."""
        evicted: list[Pending] = []
        freed = 0
        for priority in sorted(Priority, reverse=True):
            if priority <= below or freed >= rows:
                break
            heap = self._heaps[priority]
            candidates = [item for item in heap if tenant is None or item.tenant == tenant]
            if not candidates:
                continue
            candidates.sort(key=lambda item: (item.deadline, item.sequence), reverse=True)
            chosen: set[int] = set()
            for item in candidates:
                if freed >= rows:
                    break
                chosen.add(id(item))
                evicted.append(item)
                freed += item.rows
                self._removed(item)
            heap[:] = [item for item in heap if id(item) not in chosen]
            heapq.heapify(heap)
        return evicted

    def oldest_enqueued(self, priority: Priority | None = None) -> float | None:
        """When the head of a class's queue (every class's: the earliest of them) was
        queued; None when empty. The head is the earliest deadline, which within a
        class of equal deadlines is the oldest."""
        heaps = self._heaps.values() if priority is None else (self._heaps[priority],)
        times = [item.enqueued for heap in heaps for item in heap[:1]]
        return min(times) if times else None

    def take(self, max_rows: int) -> Batch:
        """Up to `max_rows` rows, critical first, earliest deadline first within a
        class. A request never splits: one larger than max_rows goes alone."""
        now = self._clock()
        items: list[Pending] = []
        expired: list[Pending] = []
        rows = 0
        for priority in Priority:
            heap = self._heaps[priority]
            while heap:
                head = heap[0]
                if head.deadline <= now:
                    heapq.heappop(heap)
                    self._removed(head)
                    expired.append(head)
                    continue
                if items and rows + head.rows > max_rows:
                    break
                heapq.heappop(heap)
                self._removed(head)
                items.append(head)
                rows += head.rows
                if rows >= max_rows:
                    break
            if rows >= max_rows or (heap and items and rows + heap[0].rows > max_rows):
                break
        return Batch(items, expired)
