"""Routes, fallbacks, circuits and quotas on the model server (embedded store, real
ONNX models trained in the test): a model that raises or stalls, an online store that
fails, the prediction cache, rules, per-tenant quotas."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from featurestore import CACHE, route
from featurestore.errors import CompileError, ConfigError, TransientError
from featurestore.plan.collect import collect_routes
from serving.models import ModelServerSettings, create_model_app
from serving.models.admission import TenantPolicy
from serving.models.batcher import Priority
from serving.models.breaker import BreakerSettings
from serving.models.config import breaker_settings, tenant_policies
from tests.model_repo import DemoRepo, build_demo_repo, feature_matrix, with_two_models

QUICK = BreakerSettings(window=4, minimum_calls=3, failure_rate=0.5, open_wait_s=60.0, half_open_calls=1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> DemoRepo:
    return with_two_models(build_demo_repo(tmp_path_factory.mktemp("fallbacks") / "repo"))


def serve(repo: DemoRepo, *, store: Any = None, **options: Any) -> TestClient:
    settings = ModelServerSettings(
        registry_dir=repo.settings.registry_dir,
        inference_timeout_ms=options.pop("inference_timeout_ms", 250.0),
        inline_run_us=options.pop("inline_run_us", 200.0),
    )
    options.setdefault("breakers", QUICK)
    return TestClient(create_model_app(settings, store or repo.store(), **options))


def server_of(client: TestClient) -> Any:
    return client.app.state.server  # type: ignore[attr-defined]


def break_model(client: TestClient, model: str, how: str = "raise") -> None:
    runtime = server_of(client).routes[model].loaded.runtime

    def submit(matrix: np.ndarray) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if how == "raise":
            future.set_exception(RuntimeError("CUDA error: an illegal memory access was encountered"))
        return future  # "stall": never completes

    runtime.submit = submit
    runtime.inline_run_s = 0  # the failure is on the model's own thread: no run may bypass it


class FailingStore:
    """The embedded store, with reads that fail like a Redis that went away."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.failing = False

    def read_many(self, requests: Any) -> Any:
        if self.failing:
            raise TransientError("online store Redis at redis://127.0.0.1:1/0 did not answer: connection refused")
        return self.store.read_many(requests)

    def close(self) -> None:
        self.store.close()


def by_amount(features: list[dict[str, float | None]] | None, request: Any) -> list[float]:
    """A rule: high risk for large amounts; it sees features only when they were read."""
    base = 0.9 if request.context.get("amount", 0) > 100 else 0.1
    return [base if features is None else base + 0.01 for _ in request.entities]


def test_a_model_that_raises_opens_its_circuit_and_the_cheaper_model_answers(repo: DemoRepo) -> None:
    spec = route("buys", primary="buys", fallbacks=["buys_logistic"])
    with serve(repo, routes={"buys": spec}) as client:
        break_model(client, "buys")
        answers = [client.post("/predict", json={"model": "buys", "entities": [1, 2]}) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6
        bodies = [a.json() for a in answers]
        assert {b["served_by"] for b in bodies} == {"buys_logistic@1"}
        assert all(b["degraded"] for b in bodies)
        assert "CUDA error" in bodies[0]["reason"]
        assert bodies[-1]["reason"] == "buys: circuit open"  # after 3 failures the model is not even tried
        assert server_of(client).guard.state("model:buys").value == "open"
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["circuits"]["model:buys"] == "open"
        metrics = client.get("/metrics").text
    assert 'tenx_model_breaker_state{dependency="model:buys"} 2.0' in metrics
    assert 'tenx_model_breaker_transitions_total{dependency="model:buys",from_state="closed",to_state="open"} 1.0' in (
        metrics
    )
    fallbacks = 'tenx_model_fallbacks_total{priority="default",route="buys",served_by="buys_logistic",tenant="default"}'
    assert f"{fallbacks} 6.0" in metrics


def test_a_stalled_model_falls_back_well_within_the_deadline(repo: DemoRepo) -> None:
    spec = route("buys", primary="buys", fallbacks=["buys_logistic"])
    with serve(repo, routes={"buys": spec}, inference_timeout_ms=50) as client:
        break_model(client, "buys", how="stall")
        began = time.perf_counter()
        response = client.post("/predict", json={"model": "buys", "entities": [1], "deadline_ms": 2000})
        elapsed = time.perf_counter() - began
    assert response.status_code == 200, response.text
    assert response.json()["served_by"] == "buys_logistic@1"
    assert "did not answer within 50 ms" in response.json()["reason"]
    assert elapsed < 1.0


def test_a_stalled_model_without_fallback_answers_at_the_deadline_never_later(repo: DemoRepo) -> None:
    with serve(repo, inference_timeout_ms=10_000) as client:
        break_model(client, "buys", how="stall")
        began = time.perf_counter()
        response = client.post("/predict", json={"model": "buys", "entities": [1], "deadline_ms": 300})
        elapsed = time.perf_counter() - began
    assert response.status_code == 504
    assert 0.25 < elapsed < 1.0


def test_timeouts_of_requests_whose_deadline_left_the_model_no_time_do_not_open_its_circuit(
    repo: DemoRepo,
) -> None:
    """Overload, not the model: requests that waited until their deadline was nearly
    gone give the model a few milliseconds; their timeouts must not open the circuit of
    a model that answers in 40 ms. Given a fair budget, the same slowness does."""
    with serve(repo, inference_timeout_ms=30) as client:
        runtime = server_of(client).routes["buys"].loaded.runtime
        runtime_pool = concurrent.futures.ThreadPoolExecutor(1)

        def slow(matrix: np.ndarray) -> Any:
            time.sleep(0.04)  # on a thread of its own, as a slow model's run would be
            return runtime.score(matrix)

        runtime.submit = lambda matrix: runtime_pool.submit(slow, matrix)
        runtime.inline_run_s = 0  # the slowness is on the model's own thread
        try:
            for _ in range(6):  # a 5 ms deadline: at most 5 ms for the model, under a quarter of 30 ms
                answer = client.post("/predict", json={"model": "buys", "entities": [1], "deadline_ms": 5})
                assert answer.status_code in (503, 504), answer.text
            assert server_of(client).guard.state("model:buys").value == "closed"
            for _ in range(4):  # the model's whole 30 ms: its own slowness, counted
                client.post("/predict", json={"model": "buys", "entities": [1], "deadline_ms": 2000})
            assert server_of(client).guard.state("model:buys").value == "open"
        finally:
            runtime_pool.shutdown(wait=True)


def test_with_the_online_store_down_the_rule_answers_from_the_request(repo: DemoRepo) -> None:
    store = FailingStore(repo.store())
    spec = route("buys", primary="buys", fallbacks=["buys_logistic", CACHE, by_amount])
    breakers = BreakerSettings(window=4, minimum_calls=3, open_wait_s=0.3, half_open_calls=1)
    with serve(repo, store=store, routes={"buys": spec}, breakers=breakers) as client:
        store.failing = True
        body = {"model": "buys", "entities": [1, 2, 3], "context": {"amount": 500}}
        answers = [client.post("/predict", json=body).json() for _ in range(5)]
        assert {a["served_by"] for a in answers} == {"rule:by_amount"}
        assert answers[0]["scores"] == [0.9, 0.9, 0.9]  # no features: the rule saw None
        assert answers[0]["status"] == ["rule", "rule", "rule"]
        assert all(a["degraded"] for a in answers)
        assert "connection refused" in answers[0]["reason"]
        assert "online store: circuit open" in answers[-1]["reason"]
        store.failing = False  # the circuit stays open until its wait passed; then a probe closes it
        time.sleep(0.4)
        recovered = client.post("/predict", json=body).json()
        assert (recovered["served_by"], recovered["degraded"]) == ("buys@1", False)


def test_the_rule_sees_the_features_when_only_the_model_failed(repo: DemoRepo) -> None:
    seen: list[Any] = []

    def record(features: Any, request: Any) -> float:
        seen.append(features)
        return 0.5

    spec = route("buys", primary="buys", fallbacks=[record])
    with serve(repo, routes={"buys": spec}) as client:
        break_model(client, "buys")
        answer = client.post("/predict", json={"model": "buys", "entities": [1, 2]}).json()
    assert (answer["served_by"], answer["scores"]) == ("rule:record", [0.5, 0.5])
    card = repo.models.card("buys")
    expected = feature_matrix(repo, card, [1, 2])
    features = seen[0]
    assert [list(row) for row in features] == [card.feature_references] * 2
    got = np.array([[row[name] for name in card.feature_references] for row in features], dtype=np.float32)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_the_cache_answers_the_models_own_score_for_the_same_features(repo: DemoRepo) -> None:
    spec = route("buys", primary="buys", fallbacks=[CACHE])
    with serve(repo, routes={"buys": spec}) as client:
        fresh = client.post("/predict", json={"model": "buys", "entities": [1, 2]}).json()
        break_model(client, "buys")
        cached = client.post("/predict", json={"model": "buys", "entities": [2, 1]}).json()
        assert cached["served_by"] == "cache:buys@1"
        assert cached["degraded"] is True
        assert cached["scores"] == fresh["scores"][::-1]
        miss = client.post("/predict", json={"model": "buys", "entities": [3]})
    assert miss.status_code == 503
    assert "cache: miss" in miss.json()["error"]


def test_the_cache_gives_no_score_to_a_row_the_card_refuses(repo: DemoRepo) -> None:
    """A missing entity scored on its empty-window vector leaves that vector's score in
    the cache; under `on_missing=refuse` the model gives such a row no score, and the
    cache must not give it one either (it answered the cached score, status `missing`)."""
    from featurestore.models import MissingPolicy

    spec = route("buys", primary="buys", fallbacks=[CACHE])
    with serve(repo, routes={"buys": spec}) as client:
        scored = client.post("/predict", json={"model": "buys", "entities": [1, 999_999]}).json()
        assert scored["status"] == ["found", "missing"]
        assert None not in scored["scores"]
        assembler = server_of(client).routes["buys"].loaded.assembler
        assembler.card = replace(assembler.card, on_missing=MissingPolicy.REFUSE)
        refused = client.post("/predict", json={"model": "buys", "entities": [1, 999_998]}).json()
        assert refused["served_by"] == "buys@1"
        assert refused["scores"] == [scored["scores"][0], None]
        break_model(client, "buys")
        cached = client.post("/predict", json={"model": "buys", "entities": [1, 999_998]}).json()
    assert cached["served_by"] == "cache:buys@1"
    assert cached["status"] == ["found", "missing"]
    assert cached["scores"] == refused["scores"]  # what the model itself answered


def test_an_overload_refusal_is_never_answered_by_a_rule_even_when_the_next_model_is_out(tmp_path: Path) -> None:
    """The primary's queue is full and the cheaper model's circuit is open: the request
    is shed (503), not answered by the route's rule as if the models had failed."""
    import asyncio
    import types

    from featurestore.definitions.route import Route as RouteSpec
    from serving.models.admission import OVERLOAD, Rejected
    from serving.models.breaker import Breakers
    from serving.models.server import ModelServer

    def fraud_rule(features: Any, request: Any) -> float:
        return 0.5

    async def scenario() -> Any:
        guard = Breakers(QUICK)
        spec = RouteSpec("fraud", primary="fraud_mlp", fallbacks=("fraud_logistic", fraud_rule))
        server = ModelServer(ModelServerSettings(registry_dir=tmp_path), None, guard=guard, routes={"fraud": spec})
        for name in ("fraud_mlp", "fraud_logistic"):
            server._route(name).loaded = types.SimpleNamespace()  # loaded: only the steps before `submit` look
        for _ in range(3):
            guard.record("model:fraud_logistic", ok=False, seconds=0.01)

        def full(*args: Any, **kwargs: Any) -> Any:
            raise Rejected("overloaded: the queue is full", reason=OVERLOAD)

        server.submit = full  # type: ignore[method-assign]
        try:
            return await server.predict("fraud", [1], priority=Priority.SHEDDABLE, tenant="t", deadline_s=1.0)
        except Rejected as refused:
            return refused

    outcome = asyncio.run(scenario())
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason == OVERLOAD
    assert "fraud_mlp: overload" in str(outcome)
    assert "fraud_logistic: circuit open" in str(outcome)


def test_requests_queued_for_a_model_that_unloads_go_down_their_fallbacks(repo: DemoRepo) -> None:
    """A model unloaded (or found skewed) while requests wait in its queue: they are
    answered by the route's next model, not refused with a bare 503."""
    import asyncio

    from serving.models.server import ModelServer

    spec = route("buys", primary="buys", fallbacks=["buys_logistic"])

    async def scenario() -> Any:
        settings = ModelServerSettings(registry_dir=repo.settings.registry_dir)
        server = ModelServer(settings, repo.store(), routes={"buys": spec})
        await server.start()
        try:
            asked = asyncio.ensure_future(
                server.predict("buys", [1, 2], priority=Priority.DEFAULT, tenant="t", deadline_s=5.0)
            )
            await asyncio.sleep(0)  # the request is queued for `buys`; its batch is not taken yet
            assert len(server.routes["buys"].queue) == 1
            server._set_loaded(server.routes["buys"], None)  # as a refresh that found it skewed does
            server.routes["buys"].problem = "unloaded for the test"
            return await asked
        finally:
            await server.stop()

    answer = asyncio.run(scenario())
    assert answer.served_by == "buys_logistic@1"
    assert answer.degraded
    assert "unloaded for the test" in (answer.reason or "")


def test_a_tenant_over_its_quota_gets_429_with_retry_after(repo: DemoRepo) -> None:
    tenants = {"shop": TenantPolicy(rate=1, burst=4), "vip": TenantPolicy(priority=Priority.CRITICAL)}
    with serve(repo, tenants=tenants) as client:
        assert (
            client.post("/predict", json={"model": "buys", "entities": [1, 2, 3], "tenant": "shop"}).status_code == 200
        )
        over = client.post("/predict", json={"model": "buys", "entities": [1, 2], "tenant": "shop"})
        assert client.post("/predict", json={"model": "buys", "entities": [1], "tenant": "vip"}).status_code == 200
        asked = {"model": "buys", "entities": [1, 2], "tenant": "other", "priority": "critical"}
        assert client.post("/predict", json=asked).status_code == 200
        metrics = client.get("/metrics").text
    assert over.status_code == 429
    assert over.headers["retry-after"] == "1"
    assert over.json()["reason"] == "quota"
    assert "tenant `shop` is over its quota of 1 predictions/s (burst 4)" in over.json()["error"]
    assert 'tenx_model_shed_total{model="buys",priority="default",reason="quota",tenant="shop"} 1.0' in metrics
    assert 'tenx_model_served_total{priority="critical",route="buys",served_by="buys",tenant="vip"} 1.0' in metrics
    assert 'tenx_model_served_total{priority="critical",route="buys",served_by="buys",tenant="other"} 1.0' in metrics


def test_a_request_refused_for_its_keys_costs_its_tenant_no_quota(repo: DemoRepo) -> None:
    tenants = {"shop": TenantPolicy(rate=0.001, burst=4)}
    with serve(repo, tenants=tenants) as client:
        for _ in range(3):
            bad = client.post("/predict", json={"model": "buys", "entities": ["abc", "def"], "tenant": "shop"})
            assert bad.status_code == 400, bad.text
        good = client.post("/predict", json={"model": "buys", "entities": [1, 2, 3, 4], "tenant": "shop"})
    assert good.status_code == 200, good.text  # the whole burst of 4 is still there


def test_routes_are_collected_from_the_feature_repo(tmp_path: Path) -> None:
    (tmp_path / "routes.py").write_text(
        "from featurestore import route\n"
        "def fallback(features, request):\n"
        "    return 0.5\n"
        "@route('fraud', primary='fraud_mlp', fallbacks=['fraud_logistic', 'cache', fallback])\n"
        "def pick(request):\n"
        "    return 'fraud_logistic' if request.priority == 'sheddable' else None\n"
    )
    routes = collect_routes(tmp_path)
    spec = routes["fraud"]
    assert spec.models == ["fraud_mlp", "fraud_logistic"]
    assert spec.choose is not None
    (tmp_path / "more.py").write_text("from featurestore import route\nagain = route('fraud', primary='other')\n")
    with pytest.raises(CompileError, match="route `fraud`: declared twice"):
        collect_routes(tmp_path)


def test_model_server_config_is_checked_with_messages_that_say_what_to_fix() -> None:
    policies = tenant_policies({"tenants": {"shop": {"rate": 10, "priority": "critical"}, "*": {"rate": 1}}})
    assert policies["shop"].priority is Priority.CRITICAL
    assert policies["*"].rate == 1
    with pytest.raises(ConfigError, match=r"model_server.tenants.shop: unknown key\(s\) rpm; expected rate"):
        tenant_policies({"tenants": {"shop": {"rpm": 10}}})
    with pytest.raises(ConfigError, match=r"model_server\.tenants\.shop: tenant rate must be above 0"):
        tenant_policies({"tenants": {"shop": {"rate": 0}}})
    with pytest.raises(ConfigError, match="priority 'urgent': expected critical, default or sheddable"):
        tenant_policies({"tenants": {"shop": {"priority": "urgent"}}})
    assert breaker_settings({"breaker": {"minimum_calls": 2}}).minimum_calls == 2
    with pytest.raises(ConfigError, match=r"model_server.breaker: unknown key\(s\) threshold"):
        breaker_settings({"breaker": {"threshold": 2}})


def test_the_client_types_shed_quota_and_degraded_answers() -> None:
    import httpx

    from serving.errors import ModelUnavailable, Overloaded, QuotaExceeded
    from serving.models.client import _answer

    def response(status: int, body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    with pytest.raises(QuotaExceeded, match="over its quota") as quota:
        _answer(response(429, {"error": "tenant `a` is over its quota", "reason": "quota"}, **{"retry-after": "3"}))
    assert quota.value.retry_after_s == 3.0
    with pytest.raises(Overloaded):
        _answer(response(503, {"error": "overloaded: ...", "reason": "evicted"}))
    with pytest.raises(ModelUnavailable):
        _answer(response(503, {"error": "route `buys` could not answer", "reason": "unavailable"}))
    body = {"route": "buys", "served_by": "rule:by_amount", "degraded": True, "reason": "online store: circuit open",
            "model": None, "version": None, "precision": None, "device": None, "scores": [0.9],
            "status": ["rule"], "as_of_ms": [None], "read_at_ms": None}  # fmt: skip
    prediction = _answer(response(200, body))
    assert (prediction.served_by, prediction.degraded, prediction.age_s) == ("rule:by_amount", True, [None])


def test_past_the_mark_a_sheddable_request_is_refused_from_its_header_before_the_body(repo: DemoRepo) -> None:
    from serving.models.batcher import Pending

    with serve(repo) as client:
        server = server_of(client)
        lanes = [route.lane for route in server.routes.values()]
        for lane in lanes:  # queued work the batch loops are not woken for
            for _ in range(lane.threshold(Priority.SHEDDABLE)):
                lane.queue.offer(Pending(deadline=1e12, rows=1, priority=Priority.DEFAULT, payload=None))
        try:
            assert server.shed_early(b"default", b"t") is None  # default still has room (below 80%)
            assert server.shed_early(b"critical", b"t") is None
            assert server.shed_early(b"urgent", b"t") is None  # the body path says what is wrong
            refused = client.post("/predict", content=b"not even JSON", headers={"x-priority": "sheddable"})
            assert refused.status_code == 503
            assert refused.json()["reason"] == "overload"
            assert "every model's queue is past the sheddable mark" in refused.json()["error"]
            metrics = client.get("/metrics").text
        finally:
            for lane in lanes:
                while len(lane.queue):
                    lane.queue.take(1 << 20)
    assert 'tenx_model_shed_total{model="*",priority="sheddable",reason="overload",tenant="default"} 1.0' in metrics


def test_every_answer_carries_a_request_id_and_json_logs_name_it(
    repo: DemoRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from serving.logs import configure_logging

    def broken(features: Any, request: Any) -> float:
        raise ZeroDivisionError("the rule divided by zero")

    spec = route("buys", primary="buys", fallbacks=[broken])
    configure_logging("json")
    try:
        with serve(repo, routes={"buys": spec}) as client:
            break_model(client, "buys")
            given = client.post(
                "/predict", json={"model": "buys", "entities": [1]}, headers={"x-request-id": "trace-42"}
            )
            fresh = client.post("/predict", json={"model": "buys", "entities": [1]})
    finally:
        import logging

        logging.getLogger("tenx").handlers.clear()
        logging.getLogger("tenx").propagate = True
    assert given.status_code == 503
    assert given.headers["x-request-id"] == "trace-42"
    assert len(fresh.headers["x-request-id"]) == 16
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["message"] == "rule broken failed"]
    assert {line["request_id"] for line in failed} == {"trace-42", fresh.headers["x-request-id"]}
    assert "ZeroDivisionError: the rule divided by zero" in failed[0]["exception"]


def test_gpu_metrics_come_from_nvml_when_there_is_a_gpu() -> None:
    from types import SimpleNamespace

    from serving.models.gpu import GpuMonitor
    from serving.models.metrics import ModelMetrics

    class FakeNvml:
        def nvmlInit(self) -> None:
            return None

        def nvmlDeviceGetCount(self) -> int:
            return 2

        def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
            return index

        def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
            return SimpleNamespace(gpu=37 + handle)

        def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
            return SimpleNamespace(used=2**30 * (handle + 1), total=80 * 2**30)

    metrics = ModelMetrics()
    GpuMonitor(FakeNvml()).export(metrics)
    assert metrics.gpu_utilization.labels("1")._value.get() == pytest.approx(0.38)
    assert metrics.gpu_memory_used.labels("0")._value.get() == 2**30
    assert GpuMonitor(SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("no driver")))).handles == []


def test_the_client_throttles_non_critical_requests_while_the_server_sheds_them() -> None:
    import httpx

    from serving.errors import ModelUnavailable, Overloaded
    from serving.models import AdaptiveThrottle, ModelClient

    now = [0.0]
    draws = iter([0.5] * 10_000)
    settings = AdaptiveThrottle(k=2.0, window_s=60, clock=lambda: now[0], draw=lambda: next(draws))
    shed = {"error": "overloaded", "reason": "overload"}
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("x-priority", "-"))
        return httpx.Response(503, json=shed)

    client = ModelClient("http://server", throttle=settings)
    client._client = httpx.Client(base_url="http://server", transport=httpx.MockTransport(handler))
    throttle = client.throttles["sheddable"]
    refused_locally = 0
    for _ in range(100):
        try:
            client.predict("buys", [1], priority="sheddable")
        except Overloaded as error:
            refused_locally += "client's throttle" in str(error)
    assert throttle.probability() > 0.9  # nothing accepted: almost everything stays home
    assert 60 < refused_locally < 100
    assert len(sent) == 100 - refused_locally
    for _ in range(5):
        with pytest.raises(Overloaded, match="overloaded"):  # critical always goes to the server
            client.predict("buys", [1], priority="critical")
    assert sent[-5:] == ["critical"] * 5
    now[0] = 120.0  # a quiet minute later the window is empty: requests go again
    assert throttle.probability() == 0.0
    loading = ModelClient("http://server")  # a server that is loading (or lost its store) is not shedding
    loading._client = httpx.Client(
        base_url="http://server",
        transport=httpx.MockTransport(
            lambda r: httpx.Response(503, json={"error": "loading", "reason": "unavailable"})
        ),
    )
    for _ in range(50):
        with pytest.raises(ModelUnavailable):
            loading.predict("buys", [1], priority="sheddable")
    assert loading.throttles["sheddable"].probability() == 0.0


def test_the_cache_answers_with_the_model_it_cached_after_two_models_failed(repo: DemoRepo) -> None:
    """Only the route's primary is cached; after the primary and then the cheaper model
    failed, the cache step looked up the cheaper model's key (never cached): a miss,
    though the primary's exact score for those features was in it."""
    spec = route("buys", primary="buys", fallbacks=["buys_logistic", CACHE])
    with serve(repo, routes={"buys": spec}) as client:
        fresh = client.post("/predict", json={"model": "buys", "entities": [1, 2]}).json()
        assert fresh["served_by"] == "buys@1"
        break_model(client, "buys")
        break_model(client, "buys_logistic")
        answer = client.post("/predict", json={"model": "buys", "entities": [1, 2]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["served_by"] == "cache:buys@1"
    assert answer.json()["scores"] == fresh["scores"]
    assert answer.json()["degraded"] is True


def test_a_request_refused_with_nothing_served_gives_its_quota_back(repo: DemoRepo) -> None:
    """Charged up front, the quota was kept for a 409 (model skewed against the plan) and
    a 503 (circuit open, every step failed): an outage drained every tenant's bucket and
    429s followed the recovery."""
    import asyncio

    from featurestore.models import SkewError
    from serving.errors import ModelUnavailable
    from serving.models.admission import Tenants
    from serving.models.breaker import Breakers
    from serving.models.server import ModelServer

    async def scenario() -> list[float]:
        tenants = Tenants({"shop": TenantPolicy(rate=0.001, burst=4)}, clock=lambda: 0.0)
        guard = Breakers(QUICK)
        settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, models=("buys",))
        server = ModelServer(settings, repo.store(), tenants=tenants, guard=guard)
        await server.start()
        left = []
        try:
            served = server.routes["buys"]
            loaded = served.loaded
            server._set_loaded(served, None)  # skewed: the plan moved on
            served.problem = "model buys@1 will not serve: view `user_spend` is at version 2, it was trained on 1."
            with pytest.raises(SkewError):
                await server.predict("buys", [1, 2], priority=Priority.DEFAULT, tenant="shop", deadline_s=1.0)
            left.append(tenants._bucket("shop").tokens)
            server._set_loaded(served, loaded)
            served.problem = None
            for _ in range(3):
                guard.record("model:buys", ok=False, seconds=0.01)
            with pytest.raises(ModelUnavailable, match="buys: circuit open"):
                await server.predict("buys", [1, 2], priority=Priority.DEFAULT, tenant="shop", deadline_s=1.0)
            left.append(tenants._bucket("shop").tokens)
        finally:
            await server.stop()
        return left

    assert asyncio.run(scenario()) == [4, 4]


def test_a_batch_whose_deadlines_all_passed_during_the_lookup_is_not_run(repo: DemoRepo) -> None:
    """Its callers were answered 504 already; the run took the model from live batches."""

    class SlowStore(FailingStore):
        def read_many(self, requests: Any) -> Any:
            time.sleep(0.15)
            return self.store.read_many(requests)

    with serve(repo, store=SlowStore(repo.store())) as client:
        runtime = server_of(client).routes["buys"].loaded.runtime
        runs = runtime.batches
        late = client.post("/predict", json={"model": "buys", "entities": [1], "deadline_ms": 50})
        assert late.status_code == 504
        time.sleep(0.3)  # the lookup ends after the answer
        assert runtime.batches == runs
        assert 'tenx_model_dead_batches_total{model="buys"} 1.0' in client.get("/metrics").text
        assert client.post("/predict", json={"model": "buys", "entities": [1], "deadline_ms": 2000}).status_code == 200
        assert runtime.batches == runs + 1


def test_the_cache_keeps_a_versions_scores_apart_by_the_precision_it_ran_at() -> None:
    """`tenx models deploy buys@1 --precision int8` keeps the version: the cache answered
    the FP32 session's scores as the INT8 model's."""
    from serving.models.cache import PredictionCache

    cache = PredictionCache(clock=lambda: 0.0)
    rows = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    cache.put("buys", 1, "fp32", rows, np.array([0.25, 0.75]), 60.0)
    assert cache.get("buys", 1, "fp32", rows) == [0.25, 0.75]
    assert cache.get("buys", 1, "int8", rows) is None
    assert cache.get("buys", 2, "fp32", rows) is None
