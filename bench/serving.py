"""Model serving benchmark: `tenx serve-models` under open-loop load, against the raw ceiling.

N entities (default 100k) x 20 float32 features in Redis (the `user_scores` view of
examples/precomputed, applied in a temp copy; 100-byte packed values written straight
with `write_packed`, as_of a minute ago: every value is FOUND), and two ONNX models on
those 20 inputs, built with onnx.helper: an MLP 20-64-64-1 (ReLU, sigmoid; the main
table) and a logistic model (20-1, sigmoid). Measured in one run, against one Redis
(TENX_REDIS_URL, required: `eval "$(scripts/services up --only redis)"`):

- raw ceiling, in this process, one call after another on one thread: ONNX Runtime
  (the server's session options: 1 intra-op thread, all graph optimizations, CPU) on
  batches of 1, 32 and 128; redis-py (hiredis) GET of one value, pipelined GET of 128
  and MGET of 100 of the same bytes; and the whole work of a request with nothing
  around it: GET + decode + ONNX batch of 1, and MGET of 100 + decode + one ONNX batch
  of 100 (the 100-entity ceiling the targets name).
- open-loop HTTP load (serving/loadgen.py: Poisson send times fixed in advance from a
  seed, latency from each request's intended send time, keep-alive connections opened
  as needed), POST /predict with 1 random entity and with 100, against:
  `tenx serve-models` (1 uvicorn worker, CPU, default batching) and a plain FastAPI +
  uvicorn app (`fastapi_app` below: 1 worker, httptools, uvloop; a pydantic body, per
  request redis.asyncio GET/MGET of the same keys, numpy decode, the same ONNX session
  run inline, no batching). For each: the max rate, found by stepping the offered rate
  up (x`--factor`, then `--refine` geometric bisections) until a step does not keep up
  (2xx answers < 95% of the requests sent, p99 > `--max-p99-ms`, sends late because
  every connection was busy, or the generator itself fell behind); then `--measure-s`
  at 30% and 70% of that max: p50/p99, and for tenx the mean batch size (GET /metrics:
  tenx_model_batch_rows sum / count, before and after).
  The logistic model: its single-entity max only.

The load generator runs in a process of its own but on the same cores as the server and
Redis (2 on the reference machine): the CPU each used during a step is printed and in the
JSON. A step where the generator itself fell behind its schedule (p99 lag of its own
hand-offs > `--max-lag-ms`) is never reported as that rate.

Targets (stated as met/MISSED, never asserted): tenx single-entity requests/s >= 2x the
FastAPI app's, in the same run; tenx p99 at 70% of max <= 10 ms; tenx 100-entity
predictions/s >= 60% of the in-process ceiling's, with p99 (at 70% of max) <= 1.5x the
ceiling's p99 + 2 ms. Written to bench/results/serving.json (or --out). Only localhost
traffic; every loop is bounded by a count or a clock; every key written is deleted.

    eval "$(scripts/services up --only redis)"
    python bench/serving.py                     # 100k entities, about 4 minutes on 2 cores
    python bench/serving.py --entities 10000 --step-s 2 --measure-s 4   # quicker
    python bench/serving.py --smoke             # under a minute; JSON in a temp folder (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# `python bench/serving.py` puts bench/ first on sys.path, where this file would shadow
# the `serving` package: import from the repo root instead.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench import _smoke  # noqa: E402
from bench._harness import proc_cpu_s, redis_cpu_s  # noqa: E402
from bench._redis_keys import unlink_matching  # noqa: E402
from serving.loadgen import LoadGenerator, LoadPlan, post_request  # noqa: E402
from serving.loadresults import LoadResult  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VIEW = "user_scores"  # examples/precomputed: 20 float32 `Latest` features f0..f19
WIDTH = 20
MLP, LOGISTIC = "mlp", "logistic"
FASTAPI_VARIABLE = "TENX_BENCH_FASTAPI"  # the baseline app's configuration (JSON)
BODIES = 2_000  # distinct pre-encoded requests per shape, sent in turn
CONNECTIONS = 256  # the generator's connection cap


# -- models and data ----------------------------------------------------------------------


def onnx_model(widths: tuple[int, ...], seed: int) -> bytes:
    """A dense network `widths` (ReLU between layers, sigmoid out), input `features`
    [N, widths[0]], output `score` [N, 1]; weights drawn from `seed`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    current = "features"
    layers = list(itertools.pairwise(widths))
    for index, (fan_in, fan_out) in enumerate(layers):
        w = rng.normal(0.0, math.sqrt(2.0 / fan_in), (fan_in, fan_out)).astype(np.float32)
        b = rng.normal(0.0, 0.1, fan_out).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{index}"), numpy_helper.from_array(b, f"b{index}")]
        nodes += [
            helper.make_node("MatMul", [current, f"w{index}"], [f"matmul{index}"]),
            helper.make_node("Add", [f"matmul{index}", f"b{index}"], [f"layer{index}"]),
        ]
        current = f"layer{index}"
        if index < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{index}"]))
            current = f"relu{index}"
    nodes.append(helper.make_node("Sigmoid", [current], ["score"]))
    graph = helper.make_graph(
        nodes,
        "x".join(map(str, widths)),
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, widths[0]])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, widths[-1]])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def session(path: Path) -> Any:
    """An ONNX Runtime CPU session with the model server's options (serving/models/runtime.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decode(raws: list[bytes | None], value_bytes: int) -> np.ndarray:
    """The 20 float32 features of packed values (header `>BQ8s`, null bitmap, 20 float32
    LE: featurestore/stores/codec.py) as a float32 matrix, NaN rows where None."""
    matrix = np.full((len(raws), WIDTH), np.nan, dtype=np.float32)
    present = [index for index, raw in enumerate(raws) if raw is not None]
    if present:
        packed = np.frombuffer(b"".join(raws[i] for i in present), dtype=np.uint8).reshape(len(present), value_bytes)
        matrix[present] = packed[:, value_bytes - 4 * WIDTH :].copy().view("<f4")
    return matrix


@dataclass(frozen=True)
class Setup:
    repo: Path
    config: Path
    prefix: str  # the store's key prefix (tenx:<project>)
    key_base: str  # `{prefix}:{view}:{view version}:`; + entity = a key
    value_bytes: int
    models: dict[str, Path]  # name -> model.onnx in the registry


def prepare(url: str, folder: Path, entities: int, seed: int) -> Setup:
    """The example repo applied in `folder`, N entities written to Redis, both models
    added to its model registry and deployed."""
    from featurestore.config import load_settings
    from featurestore.models import FeatureRef, ModelCard, ModelRegistry
    from featurestore.registry import FileRegistry
    from featurestore.stores.codec import encode_columns
    from featurestore.stores.online import RedisOnlineStore, open_online_store

    repo = folder / "repo"
    shutil.copytree(ROOT / "examples" / "precomputed", repo, ignore=shutil.ignore_patterns(".tenx", "data"))
    done = subprocess.run(
        [sys.executable, "-m", "tenx", "apply"], cwd=repo, env=clean_environment(), capture_output=True, text=True
    )
    check(done.returncode == 0, f"tenx apply failed:\n{done.stdout}\n{done.stderr}")
    config = repo / "tenx.yaml"
    settings = load_settings(config, environ={})
    plan = FileRegistry(settings.registry_dir).current()
    check(plan is not None, "tenx apply left no plan")
    assert plan is not None
    view = plan.view(VIEW)
    check(
        view.feature_names == tuple(f"f{i}" for i in range(WIDTH)) and {f.dtype for f in view.features} == {"float32"},
        f"{VIEW}: expected 20 float32 features f0..f19, got {view.feature_names}",
    )

    rng = np.random.default_rng(seed)
    keys = np.arange(1, entities + 1, dtype=np.int64)
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    as_of = np.full(entities, now_us - 60_000_000, dtype=np.int64)
    columns = [rng.normal(0.0, 1.0, entities).astype(np.float32) for _ in range(WIDTH)]
    values = encode_columns(view, as_of, columns, [None] * WIDTH)
    store = open_online_store(redis_url=url, sqlite_path=Path(os.devnull), project=plan.project)
    try:
        check(isinstance(store, RedisOnlineStore), f"expected a Redis online store for {url}, got {store!r}")
        assert isinstance(store, RedisOnlineStore)
        written = store.write_packed(view, keys.tolist(), as_of.tolist(), values)
        check(written.written == entities, f"wrote {written.written} of {entities} values")
        prefix = store.prefix
    finally:
        store.close()

    registry = ModelRegistry(Path(settings.registry_dir) / "models")
    features = tuple(FeatureRef(VIEW, f"f{i}", view.version) for i in range(WIDTH))
    models = {}
    for name, widths in ((MLP, (WIDTH, 64, 64, 1)), (LOGISTIC, (WIDTH, 1))):
        card = ModelCard(
            name="",
            version=0,
            kind="mlp" if name == MLP else "logistic",
            features=features,
            label=None,
            content_hash="",
            created_at="",
            input_name="features",
            output_name="score",
            output_index=None,
            plan_version=plan.version,
            source="bench/serving.py",
        )
        added = registry.add(name, onnx_model(widths, seed), card)
        registry.deploy(name, added.version, precision=None, by="bench")
        models[name] = registry.model_path(name, added.version)
    return Setup(repo, config, prefix, f"{prefix}:{view.name}:{view.version}:", len(values[0]), models)


# -- the FastAPI baseline -----------------------------------------------------------------


def fastapi_app() -> Any:
    """The plain baseline (uvicorn factory; configured by $TENX_BENCH_FASTAPI, JSON):
    POST /predict {"model", "entities", ...} -> {"model", "scores"}. Per request: a
    pydantic body, redis.asyncio GET (one entity) or MGET, numpy decode, the model's
    ONNX session run inline on the event loop. No batching, no queue."""
    import onnxruntime  # noqa: F401  (fail at start, not on the first request)
    import orjson
    import redis.asyncio as aioredis
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import Response
    from pydantic import BaseModel

    config = json.loads(os.environ[FASTAPI_VARIABLE])
    key_base, value_bytes = config["key_base"], config["value_bytes"]
    sessions = {name: session(Path(path)) for name, path in config["models"].items()}
    client = aioredis.Redis.from_url(config["redis_url"])

    class PredictBody(BaseModel):
        model: str
        entities: list[int]
        priority: str = "default"
        tenant: str = "default"
        deadline_ms: float = 1000.0

    async def predict(body: PredictBody) -> Response:
        model = sessions.get(body.model)
        if model is None:
            raise HTTPException(404, f"unknown model {body.model}")
        keys = [f"{key_base}{entity}" for entity in body.entities]
        raws = [await client.get(keys[0])] if len(keys) == 1 else await client.mget(keys)
        (scores,) = model.run(["score"], {"features": decode(raws, value_bytes)})
        scored = {"model": body.model, "scores": scores.reshape(-1).tolist()}
        return Response(orjson.dumps(scored), media_type="application/json")

    # The body model is local to the factory: give FastAPI the class itself, not the
    # string `from __future__ import annotations` leaves (which it resolves in globals).
    predict.__annotations__ = {"body": PredictBody, "return": Response}
    app = FastAPI()
    app.post("/predict")(predict)
    app.get("/health/ready")(lambda: {"status": "ok"})
    return app


# -- processes ----------------------------------------------------------------------------


def check(condition: bool, message: str) -> None:
    """A sanity check that stays under `python -O`."""
    if not condition:
        raise SystemExit(f"check failed: {message}")


def clean_environment(**extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TENX_")}
    environment.update(extra)
    return environment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process(name: str, command: list[str], *, cwd: Path, env: dict[str, str], port: int, log: Path) -> Iterator[int]:
    """Run `command` until the block ends; yields its pid once GET /health/ready is 200."""
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.perf_counter() + 90
            while http_get(port, "/health/ready")[0] != 200:
                if server.poll() is not None:
                    raise SystemExit(f"{name} exited with {server.returncode}:\n{log.read_text()[-3000:]}")
                if time.perf_counter() > deadline:
                    raise SystemExit(f"{name} not ready after 90 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield server.pid
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=15)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of one GET, (0, b"") when nothing answers."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        connection.close()


def http_post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def batch_rows(port: int, model: str) -> tuple[float, float]:
    """(sum, count) of tenx_model_batch_rows for `model` from GET /metrics."""
    status, text = http_get(port, "/metrics")
    check(status == 200, f"GET /metrics answered {status}")
    found = {"sum": 0.0, "count": 0.0}
    label = f'model="{model}"'
    for line in text.decode().splitlines():
        for part in found:
            if line.startswith(f"tenx_model_batch_rows_{part}{{") and label in line:
                found[part] = float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"]


# -- the raw ceiling ----------------------------------------------------------------------


def summary(seconds: list[float] | np.ndarray, rows: int) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "calls": len(ms),
        "rows": rows,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "rows_per_s": rows * 1000 / float(ms.mean()),
    }


def timed_calls(fn: Callable[[int], Any], calls: int, rows: int) -> dict[str, float]:
    for index in range(min(200, calls)):
        fn(index)
    clock = time.perf_counter
    samples = []
    for index in range(calls):
        began = clock()
        fn(index)
        samples.append(clock() - began)
    return summary(samples, rows)


def part_ceiling(url: str, setup: Setup, entities: int, calls: int, seed: int) -> dict[str, Any]:
    import redis

    rng = np.random.default_rng(seed)
    picks = rng.integers(1, entities + 1, (calls + 200, 128)).tolist()
    keys = [[f"{setup.key_base}{e}".encode() for e in row] for row in picks]
    raw = redis.Redis.from_url(url, socket_timeout=5)
    mlp = session(setup.models[MLP])
    logistic = session(setup.models[LOGISTIC])
    matrices = {n: rng.normal(size=(n, WIDTH)).astype(np.float32) for n in (1, 32, 100, 128)}
    value_bytes = setup.value_bytes

    def pipelined(index: int) -> None:
        pipe = raw.pipeline(transaction=False)
        for key in keys[index]:
            pipe.get(key)
        pipe.execute()

    def single(index: int) -> None:
        mlp.run(["score"], {"features": decode([raw.get(keys[index][0])], value_bytes)})

    def hundred(index: int) -> None:
        mlp.run(["score"], {"features": decode(raw.mget(keys[index][:100]), value_bytes)})

    def run_onnx(model: Any, rows: int) -> Callable[[int], Any]:
        return lambda _: model.run(["score"], {"features": matrices[rows]})

    check(len(raw.get(keys[0][0]) or b"") == value_bytes, "the ceiling reads the keys the server serves")
    parts = {
        "onnx_mlp_1": (run_onnx(mlp, 1), 1),
        "onnx_mlp_32": (run_onnx(mlp, 32), 32),
        "onnx_mlp_128": (run_onnx(mlp, 128), 128),
        "onnx_logistic_1": (run_onnx(logistic, 1), 1),
        "redis_get_1": (lambda i: raw.get(keys[i][0]), 1),
        "redis_pipelined_get_128": (pipelined, 128),
        "redis_mget_100": (lambda i: raw.mget(keys[i][:100]), 100),
        "get_decode_onnx_1": (single, 1),
        "mget_decode_onnx_100": (hundred, 100),
    }
    results = {}
    for name, (fn, rows) in parts.items():
        print(f"  {name} ...", file=sys.stderr)
        results[name] = timed_calls(fn, calls, rows)
    raw.close()
    return results


# -- open-loop load -----------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    label: str  # "tenx" | "fastapi"
    port: int
    pid: int
    batches: bool  # it serves /metrics with tenx_model_batch_rows


@dataclass(frozen=True)
class LoadSettings:
    step_s: float
    warmup_s: float
    measure_s: float
    factor: float
    refine: int
    max_steps: int
    max_p99_ms: float
    max_lag_ms: float
    seed: int


def bodies(model: str, per_request: int, entities: int, seed: int) -> tuple[bytes, ...]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(1, entities + 1, (BODIES, per_request)).tolist()
    return tuple(
        post_request("/predict", json.dumps({"model": model, "entities": row, "tenant": "bench"}).encode())
        for row in picks
    )


def step(
    generator: LoadGenerator,
    server: Server,
    requests: tuple[bytes, ...],
    model: str,
    rate: float,
    seconds: float,
    settings: LoadSettings,
    admin: Any,
    seed: int,
) -> dict[str, Any]:
    """One open-loop run at `rate` and what it cost; `kept_up` says whether the server
    answered it (and the generator offered it)."""
    plan = LoadPlan(
        host="127.0.0.1",
        port=server.port,
        requests=requests,
        rate=rate,
        duration_s=seconds,
        warmup_s=settings.warmup_s,
        seed=seed,
        max_connections=CONNECTIONS,
        initial_connections=16,
        drain_s=2.0,
        max_p99_lag_s=settings.max_lag_ms / 1000,
    )
    before_rows = batch_rows(server.port, model) if server.batches else (0.0, 0.0)
    server_cpu, redis_cpu, began = proc_cpu_s(server.pid), redis_cpu_s(admin), time.perf_counter()
    result = generator.run(plan)
    wall = time.perf_counter() - began
    cpu = {
        "server_pct": 100 * (proc_cpu_s(server.pid) - server_cpu) / wall,
        "redis_pct": 100 * (redis_cpu_s(admin) - redis_cpu) / wall,
        "generator_pct": 100 * result.generator_cpu_s / result.wall_s,
    }
    mean_batch = None
    if server.batches:
        after_rows = batch_rows(server.port, model)
        batches = after_rows[1] - before_rows[1]
        mean_batch = (after_rows[0] - before_rows[0]) / batches if batches else None
    kept_up, why = verdict(result, settings)
    print(
        f"    {server.label} {model} {rate:,.0f}/s: ok {result.ok_rate:,.0f}/s p50 {result.latency.p50_ms:.2f} "
        f"p99 {result.latency.p99_ms:.2f} ms, lag p99 {result.lag.p99_ms:.2f} ms"
        + (f", batch {mean_batch:.1f}" if mean_batch else "")
        + f", CPU server {cpu['server_pct']:.0f}% redis {cpu['redis_pct']:.0f}% loadgen {cpu['generator_pct']:.0f}%"
        + ("" if kept_up else f" -- {why}"),
        file=sys.stderr,
    )
    return {
        "rate": rate,
        "kept_up": kept_up,
        "why": why,
        "generator_on_time": generator_on_time(result, settings),
        "result": result.to_dict(),
        "mean_batch_rows": mean_batch,
        "cpu": cpu,
    }


def generator_on_time(result: LoadResult, settings: LoadSettings) -> bool:
    """Whether the load generator itself kept to its schedule: a request that waited for
    a connection (all busy: the server is saturated) is the server's doing, not its own."""
    return result.schedule_lag_p99_ms <= settings.max_lag_ms


def verdict(result: LoadResult, settings: LoadSettings) -> tuple[bool, str]:
    if not generator_on_time(result, settings):
        return False, (
            f"load generator fell behind: its own p99 scheduling lag {result.schedule_lag_p99_ms:.2f} ms > "
            f"{settings.max_lag_ms:g} ms"
        )
    if result.lag.fell_behind:
        return False, f"sends late: {result.lag.reason}"
    if result.ok < 0.95 * result.scheduled:
        answers = ", ".join(f"{status}: {count}" for status, count in sorted(result.statuses.items()))
        return False, (
            f"{result.ok} of {result.scheduled} requests answered 2xx ({answers}; {result.errors} errors, "
            f"{result.unfinished} unanswered)"
        )
    if result.latency.p99_ms > settings.max_p99_ms:
        return False, f"p99 {result.latency.p99_ms:.1f} ms > {settings.max_p99_ms:g} ms"
    return True, ""


def part_load(
    generator: LoadGenerator,
    server: Server,
    model: str,
    per_request: int,
    entities: int,
    start_rate: float,
    settings: LoadSettings,
    admin: Any,
    *,
    measure: bool,
) -> dict[str, Any]:
    """The max rate (ramp, then bisection), then runs at 30% and 70% of it."""
    requests = bodies(model, per_request, entities, settings.seed + per_request)
    status, answer = http_post(server.port, "/predict", requests[0].split(b"\r\n\r\n", 1)[1])
    check(status == 200, f"{server.label} POST /predict answered {status}: {answer[:300]!r}")
    scores = json.loads(answer)["scores"]
    check(len(scores) == per_request and all(isinstance(s, float) for s in scores), f"unexpected answer {answer!r}")

    steps: list[dict[str, Any]] = []  # the search's
    seeds = iter(range(settings.seed * 1000, settings.seed * 1000 + 1000))

    def run(rate: float, seconds: float) -> dict[str, Any]:
        return step(generator, server, requests, model, rate, seconds, settings, admin, next(seeds))

    best: dict[str, Any] | None = None
    refused: dict[str, Any] | None = None  # the lowest step above `best` that did not keep up
    rate = start_rate
    for _ in range(settings.max_steps):
        done = run(rate, settings.step_s)
        steps.append(done)
        if not done["kept_up"]:
            refused = done
            if best is not None:
                break
            rate /= settings.factor**2  # the first step was already too much: start lower
            continue
        best = done
        rate *= settings.factor
    if best is not None and refused is not None and refused["rate"] > best["rate"]:
        for _ in range(settings.refine):
            done = run(math.sqrt(best["rate"] * refused["rate"]), settings.step_s)
            steps.append(done)
            if done["kept_up"]:
                best = done
            else:
                refused = done
    if best is None:
        return {"max": None, "steps": steps, "per_request": per_request}
    found = {
        "offered_per_s": best["rate"],
        "requests_per_s": best["result"]["ok_rate"],
        "predictions_per_s": best["result"]["ok_rate"] * per_request,
        "refused_at": refused["rate"] if refused else None,
        "stopped_by": refused["why"] if refused else None,
    }
    measured: dict[str, Any] = {}
    if measure:
        for share in (0.3, 0.7):
            done = run(share * best["rate"], settings.measure_s)
            void = []
            if not done["generator_on_time"]:  # the generator itself was late (a busy machine): once more
                void.append(done)
                done = run(share * best["rate"], settings.measure_s)
            # A saturated server's latency is still reported (it is measured from the intended
            # send times); a step the generator itself could not offer is not.
            measured[f"at_{round(share * 100)}"] = {
                **done,
                "share": share,
                "reported": done["generator_on_time"],
                "void_runs": void,
            }
    return {"max": found, **measured, "steps": steps, "per_request": per_request}


# -- report -------------------------------------------------------------------------------


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def at(load: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The measured run `key` (at_30 / at_70) when it may be reported."""
    measured = load.get(key)
    return measured if measured and measured["reported"] else None


def latency_of(load: dict[str, Any], key: str, figure: str) -> float | None:
    measured = at(load, key)
    return measured["result"]["latency"][figure] if measured else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=100_000, help="Entities written to Redis.")
    parser.add_argument("--calls", type=int, default=3_000, help="Timed calls per in-process ceiling figure.")
    parser.add_argument("--step-s", type=float, default=3.0, help="Seconds of each step of the max-rate search.")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="Seconds sent but not counted before each step.")
    parser.add_argument("--measure-s", type=float, default=8.0, help="Seconds at 30%% and at 70%% of the max rate.")
    parser.add_argument("--factor", type=float, default=1.5, help="Rate multiplier between search steps.")
    parser.add_argument(
        "--refine", type=int, default=2, help="Bisection steps between the last kept-up rate and the next."
    )
    parser.add_argument("--max-steps", type=int, default=10, help="Most ramp steps per search.")
    parser.add_argument(
        "--max-p99-ms", type=float, default=50.0, help="A search step with a higher p99 did not keep up."
    )
    parser.add_argument(
        "--max-lag-ms",
        type=float,
        default=2.0,
        help="The load generator's own p99 scheduling lag beyond which a step is void.",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json", help="Results JSON file.")
    args = _smoke.parse_arguments(
        parser,
        lambda folder: {
            "entities": 2_000,
            "calls": 200,
            "step_s": 1.0,
            "warmup_s": 0.2,
            "measure_s": 1.5,
            "factor": 3.0,
            "refine": 0,
            "max_steps": 2,
            "out": folder / "serving.json",
        },
    )
    url = os.environ.get("TENX_REDIS_URL")
    if not url:
        raise SystemExit('TENX_REDIS_URL is not set; start Redis with: eval "$(scripts/services up --only redis)"')
    if args.entities < 200 or args.calls < 10 or args.step_s <= 0 or args.measure_s <= 0 or args.factor <= 1:
        raise SystemExit("--entities >= 200, --calls >= 10, --step-s and --measure-s > 0, --factor > 1")

    import redis

    settings = LoadSettings(
        args.step_s, args.warmup_s, args.measure_s, args.factor, args.refine, args.max_steps, args.max_p99_ms,
        args.max_lag_ms, args.seed,
    )  # fmt: skip
    admin = redis.Redis.from_url(url, socket_timeout=10)
    redis_version = admin.info("server").get("redis_version", "?")
    folder = Path(tempfile.mkdtemp(prefix="tenx-bench-serving-"))
    setup: Setup | None = None
    loads: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        print(f"preparing {args.entities:,} entities x {WIDTH} float32 features and the models ...", file=sys.stderr)
        setup = prepare(url, folder, args.entities, args.seed)
        print("raw ceiling, in-process ...", file=sys.stderr)
        ceiling = part_ceiling(url, setup, args.entities, args.calls, args.seed)
        single_start = ceiling["get_decode_onnx_1"]["rows_per_s"] / 16
        hundred_start = ceiling["mget_decode_onnx_100"]["rows_per_s"] / 100 / 16

        with LoadGenerator() as generator:
            tenx_port = free_port()
            tenx_command = [sys.executable, "-m", "tenx", "serve-models", "--port", str(tenx_port), "--cpu"]
            tenx_command += ["--config", str(setup.config)]
            with process(
                "tenx serve-models",
                tenx_command,
                cwd=setup.repo,
                env=clean_environment(TENX_REDIS_URL=url),
                port=tenx_port,
                log=folder / "serve-models.log",
            ) as pid:
                tenx = Server("tenx", tenx_port, pid, batches=True)
                for key, model, per_request, start, measure in (
                    ("tenx_mlp_1", MLP, 1, single_start, True),
                    ("tenx_mlp_100", MLP, 100, hundred_start, True),
                    ("tenx_logistic_1", LOGISTIC, 1, single_start, False),
                ):
                    print(f"open-loop load: {key} ...", file=sys.stderr)
                    loads[key] = part_load(
                        generator, tenx, model, per_request, args.entities, start, settings, admin, measure=measure
                    )

            fastapi_port = free_port()
            fastapi_config = {
                "redis_url": url,
                "key_base": setup.key_base,
                "value_bytes": setup.value_bytes,
                "models": {name: str(path) for name, path in setup.models.items()},
            }
            fastapi_command = [sys.executable, "-m", "uvicorn", "bench.serving:fastapi_app", "--factory"]
            fastapi_command += ["--port", str(fastapi_port), "--workers", "1", "--no-access-log"]
            fastapi_command += ["--http", "httptools", "--loop", "uvloop", "--log-level", "warning"]
            with process(
                "the FastAPI app",
                fastapi_command,
                cwd=ROOT,
                env=clean_environment(**{FASTAPI_VARIABLE: json.dumps(fastapi_config)}),
                port=fastapi_port,
                log=folder / "fastapi.log",
            ) as pid:
                plain = Server("fastapi", fastapi_port, pid, batches=False)
                for key, model, per_request, start in (
                    ("fastapi_mlp_1", MLP, 1, single_start),
                    ("fastapi_mlp_100", MLP, 100, hundred_start),
                ):
                    print(f"open-loop load: {key} ...", file=sys.stderr)
                    loads[key] = part_load(
                        generator, plain, model, per_request, args.entities, start, settings, admin, measure=True
                    )
    finally:
        if setup is not None:
            unlink_matching(admin, f"{setup.key_base}*")
        admin.close()
        shutil.rmtree(folder, ignore_errors=True)
    elapsed = time.perf_counter() - started

    # -- print ----------------------------------------------------------------------------
    ms = "{:.3f}".format
    ceiling_lines: list[tuple[str, ...]] = [("raw ceiling, in-process, one thread", "p50 ms", "p99 ms", "rows/s")]
    for label, key in (
        ("ONNX Runtime MLP, batch of 1", "onnx_mlp_1"),
        ("ONNX Runtime MLP, batch of 32", "onnx_mlp_32"),
        ("ONNX Runtime MLP, batch of 128", "onnx_mlp_128"),
        ("ONNX Runtime logistic, batch of 1", "onnx_logistic_1"),
        ("redis-py GET, 1 key", "redis_get_1"),
        ("redis-py pipelined GET, 128 keys", "redis_pipelined_get_128"),
        ("redis-py MGET, 100 keys", "redis_mget_100"),
        ("GET + decode + ONNX batch of 1", "get_decode_onnx_1"),
        ("MGET 100 + decode + ONNX batch of 100", "mget_decode_onnx_100"),
    ):
        c = ceiling[key]
        ceiling_lines.append((label, ms(c["p50_ms"]), ms(c["p99_ms"]), f"{c['rows_per_s']:,.0f}"))

    def cell(value: float | None, form: str = "{:.2f}") -> str:
        return "-" if value is None else form.format(value)

    labels = {
        "tenx_mlp_1": "tenx, MLP, 1 entity",
        "fastapi_mlp_1": "FastAPI (no batching), MLP, 1 entity",
        "tenx_mlp_100": "tenx, MLP, 100 entities",
        "fastapi_mlp_100": "FastAPI (no batching), MLP, 100 entities",
        "tenx_logistic_1": "tenx, logistic, 1 entity (max only)",
    }
    stops = []
    for key, label in labels.items():
        top = loads[key]["max"]
        if top is None:
            stops.append(f"  {label}: no step kept up")
        elif top["refused_at"] is None:
            stops.append(f"  {label}: no step refused (the max is at least the last rate tried)")
        else:
            stops.append(f"  {label}: at {top['refused_at']:,.0f}/s: {top['stopped_by']}")
    load_lines: list[tuple[str, ...]] = [
        ("open-loop POST /predict", "max req/s", "max pred/s", "vs baseline", "30%: p50", "p99", "batch",
         "70%: p50", "p99", "batch", "CPU srv/redis/gen at 70%"),
    ]  # fmt: skip
    fastapi_1 = loads["fastapi_mlp_1"]["max"]
    ceiling_100 = ceiling["mget_decode_onnx_100"]
    for key, label in labels.items():
        load = loads[key]
        top = load["max"]
        if key == "tenx_mlp_1":
            versus = f"{top['requests_per_s'] / fastapi_1['requests_per_s']:.2f}x FastAPI" if top and fastapi_1 else "-"
        elif key.endswith("_100"):
            versus = f"{top['predictions_per_s'] / ceiling_100['rows_per_s']:.2f}x ceiling" if top else "-"
        elif key == "tenx_logistic_1":
            mlp_1 = loads["tenx_mlp_1"]["max"]
            versus = f"{top['requests_per_s'] / mlp_1['requests_per_s']:.2f}x tenx MLP" if top and mlp_1 else "-"
        else:
            versus = "(baseline)"
        thirty, seventy = at(load, "at_30"), at(load, "at_70")
        load_lines.append(
            (
                label,
                cell(top and top["requests_per_s"], "{:,.0f}") + ("+" if top and top["refused_at"] is None else ""),
                cell(top and top["predictions_per_s"], "{:,.0f}"),
                versus,
                cell(latency_of(load, "at_30", "p50_ms")),
                cell(latency_of(load, "at_30", "p99_ms")),
                cell(thirty and thirty["mean_batch_rows"], "{:.1f}"),
                cell(latency_of(load, "at_70", "p50_ms")),
                cell(latency_of(load, "at_70", "p99_ms")),
                cell(seventy and seventy["mean_batch_rows"], "{:.1f}"),
                "/".join(f"{seventy['cpu'][k]:.0f}%" for k in ("server_pct", "redis_pct", "generator_pct"))
                if seventy
                else "-",
            )
        )

    tenx_1, tenx_100 = loads["tenx_mlp_1"], loads["tenx_mlp_100"]
    p99_70 = latency_of(tenx_1, "at_70", "p99_ms")
    p99_100 = latency_of(tenx_100, "at_70", "p99_ms")
    bound_100 = 1.5 * ceiling_100["p99_ms"] + 2.0
    ratios = {
        "tenx_1_entity_max_vs_fastapi": (
            tenx_1["max"]["requests_per_s"] / fastapi_1["requests_per_s"] if tenx_1["max"] and fastapi_1 else None
        ),
        "tenx_p99_at_70pct_ms": p99_70,
        "tenx_100_entity_predictions_vs_ceiling": (
            tenx_100["max"]["predictions_per_s"] / ceiling_100["rows_per_s"] if tenx_100["max"] else None
        ),
        "tenx_100_entity_p99_at_70pct_vs_bound": p99_100 / bound_100 if p99_100 is not None else None,
    }

    def judged(value: float | None, passes: Callable[[float], bool]) -> bool | None:
        return None if value is None else passes(value)  # None: not measured (the JSON says why)

    targets = {
        "tenx_1_entity_ge_2x_fastapi": judged(ratios["tenx_1_entity_max_vs_fastapi"], lambda r: r >= 2.0),
        "tenx_p99_at_70pct_le_10ms": judged(p99_70, lambda p: p <= 10.0),
        "tenx_100_entity_ge_60pct_ceiling": judged(
            ratios["tenx_100_entity_predictions_vs_ceiling"], lambda r: r >= 0.6
        ),
        "tenx_100_entity_p99_le_1.5x_ceiling_plus_2ms": judged(p99_100, lambda p: p <= bound_100),
    }

    def mark(name: str) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[targets[name]]

    lines = [
        f"  tenx 1-entity max / FastAPI max: {cell(ratios['tenx_1_entity_max_vs_fastapi'])}x (target >= 2x): "
        f"{mark('tenx_1_entity_ge_2x_fastapi')}",
        f"  tenx 1-entity p99 at 70% of max: {cell(p99_70)} ms (target <= 10 ms): {mark('tenx_p99_at_70pct_le_10ms')}",
        f"  tenx 100-entity predictions/s / in-process ceiling: "
        f"{cell(ratios['tenx_100_entity_predictions_vs_ceiling'])} (target >= 0.60): "
        f"{mark('tenx_100_entity_ge_60pct_ceiling')}",
        f"  tenx 100-entity p99 at 70% of max: {cell(p99_100)} ms vs 1.5 x {ceiling_100['p99_ms']:.2f} + 2 = "
        f"{bound_100:.2f} ms ({cell(ratios['tenx_100_entity_p99_at_70pct_vs_bound'])}x the bound): "
        f"{mark('tenx_100_entity_p99_le_1.5x_ceiling_plus_2ms')}",
    ]
    print(
        f"\nserving benchmark: {args.entities:,} entities x {WIDTH} float32 features "
        f"({setup.value_bytes if setup else '?'}-byte values), MLP {WIDTH}-64-64-1 and logistic on ONNX Runtime "
        f"(CPU), Redis {redis_version}, "
        f"{os.cpu_count()} CPUs shared by the server, Redis and the load generator (its own process); "
        f"{elapsed:.0f} s\n"
    )
    print(table(ceiling_lines) + "\n")
    print(table(load_lines) + "\n")
    print(
        "max: the highest offered rate kept up with (2xx >= 95%, p99 <= "
        f"{args.max_p99_ms:g} ms, sends on time, the load generator's own p99 lag <= {args.max_lag_ms:g} ms), as 2xx "
        "answers/s ('+': no "
        "step refused); latency in ms from "
        "the intended send time, at 30% and 70% of max for "
        f"{args.measure_s:g} s; batch: mean rows per inference batch\n"
    )
    print("max-rate search stopped by (the first step refused above the max):\n" + "\n".join(stops) + "\n")
    print("targets:\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "entities": args.entities,
                "features": WIDTH,
                "value_bytes": setup.value_bytes if setup else None,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "redis": redis_version},
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "ceiling": ceiling,
                "loads": loads,
                "ratios": ratios,
                "targets": targets,
                "elapsed_s": elapsed,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
