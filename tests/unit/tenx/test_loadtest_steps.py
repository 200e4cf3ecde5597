"""The loadtest's pure parts: the request mix, the capacity search, the verdicts, the
cost figures, the fault timeline and the command line's parsers (no server, no network)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featurestore.errors import ConfigError
from serving.loadresults import LagVerdict, LatencySummary, LoadResult, split_by_label
from serving.loadresults import summarize as latency_summary
from tenx.commands.loadtest import entity_keys, multiples, seconds, slo_overrides
from tenx.loadtest.faults import Fault, default_commands, injected, parse_fault, summarize
from tenx.loadtest.run import parse_shares
from tenx.loadtest.steps import (
    BODIES,
    CLASSES,
    DEFAULT_SLOS,
    SECONDS_PER_MONTH,
    Mix,
    Samples,
    Slo,
    Step,
    StepSettings,
    Target,
    combine_rounds,
    cost_summary,
    critical_only,
    find_capacity,
    overload_bar,
    request_mix,
    served,
    server_counts,
    step_costs,
    verdicts,
)

MODEL = Target("model-server", "http://10.1.2.3:8081", "churn", token="s3cret")
FEATURES = Target("feature-api", "http://127.0.0.1:8080", "user_spend")
DEADLINES = {"critical": 250.0, "default": 500.0, "sheddable": 2000.0}
KEYS = tuple(range(100, 150))


def _mix(target: Target = MODEL, *, seed: int = 7, **overrides: Any) -> Mix:
    arguments: dict[str, Any] = {
        "classes": {"critical": 0.2, "sheddable": 0.8},
        "tenants": {"acme": 0.75, "globex": 0.25},
        "entities": KEYS,
        "per_request": 7,
        "deadlines_ms": DEADLINES,
        **overrides,
    }
    return request_mix(target, seed=seed, **arguments)


def _parse(request: bytes) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The request line, headers and JSON body of one encoded request, checking its framing."""
    head, separator, body = request.partition(b"\r\n\r\n")
    assert separator == b"\r\n\r\n"
    request_line, *lines = head.decode().split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(": ")
        assert colon, line
        assert name not in headers, f"header {name} twice"
        headers[name] = value
    assert headers["Content-Length"] == str(len(body))
    data: dict[str, Any] = json.loads(body)
    return request_line, headers, data


# -- the request mix -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        ({"critical": 0.2, "sheddable": 0.8}, {"critical": 400, "sheddable": 1600}),
        # 246.8 / 691.2 / 1062: the one request left over goes to the largest remainder
        (
            {"critical": 0.1234, "default": 0.3456, "sheddable": 0.531},
            {"critical": 247, "default": 691, "sheddable": 1062},
        ),
    ],
)
def test_each_class_gets_exactly_its_share_of_the_bodies(classes: dict[str, float], expected: dict[str, int]) -> None:
    mix = _mix(classes=classes)
    assert len(mix.requests) == len(mix.labels) == len(mix.deadlines_ms) == BODIES
    assert dict(Counter(mix.labels)) == expected
    assert Counter(_parse(request)[1]["X-Priority"] for request in mix.requests) == Counter(expected)


def test_three_equal_classes_add_up_to_the_bodies() -> None:
    third = 1 / 3
    mix = _mix(classes={"critical": third, "default": third, "sheddable": third})
    counts = Counter(mix.labels)
    assert sum(counts.values()) == BODIES  # rounding each share would give 3 x 667
    assert sorted(counts.values()) == [666, 667, 667]


def test_classes_are_placed_at_random_not_in_blocks() -> None:
    labels = _mix().labels
    assert labels[:400] != ("critical",) * 400
    assert 40 <= labels[:200].count("critical") <= 80  # about 20% of any stretch


def test_a_model_server_request_carries_its_class_deadline_tenant_and_token() -> None:
    mix = _mix()
    tenants: Counter[str] = Counter()
    for request, label, deadline in zip(mix.requests, mix.labels, mix.deadlines_ms, strict=True):
        request_line, headers, body = _parse(request)
        assert request_line == "POST /predict HTTP/1.1"
        assert headers["Host"] == "10.1.2.3"
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["X-Priority"] == body["priority"] == label
        assert body["model"] == "churn"
        assert body["deadline_ms"] == deadline == DEADLINES[label]
        assert headers["X-Deadline-Ms"] == f"{DEADLINES[label]:g}"
        assert headers["X-Tenant"] == body["tenant"]
        tenants[body["tenant"]] += 1
        assert len(body["entities"]) == 7
        assert set(body["entities"]) <= set(KEYS)
    assert set(tenants) == {"acme", "globex"}
    assert 1400 <= tenants["acme"] <= 1600  # 75% of 2,000, drawn by weight


def test_entities_are_drawn_from_all_the_given_keys() -> None:
    drawn = {key for request in _mix().requests for key in _parse(request)[2]["entities"]}
    assert drawn == set(KEYS)


def test_no_tenant_or_token_means_no_such_header() -> None:
    mix = _mix(Target("model-server", "http://127.0.0.1:8081", "churn"), tenants={})
    for request in mix.requests[:50]:
        _, headers, body = _parse(request)
        assert "X-Tenant" not in headers
        assert "Authorization" not in headers
        assert "tenant" not in body


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others() -> None:
    assert _mix(seed=3).requests == _mix(seed=3).requests
    assert _mix(seed=3).labels == _mix(seed=3).labels
    assert _mix(seed=4).requests != _mix(seed=3).requests


def test_a_feature_api_request_names_the_view_on_features() -> None:
    mix = _mix(FEATURES)
    request_line, headers, body = _parse(mix.requests[0])
    assert request_line == "POST /features HTTP/1.1"
    assert headers["Host"] == "127.0.0.1"
    assert body["view"] == "user_spend"
    assert "model" not in body
    assert headers["X-Priority"] == mix.labels[0]


def test_critical_only_makes_every_request_critical_with_a_matching_length() -> None:
    mix = _mix(classes={"critical": 0.2, "default": 0.3, "sheddable": 0.5})
    probe = critical_only(mix)
    assert probe.labels == ("critical",) * BODIES
    assert probe.deadlines_ms == mix.deadlines_ms
    assert probe.entities_per_request == mix.entities_per_request
    for before, after in zip(mix.requests, probe.requests, strict=True):
        line, headers, body = _parse(after)  # checks Content-Length against the new body
        old_line, old_headers, old_body = _parse(before)
        assert headers["X-Priority"] == body["priority"] == "critical"
        assert line == old_line
        assert {k: v for k, v in headers.items() if k not in ("X-Priority", "Content-Length")} == {
            k: v for k, v in old_headers.items() if k not in ("X-Priority", "Content-Length")
        }
        assert {**old_body, "priority": "critical"} == body
    assert any(len(a) != len(b) for a, b in zip(mix.requests, probe.requests, strict=True))


# -- the capacity search -------------------------------------------------------------------

CAPACITY_WINDOW_S = 3.0
FELL_BEHIND = "p99 send lag 25.0 ms > 10 ms"


def _result(
    *,
    scheduled: int = 1_000,
    ok: int | None = None,
    statuses: dict[int, int] | None = None,
    errors: int = 0,
    unfinished: int = 0,
    p99_ms: float = 20.0,
    waited: int = 0,
    wall_s: float = 4.0,
    duration_s: float = CAPACITY_WINDOW_S,
) -> LoadResult:
    ok = scheduled if ok is None else ok
    statuses = ({200: ok} if ok else {}) if statuses is None else statuses
    latency = LatencySummary(ok, p99_ms / 4, p99_ms / 2, p99_ms, p99_ms * 1.2, p99_ms * 1.5, p99_ms / 3)
    if not ok:  # as serving.loadresults.summarize gives it: no answer, no figures
        latency = LatencySummary(0, *(math.nan,) * 6)
    rate = scheduled / duration_s
    return LoadResult(
        offered_rate=rate,
        duration_s=duration_s,
        scheduled=scheduled,
        sent=scheduled,
        completed=sum(statuses.values()),
        ok=ok,
        statuses=statuses,
        errors=errors,
        unfinished=unfinished,
        error_samples=(),
        latency=latency,
        lag=LagVerdict(0.1, 0.5, 1.0, rate, rate, False, ""),
        schedule_lag_p99_ms=0.5,
        waited_for_connection=waited,
        connections=16,
        generator_cpu_s=1.0,
        wall_s=wall_s,
    )


def _step(result: LoadResult, *, reported: bool = True, name: str = "capacity") -> Step:
    return Step(name, 0.0, result, reported, None if reported else FELL_BEHIND)


@dataclass
class FakeServer:
    """Serves every request up to `capacity` requests/s and half of them above it; the
    generator keeps to its schedule up to `generator_limit`."""

    capacity: float
    generator_limit: float = math.inf
    p99_ms: float = 20.0
    rates: list[float] = field(default_factory=list)

    def attempt(self, rate: float) -> Step:
        self.rates.append(rate)
        scheduled = int(rate * CAPACITY_WINDOW_S)
        if rate <= self.capacity:
            result = _result(scheduled=scheduled, p99_ms=self.p99_ms)
        else:
            ok = scheduled // 2
            result = _result(scheduled=scheduled, ok=ok, statuses={200: ok, 503: scheduled - ok}, p99_ms=self.p99_ms)
        return _step(result, reported=rate <= self.generator_limit)


# factor 2 halved `refine` = 3 times in log space: the served rate is within 2 ** (1/8) of the limit
PRECISION = 2.0 ** (1 / 8)


@pytest.mark.parametrize("capacity", [3_000.0, 777.0, 12_345.0])
def test_find_capacity_lands_just_below_the_servers_limit(capacity: float) -> None:
    server = FakeServer(capacity)
    found = find_capacity(server.attempt, start_rate=500.0, max_p99_ms=100.0)
    assert found["per_s"] is not None
    assert found["per_s"] <= capacity < found["refused_at"]
    assert capacity / found["per_s"] <= PRECISION
    assert found["refused_at"] / found["per_s"] <= PRECISION
    assert found["generator_bound"] is False
    assert [entry["rate"] for entry in found["search"]] == server.rates
    assert max(entry["rate"] for entry in found["search"] if entry["served"]) == found["per_s"]


def test_find_capacity_ramps_by_the_factor_then_bisects_geometrically() -> None:
    server = FakeServer(3_000.0)
    found = find_capacity(server.attempt, start_rate=500.0, max_p99_ms=100.0)
    assert server.rates[:4] == [500.0, 1_000.0, 2_000.0, 4_000.0]
    assert server.rates[4] == pytest.approx(math.sqrt(2_000.0 * 4_000.0))
    assert len(server.rates) == 4 + 3
    assert [entry["served"] for entry in found["search"]] == [True, True, True, False, True, False, False]


def test_find_capacity_starts_lower_when_the_first_rate_is_already_too_much() -> None:
    server = FakeServer(700.0)
    found = find_capacity(server.attempt, start_rate=10_000.0, max_p99_ms=100.0)
    assert found["search"][0] == {
        "rate": 10_000.0,
        "served": False,
        "why": "15000 of 30000 requests answered 2xx (200: 15000, 503: 15000; 0 errors, 0 unanswered)",
    }
    assert server.rates[1] == 10_000.0 / 4
    assert found["per_s"] <= 700.0 < found["refused_at"]
    assert 700.0 / found["per_s"] <= PRECISION


def test_find_capacity_stops_where_the_generator_falls_behind() -> None:
    server = FakeServer(10_000.0, generator_limit=1_500.0)
    found = find_capacity(server.attempt, start_rate=500.0, max_p99_ms=100.0)
    assert server.rates == [500.0, 1_000.0, 2_000.0]  # nothing after the step it could not judge
    assert found["per_s"] == 1_000.0
    assert found["refused_at"] is None
    assert found["generator_bound"] is True
    assert found["search"][-1] == {"rate": 2_000.0, "served": None, "why": FELL_BEHIND}


def test_find_capacity_stops_bisecting_where_the_generator_falls_behind() -> None:
    server = FakeServer(3_000.0, generator_limit=2_500.0)
    found = find_capacity(server.attempt, start_rate=500.0, max_p99_ms=100.0)
    assert len(server.rates) == 5  # 500, 1000, 2000, 4000 refused, then 2828 not judged
    assert found["per_s"] == 2_000.0
    assert found["refused_at"] == 4_000.0
    assert found["generator_bound"] is True


def test_a_server_over_the_p99_limit_at_every_rate_has_no_capacity() -> None:
    server = FakeServer(math.inf, p99_ms=150.0)
    found = find_capacity(server.attempt, start_rate=500.0, max_p99_ms=100.0)
    assert found["per_s"] is None


def test_served_too_few_2xx_is_refused_with_the_counts() -> None:
    result = _result(scheduled=1_000, ok=900, statuses={503: 80, 200: 900}, errors=15, unfinished=5)
    assert served(_step(result), max_p99_ms=100.0) == (
        False,
        "900 of 1000 requests answered 2xx (200: 900, 503: 80; 15 errors, 5 unanswered)",
    )


def test_served_nothing_answered_says_none() -> None:
    result = _result(scheduled=300, ok=0, statuses={}, errors=300)
    assert served(_step(result), max_p99_ms=100.0) == (
        False,
        "0 of 300 requests answered 2xx (none; 300 errors, 0 unanswered)",
    )


def test_served_at_99_percent_with_a_low_p99() -> None:
    result = _result(scheduled=1_000, ok=990, statuses={200: 990, 503: 10}, p99_ms=99.0)
    assert served(_step(result), max_p99_ms=100.0) == (True, "")


def test_served_p99_above_the_limit_is_refused() -> None:
    assert served(_step(_result(p99_ms=150.0)), max_p99_ms=100.0) == (False, "p99 150.0 ms > 100 ms")


def test_served_waits_for_a_connection_are_refused() -> None:
    assert served(_step(_result(waited=1_234)), max_p99_ms=100.0) == (
        False,
        "all connections busy 1,234 times: the server stopped reading",
    )


def test_served_is_not_judged_when_the_generator_fell_behind() -> None:
    assert served(_step(_result(p99_ms=500.0), reported=False), max_p99_ms=100.0) == (None, FELL_BEHIND)


# -- verdicts and the overload bar ---------------------------------------------------------


def _judged(name: str, reported: bool, **classes: tuple[float | None, float | None]) -> dict[str, Any]:
    """A step as `Step.as_dict` gives it, with each class's (p99_ms, success)."""
    return {
        "name": name,
        "reported": reported,
        "classes": {label: {"p99_ms": p99, "success": success} for label, (p99, success) in classes.items()},
    }


def test_verdicts_give_p99_growth_and_the_first_broken_step() -> None:
    steps = [
        _judged("1x", True, critical=(10.0, 1.0), default=(20.0, 0.995), sheddable=(40.0, 1.0)),
        _judged("3x", True, critical=(12.0, 0.9995), default=(25.0, 0.985), sheddable=(80.0, 0.5)),
        _judged("5x", False, critical=(500.0, 0.2), default=(900.0, 0.1), sheddable=(5000.0, 0.0)),
        _judged("10x", True, critical=(150.0, 0.9999), default=(30.0, 0.5), sheddable=(1500.0, 0.1)),
    ]
    verdict = verdicts(steps, DEFAULT_SLOS)
    assert list(verdict) == ["critical", "default", "sheddable"]
    critical = verdict["critical"]
    assert critical["p99_growth"] == {"1x": 1.0, "3x": pytest.approx(1.2), "5x": None, "10x": pytest.approx(15.0)}
    # 5x broke everything but the generator fell behind there: not judged
    assert (critical["first_broken_step"], critical["why"]) == ("10x", "p99 150.0 ms > SLO 100 ms")
    assert critical["slo"] == {"p99_ms": 100.0, "success": 0.999}
    default = verdict["default"]
    assert (default["first_broken_step"], default["why"]) == ("3x", "success 98.50% < SLO 99%")
    sheddable = verdict["sheddable"]  # no success floor: shedding it is the point
    assert (sheddable["first_broken_step"], sheddable["why"]) == ("10x", "p99 1500.0 ms > SLO 1000 ms")
    assert sheddable["p99_growth"]["3x"] == pytest.approx(2.0)


def test_verdicts_without_a_reported_first_step_give_no_growth() -> None:
    steps = [_judged("1x", False, critical=(10.0, 1.0)), _judged("3x", True, critical=(20.0, 1.0))]
    verdict = verdicts(steps, DEFAULT_SLOS)["critical"]
    assert verdict["p99_growth"] == {"1x": None, "3x": None}
    assert verdict["first_broken_step"] is None
    assert verdict["why"] is None


def test_verdicts_of_a_class_within_its_slo_name_no_step() -> None:
    steps = [_judged("1x", True, critical=(10.0, 1.0)), _judged("3x", True, critical=(100.0, 0.999))]
    verdict = verdicts(steps, DEFAULT_SLOS)["critical"]
    assert (verdict["first_broken_step"], verdict["why"]) == (None, None)
    assert verdicts([], DEFAULT_SLOS) == {}


def test_a_class_at_exactly_its_overridden_success_floor_is_not_broken() -> None:
    slos = slo_overrides(("critical:success=99.9",))
    verdict = verdicts([_judged("1x", True, critical=(10.0, 2997 / 3000))], slos)["critical"]
    assert (verdict["first_broken_step"], verdict["why"]) == (None, None)


def test_overload_bar_met_at_its_edges() -> None:
    steps = [
        _judged("1x", True, critical=(10.0, 1.0)),
        _judged("3x", True, critical=(15.0, 1.0)),
        _judged("10x", True, critical=(40.0, 0.999)),
    ]
    assert overload_bar(steps) == {
        "critical_p99_3x_over_1x": 1.5,
        "p99_met": True,
        "critical_success_10x": 0.999,
        "success_met": True,
        "per_round_p99_3x_over_1x": [],  # steps run in one round each: no pairs
    }


def test_overload_bar_missed() -> None:
    steps = [
        _judged("1x", True, critical=(10.0, 1.0)),
        _judged("3x", True, critical=(16.0, 1.0)),
        _judged("10x", True, critical=(40.0, 0.998)),
    ]
    assert overload_bar(steps) == {
        "critical_p99_3x_over_1x": pytest.approx(1.6),
        "p99_met": False,
        "critical_success_10x": 0.998,
        "success_met": False,
        "per_round_p99_3x_over_1x": [],
    }


def test_overload_bar_is_none_for_a_step_missing_or_not_reported() -> None:
    steps = [
        _judged("1x", True, critical=(10.0, 1.0)),
        _judged("3x", False, critical=(11.0, 1.0)),
        _judged("5x", True, critical=(12.0, 1.0)),
    ]
    assert overload_bar(steps) == {
        "critical_p99_3x_over_1x": None,
        "p99_met": None,
        "critical_success_10x": None,
        "success_met": None,
        "per_round_p99_3x_over_1x": [],
    }


# -- cost ----------------------------------------------------------------------------------


def _priced(
    name: str,
    offered_per_s: float,
    per_1k: float | None,
    *,
    shares: Mapping[str, float] | None = None,
    rows_per_batch: float | None = None,
    shed: float = 0.0,
) -> dict[str, Any]:
    cost: dict[str, Any] = {} if per_1k is None else {"per_1k_predictions": per_1k}
    if shares is not None:
        cost["share_by_source"] = dict(shares)
    return {
        "name": name,
        "offered_per_s": offered_per_s,
        "cost": cost,
        "server": {"rows_per_batch": rows_per_batch},
        "all": {"shed": shed},
    }


def test_cost_summary_projects_the_month_and_explains_the_growth() -> None:
    steps = [
        _priced("1x", 1_000.0, 0.002, shares={"churn": 0.9, "cache:churn": 0.1}, rows_per_batch=4.0),
        _priced("3x", 3_000.0, None),
        _priced("10x", 10_000.0, 0.0015, shares={"churn": 0.6, "cache:churn": 0.4}, rows_per_batch=32.0, shed=0.25),
    ]
    summary = cost_summary(steps, per_request=10)
    assert summary["per_1k"] == {"1x": 0.002, "3x": None, "10x": 0.0015}
    assert SECONDS_PER_MONTH == 2_592_000
    # $/1k predictions x requests/s x predictions per request x s/month / 1000
    assert summary["monthly"] == {"1x": pytest.approx(51_840.0), "10x": pytest.approx(388_800.0)}
    assert summary["monthly_at_1x"] == pytest.approx(51_840.0)
    assert summary["monthly_at_10x"] == pytest.approx(388_800.0)
    assert (summary["low_step"], summary["high_step"]) == ("1x", "10x")
    assert summary["per_prediction_ratio"] == pytest.approx(0.75)
    assert summary["growth"] == "sub-linear"
    assert summary["reason"] == (
        "rows per batch 4.0 at 1x -> 32.0 at 10x; cache hits 10% -> 40%; 25% shed at 10x (refusals cost no device time)"
    )


@pytest.mark.parametrize(
    ("high", "growth"),
    [(0.89, "sub-linear"), (0.9, "linear"), (1.0, "linear"), (1.1, "linear"), (1.11, "super-linear")],
)
def test_cost_growth_words_at_the_edges(high: float, growth: str) -> None:
    summary = cost_summary([_priced("1x", 100.0, 1.0), _priced("10x", 1_000.0, high)], per_request=1)
    assert summary["growth"] == growth
    assert summary["reason"] == "no batching, cache or routing change between the steps"


def test_cost_summary_without_cost_counters_says_so() -> None:
    summary = cost_summary([_priced("1x", 100.0, None), _priced("3x", 300.0, None)], per_request=10)
    assert summary["per_1k"] == {"1x": None, "3x": None}
    assert summary["growth"] is None
    assert summary["reason"] == "no cost counters on the target (a model server exports them)"
    assert not summary.get("monthly")
    assert summary.get("monthly_at_1x") is None


def test_a_single_priced_step_still_gets_its_monthly_projection() -> None:
    summary = cost_summary([_priced("1x", 1_000.0, 0.002)], per_request=10)
    assert summary["monthly"] == {"1x": pytest.approx(51_840.0)}
    assert summary["monthly_at_1x"] == pytest.approx(51_840.0)
    assert summary["growth"] is None  # growth needs two priced steps
    assert summary["reason"] is None


def _sample(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))  # as tenx.commands.top.scrape keys them


DOLLARS, PREDICTIONS = "tenx_model_cost_dollars_total", "tenx_model_served_predictions_total"
ROWS_SUM, ROWS_COUNT, SHED = "tenx_model_batch_rows_sum", "tenx_model_batch_rows_count", "tenx_model_shed_total"

BEFORE: Samples = {
    _sample(DOLLARS, model="churn", version="1", route="churn", tenant="", priority="critical"): 1.0,
    _sample(PREDICTIONS, route="churn", served_by="churn", priority="critical", tenant=""): 10_000.0,
    _sample(ROWS_SUM, model="churn"): 1_000.0,
    _sample(ROWS_COUNT, model="churn"): 100.0,
    _sample(SHED, model="churn", reason="overload", priority="sheddable", tenant=""): 5.0,
}
AFTER: Samples = {
    _sample(DOLLARS, model="churn", version="1", route="churn", tenant="", priority="critical"): 1.03,
    # counters first seen during the step count from zero
    _sample(DOLLARS, model="churn", version="1", route="churn", tenant="", priority="sheddable"): 0.01,
    _sample(PREDICTIONS, route="churn", served_by="churn", priority="critical", tenant=""): 28_000.0,
    _sample(PREDICTIONS, route="churn", served_by="cache:churn", priority="sheddable", tenant=""): 2_000.0,
    _sample(ROWS_SUM, model="churn"): 5_000.0,
    _sample(ROWS_COUNT, model="churn"): 350.0,
    _sample(SHED, model="churn", reason="overload", priority="sheddable", tenant=""): 45.0,
    _sample(SHED, model="churn", reason="deadline", priority="default", tenant=""): 7.0,
    _sample("tenx_model_predictions_total", model="churn", version="1"): 99.0,
}


def test_step_costs_from_two_scrapes() -> None:
    costs = step_costs(BEFORE, AFTER, _result(wall_s=4.0))
    assert costs["dollars"] == pytest.approx(0.04)
    assert costs["predictions"] == 20_000.0
    assert costs["per_1k_predictions"] == pytest.approx(0.002)
    assert costs["dollars_per_s"] == pytest.approx(0.01)
    assert costs["by_source"] == {"churn": pytest.approx(1000 * 0.04 / 18_000), "cache:churn": 0.0}
    assert costs["share_by_source"] == {"churn": 0.9, "cache:churn": 0.1}


def test_server_counts_from_two_scrapes() -> None:
    assert server_counts(BEFORE, AFTER) == {
        "shed_by_reason": {"overload": 40.0, "deadline": 7.0},
        "fallbacks": None,
        "rows_per_batch": 16.0,
    }


def test_no_scrape_gives_no_cost_or_counts() -> None:
    assert step_costs(BEFORE, {}, _result()) == {}
    assert server_counts(BEFORE, {}) == {}


def test_a_step_with_nothing_served_has_no_cost_per_prediction() -> None:
    costs = step_costs(BEFORE, BEFORE, _result())
    assert costs["per_1k_predictions"] is None
    assert costs["by_source"] == {}


# -- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("redis@15s", ("redis", 15.0)), ("model@2.5", ("model", 2.5)), (" Kafka@3S ", ("kafka", 3.0))],
)
def test_parse_fault(spec: str, expected: tuple[str, float]) -> None:
    assert parse_fault(spec) == expected


@pytest.mark.parametrize("spec", ["redis", "@3s", "redis@x", "redis@-1s", "redis@3h", ""])
def test_parse_fault_errors_name_the_expected_form(spec: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_fault(spec)
    assert str(error.value) == (
        f"--fault {spec!r}: write COMPONENT@SECONDS, e.g. redis@15s (components: redis, kafka, model)"
    )


def test_a_model_fault_needs_the_fault_file() -> None:
    with pytest.raises(ConfigError) as error:
        default_commands("model", redis_url=None, fault_file=None, model="churn")
    assert str(error.value) == (
        "--fault model@... needs the model server's fault file: start it with `tenx serve-models --fault-file PATH` "
        "and pass the same --fault-file here (or give --fault-stop and --fault-start)"
    )


def test_a_model_fault_writes_then_removes_the_fault_file(tmp_path: Path) -> None:
    import subprocess

    fault_file = tmp_path / "a dir" / "fault"
    fault_file.parent.mkdir()
    stop, start = default_commands("model", redis_url=None, fault_file=fault_file, model="churn v2")
    subprocess.run(stop, shell=True, check=True)
    assert fault_file.read_text() == "churn v2\n"
    subprocess.run(start, shell=True, check=True)
    assert not fault_file.exists()


def test_a_redis_fault_saves_before_stopping() -> None:
    stop, start = default_commands("redis", redis_url="redis://127.0.0.1:6379/0", fault_file=None, model="churn")
    save, _, down = stop.partition(" && ")
    assert save == "redis-cli -u redis://127.0.0.1:6379/0 SAVE >/dev/null"
    assert down.endswith("scripts/services down --only redis")
    assert start.endswith("scripts/services up --only redis >/dev/null")
    kafka_stop, _ = default_commands("kafka", redis_url="redis://127.0.0.1:6379/0", fault_file=None, model="churn")
    assert "SAVE" not in kafka_stop
    assert kafka_stop.endswith("scripts/services down --only kafka")


def test_a_redis_fault_keeps_the_password_out_of_its_commands(tmp_path: Path) -> None:
    """The commands are printed, kept in report.json and visible in `ps`: the password
    reaches redis-cli through $REDISCLI_AUTH alone."""
    from tenx.loadtest.faults import Fault, _run, redis_password

    url = "redis://tenx:s3cr%2Fet@127.0.0.1:6379/0"
    stop, _ = default_commands("redis", redis_url=url, fault_file=None, model="churn")
    assert "s3cr" not in stop
    assert stop.startswith("redis-cli -u redis://tenx@127.0.0.1:6379/0 SAVE")
    seen = tmp_path / "auth"
    fault = Fault("redis", 1.0, 1.0, f'printf %s "$REDISCLI_AUTH" > {seen}', "true", redis_password=redis_password(url))
    _run(fault.stop, fault, "stop")
    assert seen.read_text() == "s3cr/et"
    assert "s3cr" not in " ".join(fault.log)
    assert "s3cr" not in repr(fault)


def test_an_unknown_component_needs_its_own_commands() -> None:
    with pytest.raises(ConfigError) as error:
        default_commands("postgres", redis_url=None, fault_file=None, model="churn")
    assert str(error.value) == (
        "--fault postgres@...: no scripts/services here to stop it with; give --fault-stop and --fault-start "
        "(e.g. --fault-stop 'docker compose stop postgres' --fault-start 'docker compose start postgres')"
    )


def _line(ok: list[int], *, sent: int = 100, throttled: int = 0, degraded: list[int] | None = None) -> dict[str, Any]:
    """One class's timeline, 1 s buckets: stopped at 5 s, restarted at 10 s."""
    degraded = degraded if degraded is not None else [0] * len(ok)
    p99 = [10.0] * 5 + [500.0] * 5 + [20.0] * (len(ok) - 10)
    return {
        "sent": [sent] * len(ok),
        "throttled": [throttled] * len(ok),
        "ok": ok,
        "degraded": degraded,
        "errors": [sent - throttled - n for n in ok],
        "p99_ms": p99,
    }


def _fault(stopped: float | None = 5.0, restarted: float | None = 10.0) -> Fault:
    return Fault("redis", 5.0, 5.0, "stop it", "start it", stopped_at_s=stopped, restarted_at_s=restarted)


def test_summarize_before_during_after_and_the_recovery() -> None:
    critical = _line([100] * 5 + [50] * 5 + [80, 80] + [100] * 8, degraded=[0] * 5 + [25] * 5 + [0] * 10)
    # 40 of each bucket's 100 refused by the client's throttle: not counted against the server
    sheddable = _line([60] * 5 + [0] * 5 + [60] * 9 + [30], throttled=40)
    classes = {"critical": critical, "sheddable": sheddable}
    timeline = {"bucket_s": 1.0, "t_s": [float(t) for t in range(20)], "classes": classes}
    block = summarize(_fault(), timeline, step="fault 1x")
    assert {k: block[k] for k in ("component", "at_s", "down_s", "step", "stopped_at_s", "restarted_at_s")} == {
        "component": "redis",
        "at_s": 5.0,
        "down_s": 5.0,
        "step": "fault 1x",
        "stopped_at_s": 5.0,
        "restarted_at_s": 10.0,
    }
    assert block["timeline"] is timeline
    critical_summary = block["summary"]["critical"]
    assert critical_summary["before"] == {"success": 1.0, "degraded": 0.0, "errors": 0.0, "p99_ms": 10.0}
    assert critical_summary["during"] == {"success": 0.5, "degraded": 0.5, "errors": 0.5, "p99_ms": 500.0}
    assert critical_summary["after"]["success"] == pytest.approx((2 * 80 + 8 * 100) / 1000)
    assert critical_summary["recovery_s"] == 2.0  # healthy from the second bucket after the restart on
    sheddable_summary = block["summary"]["sheddable"]
    assert sheddable_summary["before"]["success"] == 1.0  # 60 of the 60 sent
    assert sheddable_summary["during"]["success"] == 0.0
    assert sheddable_summary["recovery_s"] is None  # its last bucket fell back to half


def test_summarize_degraded_answers_delay_the_recovery() -> None:
    ok = [100] * 20
    degraded = [0] * 5 + [100] * 5 + [100, 100, 100, 2] + [0] * 6  # 2%: more than 1 point over 0%
    timeline = {"bucket_s": 1.0, "t_s": [float(t) for t in range(20)], "classes": {"c": _line(ok, degraded=degraded)}}
    summary = summarize(_fault(), timeline, step="fault 1x")["summary"]["c"]
    assert summary["during"]["degraded"] == 1.0
    assert summary["recovery_s"] == 4.0


def test_summarize_a_fault_that_never_happened_has_no_during_or_after() -> None:
    timeline = {"bucket_s": 1.0, "t_s": [float(t) for t in range(20)], "classes": {"c": _line([100] * 20)}}
    summary = summarize(_fault(None, None), timeline, step="fault 1x")["summary"]["c"]
    assert summary["before"]["success"] == 1.0
    assert summary["during"]["success"] is None
    assert summary["after"]["success"] is None
    assert summary["recovery_s"] is None


def _wait_for(path: Path, text: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never written to {path}"
        time.sleep(0.01)


def test_injected_stops_then_starts_at_the_given_times(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fault = Fault("redis", 0.05, 0.15, f"echo stop >> '{log}'", f"echo start >> '{log}'")
    with injected(fault, window_starts_in_s=0.0):
        _wait_for(log, "start")
    assert log.read_text().split() == ["stop", "start"]
    assert fault.stopped_at_s is not None
    assert fault.restarted_at_s is not None
    assert 0.05 <= fault.stopped_at_s < 1.0
    assert 0.15 - 0.005 <= fault.restarted_at_s - fault.stopped_at_s < 1.0
    assert fault.log == [f"stop: `echo stop >> '{log}'` exit 0", f"start: `echo start >> '{log}'` exit 0"]


def test_injected_starts_the_component_again_when_the_step_fails(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fault = Fault("redis", 0.02, 60.0, f"echo stop >> '{log}'", f"echo start >> '{log}'")
    began = time.monotonic()

    def crashing_step() -> None:
        with injected(fault, window_starts_in_s=0.0):
            _wait_for(log, "stop")
            raise ValueError("the generator crashed")

    with pytest.raises(ValueError, match="the generator crashed"):
        crashing_step()
    assert log.read_text().split() == ["stop", "start"]  # at once, not 60 s later
    assert time.monotonic() - began < 5.0
    assert fault.restarted_at_s is not None


def test_injected_does_nothing_when_the_step_ends_before_the_fault(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fault = Fault("redis", 30.0, 5.0, f"echo stop >> '{log}'", f"echo start >> '{log}'")
    with injected(fault, window_starts_in_s=0.0):
        pass
    assert not log.exists()
    assert (fault.stopped_at_s, fault.restarted_at_s) == (None, None)


def test_injected_reports_a_failed_stop_and_still_starts(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fault = Fault("redis", 0.02, 0.05, "echo no such service >&2; exit 3", f"echo start >> '{log}'")
    with pytest.raises(RuntimeError) as error, injected(fault, window_starts_in_s=0.0):
        _wait_for(log, "start")
    assert str(error.value) == "the redis fault: stop of redis failed (exit 3): no such service"
    assert log.read_text() == "start\n"


# -- the command line's parsers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", 30.0), ("2m", 120.0), ("1.5m", 90.0), ("500ms", 0.5), ("7", 7.0), (" 10S ", 10.0)],
)
def test_seconds(text: str, expected: float) -> None:
    assert seconds(text, what="--duration") == expected


@pytest.mark.parametrize("text", ["", "abc", "-1s", "5h", "1.5.2s", "s"])
def test_seconds_errors(text: str) -> None:
    with pytest.raises(ConfigError) as error:
        seconds(text, what="--duration")
    assert str(error.value) == f"--duration {text!r}: write a duration such as 30s, 2m or 500ms"


@pytest.mark.parametrize(
    ("text", "expected"), [("1,3,5,10", (1.0, 3.0, 5.0, 10.0)), ("0.5, 2", (0.5, 2.0)), ("4", (4.0,))]
)
def test_multiples(text: str, expected: tuple[float, ...]) -> None:
    assert multiples(text) == expected


@pytest.mark.parametrize("text", ["3,1", "0,1", "-1,2", "", "a,b", "1,,x"])
def test_multiples_errors(text: str) -> None:
    with pytest.raises(ConfigError) as error:
        multiples(text)
    assert str(error.value) == (f"--steps {text!r}: give increasing positive multiples of the base rate, e.g. 1,3,5,10")


def test_multiples_refuses_a_repeated_step() -> None:
    with pytest.raises(ConfigError):
        multiples("1,1,3")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1-5", (1, 2, 3, 4, 5)),
        ("7-7", (7,)),
        ("a, b,42", ("a", "b", 42)),
        ("user-1,user-2", ("user-1", "user-2")),
    ],
)
def test_entity_keys(text: str, expected: tuple[Any, ...]) -> None:
    assert entity_keys(text) == expected


def test_entity_keys_range_is_inclusive_and_long() -> None:
    keys = entity_keys("1-20000")
    assert (len(keys), keys[0], keys[-1]) == (20_000, 1, 20_000)


def test_entity_keys_errors() -> None:
    with pytest.raises(ConfigError) as error:
        entity_keys("5-1")
    assert str(error.value) == "--entities '5-1': the range ends before it starts"
    with pytest.raises(ConfigError) as error:
        entity_keys(" , ")
    assert str(error.value) == "--entities ' , ': give a range such as 1-20000 or keys separated by commas"


def test_slo_overrides() -> None:
    slos = slo_overrides(("critical:p99=50,success=99.9",))
    assert slos["critical"].p99_ms == 50.0
    assert slos["critical"].success == pytest.approx(0.999)
    assert slos["default"] == DEFAULT_SLOS["default"]
    assert slos["sheddable"] == DEFAULT_SLOS["sheddable"]
    assert slo_overrides(()) == DEFAULT_SLOS


def test_slo_overrides_keep_what_is_not_given_and_leave_the_defaults_alone() -> None:
    slos = slo_overrides(("critical:p99=50", "sheddable:success=10"))
    assert slos["critical"] == Slo(p99_ms=50.0, success=0.999)
    assert slos["sheddable"] == Slo(p99_ms=1000.0, success=0.1)
    assert DEFAULT_SLOS["critical"] == Slo(p99_ms=100.0, success=0.999)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("vip:p99=5", "--slo 'vip:p99=5': write CLASS:p99=MS,success=PERCENT with CLASS one of critical, default, "
         "sheddable"),
        ("p99=50", "--slo 'p99=50': write CLASS:p99=MS,success=PERCENT with CLASS one of critical, default, "
         "sheddable"),
        ("critical:p50=5", "--slo 'critical:p50=5': unknown key 'p50' (keys: p99 in ms, success in percent)"),
        ("critical:p99=fast", "--slo 'critical:p99=fast': 'p99=fast' is not KEY=NUMBER (keys: p99, success)"),
    ],
)  # fmt: skip
def test_slo_override_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        slo_overrides((value,))
    assert str(error.value) == message


def test_parse_shares_normalises_to_one() -> None:
    assert parse_shares("critical=1,sheddable=3", what="--mix", allowed=CLASSES) == {
        "critical": 0.25,
        "sheddable": 0.75,
    }
    shares = parse_shares("critical=0.2, sheddable=0.8", what="--mix", allowed=CLASSES)
    assert shares == {"critical": pytest.approx(0.2), "sheddable": pytest.approx(0.8)}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert parse_shares("acme=7,globex=3", what="--tenants") == {"acme": 0.7, "globex": 0.3}


@pytest.mark.parametrize("text", ["critical", "critical=", "=0.2", "critical=x", "critical=-0.1,sheddable=1"])
def test_parse_shares_errors_name_the_expected_form(text: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_shares(text, what="--mix", allowed=CLASSES)
    assert str(error.value) == (
        f"--mix {text!r}: write NAME=SHARE pairs separated by commas, e.g. critical=0.2,sheddable=0.8"
    )


def test_parse_shares_unknown_class_and_nothing_positive() -> None:
    with pytest.raises(ConfigError) as error:
        parse_shares("vip=1", what="--mix", allowed=CLASSES)
    assert str(error.value) == "--mix: unknown class 'vip' (classes: critical, default, sheddable)"
    for text in ("critical=0,sheddable=0", ""):
        with pytest.raises(ConfigError) as error:
            parse_shares(text, what="--mix", allowed=CLASSES)
        assert str(error.value) == f"--mix {text!r}: give at least one positive share"


@pytest.mark.parametrize("text", ["critical=nan,sheddable=1", "critical=inf,sheddable=1"])
def test_parse_shares_refuses_nan_and_inf(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_shares(text, what="--mix", allowed=CLASSES)


# -- rounds --------------------------------------------------------------------------------


def _round(latencies_ms: list[float], *, name: str = "1x", reported: bool = True, shed: int = 0) -> Step:
    """A step of one round: `latencies_ms` critical answers (2xx), `shed` sheddable 503s,
    and the server's counters of AFTER - BEFORE."""
    ok = len(latencies_ms)
    kinds = np.array([0] * ok + [1] * shed)
    status = np.array([200] * ok + [503] * shed)
    latency = np.array(latencies_ms + [math.nan] * shed) / 1000
    by_label = split_by_label(("critical", "sheddable"), kinds, status=status, sent=np.zeros(ok + shed),
                              latency_s=latency, deadlines_s=None, marked=None)  # fmt: skip
    result = dataclasses.replace(
        _result(scheduled=ok + shed, ok=ok, statuses={200: ok, 503: shed} if shed else {200: ok}, duration_s=10.0),
        latency=latency_summary(latency[:ok]), by_label=by_label,
    )  # fmt: skip
    step = Step(name, 1.0, result, reported, None if reported else FELL_BEHIND)
    step.counters = {key: value - BEFORE.get(key, 0.0) for key, value in AFTER.items()}
    return step


def test_rounds_combine_into_one_step_over_all_their_requests() -> None:
    fast, slow = [2.0 + i / 100 for i in range(300)], [4.0 + i / 50 for i in range(300)]
    step = combine_rounds([_round(fast, shed=50), _round(slow, shed=100)])
    figures = step.as_dict()
    critical = figures["classes"]["critical"]
    assert critical["p99_ms"] == pytest.approx(np.percentile(fast + slow, 99))  # pooled, not averaged
    assert critical["p50_ms"] == pytest.approx(np.percentile(fast + slow, 50))
    assert figures["offered_per_s"] == pytest.approx((600 + 150) / 20.0)
    assert figures["classes"]["sheddable"]["shed"] == 1.0
    assert [r["classes"]["critical"]["p99_ms"] for r in figures["rounds"]] == [
        pytest.approx(np.percentile(fast, 99)), pytest.approx(np.percentile(slow, 99)),
    ]  # fmt: skip
    # The counters add up: twice the dollars and predictions of one round, the same price.
    assert figures["cost"]["dollars"] == pytest.approx(0.08)
    assert figures["cost"]["per_1k_predictions"] == pytest.approx(0.002)
    assert figures["server"]["shed_by_reason"] == {"overload": 80.0, "deadline": 14.0}
    assert figures["server"]["rows_per_batch"] == pytest.approx(16.0)
    assert figures["reported"] is True


def test_a_round_the_generator_fell_behind_in_leaves_the_step_unreported() -> None:
    step = combine_rounds([_round([1.0] * 10), _round([1.0] * 10, reported=False)])
    assert not step.reported
    assert step.note == f"round 2: {FELL_BEHIND}"
    assert combine_rounds([one := _round([1.0])]) is one
    assert one.as_dict()["rounds"] == [{"reported": True, "classes": {
        "critical": {"p50_ms": 1.0, "p99_ms": 1.0, "success": 1.0},
        "sheddable": {"p50_ms": None, "p99_ms": None, "success": None},
    }}]  # fmt: skip


def test_overload_bar_pairs_the_rounds_that_ran_side_by_side() -> None:
    def with_rounds(name: str, p99s: list[float | None]) -> dict[str, Any]:
        step = _judged(name, True, critical=(10.0, 1.0))
        step["rounds"] = [{"classes": {"critical": {"p99_ms": p99}}} for p99 in p99s]
        return step

    steps = [with_rounds("1x", [10.0, 8.0, 12.0]), with_rounds("3x", [12.0, 16.0, None])]
    assert overload_bar(steps)["per_round_p99_3x_over_1x"] == [pytest.approx(1.2), pytest.approx(2.0), None]
    uneven = [with_rounds("1x", [10.0, 8.0]), with_rounds("3x", [12.0])]
    assert overload_bar(uneven)["per_round_p99_3x_over_1x"] == []


def test_the_steps_run_in_interleaved_rounds_and_are_pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    from tenx.loadtest import run

    ran: list[tuple[str, float, float]] = []

    def fake_run_step(generator: Any, target: Any, mix: Any, rate: float, settings: Any, **kw: Any) -> Step:
        ran.append((kw["name"], rate, settings.duration_s))
        return _round([float(len(ran))] * 100, name=kw["name"])

    monkeypatch.setattr(run, "run_step", fake_run_step)
    options = run.Options(target=MODEL, steps=(1.0, 3.0), duration_s=30.0, rounds=3)
    said: list[str] = []
    steps = run._run_steps(None, options, None, StepSettings(duration_s=30.0, warmup_s=1.0), 200.0,  # type: ignore[arg-type]
                           lambda: 0, said.append)  # fmt: skip
    assert ran == [("1x", 200.0, 10.0), ("3x", 600.0, 10.0)] * 3  # 1x 3x, 1x 3x, 1x 3x: 10 s each
    assert [step.name for step in steps] == ["1x", "3x"]
    assert [r["classes"]["critical"]["p99_ms"] for r in steps[1].as_dict()["rounds"]] == [2.0, 4.0, 6.0]
    assert steps[1].result.duration_s == 30.0
    assert said[-3] == "each step over its 3 rounds:"


def test_the_next_step_waits_for_the_servers_queues_to_empty_and_open_circuits(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from tenx.loadtest.steps import wait_idle

    backlog = [900, 300, 0]
    asked: list[str] = []

    def ready(url: str, **_: Any) -> httpx.Response:
        asked.append(url)
        rows = backlog.pop(0) if backlog else 0
        return httpx.Response(503 if rows else 200, json={"models": [{"model": "churn", "queued_rows": rows}]})

    monkeypatch.setattr(httpx, "get", ready)
    monkeypatch.setattr(time, "sleep", lambda _: None)
    wait_idle(MODEL)
    assert asked == ["http://10.1.2.3:8081/health/ready"] * 3  # until the third answer's empty queue
    assert wait_idle(FEATURES) == 0.0  # a feature API has no queue figures: not asked
    assert len(asked) == 3

    def down(url: str, **_: Any) -> httpx.Response:
        raise httpx.ConnectError("refused")

    monkeypatch.setattr(httpx, "get", down)
    wait_idle(MODEL)  # nothing to wait on: returns at once instead of failing the step

    # An open circuit (readiness 503 without model figures) is waited out; a server
    # unready for another reason is not waited on.
    answers = [
        httpx.Response(503, json={"status": "unavailable", "circuits": {"model:churn": "open"}}),
        httpx.Response(503, json={"status": "unavailable", "circuits": {"model:churn": "open"}}),
        httpx.Response(200, json={"models": [{"model": "churn", "queued_rows": 0}], "circuits": {"c": "half_open"}}),
    ]
    monkeypatch.setattr(httpx, "get", lambda url, **_: answers.pop(0))
    wait_idle(MODEL)
    assert answers == []
    answers = [httpx.Response(503, json={"status": "unavailable", "problems": ["loading"], "circuits": {}})] * 2
    monkeypatch.setattr(httpx, "get", lambda url, **_: answers.pop(0))
    wait_idle(MODEL)
    assert len(answers) == 1  # asked once
