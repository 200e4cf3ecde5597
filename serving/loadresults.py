"""What a load run measured: latency summaries, the generator's verdict on its own
lateness, per-label figures and a timeline, and several rounds merged into one.

Pure (numpy, no I/O): the engines in serving/loadgen.py record per request when it was
meant to go, when it went, when its answer came and its status; everything here is
computed from those arrays, the same for either engine.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np

MAX_ERROR_SAMPLES = 5  # distinct error messages kept per run
FAILED = -1  # status of a request whose connection failed; 0: no answer
THROTTLED = -2  # status of a request the client-side throttle refused (never sent)


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles (numpy, linear interpolation over every sample) in milliseconds."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    # Every sample, in ms: what `merge_summaries` pools (not in to_dict; None when dropped).
    samples_ms: np.ndarray | None = field(default=None, repr=False, compare=False)


def summarize(seconds: np.ndarray) -> LatencySummary:
    """The summary of latencies given in seconds (NaN figures when there are none).

    >>> summarize(np.array([0.001, 0.002, 0.003])).p50_ms
    2.0
    """
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    if not len(values):
        nan = math.nan
        return LatencySummary(0, nan, nan, nan, nan, nan, nan, samples_ms=values)
    p50, p90, p99, p999 = (float(v) for v in np.percentile(values, [50, 90, 99, 99.9]))
    return LatencySummary(
        len(values), p50, p90, p99, p999, float(values.max()), float(values.mean()), samples_ms=values
    )


def merge_summaries(parts: Sequence[LatencySummary]) -> LatencySummary:
    """One summary of several runs' latencies: percentiles over all their samples
    together (not an average of percentiles, which has no meaning).

    >>> merge_summaries([summarize(np.array([0.001, 0.002])), summarize(np.array([0.003]))]).p50_ms
    2.0
    """
    arrays = []
    for part in parts:
        if part.samples_ms is None:
            if part.count:
                raise ValueError("merge_summaries: a summary kept no samples (made by summarize in this process?)")
            continue
        arrays.append(part.samples_ms)
    return summarize(np.concatenate(arrays) / 1000.0 if arrays else np.empty(0))


def _without_samples(data: dict[str, Any]) -> dict[str, Any]:
    """An asdict() of a result, its latency samples left out (figures only)."""
    latency = data.get("latency")
    if isinstance(latency, dict):
        latency.pop("samples_ms", None)
    return data


@dataclass(frozen=True)
class LagVerdict:
    """How far actual send times fell behind intended ones, and whether that voids the run."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    scheduled_rate: float  # requests in the window / its length (Poisson: near the offered rate)
    send_rate: float  # requests sent / the time it took to send them
    fell_behind: bool
    reason: str  # why it fell behind; "" when it did not


def judge_lag(
    intended_s: np.ndarray,
    sent_s: np.ndarray,
    *,
    window_s: float,
    max_p99_lag_s: float = 0.001,
    min_send_share: float = 0.95,
) -> LagVerdict:
    """The verdict on one run's sends: `intended_s` and `sent_s` are seconds from the
    window's start (NaN: never sent). It fell behind when the p99 lag exceeds
    `max_p99_lag_s`, or when it sent less than `min_send_share` of the scheduled rate
    (sending took longer than the window, or requests were never sent).

    >>> judge_lag(np.array([0.0, 0.5]), np.array([0.0001, 0.5001]), window_s=1.0).fell_behind
    False
    """
    intended = np.asarray(intended_s, dtype=np.float64)
    sent = np.asarray(sent_s, dtype=np.float64)
    if intended.shape != sent.shape:
        raise ValueError(f"judge_lag: {len(intended)} intended times but {len(sent)} send times")
    if not window_s > 0:
        raise ValueError(f"judge_lag: window_s must be positive; got {window_s}")
    scheduled_rate = len(intended) / window_s
    went = ~np.isnan(sent)
    lags = np.maximum(sent[went] - intended[went], 0.0)
    if not len(lags):
        nan = math.nan
        return LagVerdict(nan, nan, nan, scheduled_rate, 0.0, len(intended) > 0, "nothing was sent")
    p50, p99 = (float(v) for v in np.percentile(lags, [50, 99]))
    span = max(window_s, float(sent[went].max()))
    send_rate = int(went.sum()) / span
    reasons = []
    if p99 > max_p99_lag_s:
        reasons.append(f"p99 send lag {p99 * 1000:.2f} ms > {max_p99_lag_s * 1000:g} ms")
    if send_rate < min_send_share * scheduled_rate:
        reasons.append(
            f"sent {send_rate:,.0f} req/s < {min_send_share:.0%} of the scheduled {scheduled_rate:,.0f} req/s"
        )
    return LagVerdict(
        p50 * 1000, p99 * 1000, float(lags.max()) * 1000, scheduled_rate, send_rate, bool(reasons), "; ".join(reasons)
    )


def timeline(
    labels: Sequence[str],
    kinds: np.ndarray,
    *,
    intended_s: np.ndarray,
    status: np.ndarray,
    latency_s: np.ndarray,
    marked: np.ndarray | None,
    bucket_s: float,
    window_s: float,
) -> dict[str, Any]:
    """Per label, in buckets of `bucket_s` by intended send time (seconds from the
    window's start): requests scheduled (`sent`), answered 2xx (`ok`), 2xx marked
    (`degraded`), 503 (`shed`), refused by the client's throttle (`throttled`), anything
    else (`errors`: other statuses, failed or unanswered), and the p99 of the 2xx
    answers' latency in ms (None: no 2xx answer in the bucket).

    >>> line = timeline(("a",), np.zeros(3, dtype=np.int64), intended_s=np.array([0.1, 0.2, 1.5]),
    ...                 status=np.array([200, 503, 200]), latency_s=np.array([0.01, 0.0, 0.02]),
    ...                 marked=None, bucket_s=1.0, window_s=2.0)
    >>> line["t_s"], line["classes"]["a"]["ok"], line["classes"]["a"]["shed"]
    ([0.0, 1.0], [1, 1], [1, 0])
    """
    buckets = max(1, math.ceil(window_s / bucket_s - 1e-9))
    at = np.minimum((intended_s // bucket_s).astype(np.int64), buckets - 1)
    names = list(dict.fromkeys(labels))
    label_of = np.array([names.index(label) for label in labels], dtype=np.int64)[kinds]
    ok = (status >= 200) & (status < 300)
    marked = marked if marked is not None else np.zeros(len(status), dtype=bool)
    kinds_of = {
        "sent": np.ones(len(status), dtype=bool),
        "ok": ok,
        "degraded": ok & marked,
        "shed": status == 503,
        "throttled": status == THROTTLED,
        "errors": ~ok & (status != 503) & (status != THROTTLED),
    }
    classes: dict[str, dict[str, list[Any]]] = {}
    for number, name in enumerate(names):
        mine = label_of == number
        line = {key: np.bincount(at[mine & hit], minlength=buckets).tolist() for key, hit in kinds_of.items()}
        p99: list[float | None] = []
        for bucket in range(buckets):
            samples = latency_s[mine & ok & (at == bucket)]
            p99.append(float(np.percentile(samples, 99)) * 1000 if len(samples) else None)
        classes[name] = {**line, "p99_ms": p99}
    return {"bucket_s": bucket_s, "t_s": [round(b * bucket_s, 6) for b in range(buckets)], "classes": classes}


@dataclass(frozen=True)
class LabelResult:
    """One label's share of a run's window (warm-up excluded), as in `LoadResult`."""

    scheduled: int
    sent: int
    ok: int  # answered 2xx
    statuses: dict[int, int]  # HTTP status -> count
    errors: int
    unfinished: int
    latency: LatencySummary  # of 2xx answers, from the intended send time
    within_deadline: int | None  # 2xx answers within the request's deadline; None: the plan gave none
    marked: int | None  # 2xx answers whose body held the plan's marker; None: no marker
    throttled: int = 0  # refused by the client-side throttle, never sent

    def to_dict(self) -> dict[str, Any]:
        data = _without_samples(asdict(self))
        data["statuses"] = {str(status): count for status, count in sorted(self.statuses.items())}
        return data


def _summed_statuses(counts: Iterable[dict[int, int]]) -> dict[int, int]:
    total: collections.Counter[int] = collections.Counter()
    for one in counts:
        total.update(one)
    return dict(sorted(total.items()))


def _sum_or_none(values: Sequence[int | None]) -> int | None:
    """The sum, or None when any run did not count it."""
    return None if any(value is None for value in values) else sum(cast(int, value) for value in values)


def merge_label_results(parts: Sequence[LabelResult]) -> LabelResult:
    """One label's figures over several runs (see `merge_results`)."""

    return LabelResult(
        scheduled=sum(part.scheduled for part in parts),
        sent=sum(part.sent for part in parts),
        ok=sum(part.ok for part in parts),
        statuses=_summed_statuses(part.statuses for part in parts),
        errors=sum(part.errors for part in parts),
        unfinished=sum(part.unfinished for part in parts),
        latency=merge_summaries([part.latency for part in parts]),
        within_deadline=_sum_or_none([part.within_deadline for part in parts]),
        marked=_sum_or_none([part.marked for part in parts]),
        throttled=sum(part.throttled for part in parts),
    )


def split_by_label(
    labels: Sequence[str],
    kinds: np.ndarray,
    *,
    status: np.ndarray,
    sent: np.ndarray,
    latency_s: np.ndarray,
    deadlines_s: np.ndarray | None,
    marked: np.ndarray | None,
) -> dict[str, LabelResult]:
    """Each label's figures: request `i` is of kind `kinds[i]` (an index into `labels`,
    which may repeat a label) with `status[i]` (HTTP status; 0 unanswered, -1 failed, -2 throttled),
    `sent[i]` (NaN: never sent) and `latency_s[i]`; `deadlines_s[kind]` and `marked[i]`
    are optional. Labels in order of first appearance in `labels`.

    >>> split = split_by_label(("a", "b", "a"), np.array([0, 1, 2, 0]), status=np.array([200, 503, 200, 0]),
    ...                        sent=np.zeros(4), latency_s=np.array([0.001, 0.0, 0.5, 0.0]),
    ...                        deadlines_s=np.array([0.1, 0.1, 0.1]), marked=None)
    >>> split["a"].ok, split["a"].within_deadline, split["a"].unfinished, split["b"].statuses
    (2, 1, 1, {503: 1})
    """
    names = list(dict.fromkeys(labels))
    of_kind = np.array([names.index(label) for label in labels], dtype=np.int64)
    label_of = of_kind[kinds]
    ok = (status >= 200) & (status < 300)
    in_time = ok & (latency_s <= deadlines_s[kinds]) if deadlines_s is not None else None
    split = {}
    for number, name in enumerate(names):
        mine = label_of == number
        codes, counts = np.unique(status[mine & (status > 0)], return_counts=True)
        split[name] = LabelResult(
            scheduled=int(mine.sum()),
            sent=int((mine & ~np.isnan(sent)).sum()),
            ok=int((mine & ok).sum()),
            statuses={int(c): int(n) for c, n in zip(codes, counts, strict=True)},
            errors=int((mine & (status == FAILED)).sum()),
            unfinished=int((mine & (status == 0)).sum()),
            latency=summarize(latency_s[mine & ok]),
            within_deadline=int((mine & in_time).sum()) if in_time is not None else None,
            marked=int((mine & ok & marked).sum()) if marked is not None else None,
            throttled=int((mine & (status == THROTTLED)).sum()),
        )
    return split


@dataclass(frozen=True)
class LoadResult:
    """What one run measured over its window (warm-up excluded)."""

    offered_rate: float
    duration_s: float
    scheduled: int  # requests whose intended time fell in the window
    sent: int
    completed: int  # answered, any status
    ok: int  # answered 2xx
    statuses: dict[int, int]  # HTTP status -> count
    errors: int  # connection refused, reset or closed before the answer, malformed answer
    unfinished: int  # no answer within drain_s of the last send
    error_samples: tuple[str, ...]
    latency: LatencySummary  # of 2xx answers, from the intended send time
    lag: LagVerdict  # from intended to actual send (a wait for a free connection included)
    schedule_lag_p99_ms: float  # from intended to the scheduler's hand-off (the generator's own lateness)
    waited_for_connection: int  # requests that found all max_connections busy
    connections: int  # the most connections open at once
    generator_cpu_s: float  # CPU time of the generator process during the run (both threads)
    wall_s: float

    by_label: dict[str, LabelResult] = field(default_factory=dict)  # empty when the plan has no labels
    marked: int | None = None  # 2xx answers whose body held the plan's marker; None: no marker
    throttled: int = 0  # refused by the client-side throttle, never sent
    timeline: dict[str, Any] | None = None  # see `timeline`; None: the plan asked for none
    started_epoch_s: float = 0.0  # time.time() at the window's start (warm-up excluded)
    nice: int = 0  # the niceness the generator's threads ran at, as the generator read it back
    engine: str = "python"  # the generator's engine: "python" or "native" (tenx-loadgen)

    @property
    def completed_rate(self) -> float:
        return self.completed / self.duration_s

    @property
    def ok_rate(self) -> float:
        return self.ok / self.duration_s

    def to_dict(self) -> dict[str, Any]:
        data = _without_samples(asdict(self))
        data["statuses"] = {str(status): count for status, count in sorted(self.statuses.items())}
        data["error_samples"] = list(self.error_samples)
        data["completed_rate"] = self.completed_rate
        data["ok_rate"] = self.ok_rate
        data["by_label"] = {label: part.to_dict() for label, part in self.by_label.items()}
        return data


def merge_results(results: Sequence[LoadResult]) -> LoadResult:
    """Several runs of the same load (the rounds of one step) as one run: counts and
    times summed over their windows, percentiles over every answer of them all, the
    generator's lag the worst of theirs (a round it fell behind in taints the whole).
    The timeline is kept only for a single run.

    >>> one = LoadResult(offered_rate=10, duration_s=1, scheduled=10, sent=10, completed=10, ok=10,
    ...                  statuses={200: 10}, errors=0, unfinished=0, error_samples=(),
    ...                  latency=summarize(np.full(10, 0.002)), lag=judge_lag(np.zeros(1), np.zeros(1), window_s=1),
    ...                  schedule_lag_p99_ms=0.1, waited_for_connection=0, connections=2, generator_cpu_s=0.1,
    ...                  wall_s=1.0)
    >>> both = merge_results([one, one])
    >>> both.ok, both.duration_s, both.ok_rate, both.latency.count
    (20, 2, 10.0, 20)
    """
    if not results:
        raise ValueError("merge_results: no results to merge")
    if len(results) == 1:
        return results[0]
    first = results[0]
    duration = sum(result.duration_s for result in results)
    lags = [result.lag for result in results]
    lag = LagVerdict(
        p50_ms=max(verdict.p50_ms for verdict in lags),
        p99_ms=max(verdict.p99_ms for verdict in lags),
        max_ms=max(verdict.max_ms for verdict in lags),
        scheduled_rate=sum(v.scheduled_rate * r.duration_s for v, r in zip(lags, results, strict=True)) / duration,
        send_rate=sum(v.send_rate * r.duration_s for v, r in zip(lags, results, strict=True)) / duration,
        fell_behind=any(verdict.fell_behind for verdict in lags),
        reason="; ".join(dict.fromkeys(verdict.reason for verdict in lags if verdict.reason)),
    )
    labels = list(dict.fromkeys(label for result in results for label in result.by_label))
    return LoadResult(
        offered_rate=first.offered_rate,
        duration_s=duration,
        scheduled=sum(result.scheduled for result in results),
        sent=sum(result.sent for result in results),
        completed=sum(result.completed for result in results),
        ok=sum(result.ok for result in results),
        statuses=_summed_statuses(result.statuses for result in results),
        errors=sum(result.errors for result in results),
        unfinished=sum(result.unfinished for result in results),
        error_samples=tuple(dict.fromkeys(s for r in results for s in r.error_samples))[:MAX_ERROR_SAMPLES],
        latency=merge_summaries([result.latency for result in results]),
        lag=lag,
        schedule_lag_p99_ms=max(result.schedule_lag_p99_ms for result in results),
        waited_for_connection=sum(result.waited_for_connection for result in results),
        connections=max(result.connections for result in results),
        generator_cpu_s=sum(result.generator_cpu_s for result in results),
        wall_s=sum(result.wall_s for result in results),
        by_label={
            label: merge_label_results([r.by_label[label] for r in results if label in r.by_label]) for label in labels
        },
        marked=_sum_or_none([result.marked for result in results]),
        throttled=sum(result.throttled for result in results),
        timeline=None,
        started_epoch_s=first.started_epoch_s,
        nice=max(result.nice for result in results),
        engine="+".join(dict.fromkeys(result.engine for result in results)),
    )
