"""Canary judgement: which requests a canary takes, and when it must go.

- `takes(entity, percent)`: sticky by entity key: the same entity always lands on the
  same side for the whole canary (a hash of the key, not a coin flip per request).
- `CanaryJudge`: per side (the baseline and the canary), over a window of recent
  requests: errors, scoring latency and scores. Once the canary has `min_requests`,
  it is rolled back when its error rate exceeds the baseline's by more than
  `max_error_rate_delta`, its p99 is more than `max_p99_ratio` times the baseline's, or
  its scores drift from the baseline's on the same window (population stability index
  over the baseline's deciles above `max_psi`). Promotion is a person's decision
  (`tenx models promote`); rollback is automatic.

Plain code with no I/O and no clock: the server feeds it and asks for a verdict once a
second; the tests feed it numbers.
"""

from __future__ import annotations

import collections
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurestore.models import Canary

BUCKETS = 10_000


def takes(entity: Any, percent: float) -> bool:
    """Whether the canary serves this entity (stable across requests, processes, restarts).
    Hashed as the online key spells it: 1 and "1" are one entity of a string view, and
    were split by their JSON types (`repr`)."""
    key = "|".join(f"{name}={entity[name]}" for name in sorted(entity)) if isinstance(entity, dict) else str(entity)
    return zlib.crc32(key.encode()) % BUCKETS < percent * BUCKETS / 100


def psi(expected: Sequence[float], actual: Sequence[float], bins: int = 10) -> float:
    """Population stability index of `actual` against `expected`, over `expected`'s
    quantile bins (0: the same distribution; above 0.25 is usually read as a shift)."""
    base = np.asarray(expected, dtype=np.float64)
    other = np.asarray(actual, dtype=np.float64)
    if len(base) == 0 or len(other) == 0:
        return 0.0
    edges = np.unique(np.quantile(base, np.linspace(0, 1, bins + 1)[1:-1]))
    share_base = np.bincount(np.searchsorted(edges, base, side="right"), minlength=len(edges) + 1) / len(base)
    share_other = np.bincount(np.searchsorted(edges, other, side="right"), minlength=len(edges) + 1) / len(other)
    floor = 1e-4
    share_base = np.maximum(share_base, floor)
    share_other = np.maximum(share_other, floor)
    return float(np.sum((share_other - share_base) * np.log(share_other / share_base)))


@dataclass
class Side:
    window: int
    requests: int = 0
    errors: int = 0
    latencies: collections.deque[float] = field(init=False)
    scores: collections.deque[float] = field(init=False)
    outcomes: collections.deque[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.latencies = collections.deque(maxlen=self.window)
        self.scores = collections.deque(maxlen=self.window * 4)
        self.outcomes = collections.deque(maxlen=self.window)

    def error_rate(self) -> float:
        return (len(self.outcomes) - sum(self.outcomes)) / len(self.outcomes) if self.outcomes else 0.0

    def p99(self) -> float | None:
        return float(np.percentile(self.latencies, 99)) if self.latencies else None


class CanaryJudge:
    def __init__(self, canary: Canary, *, window: int = 5000) -> None:
        self.canary = canary
        self.baseline = Side(window)
        self.candidate = Side(window)

    def record(self, canary: bool, *, ok: bool, seconds: float, scores: Sequence[float | None] = ()) -> None:
        side = self.candidate if canary else self.baseline
        side.requests += 1
        side.outcomes.append(ok)
        if ok:
            side.latencies.append(seconds)
            side.scores.extend(s for s in scores if s is not None and not math.isnan(s))
        else:
            side.errors += 1

    def comparison(self) -> dict[str, Any]:
        base, cand = self.baseline, self.candidate
        base_p99, cand_p99 = base.p99(), cand.p99()
        return {
            "baseline": {"requests": base.requests, "error_rate": base.error_rate(), "p99_ms": _ms(base_p99)},
            "canary": {"requests": cand.requests, "error_rate": cand.error_rate(), "p99_ms": _ms(cand_p99)},
            "p99_ratio": cand_p99 / base_p99 if base_p99 and cand_p99 else None,
            "psi": psi(list(base.scores), list(cand.scores)) if base.scores and cand.scores else None,
        }

    def verdict(self) -> str | None:
        """Why the canary must be rolled back now, or None (not yet, or nothing wrong)."""
        limits = self.canary.limits
        if self.candidate.requests < limits.min_requests:
            return None
        numbers = self.comparison()
        delta = numbers["canary"]["error_rate"] - numbers["baseline"]["error_rate"]
        if delta > limits.max_error_rate_delta:
            return (
                f"error rate {numbers['canary']['error_rate']:.1%} vs {numbers['baseline']['error_rate']:.1%} on the "
                f"baseline (limit +{limits.max_error_rate_delta:.1%}) over {self.candidate.requests} canary requests"
            )
        ratio = numbers["p99_ratio"]
        if self.baseline.requests >= limits.min_requests and ratio is not None and ratio > limits.max_p99_ratio:
            return (
                f"p99 {numbers['canary']['p99_ms']:.2f} ms vs {numbers['baseline']['p99_ms']:.2f} ms on the baseline "
                f"({ratio:.2f}x, limit {limits.max_p99_ratio:g}x)"
            )
        drift = numbers["psi"]
        if self.baseline.requests >= limits.min_requests and drift is not None and drift > limits.max_psi:
            return (
                f"scores shifted: PSI {drift:.3f} against the baseline's on the same window (limit {limits.max_psi:g})"
            )
        return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
