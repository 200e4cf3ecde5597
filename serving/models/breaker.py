"""Circuit breakers for the model server's dependencies: stop calling one that fails or
slows down, and probe it again after a wait.

resilience4j's count-based breaker as a plain class with an injected clock and no I/O.
CLOSED judges a sliding window of the last `window` completed calls: once it holds at
least `minimum_calls`, a failure rate or a slow-call rate at or above its limit opens
the circuit. OPEN refuses every call for `open_wait_s`, then becomes HALF_OPEN, which
lets `half_open_calls` probes through and judges them together once all have completed:
too many failed or slow, and it opens again (the wait restarts); else it closes with an
empty window.

    breakers = Breakers(BreakerSettings(window=20), overrides={"model:fraud_mlp": ...})
    if breakers.allow(ONLINE_STORE):          # False while the circuit is open
        ...                                   # call the store, then
        breakers.record(ONLINE_STORE, ok=True, seconds=0.003)

Not thread-safe, on purpose: the server calls it from its one asyncio event loop, so it
takes no locks. Every call that `allow` let through must be recorded (a cancelled one as
failed): a half-open breaker waits for all of its probes before it judges them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def code(self) -> int:
        """For a Prometheus gauge: 0 closed, 1 half-open, 2 open (higher is worse)."""
        return _CODES[self]


_CODES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

Transition = Callable[[str, BreakerState, BreakerState, str], None]
"""Told (dependency, old state, new state, why) after every change of state: metrics, logs."""


@dataclass(frozen=True)
class BreakerSettings:
    """When a breaker opens and how it recovers. Rates are fractions in (0, 1]."""

    window: int = 20  # count-based sliding window: the last `window` completed calls
    minimum_calls: int = 5  # no verdict before this many calls are in the window
    failure_rate: float = 0.5  # open when failures / calls in the window >= this
    slow_call_rate: float = 0.5  # open when slow calls / calls in the window >= this
    slow_call_s: float = 0.5  # a call taking >= this many seconds is slow, even if it succeeded (math.inf: never)
    open_wait_s: float = 5.0  # how long OPEN refuses before letting probes through (HALF_OPEN)
    half_open_calls: int = 3  # probes allowed in HALF_OPEN; judged together once all have completed

    def __post_init__(self) -> None:
        _check_count("window", self.window, minimum=1)
        _check_count("minimum_calls", self.minimum_calls, minimum=1)
        if self.minimum_calls > self.window:
            # resilience4j quietly caps it at the window; a window that never fills to the
            # minimum would never open, so say so instead.
            raise ValueError(
                f"BreakerSettings.minimum_calls: got {self.minimum_calls}, expected at most window={self.window}"
            )
        _check_rate("failure_rate", self.failure_rate)
        _check_rate("slow_call_rate", self.slow_call_rate)
        _check_seconds("slow_call_s", self.slow_call_s, finite=False)
        _check_seconds("open_wait_s", self.open_wait_s, finite=True)
        _check_count("half_open_calls", self.half_open_calls, minimum=1)


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"BreakerSettings.{name}: got {value!r}, expected an integer >= {minimum}")


def _check_rate(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"BreakerSettings.{name}: got {value!r}, expected a fraction in (0, 1], e.g. 0.5 for 50%")


def _check_seconds(name: str, value: object, *, finite: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"BreakerSettings.{name}: got {value!r}, expected seconds > 0")
    if finite and math.isinf(value):
        raise ValueError(f"BreakerSettings.{name}: got {value!r}, expected a finite number of seconds")


class _Window:
    """The last `size` completed calls, with running counts: O(1) to add and to judge."""

    def __init__(self, size: int) -> None:
        self._calls: deque[tuple[bool, bool]] = deque(maxlen=size)  # (failed, slow)
        self.failures = 0
        self.slow = 0

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def full(self) -> bool:
        return len(self._calls) == self._calls.maxlen

    def add(self, *, failed: bool, slow: bool) -> None:
        if self.full:
            old_failed, old_slow = self._calls[0]  # append evicts it
            self.failures -= old_failed
            self.slow -= old_slow
        self._calls.append((failed, slow))
        self.failures += failed
        self.slow += slow

    @property
    def failure_rate(self) -> float:
        return self.failures / len(self._calls) if self._calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        return self.slow / len(self._calls) if self._calls else 0.0


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.1f}".removesuffix(".0") + "%"


class CircuitBreaker:
    """One dependency's breaker. `allow` before each call, `record` after it.

    `on_transition(name, old, new, reason)` is called after every change of state,
    including OPEN -> HALF_OPEN, which happens lazily: the first `state`, `allow` or
    `record` after `open_wait_s` has passed makes it.
    """

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float],
        on_transition: Transition | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        # CLOSED: the sliding window. HALF_OPEN: the probe round. OPEN: whichever opened it.
        self._window = _Window(settings.window)
        self._probe_at = 0.0  # clock time OPEN turns HALF_OPEN
        self._permits = 0  # probes let through in this HALF_OPEN round
        self._reason = ""

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._probe_at:
            self._window = _Window(self.settings.half_open_calls)
            self._permits = 0
            settings = self.settings
            self._move(
                BreakerState.HALF_OPEN,
                f"open for {settings.open_wait_s:g} s; letting {settings.half_open_calls} probe calls through",
            )
        return self._state

    @property
    def reason(self) -> str:
        """Why it last opened ("" if it never has); kept after it closes again."""
        return self._reason

    def allow(self) -> bool:
        """May a call go to the dependency now? In HALF_OPEN each True is a probe permit,
        and the call must be recorded."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._permits >= self.settings.half_open_calls:
            return False
        self._permits += 1
        return True

    def release(self) -> None:
        """A permitted call ended without saying anything about the dependency (it ran
        out of its caller's time before the dependency had a fair chance): in HALF_OPEN
        its probe permit is given back for another call. Without this a probe that was
        neither recorded nor released held its permit for good, and a half-open circuit
        whose permits were all held refused every call, for ever."""
        if self.state is BreakerState.HALF_OPEN and len(self._window) < self._permits:
            self._permits -= 1

    def record(self, ok: bool, seconds: float) -> None:
        """A completed call: failed unless `ok`, slow if it took >= slow_call_s.

        Ignored while OPEN, and in HALF_OPEN beyond the permits given: those are
        stragglers let through before the circuit opened, not probes.
        """
        state = self.state
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN and len(self._window) >= self._permits:
            return
        self._window.add(failed=not ok, slow=seconds >= self.settings.slow_call_s)
        if state is BreakerState.CLOSED:
            if len(self._window) >= self.settings.minimum_calls:
                reason = self._verdict(f"over the last {len(self._window)} calls")
                if reason:
                    self._open(reason)
        elif self._window.full:
            reason = self._verdict(f"over {len(self._window)} probe calls")
            if reason:
                self._open(reason)
            else:
                closing = (
                    f"{len(self._window)} probe calls: failure rate {_percent(self._window.failure_rate)}, "
                    f"slow-call rate {_percent(self._window.slow_call_rate)}"
                )
                self._window = _Window(self.settings.window)
                self._move(BreakerState.CLOSED, closing)

    def snapshot(self) -> dict[str, Any]:
        """For /health and logs. `calls` and the rates are over the sliding window when
        closed, the probe round when half-open, and the calls that opened it when open."""
        state = self.state
        return {
            "name": self.name,
            "state": state.value,
            "calls": len(self._window),
            "failure_rate": self._window.failure_rate,
            "slow_call_rate": self._window.slow_call_rate,
            "probe_in_s": max(0.0, self._probe_at - self._clock()) if state is BreakerState.OPEN else None,
            "probes_permitted": self._permits if state is BreakerState.HALF_OPEN else 0,
            "reason": self._reason,
        }

    def _verdict(self, over: str) -> str:
        """Why the window's calls open the circuit, or "" if they do not."""
        window, settings = self._window, self.settings
        reasons = []
        if window.failure_rate >= settings.failure_rate:
            reasons.append(
                f"failure rate {_percent(window.failure_rate)} {over} (limit {_percent(settings.failure_rate)})"
            )
        if window.slow_call_rate >= settings.slow_call_rate:
            reasons.append(
                f"slow-call rate {_percent(window.slow_call_rate)} {over} "
                f"(limit {_percent(settings.slow_call_rate)}, slow is >= {settings.slow_call_s:g} s)"
            )
        return "; ".join(reasons)

    def _open(self, reason: str) -> None:
        self._reason = reason
        self._probe_at = self._clock() + self.settings.open_wait_s
        self._move(BreakerState.OPEN, reason)

    def _move(self, new: BreakerState, reason: str) -> None:
        old, self._state = self._state, new
        if self._on_transition is not None:
            self._on_transition(self.name, old, new, reason)


DEFAULT_SETTINGS = BreakerSettings()


class Breakers:
    """A breaker per dependency ("online_store", "model:fraud_mlp"), made on first use:
    the server's Guard (serving.models.policies)."""

    def __init__(
        self,
        settings: BreakerSettings = DEFAULT_SETTINGS,
        *,
        clock: Callable[[], float] = time.monotonic,
        overrides: Mapping[str, BreakerSettings] | None = None,
        on_transition: Transition | None = None,
    ) -> None:
        self.settings = settings
        self.overrides = dict(overrides or {})
        self._clock = clock
        self._on_transition = on_transition
        self._breakers: dict[str, CircuitBreaker] = {}

    def allow(self, dependency: str) -> bool:
        return self.get(dependency).allow()

    def record(self, dependency: str, *, ok: bool, seconds: float) -> None:
        self.get(dependency).record(ok, seconds)

    def release(self, dependency: str) -> None:
        self.get(dependency).release()

    def get(self, dependency: str) -> CircuitBreaker:
        breaker = self._breakers.get(dependency)
        if breaker is None:
            breaker = self._breakers[dependency] = CircuitBreaker(
                dependency,
                self.overrides.get(dependency, self.settings),
                clock=self._clock,
                on_transition=self._on_transition,
            )
        return breaker

    def state(self, dependency: str) -> BreakerState:
        """CLOSED for a dependency never called (without making its breaker)."""
        breaker = self._breakers.get(dependency)
        return BreakerState.CLOSED if breaker is None else breaker.state

    def states(self) -> dict[str, BreakerState]:
        return {dependency: breaker.state for dependency, breaker in self._breakers.items()}
