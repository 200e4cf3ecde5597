"""Online serving benchmark: lookups, the HTTP API and materialize, against raw Redis.

One view of exactly 20 float64 features (Sum/Mean/Max/Min/Std of a float over 1h, 1d,
7d and 30d; 180-byte packed values) and the same view stored as float32 (100-byte
values: the 100-entity lookup of each is measured beside raw MGET of its own bytes,
in the same alternating rounds), N entities (default 100k) with one changelog row
each, as_of a minute ago (ttl 30d: every value is FOUND). Measured in one run, against
one Redis (TENX_REDIS_URL, required: `eval "$(scripts/services up --only redis)"`):

- materialize: `pipelines.materialize.materialize` of the N entities from a Delta
  changelog (written by DeltaOfflineStore.write_changelog in a temp folder) into Redis,
  keys deleted before each repeat. Beside it, in the same run: raw redis-py pipelined
  SET of the same N values (same bytes, encoded before the clock starts, 10k commands
  per round trip), and two parts of materialize alone: the Delta read (`latest_rows`)
  and `RedisOnlineStore.write` of the table from memory.
- lookups: `FeatureClient.get` of 1 and of 100 random entities (all 20 features),
  against raw redis-py (hiredis) GET of one key and MGET of 100 keys holding the same
  bytes under another prefix. The raw calls only fetch bytes; tenx also builds keys,
  decodes, judges freshness and builds a FeatureResult. Each pair is measured in
  alternating rounds (so machine noise hits both alike): >= 500 warm-up calls, then
  `--calls` timed calls each (time.perf_counter_ns), p50/p95/p99.
- HTTP API: `tenx serve` (uvicorn, 1 worker by default) in a subprocess, on a temp
  feature repo whose registry holds the plan. One keep-alive httpx.Client, sequential
  POST /features for 1 random entity: p50/p95/p99, beside GET /health/live through the
  same client (the HTTP floor: no Redis, no decoding). Then requests/s with 8 concurrent
  keep-alive clients (8 threads, one connection each) for `--http-seconds`, with the
  CPU used by the server, the load generator and Redis: once with a minimal socket
  HTTP/1.1 client (the figure held against the target; /health/live the floor) and once
  with httpx.Client. The load generator shares the machine's cores with the server: on
  a small machine it can be the bottleneck (httpx costs far more CPU per request than
  the server does), which the CPU figures show.

The tenx keys (materialize, lookups, HTTP) carry the prefix `tenx serve` reads for the
plan's project (`open_online_store`: `tenx:<project>`), so the HTTP part answers what
materialize wrote.

Every figure is printed beside its raw baseline, with the targets as met/MISSED, and
written to bench/results/online.json (or --out). Only localhost traffic; every loop is
bounded by a count and a wall-clock cap; every key written is deleted at the end.

Context (Feast 0.67 on the same data shape, from the issue; not measured here):
get_online_features p99 1.42 ms for 1 user and 34.7 ms for 100; `feast serve` p50
4.2 ms / p99 8.5 ms at about 185 req/s; materialize of 95k users 40.7 s.

    eval "$(scripts/services up --only redis)"
    python bench/online.py                      # 100k entities, 5000 calls per figure
    python bench/online.py --entities 10000 --calls 1000 --http-seconds 3   # quick
    python bench/online.py --smoke              # seconds; JSON in a temp folder (CI)
    scripts/services down --only redis
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from featurestore import Entity, Max, Mean, Min, Source, Std, Sum, feature_view
from featurestore.plan import AS_OF, Plan, ViewSpec, compile_definitions
from schemas import TRANSACTIONS

# `python bench/online.py` puts bench/ first on sys.path, where bench/serving.py would
# shadow the `serving` package: the repo root goes first, bench/ last.
BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(BENCH.parent), *(e for e in sys.path if Path(e or ".").resolve() != BENCH), str(BENCH)]
import _smoke  # noqa: E402
from _harness import proc_cpu_s, redis_cpu_s  # noqa: E402
from _redis_keys import unlink_matching  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RAW_PREFIX = "tenxbench:raw"  # raw baseline keys: {RAW_PREFIX}:{entity}
RAW32_PREFIX = "tenxbench:raw32"  # the float32 view's bytes, for its raw baseline
WRITE_PREFIX = "tenxbench:write"  # RedisOnlineStore.write from memory (a part of materialize)
WARMUP = 500  # untimed calls before each latency figure (--warmup)
ROUNDS = 10  # alternating rounds per measured pair

USER = Entity("user", key="user_id", dtype="int64", description="A card holder.")
TX = Source("transactions", TRANSACTIONS)


@feature_view(
    entity=USER,
    source=TX,
    aggregations=[Sum("amount"), Mean("amount"), Max("amount"), Min("amount"), Std("amount")],
    windows=["1h", "1d", "7d", "30d"],
    ttl="30d",
)
def bench_online(tx: pd.DataFrame) -> pd.DataFrame:
    """20 float64 features of the amount: 5 aggregations x 4 windows."""
    return tx[[]]


@feature_view(
    entity=USER,
    source=TX,
    aggregations=[Sum("amount"), Mean("amount"), Max("amount"), Min("amount"), Std("amount")],
    windows=["1h", "1d", "7d", "30d"],
    ttl="30d",
    float_dtype="float32",
)
def bench_online32(tx: pd.DataFrame) -> pd.DataFrame:
    """The same 20 features stored as float32 (4 bytes a value instead of 8)."""
    return tx[[]]


def bench_plan() -> Plan:
    """Two views, sorted by name: `bench_online` (float64) then `bench_online32`."""
    plan = compile_definitions("bench", views=[bench_online, bench_online32])
    for view, dtype in zip(plan.views, ("float64", "float32"), strict=True):
        dtypes = {f.dtype for f in view.features}
        check(len(view.features) == 20 and dtypes == {dtype}, f"{view.name}: 20 {dtype} features, got {dtypes}")
    return plan


def serving_prefix(url: str, plan: Plan) -> str:
    """The key prefix `tenx serve` and `tenx materialize` use for `plan`: whatever
    `open_online_store` derives from the plan's project (`tenx:<project>`)."""
    from featurestore.stores.online import RedisOnlineStore, open_online_store

    store = open_online_store(redis_url=url, sqlite_path=Path(os.devnull), project=plan.project)
    try:
        if not isinstance(store, RedisOnlineStore):
            raise SystemExit(f"check failed: expected a Redis online store for {url}, got {store!r}")
        return store.prefix
    finally:
        store.close()


def changelog(view: ViewSpec, entities: int, now_us: int, seed: int) -> pa.Table:
    """One row per entity 1..N, random floats, as_of within the last two minutes."""
    rng = np.random.default_rng(seed)
    schema = view.changelog_schema()
    as_of = now_us - 60_000_000 - rng.integers(0, 60_000_000, entities)
    columns: dict[str, Any] = {
        view.entity_key: pa.array(np.arange(1, entities + 1, dtype=np.int64)),
        AS_OF: pa.array(as_of, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
    }
    for name in view.feature_names:
        columns[name] = pa.array(rng.normal(50.0, 20.0, entities))
    return pa.table(columns).cast(schema)  # float32 views: rounded once, as the engines store them


# -- measurement helpers ------------------------------------------------------------------


def check(condition: bool, message: str) -> None:
    """A sanity check that stays under `python -O`."""
    if not condition:
        raise SystemExit(f"check failed: {message}")


def summary(samples_ns: np.ndarray) -> dict[str, float]:
    ms = samples_ns / 1e6
    return {
        "calls": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


def latencies(
    calls: dict[str, Callable[[int], Any]], count: int, warmup: int, cap_s: float
) -> dict[str, dict[str, float]]:
    """Time each of `calls` (called with the call number) `count` times, after `warmup`
    untimed calls each, in ROUNDS alternating rounds; stops early at `cap_s` seconds."""
    for fn in calls.values():
        for i in range(warmup):
            fn(i)
    samples = {name: np.zeros(count, dtype=np.int64) for name in calls}
    done = dict.fromkeys(calls, 0)
    per_round = -(-count // ROUNDS)
    deadline = time.perf_counter() + cap_s
    clock = time.perf_counter_ns
    for start in range(0, count, per_round):
        for name, fn in calls.items():
            out = samples[name]
            gc.collect()
            for i in range(start, min(start + per_round, count)):
                began = clock()
                fn(i)
                out[i] = clock() - began
                done[name] = i + 1
        if time.perf_counter() > deadline:
            print(f"  wall-clock cap of {cap_s:.0f} s reached after {start + per_round} calls", file=sys.stderr)
            break
    return {name: summary(samples[name][: done[name]]) for name in calls}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- parts --------------------------------------------------------------------------------


def part_materialize(
    url: str, view: ViewSpec, table: pa.Table, offline: Any, repeat: int, serve_prefix: str, raw_prefix: str
) -> dict[str, Any]:
    """Materialize into `serve_prefix` (fresh keys each time) beside raw pipelined SETs
    of the same bytes under `raw_prefix`; both stay populated for the lookups."""
    import redis

    from featurestore.stores.codec import encode_rows, online_key
    from featurestore.stores.online import RedisOnlineStore
    from pipelines.materialize import latest_rows, materialize

    raw = redis.Redis.from_url(url, socket_timeout=10)
    values = [(f"{raw_prefix}:{key}".encode(), value) for key, _, value in encode_rows(view, table)]
    tenx_pattern = online_key(view, "*", prefix=serve_prefix).decode()
    write_pattern = online_key(view, "*", prefix=WRITE_PREFIX).decode()
    runs: dict[str, list[float]] = {"materialize": [], "raw_set": [], "delta_read": [], "store_write": []}
    written = 0
    for attempt in range(repeat):
        print(f"  materialize {attempt + 1}/{repeat} ...", file=sys.stderr)
        unlink_matching(raw, tenx_pattern)
        store = RedisOnlineStore(url, prefix=serve_prefix, timeout_s=30)
        seconds, result = timed(lambda store=store: materialize(view, offline, store))
        store.close()
        check(result.entities == table.num_rows, f"materialized {result.entities} of {table.num_rows} entities")
        written = result.written
        runs["materialize"].append(seconds)

        unlink_matching(raw, f"{raw_prefix}:*")

        def raw_set() -> None:
            pipe = raw.pipeline(transaction=False)
            for index, (key, value) in enumerate(values, 1):
                pipe.set(key, value)
                if index % 10_000 == 0:
                    pipe.execute()
            pipe.execute()

        runs["raw_set"].append(timed(raw_set)[0])

        runs["delta_read"].append(timed(lambda: sum(b.num_rows for b in latest_rows(view, offline)))[0])
        unlink_matching(raw, write_pattern)
        writer = RedisOnlineStore(url, prefix=WRITE_PREFIX, timeout_s=30)
        runs["store_write"].append(timed(lambda writer=writer: writer.write(view, table))[0])
        writer.close()
    unlink_matching(raw, write_pattern)

    # Same bytes: what tenx stored equals what the raw baseline stored.
    sample = list(range(1, table.num_rows + 1, max(1, table.num_rows // 200)))
    stored = raw.mget([online_key(view, e, prefix=serve_prefix) for e in sample])
    copied = raw.mget([f"{raw_prefix}:{e}" for e in sample])
    check(stored == copied and None not in stored, "the raw keys do not hold the bytes tenx stored")
    size = len(stored[0])
    raw.close()
    medians = {name: float(np.median(values)) for name, values in runs.items()}
    return {
        "entities": table.num_rows,
        "written": written,
        "value_bytes": size,
        "runs_s": runs,
        "median_s": medians,
    }


def part_lookups(
    url: str, plan: Plan, serve_prefix: str, entities: int, calls: int, warmup: int, cap_s: float, seed: int
) -> dict[str, Any]:
    import redis

    from featurestore.stores.online import RedisOnlineStore
    from serving.client import FeatureClient, Status

    view, view32 = plan.views
    rng = np.random.default_rng(seed)
    total = calls + warmup
    singles = rng.integers(1, entities + 1, total).tolist()
    batches = rng.integers(1, entities + 1, (total, 100)).tolist()
    raw = redis.Redis.from_url(url, socket_timeout=2.0, retry_on_timeout=False)
    client = FeatureClient(RedisOnlineStore(url, prefix=serve_prefix), plan)
    name = view.name

    for checked in (view, view32):
        first = client.get(checked.name, batches[0])
        check(all(s is Status.FOUND for s in first.statuses), f"statuses {[s.value for s in first.statuses]}")
        check(len(first.names) == 20, f"{len(first.names)} features")

    def raw_get(i: int) -> Any:
        return raw.get(f"{RAW_PREFIX}:{singles[i]}")

    def tenx_one(i: int) -> Any:
        return client.get(name, [singles[i]])

    def raw_mget(i: int) -> Any:
        return raw.mget([f"{RAW_PREFIX}:{e}" for e in batches[i]])

    def tenx_hundred(i: int) -> Any:
        return client.get(name, batches[i])

    def raw_mget32(i: int) -> Any:
        return raw.mget([f"{RAW32_PREFIX}:{e}" for e in batches[i]])

    def tenx_hundred32(i: int) -> Any:
        return client.get(view32.name, batches[i])

    print(f"  1 entity: {calls:,} calls each ...", file=sys.stderr)
    one = latencies({"raw_get": raw_get, "client_1": tenx_one}, calls, warmup, cap_s)
    print(f"  100 entities, float64 and float32: {calls:,} calls each ...", file=sys.stderr)
    hundred = latencies(
        {
            "raw_mget_100": raw_mget,
            "client_100": tenx_hundred,
            "raw_mget_100_float32": raw_mget32,
            "client_100_float32": tenx_hundred32,
        },
        calls,
        warmup,
        cap_s,
    )
    client.close()
    raw.close()
    return one | hundred


@contextlib.contextmanager
def served(url: str, plan: Plan, folder: Path, workers: int) -> Iterator[tuple[str, int]]:
    """`tenx serve` on a temp feature repo whose registry holds `plan`; yields
    (base URL, server pid) once /health/ready answers 200."""
    import httpx

    from featurestore.config import load_settings
    from featurestore.registry import FileRegistry

    repo = folder / "repo"
    repo.mkdir()
    config = repo / "tenx.yaml"
    config.write_text(
        f"project: {plan.project}\nfeatures:\n  modules: []\nregistry: .tenx/registry\n"
        "offline_store:\n  path: data/offline\nonline_store:\n  path: data/online.sqlite\n"
    )
    settings = load_settings(config, environ={})
    FileRegistry(settings.registry_dir).apply(plan)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENX_")}
    env["TENX_REDIS_URL"] = url
    tenx = Path(sys.executable).parent / "tenx"
    command = [str(tenx)] if tenx.exists() else [sys.executable, "-m", "tenx.cli"]
    command += ["serve", "--config", str(config), "--port", str(port), "--workers", str(workers)]
    log = (folder / "serve.log").open("w")
    server = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.perf_counter() + 60
        while True:
            if server.poll() is not None:
                raise SystemExit(f"tenx serve exited with {server.returncode}:\n{(folder / 'serve.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health/ready", timeout=1.0).status_code == 200:
                    break
            if time.perf_counter() > deadline:
                raise SystemExit(f"tenx serve not ready after 60 s:\n{(folder / 'serve.log').read_text()}")
            time.sleep(0.1)
        yield base, server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        log.close()


class _SocketClient:
    """A minimal HTTP/1.1 keep-alive client on one socket: sends prepared request bytes,
    reads one response by its content-length. Much cheaper per request than httpx, so
    that on a small machine the load generator leaves more CPU to the server."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    @staticmethod
    def request(path: str, body: bytes | None) -> bytes:
        if body is None:
            return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    def send(self, request: bytes) -> int:
        """The status code of the response to `request`."""
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = self.buffer[:end].lower()
        at = head.find(b"content-length:")
        if at < 0:
            raise OSError("response without content-length")
        stop = head.find(b"\r\n", at)
        length = int(head[at + 15 : stop if stop > 0 else len(head)])
        while len(self.buffer) < end + 4 + length:
            self._fill()
        self.buffer = self.buffer[end + 4 + length :]
        return int(head[9:12])

    def _fill(self) -> None:
        chunk = self.sock.recv(65_536)
        if not chunk:
            raise OSError("connection closed")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def throughput(
    base: str, path: str, bodies: list[bytes] | None, clients: int, seconds: float, loadgen: str
) -> dict[str, float]:
    """Requests/s over `seconds` from `clients` threads, each with its own keep-alive
    connection (`loadgen`: "socket" or "httpx"), after one second of warm-up; errors are
    counted, not retried."""
    import httpx

    warm = 1.0
    counts = [0] * clients
    errors = [0] * clients
    start = threading.Barrier(clients + 1, timeout=30)
    window: dict[str, float] = {}
    payloads = bodies if bodies is not None else [None]

    def worker(index: int) -> None:
        headers = {"content-type": "application/json"}
        prepared = [_SocketClient.request(path, body) for body in payloads]
        http: Any = _SocketClient(base) if loadgen == "socket" else httpx.Client(base_url=base, timeout=5.0)
        try:
            start.wait()
            begin, end = window["begin"], window["end"]
            n = index * 7919
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                try:
                    if loadgen == "socket":
                        ok = http.send(prepared[n % len(prepared)]) == 200
                    elif bodies is None:
                        ok = http.get(path).status_code == 200
                    else:
                        ok = http.post(path, content=bodies[n % len(bodies)], headers=headers).status_code == 200
                except (OSError, httpx.HTTPError):
                    ok = False
                    if loadgen == "socket":
                        http.close()
                        http = _SocketClient(base)
                n += 1
                if now >= begin:
                    if ok:
                        counts[index] += 1
                    else:
                        errors[index] += 1
        finally:
            http.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    now = time.perf_counter()
    window["begin"], window["end"] = now + warm, now + warm + seconds
    start.wait()
    for thread in threads:
        thread.join(timeout=warm + seconds + 30)
    return {"requests_per_s": sum(counts) / seconds, "requests": sum(counts), "errors": sum(errors)}


def part_http(
    url: str,
    plan: Plan,
    entities: int,
    calls: int,
    warmup: int,
    cap_s: float,
    seconds: float,
    clients: int,
    workers: int,
    seed: int,
) -> dict[str, Any]:
    import httpx
    import orjson
    import redis

    view = plan.views[0]
    rng = np.random.default_rng(seed + 1)
    total = calls + warmup
    bodies = [orjson.dumps({"view": view.name, "entities": [e]}) for e in rng.integers(1, entities + 1, total).tolist()]
    raw = redis.Redis.from_url(url, socket_timeout=2.0)
    with (
        tempfile.TemporaryDirectory(prefix="tenx-bench-serve-") as folder,
        served(url, plan, Path(folder), workers) as (base, pid),
    ):
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=base, timeout=5.0) as http:
            first = http.post("/features", content=bodies[0], headers=headers)
            check(first.status_code == 200, f"POST /features answered {first.status_code}: {first.text}")
            answer = first.json()["results"][0]
            check(answer["status"] == "found" and len(answer["values"]) == 20, f"unexpected answer {answer}")

            def post(i: int) -> None:
                response = http.post("/features", content=bodies[i], headers=headers)
                if response.status_code != 200:
                    raise SystemExit(f"POST /features answered {response.status_code}: {response.text}")

            def live(i: int) -> None:
                if http.get("/health/live").status_code != 200:
                    raise SystemExit("GET /health/live failed")

            print(f"  HTTP sequential: {calls:,} requests each ...", file=sys.stderr)
            sequential = latencies({"http_live": live, "http_features_1": post}, calls, warmup, cap_s)

        loads: dict[str, Any] = {}
        for name, path, load_bodies, loadgen in (
            ("live_socket", "/health/live", None, "socket"),
            ("features_1_socket", "/features", bodies, "socket"),
            ("features_1_httpx", "/features", bodies, "httpx"),
        ):
            print(f"  HTTP {clients} {loadgen} clients on {path} for {seconds:.0f} s ...", file=sys.stderr)
            server_cpu, own_cpu, redis_cpu = proc_cpu_s(pid), time.process_time(), redis_cpu_s(raw)
            result = throughput(base, path, load_bodies, clients, seconds, loadgen)
            wall = seconds + 1.0  # the window plus the warm-up second
            result["server_cpu_pct"] = 100 * (proc_cpu_s(pid) - server_cpu) / wall
            result["loadgen_cpu_pct"] = 100 * (time.process_time() - own_cpu) / wall
            result["redis_cpu_pct"] = 100 * (redis_cpu_s(raw) - redis_cpu) / wall
            loads[name] = result
    raw.close()
    return {"sequential": sequential, "concurrent": loads, "clients": clients, "workers": workers, "seconds": seconds}


# -- report -------------------------------------------------------------------------------


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=100_000, help="Entities materialized and looked up.")
    parser.add_argument("--calls", type=int, default=5_000, help="Timed calls per latency figure.")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="Untimed calls before each latency figure.")
    parser.add_argument("--repeat", type=int, default=3, help="Materialize runs (the median is reported).")
    parser.add_argument("--http-seconds", type=float, default=10.0, help="Duration of each concurrent HTTP load.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent keep-alive HTTP clients.")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of `tenx serve`.")
    parser.add_argument("--cap-s", type=float, default=120.0, help="Wall-clock cap of each latency measurement.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "online.json", help="Results JSON file.")
    args = _smoke.parse_arguments(
        parser,
        lambda folder: {
            "entities": 1_000,
            "calls": 100,
            "warmup": 50,
            "repeat": 1,
            "http_seconds": 1.0,
            "clients": 2,
            "cap_s": 30.0,
            "out": folder / "online.json",
        },
    )
    url = os.environ.get("TENX_REDIS_URL")
    if not url:
        raise SystemExit('TENX_REDIS_URL is not set; start Redis with: eval "$(scripts/services up --only redis)"')
    if args.calls < 100 or args.entities < 100 or args.warmup < 0:
        raise SystemExit("--calls and --entities must be at least 100, --warmup at least 0")

    import redis

    from featurestore.stores.codec import online_key
    from featurestore.stores.offline import DeltaOfflineStore

    plan = bench_plan()
    view, view32 = plan.views
    serve_prefix = serving_prefix(url, plan)
    admin = redis.Redis.from_url(url, socket_timeout=10)
    server_info = admin.info("server")
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    folder = Path(tempfile.mkdtemp(prefix="tenx-bench-online-"))
    try:
        print(f"preparing {args.entities:,} entities x 20 float64 (and float32) features ...", file=sys.stderr)
        rows = changelog(view, args.entities, now_us, args.seed)
        rows32 = changelog(view32, args.entities, now_us, args.seed)
        offline = DeltaOfflineStore(folder / "offline")
        first = int(rows.column(AS_OF).cast(pa.int64()).to_numpy().min())
        delta_s, _ = timed(lambda: offline.write_changelog(view, [rows], start=first, end=now_us))
        offline.write_changelog(view32, [rows32], start=first, end=now_us)
        print("materialize ...", file=sys.stderr)
        materialized = part_materialize(url, view, rows, offline, args.repeat, serve_prefix, RAW_PREFIX)
        print("materialize, float32 ...", file=sys.stderr)
        materialized32 = part_materialize(url, view32, rows32, offline, args.repeat, serve_prefix, RAW32_PREFIX)
        print("lookups ...", file=sys.stderr)
        lookups = part_lookups(url, plan, serve_prefix, args.entities, args.calls, args.warmup, args.cap_s, args.seed)
        print("HTTP API ...", file=sys.stderr)
        http = part_http(
            url,
            plan,
            args.entities,
            args.calls,
            args.warmup,
            args.cap_s,
            args.http_seconds,
            args.clients,
            args.workers,
            args.seed,
        )
    finally:
        for pattern in (
            online_key(view, "*", prefix=serve_prefix).decode(),
            online_key(view, "*", prefix=WRITE_PREFIX).decode(),
            online_key(view32, "*", prefix=serve_prefix).decode(),
            online_key(view32, "*", prefix=WRITE_PREFIX).decode(),
            f"{RAW_PREFIX}:*",
            f"{RAW32_PREFIX}:*",
        ):
            unlink_matching(admin, pattern)
        admin.close()
        shutil.rmtree(folder, ignore_errors=True)

    # -- print ----------------------------------------------------------------------------
    ms = "{:.3f}".format
    raw_get, raw_mget = lookups["raw_get"], lookups["raw_mget_100"]
    seq = http["sequential"]
    lines: list[tuple[str, ...]] = [("latency (ms)", "calls", "p50", "p95", "p99", "p99 vs raw")]
    for label, key, source, baseline in (
        ("redis-py GET, 1 key (raw)", "raw_get", lookups, raw_get),
        ("FeatureClient.get, 1 entity", "client_1", lookups, raw_get),
        ("redis-py MGET, 100 keys (raw)", "raw_mget_100", lookups, raw_mget),
        ("FeatureClient.get, 100 entities", "client_100", lookups, raw_mget),
        ("redis-py MGET, 100 float32 values (raw)", "raw_mget_100_float32", lookups, lookups["raw_mget_100_float32"]),
        ("FeatureClient.get, 100 entities, float32", "client_100_float32", lookups, lookups["raw_mget_100_float32"]),
        ("HTTP GET /health/live (floor)", "http_live", seq, raw_get),
        ("HTTP POST /features, 1 entity", "http_features_1", seq, raw_get),
    ):
        s = source[key]
        lines.append(
            (
                label,
                f"{s['calls']:,}",
                ms(s["p50_ms"]),
                ms(s["p95_ms"]),
                ms(s["p99_ms"]),
                f"{s['p99_ms'] / baseline['p99_ms']:.2f}x {'GET' if baseline is raw_get else 'MGET'}",
            )
        )
    conc = http["concurrent"]
    load_lines: list[tuple[str, ...]] = [
        (f"{http['clients']} keep-alive clients", "req/s", "errors", "server CPU", "loadgen CPU", "redis CPU")
    ]
    for label, key in (
        ("GET /health/live, socket client (floor)", "live_socket"),
        ("POST /features 1 entity, socket client", "features_1_socket"),
        ("POST /features 1 entity, httpx client", "features_1_httpx"),
    ):
        c = conc[key]
        load_lines.append(
            (
                label,
                f"{c['requests_per_s']:,.0f}",
                f"{c['errors']:,}",
                f"{c['server_cpu_pct']:.0f}%",
                f"{c['loadgen_cpu_pct']:.0f}%",
                f"{c['redis_cpu_pct']:.0f}%",
            )
        )
    med = materialized["median_s"]
    n = materialized["entities"]
    mat_lines: list[tuple[str, ...]] = [(f"load {n:,} entities", "median s", "entities/s", "vs raw SET", "runs s")]
    for label, key, result in (
        ("tenx materialize (Delta -> Redis)", "materialize", materialized),
        ("  part: latest_rows (Delta read)", "delta_read", materialized),
        ("  part: RedisOnlineStore.write", "store_write", materialized),
        ("redis-py pipelined SET (raw)", "raw_set", materialized),
        ("tenx materialize, float32 view", "materialize", materialized32),
    ):
        median = result["median_s"]
        mat_lines.append(
            (
                label,
                f"{median[key]:.2f}",
                f"{n / median[key]:,.0f}",
                f"{median[key] / median['raw_set']:.1f}x",
                " ".join(f"{v:.2f}" for v in result["runs_s"][key]),
            )
        )
    wide, narrow = lookups["client_100"], lookups["client_100_float32"]
    raw_wide, raw_narrow = raw_mget, lookups["raw_mget_100_float32"]
    storage_lines: list[tuple[str, ...]] = [
        ("20 features per entity", "bytes a value", "client 100 p50", "client 100 p99", "raw MGET p99", "vs raw")
    ]
    for label, size, client, baseline in (
        ("float64", materialized["value_bytes"], wide, raw_wide),
        ("float32", materialized32["value_bytes"], narrow, raw_narrow),
    ):
        storage_lines.append(
            (
                label,
                f"{size}",
                ms(client["p50_ms"]),
                ms(client["p99_ms"]),
                ms(baseline["p99_ms"]),
                f"{client['p99_ms'] / baseline['p99_ms']:.2f}x",
            )
        )

    redis_version = server_info.get("redis_version", "?")
    print(
        f"\nonline benchmark: {n:,} entities x 20 float64 features ({materialized['value_bytes']} bytes a value), "
        f"Redis {redis_version} at {url}, {os.cpu_count()} CPUs (Delta changelog write {delta_s:.1f} s)\n"
    )
    print(table(lines) + "\n")
    print(table(storage_lines) + "\n")
    print(table(load_lines) + "\n")
    print(table(mat_lines) + "\n")

    targets = {
        "client_p99_1_entity_le_1.5x_raw_get": lookups["client_1"]["p99_ms"] <= 1.5 * raw_get["p99_ms"],
        "client_p99_100_entities_le_1.5x_raw_mget": lookups["client_100"]["p99_ms"] <= 1.5 * raw_mget["p99_ms"],
        "client_p99_100_float32_le_1.5x_raw_mget": narrow["p99_ms"] <= 1.5 * raw_narrow["p99_ms"],
        "http_p99_1_entity_le_3ms": seq["http_features_1"]["p99_ms"] <= 3.0,
        f"http_ge_1500_rps_{http['clients']}_clients": conc["features_1_socket"]["requests_per_s"] >= 1500,
        f"materialize_{n // 1000}k_le_3s": med["materialize"] <= 3.0,
    }
    print("targets: " + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in targets.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "entities": n,
                "features": 20,
                "value_bytes": materialized["value_bytes"],
                "calls": args.calls,
                "warmup": args.warmup,
                "serve_prefix": serve_prefix,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "redis": redis_version},
                "materialize": materialized,
                "float32": {
                    "value_bytes": materialized32["value_bytes"],
                    "materialize": materialized32,
                    "client_100": narrow,
                    "raw_mget_100": raw_narrow,
                },
                "delta_changelog_write_s": delta_s,
                "lookups": lookups,
                "http": http,
                "targets": targets,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
