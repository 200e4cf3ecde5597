"""The model server on real Redis: models trained in the test from demo data, served
end to end, scores equal to ONNX Runtime in-process on the same vectors; a Redis that
goes away is a prompt 503 (never a hang), and serving resumes when it is back."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from serving.models import ModelServerSettings, create_model_app
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
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not installed")
    port = free_port()
    command = [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        local = build_demo_repo(tmp_path / "repo", redis_url=f"redis://127.0.0.1:{port}/0")
        card = local.train("buys", ModelKind.LOGISTIC)
        local.models.deploy("buys", card.version, precision=None, by="test")
        settings = ModelServerSettings(registry_dir=local.settings.registry_dir)
        with TestClient(create_model_app(settings, local.store())) as client:
            assert client.post("/predict", json={"model": "buys", "entities": [1]}).status_code == 200
            server.kill()
            server.wait(timeout=10)
            began = time.perf_counter()
            response = client.post("/predict", json={"model": "buys", "entities": [1]})
            assert time.perf_counter() - began < 5
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"].startswith(f"online store Redis at redis://127.0.0.1:{port}/0")
            assert client.get("/health/ready").status_code == 503
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # back, empty: the entity is missing
            give_up = time.monotonic() + 20
            while True:
                response = client.post("/predict", json={"model": "buys", "entities": [1]})
                if response.status_code == 200 or time.monotonic() > give_up:
                    break
                time.sleep(0.2)
            assert response.status_code == 200
            assert response.json()["status"] == ["missing"]
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
