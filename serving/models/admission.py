"""Admission control for one model's queue: who gets in, how big a batch may grow, and
what is shed when there is no room. Plain classes with an injected clock and no I/O:
the server wires them to asyncio and the overload tests drive them in virtual time.

Three decisions, all made before any work is spent on a request:

- **Quota** (`Tenants`): each tenant's token bucket (rows per second, burst). Over it:
  429, with the seconds until the bucket holds enough.
- **Headroom** (`Lane.admit`): the queue's bound is adaptive (the rows the model serves
  in `queue_delay_ms`, see below). Sheddable work is admitted only while the queue is
  below `headroom[SHEDDABLE]` of it (50%), default work below 80%, critical work up to
  the whole bound, or further while the model serves the critical rows ahead of it in
  half its remaining deadline (`Lane.room`: a critical request is refused only when it
  would miss its deadline anyway); when critical work finds no room it evicts queued lower-class work
  (lowest class, latest deadline first) instead of being refused, so a critical request
  is never turned away while a sheddable one waits. Under pressure (the queue past half
  the sheddable mark) a tenant may hold at most its weighted fair share of the rows
  its request's class may fill, so one tenant's flood cannot take the room other
  tenants' work needs.
- **Batch limit** (`BatchLimit`): the rows one batch may hold, found from observed
  batch times (as Netflix's concurrency limits find concurrency from latency): a batch
  may take up to `tolerance` times its fixed cost. Past that, batching no longer comes
  nearly free, and every critical request waiting behind the batch pays for its size.
  Except when critical requests already wait behind each other (the oldest queued for
  `queue_delay_ms`, more critical rows than the batches in flight take): then a batch
  takes its share of that backlog, up to `max_batch_rows` (`Lane.next_batch_rows`),
  since a small batch spares them nothing and its fixed cost per few rows is what keeps
  the backlog growing.

`Lane(shedding=False)` is the baseline the overload bench compares with: one FIFO
queue (priorities ignored), a fixed bound and a fixed batch size, no quotas.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.models.batcher import Batch, BatchQueue, Pending, Priority

BACKLOG_BATCHES = 2  # the server's batches in flight: critical rows past this many batches are a backlog
BACKLOG_FIT_PAUSE_S = 10.0  # batch times do not feed the limit's fit until this long after a backlog batch
DEFAULT_HEADROOM: Mapping[Priority, float] = {Priority.CRITICAL: 1.0, Priority.DEFAULT: 0.8, Priority.SHEDDABLE: 0.5}

# Why a request was refused; the same words label the metrics.
OVERLOAD = "overload"  # no room in the queue for the request's class (503)
EVICTED = "evicted"  # queued, then pushed out by critical work (503)
FAIR_SHARE = "fair_share"  # the tenant holds its share of a queue under pressure (503)
QUOTA = "quota"  # the tenant's token bucket is empty (429)
DEADLINE = "deadline"  # the deadline passed while queued (504)


class Rejected(Exception):
    """Refused before any work. `status` is the HTTP status, `retry_after_s` a hint."""

    def __init__(self, message: str, *, reason: str, status: int = 503, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class AdmissionSettings:
    """How one model's queue admits and batches work (see the module docstring)."""

    queue_rows: int = 8192  # hard bound on queued rows; the adaptive bound stays below it
    max_batch_rows: int = 1024  # the batch limit's ceiling
    min_batch_rows: int = 64  # and its floor: batches this small cost about what one row does
    latency_tolerance: float = 1.5  # a batch may take this many times a one-row batch's time
    queue_delay_ms: float = 50.0  # the bound: rows the model serves in this long
    headroom: Mapping[Priority, float] = field(default_factory=lambda: dict(DEFAULT_HEADROOM))
    shedding: bool = True  # False: FIFO, fixed bound (queue_rows) and batch size (max_batch_rows)

    def __post_init__(self) -> None:
        problems = []
        if self.queue_rows < 1:
            problems.append(f"queue_rows must be at least 1, got {self.queue_rows}")
        if not 1 <= self.min_batch_rows <= self.max_batch_rows:
            problems.append(
                f"need 1 <= min_batch_rows <= max_batch_rows, got {self.min_batch_rows} and {self.max_batch_rows}"
            )
        if not self.latency_tolerance > 1:
            problems.append(f"latency_tolerance must be above 1, got {self.latency_tolerance}")
        if not self.queue_delay_ms > 0:
            problems.append(f"queue_delay_ms must be above 0, got {self.queue_delay_ms}")
        for priority in Priority:
            share = self.headroom.get(priority)
            if share is None or not 0 < share <= 1:
                problems.append(f"headroom[{priority.name.lower()}] must be in (0, 1], got {share}")
        if problems:
            raise ValueError("admission settings: " + "; ".join(problems))


class BatchLimit:
    """Rows per batch, from a cost model fitted to observed batch times.

    A batch of n rows takes about `fixed + per_row * n` seconds. Both are estimated by
    exponentially weighted least squares over recent batches (old ones fade with
    `decay` per batch), and the limit is the size at which a batch takes `tolerance`
    times its fixed part: n = (tolerance - 1) * fixed / per_row. Past it batching stops
    being nearly free, and every critical request waiting behind a batch pays for its
    size. The fixed part is measured under the current load: when the event loop is
    busy, every batch waits longer regardless of its size, `fixed` grows and so does
    the limit (bigger batches amortise the wait), where a ratio to an idle-time
    baseline would shrink batches exactly when they should grow. The fit is only
    updated while batch sizes vary (a standing overload makes every batch the limit:
    then the last fit stands), and every move is smoothed.
    """

    def __init__(
        self,
        *,
        initial: int,
        minimum: int,
        maximum: int,
        tolerance: float,
        decay: float = 0.98,
        smoothing: float = 0.2,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.tolerance = tolerance
        self.limit = float(min(max(initial, minimum), maximum))
        self.fixed_s: float | None = None
        self.per_row_s: float | None = None
        self._decay = decay
        self._smoothing = smoothing
        self._sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # weight, n, n^2, t, n*t

    @property
    def rows(self) -> int:
        return int(self.limit)

    def seconds(self, rows: int) -> float | None:
        """The fitted time of a batch of `rows`; None before a fit."""
        if self.fixed_s is None or self.per_row_s is None:
            return None
        return self.fixed_s + self.per_row_s * rows

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or not seconds > 0:
            return
        d = self._decay
        sums = self._sums
        for index, value in enumerate((1.0, rows, rows * rows, seconds, rows * seconds)):
            sums[index] = d * sums[index] + value
        weight, total_n, total_nn, total_t, total_nt = sums
        mean_n, mean_t = total_n / weight, total_t / weight
        variance = total_nn / weight - mean_n * mean_n
        if variance <= (0.05 * mean_n) ** 2 or weight < 5:  # sizes hardly vary: no information on per_row
            return
        per_row = (total_nt / weight - mean_n * mean_t) / variance
        fixed = mean_t - per_row * mean_n
        if per_row <= 0 or fixed <= 0:
            return
        self.fixed_s, self.per_row_s = fixed, per_row
        target = (self.tolerance - 1) * fixed / per_row
        limit = (1 - self._smoothing) * self.limit + self._smoothing * target
        self.limit = min(max(limit, float(self.minimum)), float(self.maximum))

    def snapshot(self) -> dict[str, Any]:
        return {"batch_rows": self.rows, "fixed_s": self.fixed_s, "per_row_s": self.per_row_s,
                "tolerance": self.tolerance}  # fmt: skip


@dataclass(frozen=True)
class TenantPolicy:
    """What tenx.yaml says about one tenant (`model_server.tenants`)."""

    rate: float | None = None  # rows (predictions) per second; None: no quota
    burst: float | None = None  # bucket size; default: one second of `rate`
    weight: float = 1.0  # share of a queue under pressure, relative to the other tenants'
    priority: Priority | None = None  # the class of its requests that name none
    tier: str = "standard"  # free text for routing rules

    def __post_init__(self) -> None:
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"tenant rate must be above 0 predictions per second, got {self.rate}")
        if self.burst is not None and not self.burst >= 1:
            raise ValueError(f"tenant burst must be at least 1, got {self.burst}")
        if not self.weight > 0:
            raise ValueError(f"tenant weight must be above 0, got {self.weight}")


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._clock = clock
        self._at = clock()

    def _fill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, amount: float) -> bool:
        self._fill()
        if self.tokens >= amount or (self.tokens >= self.burst and amount > self.burst):
            self.tokens -= amount  # a request bigger than the burst goes when the bucket is full
            return True
        return False

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.burst, self.tokens + amount)

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` tokens (at most a full bucket) are there."""
        self._fill()
        return max(0.0, (min(amount, self.burst) - self.tokens) / self.rate)


OTHER_TENANTS = "*"  # the policy of tenants tenx.yaml does not name
MAX_TENANT_LABELS = 100  # tenants named in metrics; the rest count as "other"


class Tenants:
    """Per-tenant quotas and policies; tenants the config does not name get its `*` entry."""

    def __init__(self, policies: Mapping[str, TenantPolicy] | None = None, *, clock: Callable[[], float]) -> None:
        self.policies = dict(policies or {})
        self._default = self.policies.get(OTHER_TENANTS, TenantPolicy())
        self._clock = clock
        self._buckets: dict[str, TokenBucket | None] = {}
        self._labels: set[str] = set(self.policies) - {OTHER_TENANTS}

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant, self._default)

    def weight(self, tenant: str) -> float:
        return self.policy(tenant).weight

    def label(self, tenant: str) -> str:
        """The tenant's name in metrics: bounded, so a client cannot grow them without end."""
        if tenant in self._labels:
            return tenant
        if len(self._labels) < MAX_TENANT_LABELS + len(self.policies):
            self._labels.add(tenant)
            return tenant
        return "other"

    def charge(self, tenant: str, rows: int) -> None:
        """Take `rows` from the tenant's bucket, or raise Rejected (429)."""
        bucket = self._bucket(tenant)
        if bucket is None or bucket.take(rows):
            return
        wait = bucket.wait_s(rows)
        raise Rejected(
            f"tenant `{tenant}` is over its quota of {bucket.rate:g} predictions/s (burst {bucket.burst:g}); "
            f"retry in {wait:.2f} s or ask for a higher quota (model_server.tenants in tenx.yaml)",
            reason=QUOTA,
            status=429,
            retry_after_s=max(wait, 0.001),
        )

    def refund(self, tenant: str, rows: int) -> None:
        bucket = self._bucket(tenant)
        if bucket is not None:
            bucket.give_back(rows)

    def _bucket(self, tenant: str) -> TokenBucket | None:
        if tenant in self._buckets:
            return self._buckets[tenant]
        policy = self.policy(tenant)
        bucket = None
        if policy.rate is not None:
            bucket = TokenBucket(policy.rate, policy.burst or max(1.0, policy.rate), self._clock)
        if len(self._buckets) > 100_000:  # unnamed tenants come and go: forget their buckets
            # ... but never a named tenant's: a flood of made-up names reset every quota.
            self._buckets = {name: kept for name, kept in self._buckets.items() if name in self.policies}
        self._buckets[tenant] = bucket
        return bucket


class LoopPressure:
    """How much lower-class work the server takes in, from the event loop's lag and how
    busy its thread is.

    A single-threaded server spends CPU on every request it reads, admitted or not;
    when the loop falls behind, requests wait in socket buffers before any queue can
    order them, critical ones included. Two signals see that wait: the lag (how late a
    timer fires), and the loop thread's busy share (its time running or runnable over
    wall time, `runtime.ThreadDemand`, fed in by the server): a loop
    busy all the time has a queue of ready work in front of every new request even
    before its timers run late (Google's servers shed by CPU use for the same reason).
    They drive two controls:

    - `share` scales the sheddable and default headroom of every lane (AIMD: each
      sample where either signal is past its target, after smoothing, multiplies it by
      `decrease`; each sample within both adds `increase`, back up to 1). A lag alone
      (a GC pause, a model warming on a thread) only shortens the queue the lower
      classes may fill; critical headroom is never scaled.
    - `passing` is the fraction of sheddable requests `let_through` at all, whatever
      the queue holds, driven by the busy share alone: proportional in log space
      (each sample multiplies it by exp(-gain * (busy - busy_target))), so it settles
      where the loop is `busy_target` busy instead of swinging between all and
      nothing. A queue threshold cannot do this: batches leave the queue as fast as
      they form, and an empty queue admits the next request whatever its share
      (measured at 3x load: the share pinned at its floor still let 23% of sheddable
      requests in, and the loop stayed 85% busy).
    """

    def __init__(
        self,
        *,
        target_s: float = 0.001,
        busy_target: float = 0.8,
        decrease: float = 0.7,
        increase: float = 0.005,
        floor: float = 0.02,
        busy_smoothing: float = 0.1,
        gain: float = 0.25,
    ) -> None:
        self.target_s = target_s
        self.busy_target = busy_target
        self.decrease = decrease
        self.increase = increase
        self.floor = floor
        self.busy_smoothing = busy_smoothing  # per sample: about 100 ms at 10 ms samples
        self.gain = gain
        self.share = 1.0
        self.passing = 1.0
        self.lag_s = 0.0
        self.busy = 0.0
        self._credit = 0.0

    def observe(self, lag_s: float, busy: float | None = None) -> float:
        """One sample: the lag, and the loop thread's busy share since the last one.
        Returns the headroom share."""
        self.lag_s = 0.7 * self.lag_s + 0.3 * max(0.0, lag_s)
        if busy is not None:
            smoothing = self.busy_smoothing
            self.busy = (1 - smoothing) * self.busy + smoothing * min(1.0, max(0.0, busy))
            step = math.exp(-self.gain * (self.busy - self.busy_target))
            self.passing = min(1.0, max(self.floor, self.passing * step))
        if self.lag_s > self.target_s or self.busy > self.busy_target:
            self.share = max(self.floor, self.share * self.decrease)
        else:
            self.share = min(1.0, self.share + self.increase)
        return self.share

    def let_through(self) -> bool:
        """Whether the next sheddable request may go on to its lane: every one while
        `passing` is whole, else a `passing` fraction of them, evenly spaced (each call
        adds `passing` of credit; one passes per whole credit). Ask once per request."""
        if self.passing >= 1.0:
            self._credit = 0.0
            return True
        self._credit += self.passing  # below 1 after every call: no burst is saved up
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False


class Lane:
    """One model's queue with its admission control and batch limit.

    lane = Lane(AdmissionSettings(), clock=time.monotonic)
    shed = lane.admit(pending)      # raises Rejected; returns requests evicted for it
    batch = lane.take()             # by class then deadline; expired ones in batch.expired
    lane.finished(batch.rows, seconds)
    """

    def __init__(
        self, settings: AdmissionSettings, *, clock: Callable[[], float], tenants: Tenants | None = None
    ) -> None:
        self.settings = settings
        self.tenants = tenants or Tenants(clock=clock)
        self.queue = BatchQueue(bounds=dict.fromkeys(Priority, settings.queue_rows), clock=clock)
        self.limit = BatchLimit(
            initial=settings.max_batch_rows if not settings.shedding else max(settings.min_batch_rows, 32),
            minimum=settings.min_batch_rows,
            maximum=settings.max_batch_rows,
            tolerance=settings.latency_tolerance,
        )
        self.in_flight_rows = 0
        self.admit_share = 1.0  # scales the lower classes' headroom (LoopPressure sets it)
        self._clock = clock
        self._served: collections.deque[tuple[float, int]] = collections.deque()  # (finished at, rows)
        self._served_rows = 0
        self.batch_rows = 0.0  # rows per batch taken, smoothed: what two batches hold when requests are big
        self.backlogged = False  # critical work backed up when the last batch was taken (next_batch_rows)
        self._fit_after = -math.inf  # batch times feed the limit's fit from then on (not during a backlog)

    def bound(self) -> int:
        """Rows the queue admits in all: the rows the model serves in `queue_delay_ms`
        (its batch limit over the fitted time of such a batch; before a fit, the rows it
        served over the last second), at least two batches' worth, at most `queue_rows`.
        A batch holds at least one request: with requests bigger than the batch limit,
        every batch is one request, the batch sizes never vary, the cost model is never
        fitted, and two batches are two requests, not twice the limit (a bound of 128
        rows once left room for one 100-entity request and nothing else)."""
        settings = self.settings
        if not settings.shedding:
            return settings.queue_rows
        rows = self.limit.rows
        seconds = self.limit.seconds(rows)
        rate = rows / seconds if seconds else self.served_per_s()
        floor = 2 * max(rows, math.ceil(self.batch_rows))
        return int(min(settings.queue_rows, max(floor, rate * settings.queue_delay_ms / 1000)))

    def threshold(self, priority: Priority) -> int:
        """Queued rows below which `priority` is admitted. The loop-lag share cuts the
        lower classes' headroom: default work's never below one batch (a lag with a
        short queue, a GC pause or a model warming on a thread, is not relieved by
        refusing work a client waits for), sheddable work's to nothing: while the loop
        lags, every batch that carries sheddable rows delays the critical ones, and
        each admitted sheddable request tells a throttling client to send more."""
        full = int(self.bound() * self.settings.headroom[priority])
        if priority is Priority.CRITICAL or self.admit_share >= 1.0:
            return full
        cut = int(full * self.admit_share)
        return cut if priority is Priority.SHEDDABLE else max(min(full, self.limit.rows), cut)

    def room(self, item: Pending) -> int:
        """Queued rows below which `item` is admitted: its class's threshold, and for
        critical work at least the rows the model serves in half the time left to its
        deadline (critical rows go first, so that is its wait), up to `queue_rows`. A
        burst of critical work then waits within its deadline instead of being refused
        at a bound sized for the lower classes' latency."""
        threshold = self.threshold(item.priority)
        if item.priority is not Priority.CRITICAL:
            return threshold
        rows = self.limit.rows
        seconds = self.limit.seconds(rows)
        rate = max(rows / seconds if seconds else 0.0, self.served_per_s())
        servable = rate * max(0.0, item.deadline - self._clock()) / 2
        return int(min(self.settings.queue_rows, max(threshold, servable)))

    def served_per_s(self, window_s: float = 1.0) -> float:
        """Rows finished per second over the last `window_s`: under overload, what the
        model really serves (the fitted batch cost is confounded by a busy loop then)."""
        now = self._clock()
        while self._served and self._served[0][0] < now - window_s:
            self._served_rows -= self._served.popleft()[1]
        return self._served_rows / window_s

    def admit(self, item: Pending) -> list[Pending]:
        """Queue `item` or raise Rejected. Returns the requests evicted to make room for
        it (answer them as shed)."""
        settings = self.settings
        if not settings.shedding:
            item.priority = Priority.DEFAULT  # one FIFO class: deadlines are equal per class, so arrival order
            if self.queue.rows() + item.rows > settings.queue_rows and len(self.queue):
                raise Rejected(
                    f"the queue holds {self.queue.rows()} of {settings.queue_rows} rows; retry later", reason=OVERLOAD
                )
            self.queue.offer(item)
            return []
        bound = self.bound()
        queued = self.queue.rows()
        evicted: list[Pending] = []
        threshold = self.room(item)
        if queued >= bound * settings.headroom[Priority.SHEDDABLE] / 2:  # under pressure: fair shares apply
            evicted = self._fair_share(item, threshold)
            queued = self.queue.rows()
        if queued + item.rows > threshold and queued > 0:
            if item.priority is Priority.CRITICAL:
                evicted += self.queue.evict(queued + item.rows - threshold, below=item.priority)
                queued = self.queue.rows()
            if queued + item.rows > threshold and queued > 0:
                self._restore(evicted)
                name = item.priority.name.lower()
                raise Rejected(
                    f"overloaded: {queued} rows queued, {name} requests are admitted below {threshold} of {bound}; "
                    "retry later",
                    reason=OVERLOAD,
                )
        self.queue.offer(item)
        return evicted

    def _fair_share(self, item: Pending, threshold: int) -> list[Pending]:
        """A tenant's share of the rows its request's class may fill, weighted over the
        tenants with work queued."""
        tenant = item.tenant
        others = [t for t in self.queue.tenants() if t != tenant]
        if not others:
            return []
        weights = sum(self.tenants.weight(t) for t in others) + self.tenants.weight(tenant)
        share = int(threshold * self.tenants.weight(tenant) / weights)
        held = self.queue.tenant_rows(tenant)
        if held + item.rows <= share:
            return []
        evicted = []
        if item.priority is not Priority.SHEDDABLE:  # its own lower-class work makes room first
            evicted = self.queue.evict(held + item.rows - share, below=item.priority, tenant=tenant)
            held = self.queue.tenant_rows(tenant)
        if held + item.rows > share and held > 0:
            self._restore(evicted)
            raise Rejected(
                f"tenant `{tenant}` holds {held} queued rows, its fair share ({share} of {threshold}) while the "
                "queue is under pressure; retry later",
                reason=FAIR_SHARE,
            )
        return evicted

    def _restore(self, evicted: list[Pending]) -> None:
        """Undo evictions made for a request that is refused after all."""
        for item in evicted:
            self.queue.offer(item)
        evicted.clear()

    def next_batch_rows(self) -> int:
        """The rows the next batch may take: the batch limit, or, once critical work
        has backed up (its oldest request queued for `queue_delay_ms`, the wait the
        bound is sized for, with more critical rows queued than `BACKLOG_BATCHES`
        batches take), that backlog shared among those batches, up to `max_batch_rows`.
        The limit keeps batches small so that a critical request does not wait behind
        a big one; once critical requests wait behind each other instead, a small batch
        spares them nothing, and its fixed cost (a store round trip, a model call) paid
        per few rows is what keeps the backlog growing. Lower-class backlogs do not grow
        batches: a critical arrival would wait behind them."""
        rows = self.limit.rows
        critical = self.queue.rows(Priority.CRITICAL)
        oldest = self.queue.oldest_enqueued(Priority.CRITICAL)
        self.backlogged = (
            critical > BACKLOG_BATCHES * rows
            and oldest is not None
            and self._clock() - oldest >= self.settings.queue_delay_ms / 1000
        )
        if not self.backlogged:
            return rows
        self._fit_after = self._clock() + BACKLOG_FIT_PAUSE_S
        return min(self.settings.max_batch_rows, math.ceil(critical / BACKLOG_BATCHES))

    def take(self) -> Batch:
        settings = self.settings
        batch = self.queue.take(self.next_batch_rows() if settings.shedding else settings.max_batch_rows)
        self.in_flight_rows += batch.rows
        return batch

    def finished(self, rows: int, seconds: float) -> None:
        """A batch of `rows` (from `take`) is done; it took `seconds` from take to answer."""
        self.in_flight_rows -= rows
        if self.settings.shedding:
            # Not during or just after a critical backlog: its bigger batches and the
            # smaller ones between them vary the sizes the fit learns from while every
            # batch waits on a loop short of CPU, and the fit then took those waits for
            # a fixed cost worth 1,024-row batches of any class (seen at 10x).
            if self._clock() >= self._fit_after:
                self.limit.observe(rows, seconds)
            self.batch_rows = 0.9 * self.batch_rows + 0.1 * rows if self.batch_rows else float(rows)
            self._served.append((self._clock(), rows))
            self._served_rows += rows
            self.served_per_s()  # drop what fell out of the window

    def snapshot(self) -> dict[str, Any]:
        return {
            "queued_rows": self.queue.rows(),
            "queued_rows_by_class": {p.name.lower(): self.queue.rows(p) for p in Priority},
            "bound_rows": self.bound(),
            "in_flight_rows": self.in_flight_rows,
            **self.limit.snapshot(),
        }
