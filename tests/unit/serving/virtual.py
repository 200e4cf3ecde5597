"""The model server's admission, queue and batcher driven in virtual time.

A discrete-event run: seeded Poisson arrivals per (class, tenant), the real `Lane`
(admission, per-class queue, gradient batch limit) and `Tenants` (token buckets), and a
service-time model in place of the lookup and the ONNX run: a batch of n rows takes
`fixed_s + per_row_s * n` (times a seeded jitter) on one of `executors`. The batch loop
follows the server's: whenever an executor is free and work is queued it takes a batch;
expired requests are dropped at that point, before any work.

Every request's fate is recorded, and the run checks as it goes what must hold at every
instant (the queue within its bound, nothing started after its deadline, no critical
request refused for overload while lower-class work waits), so a test only asserts on
the summary.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from serving.models.admission import OVERLOAD, AdmissionSettings, Lane, Rejected, TenantPolicy, Tenants
from serving.models.batcher import Pending, Priority


@dataclass(frozen=True)
class Service:
    fixed_s: float = 0.001  # per batch: the lookup round trip and the runtime call
    per_row_s: float = 0.00001
    jitter: float = 0.1  # each batch's time is scaled by a uniform draw in [1 - jitter, 1 + jitter]
    executors: int = 1

    def seconds(self, rows: int, rng: np.random.Generator) -> float:
        scale = 1.0 + self.jitter * (2 * rng.random() - 1)
        return (self.fixed_s + self.per_row_s * rows) * scale


@dataclass(frozen=True)
class Stream:
    """Arrivals of one kind of request."""

    rate: float  # requests per second
    priority: Priority = Priority.DEFAULT
    tenant: str = "default"
    rows: int = 1
    deadline_s: float = 1.0


@dataclass
class Outcome:
    arrived: float
    priority: Priority
    tenant: str
    deadline: float
    rows: int
    answered: float | None = None  # completion time of its batch
    started: float | None = None
    refused: str | None = None  # a Rejected reason, or "deadline" when dropped at dequeue

    @property
    def latency(self) -> float | None:
        return None if self.answered is None else self.answered - self.arrived

    @property
    def ok(self) -> bool:
        """Answered within its deadline (the server answers 504 at the deadline otherwise)."""
        return self.answered is not None and self.answered <= self.deadline


@dataclass
class Run:
    outcomes: list[Outcome]
    duration_s: float
    warmup_s: float
    max_queued_rows: int = 0
    violations: list[str] = field(default_factory=list)
    busy_s: float = 0.0

    def counted(self, priority: Priority | None = None, tenant: str | None = None) -> list[Outcome]:
        return [
            o
            for o in self.outcomes
            if o.arrived >= self.warmup_s
            and (priority is None or o.priority is priority)
            and (tenant is None or o.tenant == tenant)
        ]

    def success(self, priority: Priority | None = None, tenant: str | None = None) -> float:
        outcomes = self.counted(priority, tenant)
        return sum(o.ok for o in outcomes) / len(outcomes)

    def p99(self, priority: Priority | None = None, tenant: str | None = None) -> float:
        latencies = [o.latency for o in self.counted(priority, tenant) if o.ok and o.latency is not None]
        return float(np.percentile(latencies, 99))

    def goodput_rows(self) -> float:
        """Rows answered within their deadline per second, over the counted window."""
        rows = sum(o.rows for o in self.counted() if o.ok)
        return rows / (self.duration_s - self.warmup_s)

    def refused(self, reason: str, priority: Priority | None = None) -> int:
        return sum(o.refused == reason for o in self.counted(priority))


def simulate(
    streams: list[Stream],
    *,
    settings: AdmissionSettings,
    service: Service,
    duration_s: float,
    warmup_s: float = 1.0,
    tenants: Mapping[str, TenantPolicy] | None = None,
    seed: int = 0,
) -> Run:
    rng = np.random.default_rng(seed)
    now = 0.0

    def clock() -> float:
        return now

    lane = Lane(settings, clock=clock, tenants=Tenants(tenants, clock=clock))
    # Arrivals for every stream, merged: (time, sequence, stream index).
    events: list[tuple[float, int, int, object]] = []
    sequence = itertools.count()
    for index, stream in enumerate(streams):
        count = int(stream.rate * duration_s * 1.2 + 20)
        times = np.cumsum(rng.exponential(1 / stream.rate, count))
        for t in times[times < duration_s].tolist():
            events.append((t, next(sequence), 0, index))
    heapq.heapify(events)
    run = Run([], duration_s, warmup_s)
    free = service.executors

    def dispatch() -> None:
        nonlocal free
        while free and len(lane.queue):
            batch = lane.take()
            for item in batch.expired:
                item.payload.refused = "deadline"
            if not batch.items:
                continue
            for item in batch.items:
                outcome = item.payload
                if now >= outcome.deadline:
                    run.violations.append(f"started at {now:.6f} after its deadline {outcome.deadline:.6f}")
                outcome.started = now
            seconds = service.seconds(batch.rows, rng)
            run.busy_s += seconds
            free -= 1
            heapq.heappush(events, (now + seconds, next(sequence), 1, (batch, seconds)))

    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == 1:  # a batch finished
            batch, seconds = data  # type: ignore[misc]
            lane.finished(batch.rows, seconds)
            for item in batch.items:
                item.payload.answered = now
            free += 1
            dispatch()
            continue
        stream = streams[data]  # type: ignore[index]
        outcome = Outcome(now, stream.priority, stream.tenant, now + stream.deadline_s, stream.rows)
        run.outcomes.append(outcome)
        pending = Pending(
            deadline=outcome.deadline,
            rows=stream.rows,
            priority=stream.priority,
            enqueued=now,
            tenant=stream.tenant,
            payload=outcome,
        )
        try:
            lane.tenants.charge(stream.tenant, stream.rows)
            try:
                evicted = lane.admit(pending)
            except Rejected:
                lane.tenants.refund(stream.tenant, stream.rows)
                raise
        except Rejected as rejected:
            outcome.refused = rejected.reason
            if rejected.reason == OVERLOAD and stream.priority is Priority.CRITICAL:
                waiting = lane.queue.rows(Priority.SHEDDABLE) + lane.queue.rows(Priority.DEFAULT)
                if waiting:
                    run.violations.append(f"critical refused at {now:.6f} while {waiting} lower-class rows wait")
            continue
        for item in evicted:
            item.payload.refused = "evicted"
        queued = lane.queue.rows()
        run.max_queued_rows = max(run.max_queued_rows, queued)
        if queued > max(lane.room(pending), stream.rows) and settings.shedding:
            run.violations.append(f"{queued} rows queued, above the room {lane.room(pending)} of its request")
        if queued > settings.queue_rows:
            run.violations.append(f"{queued} rows queued, above queue_rows {settings.queue_rows}")
        dispatch()
    return run


def capacity(settings: AdmissionSettings, service: Service, *, seed: int = 0) -> float:
    """Rows per second the lane serves under a standing backlog (requests of one row,
    default class, deadlines far away): what `1x` and goodput are measured against."""
    backlog = simulate(
        [Stream(rate=500_000.0, deadline_s=60.0)],
        settings=settings,
        service=service,
        duration_s=3.0,
        warmup_s=1.0,
        seed=seed,
    )
    return backlog.goodput_rows()
