"""Canaries: the sticky split, the judge, the registry's lifecycle, and the server under
load: a bad canary (raising, slow, shifting scores) rolled back on its own with no
failed request, a good one promoted by command with no failed request, a shadow one
scoring copies without answering."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from featurestore.errors import TenxError
from featurestore.models import Canary, CanaryLimits
from serving.models import ModelServerSettings, create_model_app
from serving.models.canary import CanaryJudge, psi, takes
from tests.model_repo import USERS, DemoRepo, build_demo_repo
from training.train import ModelKind

# -- the pieces -------------------------------------------------------------------------


def test_the_split_is_sticky_by_entity_and_close_to_the_percent() -> None:
    chosen = [takes(user, 10) for user in range(20_000)]
    assert 0.09 < sum(chosen) / len(chosen) < 0.11
    assert chosen == [takes(user, 10) for user in range(20_000)]  # the same entity, the same side
    assert not any(takes(user, 0.0) for user in range(1000))
    assert all(takes(user, 100) for user in range(1000))
    assert takes({"user_id": 1, "merchant_id": 2}, 50) == takes({"merchant_id": 2, "user_id": 1}, 50)
    # One entity whatever its JSON type (a string view reads 1 and "1" from one online key).
    assert [takes(user, 50) for user in range(2000)] == [takes(str(user), 50) for user in range(2000)]
    assert [takes({"user_id": u, "merchant_id": 2}, 50) for u in range(500)] == [
        takes({"user_id": str(u), "merchant_id": "2"}, 50) for u in range(500)
    ]


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    base = rng.beta(2, 5, 5000)
    assert psi(base, rng.beta(2, 5, 5000)) < 0.02
    assert psi(base, rng.beta(5, 2, 5000)) > 1.0


def canary(**limits: Any) -> Canary:
    return Canary("m", 2, 10.0, False, "now", "test", CanaryLimits(**limits))


def test_the_judge_waits_for_its_sample_then_names_the_breach() -> None:
    judge = CanaryJudge(canary(min_requests=50))
    rng = np.random.default_rng(1)
    for _ in range(100):
        judge.record(False, ok=True, seconds=0.002, scores=rng.beta(2, 5, 3).tolist())
    for index in range(49):
        judge.record(True, ok=index % 5 != 0, seconds=0.002, scores=rng.beta(2, 5, 3).tolist())
    assert judge.verdict() is None  # 49 < 50
    judge.record(True, ok=True, seconds=0.002, scores=[0.3])
    reason = judge.verdict()
    assert (reason or "").startswith("error rate 20.0% vs 0.0% on the baseline (limit +2.0%)")


def test_the_judge_rolls_back_a_slow_canary_and_a_shifted_one() -> None:
    rng = np.random.default_rng(2)
    slow = CanaryJudge(canary(min_requests=20))
    shifted = CanaryJudge(canary(min_requests=20))
    for _ in range(50):
        scores = rng.beta(2, 5, 4).tolist()
        for judge in (slow, shifted):
            judge.record(False, ok=True, seconds=0.002, scores=scores)
        slow.record(True, ok=True, seconds=0.009, scores=scores)
        shifted.record(True, ok=True, seconds=0.002, scores=[1 - s for s in scores])
    assert (slow.verdict() or "").startswith("p99 9.00 ms vs 2.00 ms on the baseline (4.50x, limit 2x)")
    assert (shifted.verdict() or "").startswith("scores shifted: PSI")


def test_the_registry_keeps_one_canary_with_its_history(tmp_path: Any) -> None:
    repo = build_demo_repo(tmp_path / "repo")
    first = repo.train("buys", ModelKind.LOGISTIC)
    registry = repo.models
    with pytest.raises(TenxError, match="is not deployed: a canary needs a baseline"):
        registry.start_canary("buys", first.version, percent=5, shadow=False, by="t")
    registry.deploy("buys", first.version, precision=None, by="t")
    second = repo.train("buys", ModelKind.MLP)
    with pytest.raises(TenxError, match="already the deployed version"):
        registry.start_canary("buys", first.version, percent=5, shadow=False, by="t")
    registry.start_canary("buys", second.version, percent=5, shadow=False, by="t")
    with pytest.raises(TenxError, match="is already a canary"):
        registry.start_canary("buys", second.version, percent=5, shadow=False, by="t")
    with pytest.raises(TenxError, match=f"is @{second.version} now, not @{first.version}; nothing rolled back"):
        registry.rollback("buys", by="t", reason="a verdict on an older canary", version=first.version)
    registry.rollback("buys", by="t", reason="p99 too high", version=second.version)
    assert registry.canary("buys") is None
    with pytest.raises(TenxError, match="has no canary running"):
        registry.promote("buys", by="t")
    registry.start_canary("buys", second.version, percent=5, shadow=True, by="t")
    assert registry.promote("buys", by="t").version == second.version
    events = [(e["event"], e.get("reason")) for e in registry.canary_history("buys")]
    assert events == [("started", None), ("rolled_back", "p99 too high"), ("started", None),
                      ("promoted", "promoted by t")]  # fmt: skip


# -- the server under load ----------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Any) -> DemoRepo:
    repo = build_demo_repo(tmp_path / "repo")
    first = repo.train("buys", ModelKind.MLP)
    repo.models.deploy("buys", first.version, precision=None, by="test")
    repo.train("buys", ModelKind.LOGISTIC)  # @2, the canary
    return repo


@pytest.fixture
def client(repo: DemoRepo) -> Iterator[TestClient]:
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, reload_interval_s=0.05)
    with TestClient(create_model_app(settings, repo.store())) as test_client:
        yield test_client


class Load:
    """Threads sending single-entity requests; every answer and failure recorded."""

    def __init__(self, client: TestClient, threads: int = 3) -> None:
        self.client = client
        self.answers: list[tuple[int, str]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.send, args=(index,)) for index in range(threads)]

    def send(self, index: int) -> None:
        user = index
        while not self.stop.is_set():
            user = user % USERS + 1
            response = self.client.post("/predict", json={"model": "buys", "entities": [user]})
            if response.status_code != 200:
                self.failures.append(f"{response.status_code} {response.text}")
            else:
                self.answers.append((user, response.json()["served_by"]))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "timed out"
        time.sleep(0.05)


def server_route(client: TestClient) -> Any:
    return client.app.state.server.routes["buys"]  # type: ignore[attr-defined]


def start(repo: DemoRepo, client: TestClient, *, percent: float = 50, shadow: bool = False, **limits: Any) -> Any:
    repo.models.start_canary("buys", 2, percent=percent, shadow=shadow, by="test", limits=CanaryLimits(**limits))
    wait_for(lambda: server_route(client).canary is not None)
    return server_route(client)


def test_a_canary_is_loaded_again_under_a_newly_applied_plan(repo: DemoRepo, client: TestClient) -> None:
    """The deployed version is reloaded when the plan changes; the canary stayed on the
    plan it was loaded under (its keys named the old view versions, and the skew check
    never saw the new plan)."""
    from featurestore.plan import compile_repo
    from featurestore.registry import FileRegistry

    route = start(repo, client, min_requests=100_000)
    assert route.canary.plan_version == repo.plan.version
    features = repo.root / "features.py"
    original = features.read_text()
    registry = FileRegistry(repo.settings.registry_dir)
    try:
        features.write_text(original.replace('ttl="2d"', 'ttl="3d"', 1))  # a new plan, the same view versions
        changed = compile_repo(
            repo.settings.features_path, project=repo.settings.project, modules=repo.settings.modules
        )
        assert changed.version != repo.plan.version
        registry.apply(changed)
        wait_for(
            lambda: (
                server_route(client).canary is not None and server_route(client).canary.plan_version == changed.version
            )
        )
        served = {client.post("/predict", json={"model": "buys", "entities": [user]}).json()["served_by"]
                  for user in range(1, 60)}  # fmt: skip
        assert served == {"buys@1", "buys@2"}
    finally:
        features.write_text(original)
        registry.apply(repo.plan)


def test_a_canary_that_raises_is_rolled_back_on_its_own_with_no_failed_request(
    repo: DemoRepo, client: TestClient
) -> None:
    route = start(repo, client, min_requests=30)
    runtime = route.canary.runtime

    def raising(matrix: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_exception(RuntimeError("canary crashed"))
        return future

    runtime.submit = raising
    runtime.inline_run_s = 0  # the failure is on the canary's own thread: no run may bypass it
    with Load(client) as load:
        wait_for(lambda: repo.models.canary("buys") is None)
        wait_for(lambda: server_route(client).canary is None)
        settled = len(load.answers)
        wait_for(lambda: len(load.answers) > settled + 20)
    assert load.failures == []
    assert {served for _, served in load.answers} == {"buys@1"}  # the baseline answered the canary's share
    event = repo.models.canary_history("buys")[-1]
    assert event["event"] == "rolled_back"
    assert event["reason"].startswith("error rate 100.0% vs 0.0% on the baseline")
    assert 'tenx_model_canary_decisions_total{decision="rolled_back",model="buys"} 1.0' in client.get("/metrics").text


def test_a_slow_canary_is_rolled_back_on_its_p99(repo: DemoRepo, client: TestClient) -> None:
    route = start(repo, client, min_requests=30, max_p99_ratio=3.0, max_psi=100.0)
    runtime = route.canary.runtime
    real = runtime.submit
    slow = concurrent.futures.ThreadPoolExecutor(4)

    def sleepy(matrix: Any) -> concurrent.futures.Future[Any]:
        return slow.submit(lambda: (time.sleep(0.05), real(matrix).result())[1])

    runtime.submit = sleepy
    runtime.inline_run_s = 0  # the slowness is on the canary's own thread
    with Load(client) as load:
        wait_for(lambda: repo.models.canary("buys") is None)
    slow.shutdown()
    assert load.failures == []
    assert repo.models.canary_history("buys")[-1]["reason"].startswith("p99 ")


def test_a_good_canary_serves_its_sticky_share_and_is_promoted_with_no_failed_request(
    repo: DemoRepo, client: TestClient
) -> None:
    start(repo, client, percent=50, min_requests=10**6)
    with Load(client) as load:
        wait_for(lambda: {served for _, served in load.answers} == {"buys@1", "buys@2"})
        wait_for(lambda: len(load.answers) > 200)
        promoted_at = len(load.answers)
        repo.models.promote("buys", by="test")
        wait_for(lambda: server_route(client).loaded.card.version == 2)
        settled = len(load.answers)
        wait_for(lambda: len(load.answers) > settled + 30)
    assert load.failures == []
    sides: dict[int, set[str]] = {}
    for user, served in load.answers[:promoted_at]:
        sides.setdefault(user, set()).add(served)
    for user, served in sides.items():  # sticky: each entity on its own side for the whole canary
        assert served == ({"buys@2"} if takes(user, 50) else {"buys@1"}), user
    assert {served for _, served in load.answers[settled + 5 :]} == {"buys@2"}


def test_a_shadow_canary_scores_copies_and_answers_nothing(repo: DemoRepo, client: TestClient) -> None:
    route = start(repo, client, percent=100, shadow=True, min_requests=10**6)
    with Load(client) as load:
        wait_for(lambda: route.judge.candidate.requests >= 20)
    assert load.failures == []
    assert {served for _, served in load.answers} == {"buys@1"}
    text = client.get("/metrics").text
    assert 'tenx_model_shadow_score_diff_count{model="buys"}' in text
    live = client.get("/models").json()["models"][0]["canary"]
    assert live["shadow"] is True
    assert live["comparison"]["canary"]["requests"] >= 20


def test_canary_status_asks_a_server_with_a_token_for_its_live_figures_with_the_token() -> None:
    """GET /models is for token holders when the server has a token: `tenx models status
    --url` sends $TENX_API_TOKEN, and says what to do when it has none."""
    import http.server
    import json

    from featurestore.errors import ConfigError
    from tenx.commands.canary import _live

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("authorization") != "Bearer s3cret":
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"models": [{"model": "buys", "canary": {"version": 2}}]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _live(url, "buys", "s3cret") == {"version": 2}
        with pytest.raises(ConfigError, match="wants a bearer token: pass --token or set \\$TENX_API_TOKEN"):
            _live(url, "buys", None)
    finally:
        server.shutdown()
        server.server_close()


def test_a_rollback_is_counted_once_whichever_workers_condemn_the_canary(tmp_path: Any) -> None:
    """Each worker judges on its own share of traffic; the registry rolls back once, and
    the merged counter counted one rollback per condemning worker."""
    import asyncio

    from serving.models.metrics import ModelMetrics
    from serving.models.server import ModelServer
    from tests.model_repo import with_two_models

    repo = with_two_models(build_demo_repo(tmp_path / "repo"))
    card = repo.train("buys", ModelKind.LOGISTIC)
    repo.models.start_canary(
        "buys", card.version, percent=50, shadow=False, by="test", limits=CanaryLimits(min_requests=5)
    )

    async def scenario() -> float:
        metrics = ModelMetrics()  # shared, as /metrics merges the workers' files
        settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, models=("buys",))
        workers = [ModelServer(settings, repo.store(), metrics=metrics) for _ in range(2)]
        for worker in workers:
            await worker.start()
        try:
            for worker in workers:
                judge = worker.routes["buys"].judge
                assert judge is not None
                for _ in range(10):
                    judge.record(False, ok=True, seconds=0.001, scores=[0.5])
                    judge.record(True, ok=False, seconds=0.001)
            for worker in workers:
                worker.judge_canaries()
        finally:
            for worker in workers:
                await worker.stop()
        return float(metrics.canary_decisions.labels("buys", "rolled_back")._value.get())

    assert asyncio.run(scenario()) == 1.0
    assert [e["event"] for e in repo.models.canary_history("buys")].count("rolled_back") == 1
