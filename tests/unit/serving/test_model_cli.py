"""The model commands as a user runs them: `tenx train`, `tenx models add/show/deploy`,
`tenx serve-models --workers 2` answered by ModelClient (sync and async), with
Prometheus metrics merged over the worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.errors import DeadlineExceeded, UnknownModelError
from serving.models import AsyncModelClient, ModelClient
from tests.model_repo import DemoRepo, build_demo_repo
from tests.processes import clean_environment, free_port, wait_until_serving

TENX = shutil.which("tenx", path=os.path.dirname(sys.executable)) or "tenx"
FEATURES = ",".join(
    f"user_spend:{name}" for name in ("count_1h", "count_1d", "count_7d", "sum_amount_eur_1d", "sum_amount_eur_7d")
)


def tenx(repo: DemoRepo, *args: str, code: int = 0) -> str:
    done = subprocess.run(
        [TENX, *args], cwd=repo.root, env=clean_environment(COLUMNS="200"), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == code, f"tenx {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> DemoRepo:
    return build_demo_repo(tmp_path_factory.mktemp("model-cli") / "repo")


def test_train_adds_a_version_with_its_card(repo: DemoRepo) -> None:
    out = tenx(repo, "train", "--training-set", "data/train.parquet", "--label", "buys_within_6h", "--model", "buys",
               "--kind", "mlp")  # fmt: skip
    assert re.search(r"buys@1: mlp on 20 features, 3,200 rows trained, 800 held out \(the latest by timestamp\): "
                     r"AUC 0\.\d{4}, log loss \d\.\d{4}", out), out  # fmt: skip
    assert "next: tenx models deploy buys@1" in out
    shown = tenx(repo, "models", "show", "buys@1")
    assert "label buys_within_6h; trained on" in shown
    assert "user_spend:count_1h" in shown
    assert repo.plan.view("user_spend").version in shown
    deployed = tenx(repo, "models", "deploy", "buys")
    assert "fp16: ok holdout AUC" in deployed
    assert "deployed buys@1 as `buys`, precision auto; running servers pick it up" in deployed
    assert "buys" in tenx(repo, "models", "list")


def test_train_errors_say_what_to_do(repo: DemoRepo) -> None:
    (repo.root / "data" / "loose.parquet").write_bytes((repo.root / "data" / "train.parquet").read_bytes())
    out = tenx(repo, "train", "--training-set", "data/loose.parquet", "--label", "x", "--model", "m", code=2)
    assert "loose.parquet.manifest.json is missing: train on a file written by `tenx export --out loose.parquet`" in out
    out = tenx(repo, "train", "--training-set", "data/train.parquet", "--label", "nope", "--model", "m", code=2)
    assert "label column `nope` is not in train.parquet (columns: user_id, timestamp, buys_within_6h," in out
    out = tenx(repo, "train", "--training-set", "data/train.parquet", "--label", "count_1d", "--model", "m", code=2)
    assert "label column `count_1d` must be binary (true/false or 0/1)" in out


def test_models_add_registers_an_onnx_model_trained_elsewhere(repo: DemoRepo, tmp_path: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    table = pq.read_table(repo.training_set)
    names = [f.split(":")[1] for f in FEATURES.split(",")]
    x = np.column_stack([table.column(n).to_numpy(zero_copy_only=False) for n in names]).astype(np.float32)
    y = table.column("buys_within_6h").to_numpy(zero_copy_only=False).astype(int)
    model = LogisticRegression(max_iter=500).fit(x, y)
    onnx_file = tmp_path / "mine.onnx"
    onnx_file.write_bytes(to_onnx(model, x[:1], options={id(model): {"zipmap": False}}).SerializeToString())
    out = tenx(repo, "models", "add", "mine", str(onnx_file), "--features", FEATURES, "--holdout", "data/train.parquet",
               "--label", "buys_within_6h")  # fmt: skip
    assert "mine@1: input `X` (5 features), scores from `probabilities`[:, 1]" in out
    out = tenx(repo, "models", "add", "wrong", str(onnx_file), "--features", "user_spend:count_1h", code=2)
    assert "the model's input X has shape [None, 5]; --features names 1 columns" in out
    out = tenx(repo, "models", "add", "bad", str(onnx_file), "--features", "user_spend:count_2h", code=2)
    assert "--features: no feature `count_2h` in view `user_spend`" in out or "count_2h" in out
    tenx(repo, "models", "deploy", "mine")


def wait_until_ready(url: str, process: subprocess.Popen[str]) -> None:
    """Until the server answers, then until /health/ready says its models are loaded (30 s)."""
    wait_until_serving(f"{url}/health/live", process)
    for _ in range(300):
        if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(repo: DemoRepo) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [TENX, "serve-models", "--port", str(port), "--workers", "2"],
        cwd=repo.root,
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_model_client_sync_and_async_against_two_workers(server: str) -> None:
    with ModelClient(server) as client:
        prediction = client.predict("buys", [1, 2, 3], priority="critical", deadline_ms=2000)
        assert prediction.served_by == "buys@1"
        assert len(prediction.scores) == 3
        assert all(0 <= s <= 1 for s in prediction.scores if s is not None)
        with pytest.raises(UnknownModelError, match="unknown model `nope` \\(served: buys, mine\\)"):
            client.predict("nope", [1])
        with pytest.raises(ValueError, match="HTTP 400: `entities` must be a non-empty list"):
            client.predict("buys", [])
        with pytest.raises(DeadlineExceeded):
            client.predict("buys", [1], deadline_ms=0.001)

    async def many() -> list[float | None]:
        async with AsyncModelClient(server) as client:
            answers = await asyncio.gather(*(client.predict("mine", [user]) for user in range(1, 51)))
        return [a.scores[0] for a in answers]

    scores = asyncio.run(many())
    assert len(scores) == 50
    assert all(s is not None for s in scores)


def test_metrics_add_up_over_worker_processes(server: str) -> None:
    def ok_count() -> float:
        text = httpx.get(f"{server}/metrics", timeout=5).text
        pattern = r'tenx_model_requests_total\{model="buys",outcome="ok",priority="default"\} ([0-9.e+]+)'
        match = re.search(pattern, text)
        return float(match.group(1)) if match else 0.0

    before = ok_count()
    # New connections each time: the kernel spreads them over both workers.
    for user in range(60):
        response = httpx.post(f"{server}/predict", json={"model": "buys", "entities": [user + 1]}, timeout=5)
        assert response.status_code == 200
    assert ok_count() - before == 60
    text = httpx.get(f"{server}/metrics", timeout=5).text
    assert 'tenx_model_batch_rows_bucket{le="1.0",model="buys"}' in text, [
        line for line in text.splitlines() if "batch_rows" in line
    ][:5]


def test_tenx_cost_reads_what_two_tenants_spent_from_the_workers_metrics(repo: DemoRepo, server: str) -> None:
    with ModelClient(server) as client:
        for _ in range(4):
            client.predict("buys", [1, 2, 3], tenant="shop-a")
            client.predict("buys", [4, 5], tenant="shop-b")
    report = json.loads(tenx(repo, "cost", "--url", server, "--json"))
    tenants = report["tenant"]
    assert tenants["shop-a"]["predictions"] == 12
    assert tenants["shop-b"]["predictions"] == 8
    assert tenants["shop-a"]["device_s"] > 0
    assert tenants["shop-a"]["dollars"] > 0
    assert report["model"]["buys"]["usd_per_1k"] > 0
    assert report["route"]["buys"]["predictions"] >= 20
    table = tenx(repo, "cost", "--url", server)
    assert "USD / 1k predictions" in table
    assert "shop-a" in table
    assert "since the server(s) started" in table


def test_tenx_top_shows_a_running_servers_rates_p99_by_class_and_circuits(repo: DemoRepo, server: str) -> None:
    stop = threading.Event()

    def load() -> None:
        with ModelClient(server) as client:
            while not stop.is_set():
                client.predict("buys", [1, 2], priority="critical")
                client.predict("buys", [3], priority="sheddable")

    sender = threading.Thread(target=load)
    sender.start()
    try:
        shown = tenx(repo, "top", "--url", server, "--once", "--interval", "1.5")
    finally:
        stop.set()
        sender.join()
    row = next(line for line in shown.splitlines() if line.lstrip("│ ").startswith("buys "))
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert float(cells[1].replace(",", "")) > 1  # req/s
    assert cells[3].endswith("ms")  # p99 critical
    assert cells[5].endswith("ms")  # p99 sheddable
    assert "predictions/s" in shown
    assert "event loop lag" in shown


def test_canary_commands_start_judge_and_end_a_canary_against_a_running_server(repo: DemoRepo, server: str) -> None:
    out = tenx(repo, "models", "canary", "buys", code=2)
    assert "say which version: `tenx models canary buys@N`" in out
    out = tenx(repo, "models", "canary", "buys@1", code=2)
    assert "buys@1 is already the deployed version; canary another one" in out
    tenx(repo, "train", "--training-set", "data/train.parquet", "--label", "buys_within_6h", "--model", "buys",
         "--kind", "logistic")  # fmt: skip
    version = max(repo.models.versions("buys"))
    out = tenx(repo, "models", "canary", f"buys@{version}", "--percent", "50", "--min-requests", "100000")
    assert f"canary buys@{version} serves 50% of `buys`'s entities beside buys@1" in out
    with ModelClient(server) as client:
        give_up = time.monotonic() + 20
        served: set[str] = set()
        while served != {"buys@1", f"buys@{version}"}:
            assert time.monotonic() < give_up, served
            served |= {client.predict("buys", [user]).served_by for user in range(1, 40)}
    status = tenx(repo, "models", "status", "buys", "--url", server)
    assert f"canary @{version}: sticky 50% of entities" in status
    assert "baseline" in status
    assert "canary" in status
    out = tenx(repo, "models", "rollback", "buys", "--reason", "not today")
    assert f"rolled back the canary buys@{version}; the deployed version serves everything" in out
    out = tenx(repo, "models", "promote", "buys", code=2)
    assert "`buys` has no canary running (`tenx models canary buys@N --percent 5`)" in out
    history = tenx(repo, "models", "status", "buys")
    assert "no canary running" in history
    assert f"@{version} rolled_back: not today" in history


def test_serve_models_behind_its_front_answers_counts_and_stops_with_it(repo: DemoRepo) -> None:
    """`tenx serve-models --front --workers 2`: predictions and /metrics through tenx-front,
    the front's overload refusals counted in the workers' merged metrics, and the front
    gone (its port closed) once the server is stopped."""
    from featurestore.errors import ConfigError
    from serving.models.front import front_binary

    try:
        front_binary()
    except ConfigError as error:
        pytest.skip(f"tenx-front is not built: {error}")
    port = free_port()
    process = subprocess.Popen(
        [TENX, "serve-models", "--port", str(port), "--workers", "2", "--front", "--loop-busy-target", "0.001"],
        cwd=repo.root, env=clean_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        with ModelClient(url) as client:
            assert client.predict("buys", [1, 2], priority="critical").served_by == "buys@1"
        # A busy target no loop meets drives each worker's sheddable share to its floor
        # (2%) within seconds; the front then refuses nearly every sheddable request itself.
        statuses: list[int] = []
        with httpx.Client(base_url=url, timeout=5) as http:
            deadline = time.monotonic() + 60
            while statuses.count(503) < 50:
                assert time.monotonic() < deadline, f"no shedding within 60 s: {statuses[-20:]}"
                answer = http.post("/predict", json={"model": "buys", "entities": [1]},
                                   headers={"X-Priority": "sheddable", "X-Tenant": "cli"})  # fmt: skip
                assert "x-tenx-gate" not in answer.headers
                statuses.append(answer.status_code)
            text = http.get("/metrics").text
        pattern = r'tenx_model_shed_total\{model="\*",priority="sheddable",reason="overload",tenant="cli"\} (\S+)'
        shed = re.search(pattern, text)
        assert shed is not None, "the refusals are not in /metrics"
        assert float(shed.group(1)) == statuses.count(503)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    with pytest.raises(httpx.ConnectError):  # the front stopped with the server
        httpx.get(f"{url}/health/live", timeout=2)
