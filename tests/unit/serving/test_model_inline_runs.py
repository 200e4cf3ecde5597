"""A CPU model whose recent runs were quick runs on the event loop instead of its own
thread (`Runtime.quick`): the same scores, back to its thread after a slow run, its
failures handled as on the thread, never on a GPU, and never a batch larger than the
recent runs."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from starlette.testclient import TestClient

from featurestore import route
from serving.models import ModelServerSettings, create_model_app
from tests.model_repo import DemoRepo
from tests.unit.serving.test_model_fallbacks import QUICK, repo, serve, server_of

__all__ = ["repo"]  # the fallback tests' module-scoped fixture, used here too


def test_a_quick_cpu_model_runs_on_the_loop_with_the_same_scores_and_leaves_it_after_a_slow_run(
    repo: DemoRepo,
) -> None:
    """A small model on the CPU costs less run on the event loop than handed to its own
    thread; the answers must not change, and a slow run sends it back to its thread."""
    from serving.models.runtime import QUICK_RUNS

    body = {"model": "buys", "entities": [1, 2, 3]}
    with serve(repo, inline_run_us=5_000) as client:  # the demo model runs 3 rows in about 0.2 ms
        runtime = server_of(client).routes["buys"].loaded.runtime
        first = client.post("/predict", json=body).json()["scores"]
        assert runtime.inline_batches == 0  # not before QUICK_RUNS quick runs on its thread
        for _ in range(QUICK_RUNS):
            assert client.post("/predict", json=body).json()["scores"] == first
        assert runtime.quick(3)
        assert not runtime.quick(10_000)  # never a batch bigger than the runs it has seen
        before = runtime.inline_batches
        assert client.post("/predict", json=body).json()["scores"] == first
        assert runtime.inline_batches == before + 1
        batches = client.get("/models").json()["models"][0]["batches"]
        assert batches == {"run": runtime.batches, "inline": runtime.inline_batches}

        real = runtime.session.run

        def slow(*args: Any) -> Any:
            time.sleep(0.08)  # a run that waited: over ten times the limit of wall time
            return real(*args)

        runtime.session.run = slow
        assert client.post("/predict", json=body).json()["scores"] == first  # run inline, found slow
        assert not runtime.quick(3)
        inline = runtime.inline_batches
        assert client.post("/predict", json=body).json()["scores"] == first
        assert runtime.inline_batches == inline  # back on its thread


def test_a_model_that_raises_while_running_on_the_loop_falls_back_and_opens_its_circuit(repo: DemoRepo) -> None:
    from serving.models.runtime import QUICK_RUNS

    spec = route("buys", primary="buys", fallbacks=["buys_logistic"])
    with serve(repo, routes={"buys": spec}, inline_run_us=5_000) as client:
        runtime = server_of(client).routes["buys"].loaded.runtime
        for _ in range(QUICK_RUNS):
            assert client.post("/predict", json={"model": "buys", "entities": [1]}).json()["served_by"] == "buys@1"
        assert runtime.quick(1)

        def raising(*args: Any) -> Any:
            raise RuntimeError("ONNX Runtime: invalid input")

        runtime.session.run = raising
        bodies = [client.post("/predict", json={"model": "buys", "entities": [1]}).json() for _ in range(4)]
        assert runtime.inline_batches >= 3
    assert {b["served_by"] for b in bodies} == {"buys_logistic@1"}
    assert "invalid input" in bodies[0]["reason"]
    assert bodies[-1]["reason"] == "buys: circuit open"


def test_only_cpu_sessions_run_on_the_loop_and_none_when_turned_off(repo: DemoRepo) -> None:
    from serving.models.runtime import QUICK_RUNS

    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, inline_run_us=0)
    with TestClient(create_model_app(settings, repo.store(), breakers=QUICK)) as client:
        runtime = server_of(client).routes["buys"].loaded.runtime
        for _ in range(QUICK_RUNS + 2):
            client.post("/predict", json={"model": "buys", "entities": [1]})
        assert runtime.inline_batches == 0
        assert not runtime.quick(1)
        runtime.inline_run_s = 1.0  # every run is quick from here on
        for _ in range(QUICK_RUNS):
            client.post("/predict", json={"model": "buys", "entities": [1]})
        assert runtime.quick(1)
        runtime.placement = replace(runtime.placement, device="cuda")  # as a GPU session's
        assert not runtime.quick(1)  # a device can hang: a GPU session always keeps its own thread


def test_the_warm_up_batch_does_not_let_batches_that_large_run_on_the_loop(repo: DemoRepo) -> None:
    """Inline batches are bounded by the recent runs (the last 32-64), not by every run of
    the streak: the warm-up's max-size batch must drop out of that evidence."""
    from serving.models.runtime import QUICK_RUNS

    with serve(repo, inline_run_us=1_000_000) as client:  # every run is quick
        runtime = server_of(client).routes["buys"].loaded.runtime
        for _ in range(2 * QUICK_RUNS):
            client.post("/predict", json={"model": "buys", "entities": [1, 2]})
        assert runtime.quick(2)
        assert not runtime.quick(3)  # the warm-up ran max_batch_rows; recent runs had 2 rows
