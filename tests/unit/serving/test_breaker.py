"""Circuit breakers in virtual time: a hypothesis state machine against a plain reference
model, then one example per rule (opening, slow calls, minimum calls, probing)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from serving.models.breaker import Breakers, BreakerSettings, BreakerState, CircuitBreaker
from serving.models.policies import ONLINE_STORE, Guard, runtime_dependency

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Transitions:
    """What on_transition was told, with the clock time it was told at."""

    clock: Clock
    seen: list[tuple[float, str, BreakerState, BreakerState, str]] = field(default_factory=list)

    def __call__(self, name: str, old: BreakerState, new: BreakerState, reason: str) -> None:
        self.seen.append((self.clock.now, name, old, new, reason))

    def moves(self) -> list[tuple[BreakerState, BreakerState]]:
        return [(old, new) for _, _, old, new, _ in self.seen]


def breaker(settings: BreakerSettings | None = None) -> tuple[CircuitBreaker, Clock, Transitions]:
    clock = Clock()
    transitions = Transitions(clock)
    made = CircuitBreaker(ONLINE_STORE, settings or BreakerSettings(), clock=clock, on_transition=transitions)
    return made, clock, transitions


def record_many(target: CircuitBreaker, *, ok: int = 0, failed: int = 0, seconds: float = 0.01) -> None:
    for _ in range(ok):
        target.record(True, seconds)
    for _ in range(failed):
        target.record(False, seconds)


def opened(settings: BreakerSettings) -> tuple[CircuitBreaker, Clock, Transitions]:
    """A breaker that has just opened on failures, at clock time 0."""
    made, clock, transitions = breaker(settings)
    record_many(made, failed=settings.window)
    assert made.state is OPEN
    return made, clock, transitions


# The reference model: the rules of the spec, re-done from plain lists on every call.


class Model:
    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self.state = CLOSED
        self.window: list[tuple[bool, bool]] = []  # (ok, slow), oldest first
        self.opened_at = 0.0
        self.permits = 0
        self.probes: list[tuple[bool, bool]] = []
        self.moves: list[tuple[BreakerState, BreakerState]] = []

    def _move(self, new: BreakerState) -> None:
        self.moves.append((self.state, new))
        self.state = new

    def _trips(self, calls: list[tuple[bool, bool]]) -> bool:
        failed = sum(1 for ok, _ in calls if not ok)
        slow = sum(1 for _, is_slow in calls if is_slow)
        return (
            failed / len(calls) >= self.settings.failure_rate or slow / len(calls) >= self.settings.slow_call_rate
        )  # fmt: skip

    def _open(self, now: float) -> None:
        self.opened_at = now
        self._move(OPEN)

    def current(self, now: float) -> BreakerState:
        if self.state is OPEN and now >= self.opened_at + self.settings.open_wait_s:
            self.permits = 0
            self.probes = []
            self._move(HALF_OPEN)
        return self.state

    def allow(self, now: float) -> bool:
        state = self.current(now)
        if state is HALF_OPEN and self.permits < self.settings.half_open_calls:
            self.permits += 1
            return True
        return state is CLOSED

    def release(self, now: float) -> None:
        if self.current(now) is HALF_OPEN and len(self.probes) < self.permits:
            self.permits -= 1

    def record(self, now: float, ok: bool, seconds: float) -> None:
        state = self.current(now)
        call = (ok, seconds >= self.settings.slow_call_s)
        if state is CLOSED:
            self.window = [*self.window, call][-self.settings.window :]
            if len(self.window) >= self.settings.minimum_calls and self._trips(self.window):
                self._open(now)
        elif state is HALF_OPEN and len(self.probes) < self.permits:
            self.probes.append(call)
            if len(self.probes) == self.settings.half_open_calls:
                if self._trips(self.probes):
                    self._open(now)
                else:
                    self.window = []
                    self._move(CLOSED)


ALLOWED_MOVES = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
RATES = [0.2, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0]
SLOW_S = 0.5


@st.composite
def small_settings(draw: st.DrawFn) -> BreakerSettings:
    window = draw(st.integers(1, 6))
    return BreakerSettings(
        window=window,
        minimum_calls=draw(st.integers(1, window)),
        failure_rate=draw(st.sampled_from(RATES)),
        slow_call_rate=draw(st.sampled_from(RATES)),
        slow_call_s=SLOW_S,
        # Quarters of a second: clock sums are exact, so the model's and the breaker's
        # arithmetic cannot disagree by a rounding at the wait's boundary.
        open_wait_s=draw(st.sampled_from([0.25, 1.0, 2.5])),
        half_open_calls=draw(st.integers(1, 4)),
    )


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.transitions = Transitions(self.clock)
        self.breaker: CircuitBreaker | None = None
        self.model: Model | None = None
        self.granted: dict[int, int] = {}  # probe permits given, by half-open round

    @property
    def subject(self) -> CircuitBreaker:
        assert self.breaker is not None
        return self.breaker

    @property
    def reference(self) -> Model:
        assert self.model is not None
        return self.model

    @initialize(settings=small_settings())
    def start(self, settings: BreakerSettings) -> None:
        self.breaker = CircuitBreaker("model:m", settings, clock=self.clock, on_transition=self.transitions)
        self.model = Model(settings)

    @rule(quarters=st.integers(0, 12))
    def advance(self, quarters: int) -> None:
        self.clock.now += quarters / 4

    @precondition(lambda self: self.model is not None and self.model.state is OPEN)
    @rule(early=st.booleans())
    def advance_to_the_end_of_the_wait(self, early: bool) -> None:
        """Exactly when probing is due, or a quarter second before it (the clock never goes back)."""
        model = self.reference
        self.clock.now = max(self.clock.now, model.opened_at + model.settings.open_wait_s - (0.25 if early else 0.0))

    @rule()
    def allow(self) -> None:
        wait_ends = self.opened_at() + self.subject.settings.open_wait_s
        was_open_and_waiting = self.last_state() is OPEN and self.clock.now < wait_ends
        expected = self.reference.allow(self.clock.now)
        allowed = self.subject.allow()
        assert allowed == expected
        if was_open_and_waiting:
            assert not allowed, f"allowed at {self.clock.now} while open until {wait_ends}"
        if allowed and self.subject.state is HALF_OPEN:
            round_ = sum(1 for _, new in self.transitions.moves() if new is HALF_OPEN)
            self.granted[round_] = self.granted.get(round_, 0) + 1
            assert self.granted[round_] <= self.subject.settings.half_open_calls

    @rule(ok=st.booleans(), seconds=st.sampled_from([0.0, 0.1, SLOW_S - 0.001, SLOW_S, 2.0]))
    def record(self, ok: bool, seconds: float) -> None:
        before = len(self.transitions.seen)
        window_before = len(self.reference.window)
        self.reference.record(self.clock.now, ok, seconds)
        self.subject.record(ok, seconds)
        for _, _, old, new, _ in self.transitions.seen[before:]:
            if (old, new) == (CLOSED, OPEN):
                calls = min(window_before + 1, self.subject.settings.window)
                assert calls >= self.subject.settings.minimum_calls

    @rule()
    def release(self) -> None:
        """A permitted call that ended without a verdict (it ran out of its caller's time)."""
        self.reference.release(self.clock.now)
        self.subject.release()
        if self.subject.state is HALF_OPEN:
            round_ = sum(1 for _, new in self.transitions.moves() if new is HALF_OPEN)
            self.granted[round_] = self.reference.permits

    def opened_at(self) -> float:
        return next((at for at, _, _, new, _ in reversed(self.transitions.seen) if new is OPEN), 0.0)

    def last_state(self) -> BreakerState:
        return self.transitions.seen[-1][3] if self.transitions.seen else CLOSED

    @invariant()
    def agrees_with_the_model(self) -> None:
        if self.breaker is None:
            return
        assert self.subject.state is self.reference.current(self.clock.now)
        assert self.transitions.moves() == self.reference.moves
        if self.subject.state is CLOSED:
            window = self.reference.window
            snapshot = self.subject.snapshot()
            assert snapshot["calls"] == len(window)
            failed = sum(1 for ok, _ in window if not ok)
            slow = sum(1 for _, is_slow in window if is_slow)
            assert snapshot["failure_rate"] == (failed / len(window) if window else 0.0)
            assert snapshot["slow_call_rate"] == (slow / len(window) if window else 0.0)

    @invariant()
    def moves_only_along_the_allowed_edges(self) -> None:
        assert set(self.transitions.moves()) <= ALLOWED_MOVES


TestBreakerMachine = BreakerMachine.TestCase


# Examples, one rule each.


def test_opens_on_the_failure_rate_and_says_by_how_much() -> None:
    made, _, transitions = breaker(BreakerSettings(window=10, minimum_calls=10, failure_rate=0.5))
    record_many(made, ok=4, failed=5)
    assert made.state is CLOSED  # 9 calls: below the minimum
    made.record(False, 0.01)
    assert made.state is OPEN
    assert made.reason == "failure rate 60% over the last 10 calls (limit 50%)"
    assert transitions.seen == [(0.0, "online_store", CLOSED, OPEN, made.reason)]
    assert not made.allow()


def test_opens_on_slow_calls_even_when_every_call_succeeded() -> None:
    made, _, _ = breaker(BreakerSettings(window=4, minimum_calls=4, slow_call_rate=0.75, slow_call_s=0.5))
    record_many(made, ok=1, seconds=0.499)
    record_many(made, ok=2, seconds=0.5)
    assert made.state is CLOSED  # 2 of 3 slow, but only 3 calls
    made.record(True, 3.0)
    assert made.state is OPEN
    assert made.reason == "slow-call rate 75% over the last 4 calls (limit 75%, slow is >= 0.5 s)"


def test_the_window_slides_old_calls_out() -> None:
    made, _, _ = breaker(BreakerSettings(window=4, minimum_calls=4, failure_rate=0.5))
    record_many(made, failed=1, ok=3)  # failures first: 1 of 4
    record_many(made, ok=3)  # the failure slides out
    record_many(made, failed=1)  # 1 of 4 again, not 2 of 4
    assert made.state is CLOSED
    assert made.snapshot()["failure_rate"] == 0.25
    made.record(False, 0.01)
    assert made.state is OPEN


def test_stays_closed_below_minimum_calls() -> None:
    made, _, transitions = breaker(BreakerSettings(window=10, minimum_calls=5))
    record_many(made, failed=4)
    assert made.state is CLOSED
    assert made.allow()
    assert transitions.seen == []
    made.record(False, 0.01)
    assert made.state is OPEN


def test_a_successful_probe_round_closes_with_an_empty_window() -> None:
    made, clock, transitions = opened(BreakerSettings(window=5, minimum_calls=5, open_wait_s=5, half_open_calls=3))
    clock.now = 4.99
    assert not made.allow()
    clock.now = 5.0
    assert [made.allow() for _ in range(4)] == [True, True, True, False]
    assert made.state is HALF_OPEN
    record_many(made, ok=2)
    assert made.state is HALF_OPEN  # judged only once all three probes are in
    made.record(True, 0.01)
    assert made.state is CLOSED
    assert made.snapshot()["calls"] == 0
    assert transitions.moves() == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    record_many(made, failed=4)  # the failures that opened it are gone
    assert made.state is CLOSED
    assert made.reason == "failure rate 100% over the last 5 calls (limit 50%)"  # the last opening's


def test_a_failed_probe_reopens_and_restarts_the_wait() -> None:
    made, clock, transitions = opened(BreakerSettings(window=5, minimum_calls=5, open_wait_s=5, half_open_calls=2))
    clock.now = 5.0
    assert made.allow()
    assert made.allow()
    clock.now = 6.0
    made.record(True, 0.01)
    made.record(False, 0.01)
    assert made.state is OPEN
    assert made.reason == "failure rate 50% over 2 probe calls (limit 50%)"
    assert transitions.seen[-1] == (6.0, "online_store", HALF_OPEN, OPEN, made.reason)
    clock.now = 10.99
    assert not made.allow()
    assert made.snapshot()["probe_in_s"] == pytest.approx(0.01)
    clock.now = 11.0
    assert made.allow()
    assert made.state is HALF_OPEN


def test_records_while_open_are_ignored() -> None:
    made, clock, _ = opened(BreakerSettings(window=5, minimum_calls=5, open_wait_s=5, half_open_calls=1))
    before = made.snapshot()
    record_many(made, ok=20)  # stragglers let through before it opened
    assert made.state is OPEN
    assert made.snapshot() == before
    clock.now = 5.0
    assert made.state is HALF_OPEN
    made.record(True, 0.01)  # no permit was given: not a probe either
    assert made.state is HALF_OPEN
    assert made.allow()
    made.record(True, 0.01)
    assert made.state is CLOSED


def test_snapshot_reports_the_state_the_rates_and_the_wait() -> None:
    made, clock, _ = opened(BreakerSettings(window=4, minimum_calls=4, open_wait_s=5))
    clock.now = 2.0
    assert made.snapshot() == {
        "name": "online_store",
        "state": "open",
        "calls": 4,
        "failure_rate": 1.0,
        "slow_call_rate": 0.0,
        "probe_in_s": 3.0,
        "probes_permitted": 0,
        "reason": "failure rate 100% over the last 4 calls (limit 50%)",
    }


def test_state_codes_for_the_gauge() -> None:
    assert [state.code for state in (CLOSED, HALF_OPEN, OPEN)] == [0, 1, 2]


def test_breakers_keep_one_breaker_per_dependency_and_apply_overrides() -> None:
    clock = Clock()
    transitions = Transitions(clock)
    model = runtime_dependency("fraud_mlp")
    breakers = Breakers(
        BreakerSettings(window=2, minimum_calls=2),
        clock=clock,
        overrides={model: BreakerSettings(window=4, minimum_calls=4)},
        on_transition=transitions,
    )
    guard: Guard = breakers
    assert breakers.state(ONLINE_STORE) is CLOSED
    assert breakers.states() == {}  # asking made no breaker
    for _ in range(2):
        assert guard.allow(ONLINE_STORE)
        guard.record(ONLINE_STORE, ok=False, seconds=0.01)
        assert guard.allow(model)
        guard.record(model, ok=False, seconds=0.01)
    assert breakers.states() == {ONLINE_STORE: OPEN, model: CLOSED}  # the model's needs 4 calls
    assert not guard.allow(ONLINE_STORE)
    assert guard.allow(model)
    assert breakers.get(model).settings.window == 4
    assert breakers.get(model) is breakers.get(model)
    assert [name for _, name, *_ in transitions.seen] == [ONLINE_STORE]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"window": 0}, "BreakerSettings.window: got 0, expected an integer >= 1"),
        ({"window": 2.5}, "BreakerSettings.window: got 2.5, expected an integer >= 1"),
        ({"minimum_calls": 0}, "BreakerSettings.minimum_calls: got 0, expected an integer >= 1"),
        ({"window": 3, "minimum_calls": 4}, "BreakerSettings.minimum_calls: got 4, expected at most window=3"),
        ({"failure_rate": 0}, "BreakerSettings.failure_rate: got 0, expected a fraction in (0, 1], e.g. 0.5 for 50%"),
        ({"failure_rate": 50}, "BreakerSettings.failure_rate: got 50, expected a fraction in (0, 1], e.g. 0.5 for 50%"),
        (
            {"slow_call_rate": float("nan")},
            "BreakerSettings.slow_call_rate: got nan, expected a fraction in (0, 1], e.g. 0.5 for 50%",
        ),
        ({"slow_call_s": -1.0}, "BreakerSettings.slow_call_s: got -1.0, expected seconds > 0"),
        ({"open_wait_s": 0}, "BreakerSettings.open_wait_s: got 0, expected seconds > 0"),
        ({"open_wait_s": float("inf")}, "BreakerSettings.open_wait_s: got inf, expected a finite number of seconds"),
        ({"half_open_calls": True}, "BreakerSettings.half_open_calls: got True, expected an integer >= 1"),
    ],
)
def test_settings_reject_bad_values_naming_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        BreakerSettings(**changes)  # type: ignore[arg-type]


def test_settings_accept_the_edges() -> None:
    edges = BreakerSettings(window=1, minimum_calls=1, failure_rate=1, slow_call_s=float("inf"), half_open_calls=1)
    made, _, _ = breaker(edges)
    made.record(True, 1e9)  # nothing is slow with slow_call_s=inf
    assert made.state is CLOSED
    made.record(False, 0.0)
    assert made.state is OPEN


def test_a_probe_that_ends_without_a_verdict_frees_its_permit() -> None:
    """A half-open circuit whose only probe timed out on its caller's deadline (not the
    dependency's doing, so not recorded) refused every later call, for ever."""
    settings = BreakerSettings(window=4, minimum_calls=2, open_wait_s=1.0, half_open_calls=2)
    circuit, clock, _ = breaker(settings)
    for _ in range(2):
        assert circuit.allow()
        circuit.record(False, 0.01)
    assert circuit.state is OPEN
    clock.now += 1.0
    assert circuit.allow()
    assert circuit.allow()
    assert not circuit.allow()
    circuit.release()  # one probe gave no verdict
    circuit.record(True, 0.01)
    assert circuit.state is HALF_OPEN
    assert circuit.allow()  # its permit is free again
    circuit.record(True, 0.01)
    assert circuit.state is CLOSED
