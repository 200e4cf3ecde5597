"""Stream job benchmark: demo events from Kafka into Redis, against raw consumers.

The `tenx stream` dataflow as the CLI wires it (`build_dataflow` with Emit.LATEST,
drain=False, `kafka_messages` (tenx's KafkaSource, batches of up to 5000), 4 shards,
`OnlineSink` into a real Redis), on the template repo's `user_spend` view (3 windows
x 8 aggregations = 20 features; `--both-views` adds `merchant_sales`). Dead letters and
late events go to counting sinks instead of Kafka topics (the demo data has none of
either: both counts are checked to be 0). Measured in one run, against one Kafka and
one Redis (TENX_KAFKA_BOOTSTRAP and TENX_REDIS_URL, required:
`eval "$(scripts/services up)"`):

- throughput: N demo events (tenx.demo_data, JSON with an isoformat event_time, as the
  integration tests encode them, keyed by user_id) produced to a fresh topic, then the
  bounded job (tail=False: it ends at the end of the topic) with 1 worker and with 2
  (cluster_main, worker_count_per_proc): events/s from the first message consumed to
  the last Redis write, rows written, CPU used. Beside it, in the same run: the raw
  consume rate of the same topic with the same client and the same consumer settings
  as the job's KafkaSource (confluent_kafka, one assigned consumer per partition,
  consume(5000)): plain consume + orjson decode, and the same plus one pipelined Redis
  SET per message (the floor of any job that writes every event somewhere). The raw
  figures run from the first message to the last one decoded: the end-of-partition
  report comes one broker fetch.wait.max.ms (50 ms) later and is not counted, as the
  job's last write does not wait for it either. The raw consume runs 3 times (the
  median is shown).
- partitions: the same throughput runs on a topic of `--multi-partitions` (3)
  partitions, the events keyed by user as `tenx demo-data --to-kafka` sends them: the
  job reads the partitions at different paces (a batch of each in turn), so a
  watermark that followed the fastest partition would send most events to the late
  output; checked 0 late, every key written, beside the raw consume of that topic.
- freshness: events produced at a fixed offered rate (default half the 1-worker rate
  measured above, capped at half the target) for `--fresh-seconds`, with event_time =
  now, while the job tails a fresh topic in a subprocess; freshness of each written row
  is the Redis write time minus its as_of (= its newest event time), p50/p99. Beside
  it: a raw tail consumer (consume + decode + pipelined SET per batch) on another fresh
  topic at the same rate, its freshness per message. Each tail process is stopped once
  the last produced event is written (or a wall-clock cap), then killed if need be.
  The p99 of each 5 s slice of the timed phase is shown too (a drift would show a
  cost that grows with the state).
- profile: cProfile of the bounded 1-worker job on `--profile-events` events (run_main
  in the profiled thread), top functions by own time, and the time of the pipeline's
  stages (cumulative time of the step functions: Kafka source, decode + validate, row
  transform, state, online sink).

Every job and consumer runs in its own process (`--part`); every phase has a
wall-clock cap; only localhost traffic; every topic and Redis key created is deleted
at the end. Prints tables, the targets as met/MISSED, and writes
bench/results/stream.json (or --out).

    eval "$(scripts/services up)"
    python bench/stream.py                        # 100k events, 1 partition
    python bench/stream.py --events 20000 --fresh-seconds 5 --profile-events 10000   # quick
    python bench/stream.py --smoke                # under a minute; JSON in a temp folder (CI)
    scripts/services down                         # only if you started them
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import platform
import pstats
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _smoke
from _redis_keys import unlink_matching

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REPO = ROOT / "tenx" / "templates" / "repo"
BATCH = 5000  # kafka_messages' default batch (what `tenx stream` uses)
SHARDS = 4  # `tenx stream --shards` default
TARGET_EVENTS_S = 50_000
TARGET_P99_MS = 250.0


# -- helpers --------------------------------------------------------------------------------


def check(condition: bool, message: str) -> None:
    """A sanity check that stays under `python -O`."""
    if not condition:
        raise SystemExit(f"check failed: {message}")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def watchdog(seconds: float) -> None:
    """Exit the process hard after `seconds` (a child's own wall-clock cap)."""

    def expire() -> None:
        print(f"wall-clock cap of {seconds:.0f} s reached", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def kafka_config(bootstrap: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 5000, "log_level": 3}


def consumer_config(bootstrap: str, *, tail: bool) -> dict[str, Any]:
    """What `pipelines.stream.dataflow.KafkaSource` gives each partition's consumer."""
    return {
        "bootstrap.servers": bootstrap,
        "group.id": "tenx-stream",
        "enable.auto.commit": False,
        "enable.partition.eof": not tail,
        "socket.connection.setup.timeout.ms": 5000,
        "session.timeout.ms": 10000,
        "fetch.wait.max.ms": 50,
    }


def create_topic(admin: Any, topic: str, partitions: int, cap_s: float = 30.0) -> None:
    from confluent_kafka.cimpl import NewTopic  # .admin re-exports it implicitly

    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    futures[topic].result(timeout=cap_s)
    deadline = time.monotonic() + cap_s
    while True:  # the broker's metadata can lag a moment behind the controller
        meta = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if (
            meta is not None
            and meta.error is None
            and len(meta.partitions) == partitions
            and all(p.leader >= 0 and p.error is None for p in meta.partitions.values())
        ):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"topic {topic} not ready {cap_s:.0f} s after creation")
        time.sleep(0.05)


def count_matching(client: Any, pattern: str) -> int:
    return sum(1 for _ in client.scan_iter(match=pattern, count=10_000))


def load_plan() -> Any:
    from featurestore.plan import compile_repo

    return compile_repo(REPO, project="bench", modules=["features"])


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


def iso_us(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return round(moment.timestamp() * 1_000_000)


class Samples:
    """Reads the `as_of_us write_us` lines that tail processes append to files named
    `{base}*`, incrementally (complete lines only)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.offsets: dict[Path, int] = {}
        self.parts: list[np.ndarray] = []
        self.newest = -1

    def read(self) -> int:
        """Read what was appended since the last call; the number of new samples."""
        new = 0
        for path in sorted(self.base.parent.glob(self.base.name + "*")):
            with path.open("rb") as handle:
                handle.seek(self.offsets.get(path, 0))
                data = handle.read()
            end = data.rfind(b"\n") + 1
            if end == 0:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + end
            values = np.array(data[:end].split(), dtype=np.int64).reshape(-1, 2)
            self.parts.append(values)
            self.newest = max(self.newest, int(values[:, 0].max()))
            new += len(values)
        return new

    def all(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros((0, 2), dtype=np.int64)


# -- events ---------------------------------------------------------------------------------


def demo_rows(events: int, users: int, merchants: int, days: int, seed: int) -> list[dict[str, Any]]:
    """Demo transactions in log order, event_time as isoformat (as the tests send them)."""
    import pyarrow as pa

    from tenx.demo_data import DemoConfig, generate

    config = DemoConfig(events=events, users=users, merchants=merchants, days=days, seed=seed, chunk_rows=events)
    rows = pa.concat_tables(list(generate(config))).to_pylist()
    for row in rows:
        row["event_time"] = row["event_time"].isoformat()
    return rows


def produce_all(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]], cap_s: float) -> float:
    """Produce every (key, value); the seconds until all are acknowledged."""
    from confluent_kafka import Producer

    producer = Producer({**kafka_config(bootstrap), "linger.ms": 20, "queue.buffering.max.messages": 500_000})
    began = time.perf_counter()
    deadline = began + cap_s
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
                if time.perf_counter() > deadline:
                    raise SystemExit(f"producing to {topic} took over {cap_s:.0f} s") from None
        producer.poll(0)
    left = producer.flush(max(1.0, deadline - time.perf_counter()))
    check(left == 0, f"{left} messages to {topic} not delivered")
    return time.perf_counter() - began


def produce_at_rate(
    bootstrap: str,
    topic: str,
    rows: list[dict[str, Any]],
    rate: float,
    seconds: float,
    ready: Callable[[], bool],
    warm_cap_s: float,
) -> dict[str, Any]:
    """Warm up (one event every 50 ms until `ready()`), then produce demo rows (cycled)
    with event_time = now at `rate` events/s for `seconds`. Event times strictly
    increase, so the last event's row is the last row the job writes."""
    from confluent_kafka import Producer

    producer = Producer({**kafka_config(bootstrap), "linger.ms": 1})
    last_us = 0
    index = 0

    def send() -> int:
        nonlocal last_us, index
        row = rows[index % len(rows)]
        index += 1
        us = max(time.time_ns() // 1000, last_us + 1)
        last_us = us
        payload = {**row, "event_time": iso(us)}
        while True:
            try:
                producer.produce(topic, _dumps(payload), key=str(row["user_id"]).encode())
                return us
            except BufferError:
                producer.poll(0.01)

    deadline = time.perf_counter() + warm_cap_s
    while not ready():
        if time.perf_counter() > deadline:
            raise SystemExit(f"the job wrote nothing within {warm_cap_s:.0f} s of warm-up events")
        send()
        producer.poll(0)
        time.sleep(0.05)
    producer.flush(5)
    time.sleep(0.5)

    cpu = time.process_time()
    began = time.perf_counter()
    first_us = time.time_ns() // 1000
    sent = 0
    while True:
        elapsed = time.perf_counter() - began
        if elapsed >= seconds:
            break
        due = int(rate * elapsed)
        while sent < due:
            send()
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    left = producer.flush(10)
    check(left == 0, f"{left} messages to {topic} not delivered")
    wall = time.perf_counter() - began
    return {
        "first_us": first_us,
        "last_us": last_us,
        "events": sent,
        "offered_rate": sent / seconds,
        "seconds": seconds,
        "producer_cpu_pct": 100 * (time.process_time() - cpu) / wall,
    }


def _dumps(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)


# -- child parts ----------------------------------------------------------------------------


def part_consume(args: argparse.Namespace) -> dict[str, Any]:
    """Raw baseline: the topic with the job's consumer settings, one assigned
    consumer per partition polled in turn, consume(1000) + orjson decode; with --redis,
    also one pipelined SET per message (key by user_id) per batch. Bounded: until every
    partition reports EOF. With --samples (tail mode): runs until killed, appending
    `as_of_us write_us` per message."""
    import orjson
    import redis
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
    from confluent_kafka.admin import AdminClient

    tail = args.samples is not None
    meta = AdminClient(kafka_config(args.bootstrap)).list_topics(topic=args.topic, timeout=10).topics[args.topic]
    consumers = []
    for partition in sorted(meta.partitions):
        consumer = Consumer(consumer_config(args.bootstrap, tail=tail))
        consumer.assign([TopicPartition(args.topic, partition, OFFSET_BEGINNING)])
        consumers.append(consumer)
    client = redis.Redis.from_url(args.redis_url, socket_timeout=10) if args.prefix else None
    out = Path(args.samples).open("a") if tail else None  # noqa: SIM115 (closed by os._exit/kill)
    prefix = args.prefix
    live = set(range(len(consumers)))
    events = errors = 0
    first: float | None = None
    last = 0.0
    cpu = cpu_s()
    while live:
        for index in list(live):
            messages = consumers[index].consume(BATCH, 0.05)
            if not messages:
                continue
            if first is None:
                first = time.time()
            records = []
            values = []
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        live.discard(index)
                        break
                    errors += 1
                    continue
                value = message.value() or b""
                records.append(orjson.loads(value))
                values.append(value)
            if not records:
                continue  # the end-of-partition report: the last message came before it
            events += len(records)
            if client is not None:
                pipe = client.pipeline(transaction=False)
                for record, value in zip(records, values, strict=True):
                    pipe.set(f"{prefix}:{record['user_id']}", value)
                pipe.execute()
            last = time.time()
            if out is not None:
                now_us = int(last * 1_000_000)
                out.write("".join(f"{iso_us(r['event_time'])} {now_us}\n" for r in records))
                out.flush()
    cpu = cpu_s() - cpu
    for consumer in consumers:
        consumer.close()
    return {"first": first, "last": last, "events": events, "errors": errors, "cpu_s": cpu}


class _Clock:
    """Shared by every worker thread of the job process: first message seen, last
    Redis write, counts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first: float | None = None
        self.events = 0
        self.last_write = 0.0
        self.rows = 0
        self.batches = 0

    def seen(self, batch: list[Any]) -> list[Any]:
        """A pass-through step right after the source: one call per batch of items
        (each item a consumed batch of messages)."""
        messages = sum(1 for item in batch for entry in item if isinstance(entry, tuple))  # not progress reports
        if messages:
            with self.lock:
                if self.first is None:
                    self.first = time.time()
                self.events += messages
        return batch


def part_job(args: argparse.Namespace) -> dict[str, Any]:
    """The tenx stream job, bounded (or tailing with --samples), in this process."""
    from bytewax import operators as op
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import cluster_main, run_main

    from pipelines.stream.dataflow import OnlineSink, Outputs, StoreFactory, build_dataflow, kafka_messages
    from pipelines.stream.state import Emit

    check(bool(args.redis_url), "the job part needs --redis-url (else it would write a SQLite file)")
    clock = _Clock()
    counts = {"dead_letters": 0, "late": 0}
    tail = args.samples is not None

    class TimedPartition(StatelessSinkPartition[Any]):
        """OnlineSink's partition, then the clock (and, tailing, one sample per row)."""

        def __init__(self, inner: Any, samples: Path | None) -> None:
            self.inner = inner
            self.out = samples.open("a") if samples is not None else None

        def write_batch(self, items: list[Any]) -> None:
            self.inner.write_batch(items)
            now = time.time()
            with clock.lock:
                clock.last_write = max(clock.last_write, now)
                clock.rows += sum(len(rows) for _, rows in items)
                clock.batches += 1
            if self.out is not None:
                now_us = int(now * 1_000_000)
                self.out.write("".join(f"{as_of} {now_us}\n" for _, rows in items for as_of in rows.as_of.tolist()))
                self.out.flush()

        def close(self) -> None:
            self.inner.close()
            if self.out is not None:
                self.out.close()

    class TimedSink(DynamicSink[Any]):
        def __init__(self, inner: OnlineSink, samples: str | None) -> None:
            self.inner = inner
            self.samples = samples

        def build(self, step_id: str, worker_index: int, worker_count: int) -> TimedPartition:
            path = Path(f"{self.samples}.{step_id}.{worker_index}") if self.samples else None
            return TimedPartition(self.inner.build(step_id, worker_index, worker_count), path)

    class CountPartition(StatelessSinkPartition[Any]):
        def __init__(self, name: str) -> None:
            self.name = name

        def write_batch(self, items: list[Any]) -> None:
            with clock.lock:
                counts[self.name] += len(items)

    class CountSink(DynamicSink[Any]):
        def __init__(self, name: str) -> None:
            self.name = name

        def build(self, step_id: str, worker_index: int, worker_count: int) -> CountPartition:
            return CountPartition(self.name)

    plan = load_plan()
    source = dataclasses.replace(plan.source("transactions"), topic=args.topic)
    views = ["user_spend", "merchant_sales"] if args.both_views else ["user_spend"]

    def messages(flow: Any, _: Any) -> Any:
        stream = kafka_messages(flow, source, args.bootstrap, tail=tail)
        return op.flat_map_batch("bench_clock", stream, clock.seen)

    online = OnlineSink(StoreFactory(args.redis_url, None, prefix=args.prefix), plan.views)
    flow = build_dataflow(
        plan,
        messages,
        Outputs(TimedSink(online, args.samples), CountSink("dead_letters"), CountSink("late")),
        views=views,
        shards=args.shards,
        drain=False,
        emit=Emit.LATEST,
    )
    epoch = timedelta(seconds=5)  # `tenx stream --snapshot-interval` default
    began = time.time()
    cpu = cpu_s()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run_main(flow, epoch_interval=epoch)
        profiler.disable()
        profiler.dump_stats(args.profile)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=args.workers, epoch_interval=epoch)
    ended = time.time()
    return {
        "started": began,
        "first": clock.first,
        "last_write": clock.last_write,
        "ended": ended,
        "events": clock.events,
        "rows": clock.rows,
        "write_batches": clock.batches,
        "cpu_s": cpu_s() - cpu,
        **counts,
    }


PARTS = {"consume": part_consume, "job": part_job}
# Pipeline stages in the profile: (file, function) whose cumulative time is the stage's.
STAGES = {
    "Kafka source (KafkaSource next_batch)": ("pipelines/stream/sources.py", "next_batch"),
    "decode + validate (orjson, validate_records)": ("pipelines/stream/dataflow.py", "decode"),
    "row transform + shard split (pandas -> EventBatch)": ("pipelines/stream/dataflow.py", "to_events"),
    "state (LatestState.step)": ("pipelines/stream/dataflow.py", "on_batch"),
    "  of which fold (tiles)": ("pipelines/stream/tiles.py", "fold"),
    "  of which evaluate (rows' values)": ("pipelines/stream/tiles.py", "_evaluate"),
    "  of which forget (old tiles)": ("pipelines/stream/tiles.py", "_forget"),
    "online sink (encode_columns + Redis write)": ("pipelines/stream/dataflow.py", "write_batch"),
}


def child_command(part: str, args: argparse.Namespace, **options: Any) -> list[str]:
    command = [sys.executable, __file__, "--part", part, "--bootstrap", args.bootstrap]
    if args.redis_url:
        command += ["--redis-url", args.redis_url]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value not in (None, False):
            command += [flag, str(value)]
    return command


def child(part: str, args: argparse.Namespace, cap_s: float, **options: Any) -> dict[str, Any]:
    """Run a bounded part in a fresh process; its JSON line plus the process wall time."""
    command = child_command(part, args, max_s=cap_s, **options)
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=cap_s + 30)
    except subprocess.TimeoutExpired as error:
        raise SystemExit(f"{part} {options} ran past its cap of {cap_s:.0f} s") from error
    if done.returncode != 0:
        raise SystemExit(f"{part} {options} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - began
    return result


def stop(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


# -- phases (parent) ------------------------------------------------------------------------


def freshness(
    args: argparse.Namespace,
    part: str,
    topic: str,
    rows: list[dict[str, Any]],
    rate: float,
    folder: Path,
    **options: Any,
) -> dict[str, Any]:
    """Tail `topic` with `part` in a subprocess while producing at `rate`; freshness of
    every sample written for an event of the timed phase."""
    base = folder / f"samples-{part}-{uuid.uuid4().hex[:6]}"
    samples = Samples(base)
    cap = args.warm_cap_s + args.fresh_seconds + args.drain_cap_s + 60
    log_path = folder / f"log-{base.name}.txt"
    log = log_path.open("wb")
    process = subprocess.Popen(
        child_command(part, args, topic=topic, samples=base, max_s=cap, **options), stdout=log, stderr=log
    )
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"{part} exited early:\n{log_path.read_text()[-4000:]}")
            return samples.read() > 0

        produced = produce_at_rate(args.bootstrap, topic, rows, rate, args.fresh_seconds, ready, args.warm_cap_s)
        began = time.perf_counter()
        while samples.newest < produced["last_us"] and time.perf_counter() - began < args.drain_cap_s:
            if process.poll() is not None:
                break
            samples.read()
            time.sleep(0.05)
        samples.read()
        drained = samples.newest >= produced["last_us"]
        drain_s = time.perf_counter() - began
    finally:
        stop(process)
        log.close()
    samples.read()
    data = samples.all()
    timed = data[data[:, 0] >= produced["first_us"]]
    lag_ms = (timed[:, 1] - timed[:, 0]) / 1000.0
    check(len(lag_ms) > 0, f"{part}: no sample for the timed events")
    slice_of = (timed[:, 0] - produced["first_us"]) // 5_000_000
    slices = [
        float(np.percentile(lag_ms[slice_of == i], 99)) if (slice_of == i).any() else float("nan")
        for i in range(int(slice_of.max()) + 1)
    ]
    return {
        "p99_per_5s_ms": slices,
        **produced,
        "samples": len(lag_ms),
        "p50_ms": float(np.percentile(lag_ms, 50)),
        "p99_ms": float(np.percentile(lag_ms, 99)),
        "max_ms": float(lag_ms.max()),
        "drained": drained,
        "drain_s": drain_s,
    }


def profile_top(path: Path, count: int) -> dict[str, Any]:
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = []
    for (filename, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.replace(str(ROOT) + "/", "")
        if "site-packages/" in short:
            short = short.split("site-packages/", 1)[1]
        entries.append(
            {"function": f"{short}:{line}({function})", "calls": calls, "tottime_s": own, "cumtime_s": cumulative}
        )
    by_own = sorted(entries, key=lambda e: e["tottime_s"], reverse=True)[:count]
    by_cumulative = sorted(entries, key=lambda e: e["cumtime_s"], reverse=True)[: 3 * count]
    stages: dict[str, float] = {}
    for stage, (where, function) in STAGES.items():
        found = [e["cumtime_s"] for e in entries if where in e["function"] and e["function"].endswith(f"({function})")]
        if found:
            stages[stage] = max(found)
    return {"total_s": total, "top_tottime": by_own, "top_cumtime": by_cumulative, "stages_s": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="Demo events produced for the throughput runs.")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--merchants", type=int, default=1_000)
    parser.add_argument("--days", type=int, default=7, help="Event-time span of the demo events.")
    parser.add_argument("--partitions", type=int, default=1, help="Partitions of each topic.")
    parser.add_argument(
        "--multi-partitions",
        type=int,
        default=3,
        help="Also run the throughput jobs on a topic of this many partitions (same events, keyed by user; 0: skip).",
    )
    parser.add_argument("--both-views", action="store_true", help="Run user_spend and merchant_sales (default: 1).")
    parser.add_argument("--rate", type=float, default=None, help="Offered rate of the freshness runs (events/s).")
    parser.add_argument("--rate-cap", type=float, default=TARGET_EVENTS_S / 2, help="Cap of the default rate.")
    parser.add_argument("--fresh-seconds", type=float, default=15.0, help="Timed produce phase of each freshness run.")
    parser.add_argument("--drain-cap-s", type=float, default=30.0, help="Wait for the lag to drain at most this.")
    parser.add_argument("--warm-cap-s", type=float, default=60.0, help="Wait for a tail job's first write at most.")
    parser.add_argument("--profile-events", type=int, default=50_000, help="Events of the profiled run (0: skip).")
    parser.add_argument("--cap-s", type=float, default=600.0, help="Wall-clock cap of each bounded run.")
    parser.add_argument("--shards", type=int, default=SHARDS, help="State shards per view (`tenx stream --shards`).")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "stream.json", help="Results JSON file.")
    # child parts
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--samples", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--max-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = _smoke.parse_arguments(
        parser,
        lambda folder: {
            "events": 1_000,
            "users": 100,
            "merchants": 20,
            "days": 1,
            "rate": 500.0,
            "fresh_seconds": 2.0,
            "drain_cap_s": 15.0,
            "warm_cap_s": 30.0,
            "profile_events": 1_000,
            "cap_s": 60.0,
            "out": folder / "stream.json",
        },
    )

    if args.part:  # a child process: print one JSON line
        watchdog(args.max_s)
        print(json.dumps(PARTS[args.part](args)), flush=True)
        return

    args.bootstrap = os.environ.get("TENX_KAFKA_BOOTSTRAP")
    url = args.redis_url = os.environ.get("TENX_REDIS_URL")
    if not args.bootstrap or not url:
        raise SystemExit('TENX_KAFKA_BOOTSTRAP / TENX_REDIS_URL not set; start them: eval "$(scripts/services up)"')
    if args.events < 1000:
        raise SystemExit("--events must be at least 1000")

    import redis
    from confluent_kafka.admin import AdminClient

    from featurestore.stores.codec import decode, online_keys

    plan = load_plan()
    view = plan.view("user_spend")
    views = ["user_spend", "merchant_sales"] if args.both_views else ["user_spend"]
    admin = AdminClient(kafka_config(args.bootstrap))
    client = redis.Redis.from_url(url, socket_timeout=10)
    run_id = uuid.uuid4().hex[:8]
    topics: list[str] = []
    patterns: list[str] = []

    def new_topic(name: str, partitions: int | None = None) -> str:
        topic = f"tenxbench-stream-{run_id}-{name}"
        create_topic(admin, topic, partitions or args.partitions)
        topics.append(topic)
        return topic

    def new_prefix(name: str) -> str:
        prefix = f"tenxbench-stream:{run_id}:{name}"
        patterns.append(f"{prefix}:*")
        return prefix

    folder = Path(tempfile.mkdtemp(prefix="tenx-bench-stream-"))
    results: dict[str, Any] = {}
    try:
        print(f"generating {args.events:,} demo events ...", file=sys.stderr)
        began = time.perf_counter()
        rows = demo_rows(args.events, args.users, args.merchants, args.days, args.seed)
        payloads = [(str(r["user_id"]).encode(), _dumps(r)) for r in rows]
        generate_s = time.perf_counter() - began
        users = len({r["user_id"] for r in rows})
        merchants = len({r["merchant_id"] for r in rows if r["amount"] > 0})
        keys_expected = users + (merchants if args.both_views else 0)

        topic = new_topic("main")
        print(f"producing to {topic} ...", file=sys.stderr)
        produce_s = produce_all(args.bootstrap, topic, payloads, args.cap_s)

        print("raw consume (3 runs) ...", file=sys.stderr)
        raw_runs = [child("consume", args, args.cap_s, topic=topic) for _ in range(3)]
        for run in raw_runs:
            check(run["events"] == args.events and run["errors"] == 0, f"raw consume read {run['events']} events")
        raw = sorted(raw_runs, key=lambda r: r["last"] - r["first"])[1]
        print("raw consume + Redis SET ...", file=sys.stderr)
        raw_set = child("consume", args, args.cap_s, topic=topic, prefix=new_prefix("rawset"))
        check(raw_set["events"] == args.events, f"raw consume + SET read {raw_set['events']} events")

        jobs: dict[str, dict[str, Any]] = {}
        runs = [(topic, workers, f"tenx_{workers}w") for workers in (1, 2)]
        multi_raw: dict[str, Any] | None = None
        if args.multi_partitions and args.multi_partitions != args.partitions:
            # The watermark waits for the slowest partition: the same events over several
            # partitions (read at different paces) must give no late event and no slower job.
            many = args.multi_partitions
            multi = new_topic(f"p{many}", many)
            print(f"producing to {multi} ({many} partitions) ...", file=sys.stderr)
            produce_all(args.bootstrap, multi, payloads, args.cap_s)
            print(f"raw consume, {many} partitions ...", file=sys.stderr)
            multi_raw = child("consume", args, args.cap_s, topic=multi)
            check(multi_raw["events"] == args.events, f"raw consume read {multi_raw['events']} events")
            runs += [(multi, workers, f"tenx_{workers}w_{many}p") for workers in (1, 2)]
        for run_topic, workers, name in runs:
            print(f"tenx stream job, {workers} worker(s), bounded, {run_topic} ...", file=sys.stderr)
            prefix = new_prefix(name)
            job = child(
                "job",
                args,
                args.cap_s,
                topic=run_topic,
                prefix=prefix,
                workers=workers,
                both_views=args.both_views,
                shards=args.shards,
            )
            check(job["events"] == args.events, f"{name} consumed {job['events']} of {args.events} events")
            check(
                job["dead_letters"] == 0 and job["late"] == 0, f"{name}: {job['dead_letters']} dead, {job['late']} late"
            )
            job["keys"] = count_matching(client, f"{prefix}:*")
            check(job["keys"] == keys_expected, f"{name} left {job['keys']} keys, expected {keys_expected}")
            job["prefix"] = prefix
            jobs[name] = job
        # Same final as_of per user from 1 and 2 workers (a sample of users).
        sample = sorted({r["user_id"] for r in rows})[:: max(1, users // 500)]
        one, two = (client.mget(online_keys(view, sample, prefix=jobs[n]["prefix"])) for n in ("tenx_1w", "tenx_2w"))
        check(all(a and b for a, b in zip(one, two, strict=True)), "a sampled user has no value")
        same_as_of = [decode(view, a)[0] == decode(view, b)[0] for a, b in zip(one, two, strict=True)]
        check(all(same_as_of), "1 and 2 workers disagree on a user's final as_of")
        identical = sum(a == b for a, b in zip(one, two, strict=True)) / len(sample)

        profile: dict[str, Any] | None = None
        if args.profile_events:
            count = min(args.profile_events, args.events)
            print(f"profiled tenx job on {count:,} events ...", file=sys.stderr)
            ptopic = new_topic("profile")
            produce_all(args.bootstrap, ptopic, payloads[:count], args.cap_s)
            path = folder / "job.prof"
            run = child(
                "job",
                args,
                args.cap_s,
                topic=ptopic,
                prefix=new_prefix("profile"),
                profile=path,
                both_views=args.both_views,
                shards=args.shards,
            )
            profile = {"events": count, "run": run, **profile_top(path, 10)}

        rate_1w = args.events / (jobs["tenx_1w"]["last_write"] - jobs["tenx_1w"]["first"])
        rate = args.rate or min(args.rate_cap, rate_1w / 2)
        print(f"freshness at {rate:,.0f} events/s for {args.fresh_seconds:.0f} s: tenx job ...", file=sys.stderr)
        fresh_tenx = freshness(
            args,
            "job",
            new_topic("fresh-tenx"),
            rows,
            rate,
            folder,
            prefix=new_prefix("fresh"),
            both_views=args.both_views,
            shards=args.shards,
        )
        print(f"freshness at {rate:,.0f} events/s: raw consumer ...", file=sys.stderr)
        fresh_raw = freshness(
            args, "consume", new_topic("fresh-raw"), rows, rate, folder, prefix=new_prefix("fresh-raw")
        )
        results = {
            "raw_runs": raw_runs,
            "raw": raw,
            "raw_multi_partitions": multi_raw,
            "raw_set": raw_set,
            "jobs": jobs,
            "final_values_identical_1w_2w": identical,
            "profile": profile,
            "freshness": {"rate": rate, "tenx": fresh_tenx, "raw": fresh_raw},
        }
    finally:
        for pattern in patterns:
            unlink_matching(client, pattern)
        client.close()
        if topics:
            for future in admin.delete_topics(topics, operation_timeout=15).values():
                try:
                    future.result(timeout=30)
                except Exception as error:
                    print(f"could not delete a topic: {error}", file=sys.stderr)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()

    # -- print ----------------------------------------------------------------------------
    n = args.events

    def span(r: dict[str, Any], end: str) -> float:
        return float(r[end] - r["first"])

    raw_s = span(raw, "last")
    lines: list[tuple[str, ...]] = [
        ("throughput", "seconds", "events/s", "time vs raw", "rows written", "CPU s", "process s")
    ]
    entries = [
        ("raw consume + orjson (baseline)", raw, "last", "-"),
        ("raw consume + orjson + Redis SET", raw_set, "last", "-"),
        (f"tenx stream, 1 worker ({'+'.join(views)})", jobs["tenx_1w"], "last_write", None),
        (f"tenx stream, 2 workers ({'+'.join(views)})", jobs["tenx_2w"], "last_write", None),
    ]
    many = args.multi_partitions
    if multi_raw is not None:
        entries += [
            (f"raw consume + orjson, {many} partitions", multi_raw, "last", "-"),
            (f"tenx stream, 1 worker, {many} partitions", jobs[f"tenx_1w_{many}p"], "last_write", None),
            (f"tenx stream, 2 workers, {many} partitions", jobs[f"tenx_2w_{many}p"], "last_write", None),
        ]
    if profile is not None:
        entries.append(
            (f"  same, 1 worker, under cProfile ({profile['events'] // 1000}k)", profile["run"], "last_write", None)
        )
    for label, r, end, rows_cell in entries:
        events = profile["events"] if profile is not None and r is profile["run"] else n
        seconds = span(r, end)
        rate_vs = (seconds / events) / (raw_s / n)
        lines.append(
            (
                label,
                f"{seconds:.2f}",
                f"{events / seconds:,.0f}",
                f"{rate_vs:.1f}x" if r is not raw else "1.0x",
                rows_cell or f"{r['rows']:,}",
                f"{r['cpu_s']:.1f}",
                f"{r['process_wall_s']:.1f}",
            )
        )
    fr = results["freshness"]
    fresh_lines: list[tuple[str, ...]] = [
        (
            f"freshness at {fr['rate']:,.0f} events/s offered",
            "events",
            "samples",
            "p50 ms",
            "p99 ms",
            "max ms",
            "drained",
        )
    ]
    for label, r in (("raw consume + SET (baseline)", fr["raw"]), ("tenx stream, 1 worker", fr["tenx"])):
        fresh_lines.append(
            (
                label,
                f"{r['events']:,}",
                f"{r['samples']:,}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['max_ms']:.1f}",
                f"{'yes' if r['drained'] else 'NO'} ({r['drain_s']:.1f} s)",
            )
        )

    print(
        f"\nstream benchmark: {n:,} demo events ({users:,} users, {args.days} days), {args.partitions} partition(s), "
        f"views {', '.join(views)}, {os.cpu_count()} CPUs (generate {generate_s:.1f} s, "
        f"produce {produce_s:.1f} s = {n / produce_s:,.0f} events/s)\n"
    )
    print(table(lines) + "\n")
    print(table(fresh_lines))
    for label, r in (("raw", fr["raw"]), ("tenx", fr["tenx"])):
        print(f"  {label} p99 per 5 s slice (ms): " + " ".join(f"{v:.0f}" for v in r["p99_per_5s_ms"]))
    print()
    if profile is not None:
        prof: list[tuple[str, ...]] = [("profile: top 10 by own time", "calls", "tottime s", "cumtime s")]
        for entry in profile["top_tottime"]:
            prof.append(
                (entry["function"], f"{entry['calls']:,}", f"{entry['tottime_s']:.2f}", f"{entry['cumtime_s']:.2f}")
            )
        print(table(prof) + f"\n(profiled total {profile['total_s']:.1f} s)\n")
        total = profile["total_s"]
        stage_lines: list[tuple[str, ...]] = [("profile: stages (cumulative)", "seconds", "share")]
        for stage, seconds in profile["stages_s"].items():
            stage_lines.append((stage, f"{seconds:.2f}", f"{100 * seconds / total:.0f}%"))
        print(table(stage_lines) + "\n")

    rate_1w = n / span(jobs["tenx_1w"], "last_write")
    targets = {
        f"e2e_1_worker_ge_{TARGET_EVENTS_S // 1000}k_events_s": rate_1w >= TARGET_EVENTS_S,
        **(
            {
                f"e2e_1_worker_{many}_partitions_ge_{TARGET_EVENTS_S // 1000}k_events_s": n
                / span(jobs[f"tenx_1w_{many}p"], "last_write")
                >= TARGET_EVENTS_S
            }
            if multi_raw is not None
            else {}
        ),
        f"freshness_p99_le_{TARGET_P99_MS:.0f}ms_at_{fr['rate']:.0f}_events_s": fr["tenx"]["p99_ms"] <= TARGET_P99_MS
        and fr["tenx"]["drained"],
    }
    if fr["rate"] < TARGET_EVENTS_S / 2:
        print(
            f"note: freshness measured at {fr['rate']:,.0f} events/s "
            f"({'--rate' if args.rate else 'half the measured 1-worker rate'}), "
            f"not at the {TARGET_EVENTS_S // 2:,} events/s the target assumes"
        )
    print("targets: " + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in targets.items()))
    for job in jobs.values():
        job.pop("prefix", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "events": n,
                "users": users,
                "merchants": args.merchants,
                "days": args.days,
                "partitions": args.partitions,
                "views": views,
                "batch_size": BATCH,
                "shards": SHARDS,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "generate_s": generate_s,
                "produce_s": produce_s,
                "events_per_s": {
                    "raw_consume": n / raw_s,
                    "raw_consume_set": n / span(raw_set, "last"),
                    "tenx_1w": rate_1w,
                    "tenx_2w": n / span(jobs["tenx_2w"], "last_write"),
                    **{
                        name: n / span(job, "last_write")
                        for name, job in jobs.items()
                        if name not in ("tenx_1w", "tenx_2w")
                    },
                },
                **results,
                "targets": targets,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
