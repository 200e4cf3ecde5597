"""The Bytewax stream job built from a Plan: events in, fresh feature vectors out.

    source (Kafka | JSON-lines file | test list): one item per consumed batch of messages
      -> decode + validate           column by column; bad record -> dead-letter output,
                                     with reason + partition + offset
      -> per view: row transform + where on the micro-batch (the batch engine's code)
      -> split by shard (crc32(entity) % shards): one EventBatch (numpy columns) per shard
      -> state per shard              LatestState (numpy tiles; what `tenx stream` runs) or
                                      ViewState (every changelog row; parity tests)
      -> RowBatch -> online store     packed in one numpy pass, ordered writes in one
                                      script call per 2,000 keys (newer-or-equal as_of wins)
      -> late events -> late output

Items are micro-batches, not events: Bytewax's per-item cost (and pickling between
processes) is paid once per batch and shard. Measured in bench/stream.py.
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

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from featurestore.errors import ConfigError, TransientError
from featurestore.plan.model import AS_OF, Plan, SourceSpec, ViewSpec
from featurestore.stores.codec import encode_columns, with_nulls
from featurestore.stores.online import OnlineStore
from featurestore.transforms import prepare_events
from pipelines.stream.metrics import METRICS
from pipelines.stream.state import Emit, Event, Row, ViewState
from pipelines.stream.tiles import EventBatch, LatestState, RowBatch, batch_from_frame
from schemas.validation import validate_records

# (partition, offset, raw bytes): what every source yields
Message = tuple[int, int, bytes]
PARTITION_BITS = 10  # sequence = offset << 10 | partition: log order within a partition


def sequence(partition: int, offset: int) -> int:
    return (offset << PARTITION_BITS) | partition


# -- sources -------------------------------------------------------------------------------


class _LinesPartition(StatefulSourcePartition[list[Message], int]):
    def __init__(self, path: Path, resume: int | None, batch_size: int) -> None:
        self._file = path.open("rb")
        self._offset = 0
        self._batch = batch_size
        for _ in range(resume or 0):
            self._file.readline()
            self._offset += 1

    def next_batch(self) -> list[list[Message]]:
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
        return [out]

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._file.close()


class JsonLinesSource(FixedPartitionedSource[list[Message], int]):
    """A JSON-lines file as a one-partition log (offset = line number): replay without
    Kafka, e.g. for the quickstart. Yields batches of lines; resumes from its snapshot."""

    def __init__(self, path: Path, batch_size: int = 5000) -> None:
        self.path = Path(path)
        self.batch_size = batch_size

    def list_parts(self) -> list[str]:
        return [str(self.path)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _LinesPartition:
        return _LinesPartition(self.path, resume_state, self.batch_size)


class _KafkaSourcePartition(StatefulSourcePartition[list[Message], int]):
    """One Kafka partition; yields each consumed batch as one item, snapshots the next
    offset (restored with the state of the same epoch: nothing lost or applied twice)."""

    def __init__(self, bootstrap: str, topic: str, partition: int, offset: int, *, tail: bool, batch_size: int) -> None:
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        self._eof_code = KafkaError._PARTITION_EOF
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "tenx-stream",  # offsets live in the recovery store, not in Kafka
                "enable.auto.commit": False,
                "enable.partition.eof": not tail,
                "socket.connection.setup.timeout.ms": 5000,
                "session.timeout.ms": 10000,
                "fetch.wait.max.ms": 50,
                # An offset retention has deleted: the oldest message left, never the end.
                "auto.offset.reset": "earliest",
            }
        )
        self._consumer.assign([TopicPartition(topic, partition, offset)])
        self._topic, self._partition = topic, partition
        self._offset = offset
        self._batch = batch_size
        self._eof = False
        self._polls = 0

    def next_batch(self) -> list[list[Message]]:
        if self._eof:
            raise StopIteration
        consumed = self._consumer.consume(self._batch, 0.05)
        partition = self._partition
        out: list[Message] = [(partition, m.offset(), m.value()) for m in consumed if m.error() is None]  # type: ignore[misc]
        if len(out) != len(consumed):  # errors, or the end of the partition: in log order
            out = []
            for message in consumed:
                error = message.error()
                if error is None:
                    out.append((partition, int(message.offset() or 0), message.value() or b""))
                elif error.code() == self._eof_code:
                    self._eof = True
                    break
                else:
                    out.append((-1, message.offset() or -1, orjson.dumps({"kafka_error": str(error)})))
        for item in reversed(out):
            if item[0] >= 0:
                self._offset = item[1] + 1
                break
        self._polls += 1
        if self._polls % 20 == 0:
            self._report_lag()
        return [out] if out else []

    def _report_lag(self) -> None:
        from confluent_kafka import TopicPartition

        try:
            _, high = self._consumer.get_watermark_offsets(TopicPartition(self._topic, self._partition), cached=True)
        except Exception:  # noqa: BLE001 (no statistics yet: nothing to report)
            return
        if high is not None and high >= 0 and self._offset >= 0:
            METRICS.lag.labels(self._topic, str(self._partition)).set(max(high - self._offset, 0))

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


class KafkaSource(FixedPartitionedSource[list[Message], int]):
    """A topic's partitions spread over workers. Each yields a consumed batch as one item.
    Without a snapshot a partition starts at the first message at or after
    `start_time_us` (Kafka's offsets for times; the end when there is none), or at the
    beginning when `start_time_us` is None. Every call to the broker has a timeout."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        tail: bool = True,
        batch_size: int = 20000,
        start_time_us: int | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.tail = tail
        self.batch_size = batch_size
        self.start_time_us = start_time_us
        self.timeout_s = timeout_s

    def _config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "socket.connection.setup.timeout.ms": 5000}

    def list_parts(self) -> list[str]:
        from confluent_kafka.admin import AdminClient

        metadata = AdminClient(self._config()).list_topics(self.topic, timeout=self.timeout_s)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise ConfigError(f"Kafka topic {self.topic!r} at {self.bootstrap}: {topic.error if topic else 'missing'}")
        if len(topic.partitions) > 1 << PARTITION_BITS:
            raise ConfigError(
                f"Kafka topic {self.topic!r} has {len(topic.partitions)} partitions; tenx supports up to "
                f"{1 << PARTITION_BITS} (an event's sequence is offset << {PARTITION_BITS} | partition)"
            )
        return [str(p) for p in sorted(topic.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaSourcePartition:
        partition = int(for_part)
        offset = resume_state if resume_state is not None else self._start_offset(partition)
        return _KafkaSourcePartition(
            self.bootstrap, self.topic, partition, offset, tail=self.tail, batch_size=self.batch_size
        )

    def _start_offset(self, partition: int) -> int:
        """A concrete offset (never the "end" sentinel: a snapshot taken before the first
        message must not resume at a later end and skip what arrived in between)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        if self.start_time_us is None:
            return int(OFFSET_BEGINNING)
        consumer = Consumer({**self._config(), "group.id": "tenx-stream-offsets"})
        try:
            wanted = TopicPartition(self.topic, partition, max(self.start_time_us // 1000, 0))
            (found,) = consumer.offsets_for_times([wanted], timeout=self.timeout_s)
            if found.offset >= 0:
                return int(found.offset)
            _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=self.timeout_s)
            return int(high)  # nothing at or after the time: start after the last message
        finally:
            consumer.close()


def kafka_topics(bootstrap: str, timeout_s: float = 10.0) -> set[str]:
    """The broker's topics; a TransientError saying so when it does not answer in time."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # log_level 0: the connection failures are reported once, below, not logged every 50 ms.
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 5000, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as error:
        raise TransientError(f"cannot reach Kafka at {bootstrap} within {timeout_s:.0f} s: {error}") from error
    return set(metadata.topics)


def check_topics(bootstrap: str, topics: list[str], timeout_s: float = 10.0) -> None:
    """Fail early, with what to do, when the broker is unreachable or a topic is missing
    (inside the running dataflow either would end in a Bytewax traceback)."""
    known = kafka_topics(bootstrap, timeout_s)
    missing = [topic for topic in topics if topic not in known]
    if missing:
        raise ConfigError(
            f"Kafka topic(s) {', '.join(missing)} do not exist at {bootstrap}: create them "
            "(e.g. `tenx demo-data --to-kafka <topic>`), or set the source's topic= in the feature repo"
        )


def kafka_messages(
    flow: Dataflow,
    source: SourceSpec,
    bootstrap: str,
    *,
    tail: bool,
    batch_size: int = 20000,
    start_time_us: int | None = None,
) -> Any:
    """The source's topic as a stream of message batches (`KafkaSource`)."""
    kafka = KafkaSource(bootstrap, source.topic, tail=tail, batch_size=batch_size, start_time_us=start_time_us)
    return op.input(f"kafka_{source.name}", flow, kafka)


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


class _OnlinePartition(StatelessSinkPartition[tuple[str, RowBatch]]):
    def __init__(self, store: OnlineStore, views: dict[str, ViewSpec]) -> None:
        self.store = store
        self.views = views

    def write_batch(self, items: list[tuple[str, RowBatch]]) -> None:
        by_view: dict[str, list[RowBatch]] = {}
        for name, rows in items:
            by_view.setdefault(name, []).append(rows)
        for name, batches in by_view.items():
            view = self.views[name]
            rows = RowBatch.concat(batches)
            if not len(rows):
                continue
            values = encode_columns(view, rows.as_of, rows.values, rows.nulls)
            self.store.write_packed(view, rows.keys, rows.as_of.tolist(), values)
            METRICS.freshness.observe_many(np.maximum(time.time() - rows.as_of / 1e6, 0.0))
            METRICS.rows_out.labels(name).inc(len(rows))

    def close(self) -> None:
        self.store.close()


class OnlineSink(DynamicSink[tuple[str, RowBatch]]):
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


class _KafkaSinkPartition(StatelessSinkPartition[dict[str, Any]]):
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

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaSinkPartition:
        return _KafkaSinkPartition(self.bootstrap, self.topic)


# -- steps ---------------------------------------------------------------------------------


def _decoder(source: SourceSpec) -> Callable[[list[Any]], list[tuple[str, Any]]]:
    schema = source.schema

    def dead_letter(partition: int, offset: int, value: bytes, reason: str) -> tuple[str, Any]:
        METRICS.dead_letters.labels(source.name).inc()
        return (
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

    def decode(items: list[Any]) -> list[tuple[str, Any]]:
        messages: list[Message] = []
        for item in items:  # message batches (Kafka, files) or single messages (tests)
            if isinstance(item, list):
                messages.extend(item)
            else:
                messages.append(item)
        dead: list[tuple[int, tuple[str, Any]]] = []  # (position in the batch, item): log order
        records: list[Any] = []
        sequences: list[int] = []
        kept: list[int] = []
        loads = orjson.loads
        for position, (partition, offset, value) in enumerate(messages):
            try:
                record = loads(value)
            except (orjson.JSONDecodeError, TypeError) as error:  # TypeError: a tombstone (no value)
                dead.append((position, dead_letter(partition, offset, value or b"", f"invalid JSON: {error}")))
                continue
            if partition < 0:
                reason = f"Kafka error: {record.get('kafka_error')}"
                dead.append((position, dead_letter(partition, offset, value, reason)))
                continue
            records.append(record)
            sequences.append((offset << PARTITION_BITS) | partition)
            kept.append(position)
        METRICS.events_in.labels(source.name).inc(len(messages))
        out: list[tuple[str, Any]] = []
        if records:
            checked = validate_records(schema, records)
            for index, problems in checked.rejected:
                partition, offset, value = messages[kept[index]]
                dead.append((kept[index], dead_letter(partition, offset, value, "; ".join(str(p) for p in problems))))
            if checked.valid.num_rows:
                positions = checked.positions
                seq = sequences if len(positions) == len(sequences) else [sequences[i] for i in positions]
                out.append(("ok", checked.valid.append_column("_seq", pa.array(seq, pa.int64()))))
        dead.sort(key=lambda item: item[0])
        return [item for _, item in dead] + out

    return decode


def _events_for(view: ViewSpec, shards: int, inputs: tuple[str, ...]) -> Callable[[pa.Table], list[tuple[str, Any]]]:
    def to_events(table: pa.Table) -> list[tuple[str, Any]]:
        frame = prepare_events(view, table.to_pandas())
        if len(frame) == 0:
            return []
        events = batch_from_frame(view, frame, inputs)
        codes, uniques = pd.factorize(pd.Series(events.keys, dtype=object))
        shard_of = np.array([zlib.crc32(str(key).encode()) % shards for key in uniques.tolist()], dtype=np.int64)
        shard = shard_of[codes]
        present = np.unique(shard)
        if len(present) == 1:
            return [(str(int(present[0])), events)]
        order = np.argsort(shard, kind="stable")
        bounds = [*np.searchsorted(shard[order], present, side="left").tolist(), len(order)]
        return [
            (str(int(key)), events.take(order[bounds[i] : bounds[i + 1]])) for i, key in enumerate(present.tolist())
        ]

    return to_events


class _ShardLogic(StatefulBatchLogic[EventBatch, tuple[str, Any], Any]):
    """One shard's state: LatestState (online rows) or ViewState (every changelog row)."""

    def __init__(self, view: ViewSpec, drain: bool, emit: Emit, resume: Any) -> None:
        self.view = view
        self.emit = emit
        if resume is not None:
            self.state = resume
        else:
            self.state = LatestState(view) if emit is Emit.LATEST else ViewState(view, emit)
        self.drain = drain

    def on_batch(self, values: list[EventBatch]) -> tuple[Iterable[tuple[str, Any]], bool]:
        batch = EventBatch.concat(values)
        state = self.state
        late_events: list[tuple[Any, int, int]] = []
        if isinstance(state, LatestState):
            rows, late = state.step(batch)
            if len(late):
                times, sequences = batch.times[late].tolist(), batch.sequences[late].tolist()
                late_events = [(batch.keys[i], times[n], sequences[n]) for n, i in enumerate(late.tolist())]
        else:
            plain, late_pairs = state.apply(_as_events(batch))
            rows = rows_batch(self.view, plain + state.advance())
            late_events = [(entity, event[0], event[1]) for entity, event in late_pairs]
        out: list[tuple[str, Any]] = [("row", rows)] if len(rows) else []
        if late_events:
            METRICS.late.labels(self.view.name).inc(len(late_events))
            watermark = state.watermark
            out.extend(
                (
                    "late",
                    {
                        "view": self.view.name,
                        "entity": entity,
                        "event_time_us": event_time,
                        "sequence": sequence,
                        "watermark_us": watermark,
                    },
                )
                for entity, event_time, sequence in late_events
            )
        return out, StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[tuple[str, Any]], bool]:
        # A bounded input ending is not time passing: only with `drain` are the pending
        # expiries (up to the end of every window) emitted. Without it the store keeps
        # the values as of the last events, as a live stream would serve them.
        if not self.drain:
            return [], StatefulBatchLogic.RETAIN
        state = self.state
        rows = state.flush() if isinstance(state, LatestState) else rows_batch(self.view, state.flush())
        return ([("row", rows)] if len(rows) else []), StatefulBatchLogic.RETAIN

    def snapshot(self) -> Any:
        return self.state


def _as_events(batch: EventBatch) -> list[tuple[Any, Event]]:
    """An EventBatch as `ViewState` events (plain Python values, None for null)."""
    columns = [with_nulls(values, ~valid) for values, valid in zip(batch.values, batch.valid, strict=True)]
    times, sequences = batch.times.tolist(), batch.sequences.tolist()
    return [(key, (times[i], sequences[i], tuple(column[i] for column in columns))) for i, key in enumerate(batch.keys)]


def rows_batch(view: ViewSpec, rows: list[Row]) -> RowBatch:
    """A RowBatch from plain rows (entity, as_of, values)."""
    if not rows:
        return RowBatch.empty(len(view.features))
    values: list[np.ndarray] = []
    nulls: list[np.ndarray | None] = []
    for index, feature in enumerate(view.features):
        column = [row[2][index] for row in rows]
        null = np.array([v is None for v in column], dtype=bool)
        kind = {"int64": np.int64, "int32": np.int64, "float64": np.float64, "float32": np.float64, "bool": bool}
        dtype = kind.get(feature.dtype, object)
        if dtype is not object and null.any():
            column = [0 if v is None else v for v in column]
        values.append(np.array(column, dtype=dtype))
        nulls.append(null if null.any() else None)
    return RowBatch([row[0] for row in rows], np.array([row[1] for row in rows], dtype=np.int64), values, nulls)


@dataclass(frozen=True)
class Outputs:
    """Where the job writes: rows (one sink or several, e.g. the online store and a
    capture for tests), dead letters and late events."""

    rows: DynamicSink[tuple[str, RowBatch]] | Any
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
    shards: int = 4,
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
            keyed = op.flat_map(f"events_{view.name}", records, _events_for(view, shards, view.input_columns))
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


def _named(name: str, item: tuple[str, RowBatch]) -> tuple[str, RowBatch]:
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
    "check_topics",
    "kafka_messages",
    "rows_batch",
    "sequence",
]
