"""The Bytewax stream job built from a Plan: events in, fresh feature vectors out.

    source (Kafka | JSON-lines file | test list)
      -> decode + validate           bad record -> dead-letter output, with reason + offset
      -> per view: row transform + where on each micro-batch (the batch engine's code)
      -> key by shard (crc32(entity) % shards)
      -> ViewState per shard          tiles, watermark, expiry timers (pipelines.stream.state)
      -> rows -> online store          batched, ordered writes (newer-or-equal as_of wins)
      -> late events -> late output

Items crossing workers are plain tuples of ints, floats and strings (pickled one by one).
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from featurestore.plan.model import AS_OF, Plan, SourceSpec, ViewSpec
from featurestore.stores.online import OnlineStore
from featurestore.transforms import prepare_events
from pipelines.stream.metrics import METRICS
from pipelines.stream.state import Emit, Row, ViewState, events_from_frame
from schemas.validation import validate_record

# (partition, offset, raw bytes): what every source yields
Message = tuple[int, int, bytes]
PARTITION_BITS = 10  # sequence = offset << 10 | partition: log order within a partition


def sequence(partition: int, offset: int) -> int:
    return (offset << PARTITION_BITS) | partition


# -- sources -------------------------------------------------------------------------------


class _LinesPartition(StatefulSourcePartition[Message, int]):
    def __init__(self, path: Path, resume: int | None, batch_size: int) -> None:
        self._file = path.open("rb")
        self._offset = 0
        self._batch = batch_size
        for _ in range(resume or 0):
            self._file.readline()
            self._offset += 1

    def next_batch(self) -> list[Message]:
        out: list[Message] = []
        for _ in range(self._batch):
            line = self._file.readline()
            if not line:
                if not out:
                    raise StopIteration
                break
            if line.strip():
                out.append((0, self._offset, line.rstrip(b"\n")))
            self._offset += 1
        return out

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._file.close()


class JsonLinesSource(FixedPartitionedSource[Message, int]):
    """A JSON-lines file as a one-partition log (offset = line number): replay without
    Kafka, e.g. for the quickstart. Resumes from its snapshot."""

    def __init__(self, path: Path, batch_size: int = 1000) -> None:
        self.path = Path(path)
        self.batch_size = batch_size

    def list_parts(self) -> list[str]:
        return [str(self.path)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _LinesPartition:
        return _LinesPartition(self.path, resume_state, self.batch_size)


def kafka_messages(flow: Dataflow, source: SourceSpec, bootstrap: str, *, tail: bool, batch_size: int = 1000) -> Any:
    """The source's topic through Bytewax's Kafka connector (partitions spread over
    workers, offsets kept in the recovery store)."""
    from bytewax.connectors.kafka import KafkaSource

    kafka = KafkaSource(
        [bootstrap],
        [source.topic],
        tail=tail,
        add_config={"socket.connection.setup.timeout.ms": "5000", "session.timeout.ms": "10000"},
        batch_size=batch_size,
        raise_on_errors=False,
    )
    raw = op.input(f"kafka_{source.name}", flow, kafka)
    return op.map(f"messages_{source.name}", raw, _from_kafka)


def _from_kafka(message: Any) -> Message:
    if getattr(message, "error", None) is not None:
        return (-1, -1, orjson.dumps({"kafka_error": str(message.error)}))
    return (message.partition, message.offset, message.value or b"")


# -- sinks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreFactory:
    """How each worker opens the online store (a connection per worker)."""

    redis_url: str | None
    sqlite_path: Path | None
    prefix: str | None = None
    project: str | None = None

    def open(self) -> OnlineStore:
        from featurestore.stores.online import open_online_store

        if self.redis_url is None and self.sqlite_path is None:
            raise ValueError("no online store configured: give a Redis URL or an embedded store path")
        return open_online_store(
            redis_url=self.redis_url,
            sqlite_path=self.sqlite_path or Path(),
            project=self.project,
            prefix=self.prefix,
        )


class _OnlinePartition(StatelessSinkPartition[tuple[str, Row]]):
    def __init__(self, store: OnlineStore, views: dict[str, ViewSpec]) -> None:
        self.store = store
        self.views = views

    def write_batch(self, items: list[tuple[str, Row]]) -> None:
        by_view: dict[str, list[Row]] = {}
        for name, row in items:
            by_view.setdefault(name, []).append(row)
        for name, rows in by_view.items():
            view = self.views[name]
            self.store.write(view, rows_table(view, rows))
            now = time.time()
            for _, as_of, _ in rows:
                METRICS.freshness.observe(max(now - as_of / 1e6, 0.0))
            METRICS.rows_out.labels(name).inc(len(rows))

    def close(self) -> None:
        self.store.close()


class OnlineSink(DynamicSink[tuple[str, Row]]):
    """Rows into the online store, one store connection per worker, batched writes."""

    def __init__(self, factory: StoreFactory, views: Iterable[ViewSpec]) -> None:
        self.factory = factory
        self.views = {v.name: v for v in views}

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OnlinePartition:
        return _OnlinePartition(self.factory.open(), self.views)


class _JsonLinesPartition(StatelessSinkPartition[dict[str, Any]]):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")

    def write_batch(self, items: list[dict[str, Any]]) -> None:
        self._file.write(b"".join(orjson.dumps(item) + b"\n" for item in items))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class JsonLinesSink(DynamicSink[dict[str, Any]]):
    """Dead letters or late events as JSON lines, a file per worker."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _JsonLinesPartition:
        return _JsonLinesPartition(self.path.with_name(f"{self.path.stem}.{worker_index}{self.path.suffix}"))


class _KafkaPartition(StatelessSinkPartition[dict[str, Any]]):
    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 5000})

    def write_batch(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            self.producer.produce(self.topic, orjson.dumps(item))
        self.producer.flush(10)

    def close(self) -> None:
        self.producer.flush(10)


class KafkaJsonSink(DynamicSink[dict[str, Any]]):
    """Dead letters or late events to a Kafka topic, as JSON."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaPartition:
        return _KafkaPartition(self.bootstrap, self.topic)


def rows_table(view: ViewSpec, rows: list[Row]) -> pa.Table:
    """Changelog-shaped Arrow table from stream rows."""
    schema = view.changelog_schema()
    columns: list[list[Any]] = [[] for _ in schema.names]
    for entity, as_of, values in rows:
        columns[0].append(entity)
        columns[1].append(as_of)
        for index, value in enumerate(values):
            columns[index + 2].append(value)
    arrays = [pa.array(columns[0], schema.field(0).type), pa.array(columns[1], pa.int64()).cast(schema.field(1).type)]
    arrays += [pa.array(column, schema.field(i + 2).type) for i, column in enumerate(columns[2:])]
    return pa.Table.from_arrays(arrays, schema=schema)


# -- steps ---------------------------------------------------------------------------------


def _decoder(source: SourceSpec) -> Callable[[list[Message]], list[tuple[str, Any]]]:
    schema = source.schema

    def decode(messages: list[Message]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for partition, offset, value in messages:
            reason: str
            try:
                record = orjson.loads(value)
            except orjson.JSONDecodeError as error:
                reason = f"invalid JSON: {error}"
            else:
                if partition < 0:
                    reason = f"Kafka error: {record.get('kafka_error')}"
                else:
                    normalised, problems = validate_record(schema, record)
                    if normalised is not None:
                        normalised["_seq"] = sequence(partition, offset)
                        out.append(("ok", normalised))
                        continue
                    reason = "; ".join(str(p) for p in problems)
            METRICS.dead_letters.labels(source.name).inc()
            out.append(
                (
                    "dlq",
                    {
                        "source": source.name,
                        "topic": source.topic,
                        "partition": partition,
                        "offset": offset,
                        "reason": reason,
                        "value": value.decode("utf-8", errors="replace"),
                        "at": datetime.now(UTC).isoformat(),
                    },
                )
            )
        METRICS.events_in.labels(source.name).inc(len(messages))
        return out

    return decode


def _events_for(view: ViewSpec, shards: int, inputs: tuple[str, ...]) -> Callable[[list[Any]], list[tuple[str, Any]]]:
    schema = view.source.schema.arrow_schema()
    time_field = view.event_time
    relaxed = pa.schema(
        [pa.field(f.name, pa.int64() if f.name == time_field else f.type) for f in schema]
        + [pa.field("_seq", pa.int64())]
    )

    def to_events(records: list[Any]) -> list[tuple[str, Any]]:
        table = pa.Table.from_pylist(list(records), schema=relaxed)
        table = table.set_column(
            table.schema.get_field_index(time_field),
            time_field,
            table.column(time_field).cast(schema.field(time_field).type),
        )
        frame = prepare_events(view, table.to_pandas())
        return [
            (str(zlib.crc32(str(entity).encode()) % shards), (entity, event))
            for entity, event in events_from_frame(view, frame, inputs, [])
        ]

    return to_events


class _ShardLogic(StatefulBatchLogic[tuple[Any, Any], tuple[str, Any], ViewState]):
    def __init__(self, view: ViewSpec, drain: bool, emit: Emit, resume: ViewState | None) -> None:
        self.state = resume if resume is not None else ViewState(view, emit)
        self.drain = drain

    def on_batch(self, values: list[tuple[Any, Any]]) -> tuple[Iterable[tuple[str, Any]], bool]:
        rows, late = self.state.apply(values)
        rows.extend(self.state.advance())
        out: list[tuple[str, Any]] = [("row", row) for row in rows]
        for entity, event in late:
            METRICS.late.labels(self.state.view.name).inc()
            out.append(
                (
                    "late",
                    {
                        "view": self.state.view.name,
                        "entity": entity,
                        "event_time_us": event[0],
                        "sequence": event[1],
                        "watermark_us": self.state.watermark,
                    },
                )
            )
        return out, StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[tuple[str, Any]], bool]:
        # A bounded input ending is not time passing: only with `drain` are the pending
        # expiries (up to the end of every window) emitted. Without it the store keeps
        # the values as of the last events, as a live stream would serve them.
        if not self.drain:
            return [], StatefulBatchLogic.RETAIN
        return [("row", row) for row in self.state.flush()], StatefulBatchLogic.RETAIN

    def snapshot(self) -> ViewState:
        return self.state


@dataclass(frozen=True)
class Outputs:
    """Where the job writes: rows (one sink or several, e.g. the online store and a
    capture for tests), dead letters and late events."""

    rows: DynamicSink[tuple[str, Row]] | Any
    dead_letters: DynamicSink[dict[str, Any]] | Any
    late: DynamicSink[dict[str, Any]] | Any

    def row_sinks(self) -> list[Any]:
        return list(self.rows) if isinstance(self.rows, list | tuple) else [self.rows]


def build_dataflow(
    plan: Plan,
    messages: Callable[[Dataflow, SourceSpec], Any],
    outputs: Outputs,
    *,
    views: list[str] | None = None,
    shards: int = 8,
    drain: bool = True,
    emit: Emit = Emit.CHANGELOG,
    name: str = "tenx_stream",
) -> Dataflow:
    """The dataflow for every online view of the plan (or those named), reading each
    source's messages from `messages(flow, source)`. With `drain`, the end of a bounded
    input emits every pending expiry. `emit` chooses every changelog row or only those
    that can become online values (what `tenx stream` runs)."""
    flow = Dataflow(name)
    chosen = [plan.view(v) for v in views] if views else [v for v in plan.views if v.online]
    for source in {view.source.name: view.source for view in chosen}.values():
        raw = messages(flow, source)
        decoded = op.flat_map_batch(f"decode_{source.name}", raw, _decoder(source))
        split = op.branch(f"valid_{source.name}", decoded, lambda item: item[0] == "ok")
        op.output(
            f"dead_letters_{source.name}", op.map(f"dlq_{source.name}", split.falses, _second), outputs.dead_letters
        )
        records = op.map(f"records_{source.name}", split.trues, _second)
        for view in (v for v in chosen if v.source.name == source.name):
            state = ViewState(view)
            keyed = op.flat_map_batch(f"events_{view.name}", records, _events_for(view, shards, state.inputs))
            results = op.stateful_batch(f"state_{view.name}", keyed, functools.partial(_ShardLogic, view, drain, emit))
            tagged = op.map(f"untag_{view.name}", results, _second)
            kinds = op.branch(f"rows_or_late_{view.name}", tagged, lambda item: item[0] == "row")
            rows = op.map(f"rows_{view.name}", kinds.trues, functools.partial(_named, view.name))
            for index, sink in enumerate(outputs.row_sinks()):
                op.output(f"rows_{index}_{view.name}", rows, sink)
            op.output(f"late_{view.name}", op.map(f"late_items_{view.name}", kinds.falses, _second), outputs.late)
    return flow


def _second(item: tuple[Any, Any]) -> Any:
    return item[1]


def _named(name: str, item: tuple[str, Row]) -> tuple[str, Row]:
    return (name, item[1])


__all__ = [
    "AS_OF",
    "JsonLinesSink",
    "JsonLinesSource",
    "KafkaJsonSink",
    "OnlineSink",
    "Outputs",
    "StoreFactory",
    "build_dataflow",
    "kafka_messages",
    "rows_table",
    "sequence",
]
