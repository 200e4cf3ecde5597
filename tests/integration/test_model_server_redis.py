"""The model server on real Redis: models trained in the test from demo data, served
end to end, scores equal to ONNX Runtime in-process on the same vectors; a Redis that
goes away is a prompt 503 (never a hang), and serving resumes when it is back; with a
route, the outage is answered by its rule (degraded) and a failing model by the cheaper one."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from featurestore import CACHE, route
from serving.models import ModelServerSettings, create_model_app
from serving.models.breaker import BreakerSettings
from tests.model_repo import USERS, DemoRepo, build_demo_repo, feature_matrix, onnx_scores
from tests.processes import free_port
from tests.services import _unavailable
from training.train import ModelKind


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> DemoRepo:
    project = f"models_{uuid.uuid4().hex[:8]}"  # keys of its own in the shared Redis
    repo = build_demo_repo(tmp_path_factory.mktemp("models-redis") / "repo", redis_url=redis_url, project=project)
    for name, kind in (("buys", ModelKind.MLP), ("buys_logistic", ModelKind.LOGISTIC)):
        card = repo.train(name, kind)
        repo.models.deploy(name, card.version, precision=None, by="test")
    return repo


class PrivateRedis:
    """A redis-server of the test's own, to kill and start again (the shared one stays up)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _unavailable("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = [
            str(binary),
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
        ]
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)  # back, and empty

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def private_demo_repo(redis: PrivateRedis, root: Path) -> DemoRepo:
    local = build_demo_repo(root, redis_url=redis.url)
    card = local.train("buys", ModelKind.LOGISTIC)
    local.models.deploy("buys", card.version, precision=None, by="test")
    return local


def test_scores_from_redis_equal_onnx_runtime_in_process(repo: DemoRepo) -> None:
    users = [*range(1, USERS + 1), 10**9]
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir)
    with TestClient(create_model_app(settings, repo.store())) as client:
        for name in ("buys", "buys_logistic"):
            card = repo.models.card(name)
            response = client.post("/predict", json={"model": name, "entities": users})
            assert response.status_code == 200, response.text
            answer = response.json()
            known = users[:-1]  # the last one is missing: scored on empty-window values (unit-tested)
            expected = onnx_scores(repo, card, feature_matrix(repo, card, known))
            assert np.max(np.abs(np.array(answer["scores"][:-1]) - expected)) <= 1e-6
            assert answer["status"][-1] == "missing"
            assert answer["status"].count("found") > USERS // 2


def test_a_redis_that_goes_away_is_a_prompt_503_and_serving_resumes(repo: DemoRepo, tmp_path: Path) -> None:
    redis = PrivateRedis()
    try:
        local = private_demo_repo(redis, tmp_path / "repo")
        settings = ModelServerSettings(registry_dir=local.settings.registry_dir)
        with TestClient(create_model_app(settings, local.store())) as client:
            assert client.post("/predict", json={"model": "buys", "entities": [1]}).status_code == 200
            redis.kill()
            began = time.perf_counter()
            response = client.post("/predict", json={"model": "buys", "entities": [1]})
            assert time.perf_counter() - began < 5
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert f"online store Redis at {redis.url}" in response.json()["error"]
            assert client.get("/health/ready").status_code == 503
            redis.start()  # back, empty: the entity is missing
            give_up = time.monotonic() + 20
            while True:
                response = client.post("/predict", json={"model": "buys", "entities": [1]})
                if response.status_code == 200 or time.monotonic() > give_up:
                    break
                time.sleep(0.2)
            assert response.status_code == 200
            assert response.json()["status"] == ["missing"]
    finally:
        redis.close()


def risk_rule(features: list[dict[str, float | None]] | None, request: Any) -> list[float]:
    return [0.25 if features is None else 0.75 for _ in request.entities]


def test_redis_stopped_mid_load_gets_degraded_rule_answers_in_time_and_recovers(repo: DemoRepo, tmp_path: Path) -> None:
    """Four threads send requests with a 500 ms deadline while Redis is killed and
    restarted: every request is answered before its deadline (plus HTTP slack), the
    outage's answers come from the rule marked degraded, and model answers return
    without a restart once Redis is back."""
    redis = PrivateRedis()
    try:
        local = private_demo_repo(redis, tmp_path / "repo")
        settings = ModelServerSettings(registry_dir=local.settings.registry_dir)
        spec = route("buys", primary="buys", fallbacks=[CACHE, risk_rule])
        breakers = BreakerSettings(window=10, minimum_calls=5, open_wait_s=0.5, half_open_calls=1)
        app = create_model_app(settings, local.store(), routes={"buys": spec}, breakers=breakers)
        answers: list[tuple[float, int, dict[str, Any]]] = []
        stop = threading.Event()
        with TestClient(app) as client:

            def send() -> None:
                while not stop.is_set():
                    began = time.perf_counter()
                    response = client.post("/predict", json={"model": "buys", "entities": [1], "deadline_ms": 500})
                    answers.append((time.perf_counter() - began, response.status_code, response.json()))

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                for _ in range(4):
                    pool.submit(send)
                time.sleep(0.5)
                redis.kill()
                killed_at = len(answers)
                time.sleep(1.5)
                during = answers[killed_at:]
                redis.start()
                give_up = time.monotonic() + 20
                while time.monotonic() < give_up:
                    if answers and answers[-1][2].get("served_by") == "buys@1":
                        break
                    time.sleep(0.1)
                time.sleep(0.3)
                stop.set()
        assert answers
        assert max(seconds for seconds, _, _ in answers) < 0.5 + 0.5  # nothing hung past its deadline
        assert {status for _, status, _ in during} == {200}
        degraded = [body for _, _, body in during if body["degraded"]]
        assert degraded, "no request reached the fallback during the outage"
        assert {body["served_by"] for body in degraded} == {"rule:risk_rule"}
        assert all(body["scores"] == [0.25] for body in degraded)  # the rule had no features
        assert answers[-1][2]["served_by"] == "buys@1"  # recovered without a restart
        assert answers[-1][2]["degraded"] is False
    finally:
        redis.close()


def test_a_model_that_raises_on_real_redis_opens_its_circuit_and_the_cheaper_model_answers(repo: DemoRepo) -> None:
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir)
    spec = route("buys", primary="buys", fallbacks=["buys_logistic"])
    breakers = BreakerSettings(window=4, minimum_calls=3, open_wait_s=60)
    with TestClient(create_model_app(settings, repo.store(), routes={"buys": spec}, breakers=breakers)) as client:
        runtime = client.app.state.server.routes["buys"].loaded.runtime  # type: ignore[attr-defined]

        def raising(matrix: Any) -> concurrent.futures.Future[Any]:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_exception(RuntimeError("model crashed"))
            return future

        runtime.submit = raising
        runtime.inline_run_s = 0  # the failure is on the model's own thread: no run may bypass it
        bodies = [client.post("/predict", json={"model": "buys", "entities": [1, 2, 3]}).json() for _ in range(5)]
        state = client.app.state.server.guard.state("model:buys")  # type: ignore[attr-defined]
    assert {b["served_by"] for b in bodies} == {"buys_logistic@1"}
    assert all(b["degraded"] for b in bodies)
    assert all(len(b["scores"]) == 3 and None not in b["scores"] for b in bodies)
    assert state.value == "open"


def test_a_canary_that_raises_on_real_redis_is_rolled_back_under_load_with_no_failed_request(
    repo: DemoRepo,
) -> None:
    from featurestore.models import CanaryLimits

    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, reload_interval_s=0.05)
    canary_card = repo.train("buys", ModelKind.LOGISTIC)
    with TestClient(create_model_app(settings, repo.store())) as client:
        repo.models.start_canary(
            "buys", canary_card.version, percent=50, shadow=False, by="test", limits=CanaryLimits(min_requests=30)
        )
        server = client.app.state.server  # type: ignore[attr-defined]
        give_up = time.monotonic() + 20
        while server.routes["buys"].canary is None:
            assert time.monotonic() < give_up
            time.sleep(0.05)

        def raising(matrix: Any) -> concurrent.futures.Future[Any]:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_exception(RuntimeError("canary crashed"))
            return future

        server.routes["buys"].canary.runtime.submit = raising
        server.routes["buys"].canary.runtime.inline_run_s = 0  # the failure is on the canary's own thread
        statuses: list[int] = []
        served: set[str] = set()
        stop = threading.Event()

        def send(offset: int) -> None:
            user = offset
            while not stop.is_set():
                user = user % USERS + 1
                response = client.post("/predict", json={"model": "buys", "entities": [user]})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    served.add(response.json()["served_by"])

        threads = [threading.Thread(target=send, args=(offset,)) for offset in range(3)]
        for thread in threads:
            thread.start()
        try:
            give_up = time.monotonic() + 30
            while repo.models.canary("buys") is not None:
                assert time.monotonic() < give_up, "the canary was not rolled back"
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert statuses
    assert set(statuses) == {200}
    assert served == {"buys@1"}
    assert repo.models.canary_history("buys")[-1]["event"] == "rolled_back"
