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
import pickle
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
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from featurestore.errors import ConfigError
from featurestore.plan.model import AS_OF, Plan, SourceSpec, ViewSpec
from featurestore.stores.codec import encode_columns, with_nulls
from featurestore.stores.online import OnlineStore
from featurestore.transforms import events_frame, prepare_events
from pipelines.stream.metrics import METRICS, DeadLetterReason
from pipelines.stream.producer import Delivery
from pipelines.stream.sources import (
    PARTITION_BITS,
    JsonLinesSource,
    KafkaSource,
    Message,
    check_topics,
    kafka_messages,
    kafka_topics,
    sequence,
    sources_stopped,
)
from pipelines.stream.state import Emit, Event, Row, ViewState
from pipelines.stream.tiles import EventBatch, LatestState, RowBatch, batch_from_frame
from pipelines.stream.watermark import PartitionStatus, Progress
from schemas.validation import validate_records

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
            began = time.perf_counter()
            self.store.write_packed(view, rows.keys, rows.as_of.tolist(), values)
            METRICS.online_write_seconds.labels(name).observe(time.perf_counter() - began)
            METRICS.freshness.observe_many(np.maximum(time.time() - rows.as_of / 1e6, 0.0))
            METRICS.rows_out.labels(name).inc(len(rows))
            METRICS.written_event_time.advance((name,), int(rows.as_of.max()))

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
    def __init__(self, bootstrap: str, topic: str | None, suffix: str, config: dict[str, Any]) -> None:
        self.topic = topic
        self.suffix = suffix
        self.producer = Delivery(bootstrap, **{"linger.ms": 20, **config})

    def write_batch(self, items: list[dict[str, Any]]) -> None:
        # Delivered before the epoch closes: a snapshot never covers a dead letter or a
        # late event that is not in its topic yet (a failure here restarts the job from
        # its last snapshot, which sends them again: at least once).
        for item in items:
            topic = self.topic if self.topic is not None else f"{item['topic']}{self.suffix}"
            self.producer.send(topic, orjson.dumps(item))
        self.producer.flush()

    def close(self) -> None:
        self.producer.flush()


class KafkaJsonSink(DynamicSink[dict[str, Any]]):
    """Dead letters or late events to a Kafka topic, as JSON: `topic`, or with `topic`
    None each record's own source topic (its `topic` field) + `suffix`, so each source's
    dead letters land in `<its topic>.dead-letters` (they all went to the first
    source's)."""

    def __init__(self, bootstrap: str, topic: str | None = None, *, suffix: str = "", **config: Any) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.suffix = suffix
        self.config = config  # librdkafka producer settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaSinkPartition:
        return _KafkaSinkPartition(self.bootstrap, self.topic, self.suffix, self.config)


# -- steps ---------------------------------------------------------------------------------


def _decoder(source: SourceSpec, clock: Callable[[], float]) -> Callable[[list[Any]], list[tuple[str, Any]]]:
    """Decode + validate message batches: ("dlq", dead letter) items first (in log
    order), then ("ok", table with a `_seq` column) and ("progress", Progress) items: the
    sources' start and idle reports, one report per partition with the newest valid
    event time of the batch, then the sources' end reports. An event more than the
    source's `max_future` ahead of the processing clock is a dead letter: it would move
    a watermark past every real event."""
    schema = source.schema
    event_time = source.event_time

    def dead_letter(message: Message, why: DeadLetterReason, reason: str) -> tuple[str, Any]:
        partition, offset, value = message
        METRICS.dead_letters.labels(source.name, why.value).inc()
        return (
            "dlq",
            {
                "source": source.name,
                "topic": source.topic,
                "partition": partition,
                "offset": offset,
                "reason": reason,
                "value": (value or b"").decode("utf-8", errors="replace"),
                "at": datetime.now(UTC).isoformat(),
            },
        )

    def decode(items: list[Any]) -> list[tuple[str, Any]]:
        messages: list[Message] = []
        reports: list[Progress] = []
        for item in items:  # message batches (Kafka, files) or single messages (tests)
            if isinstance(item, list):
                for entry in item:
                    (reports if isinstance(entry, Progress) else messages).append(entry)
            elif isinstance(item, Progress):
                reports.append(item)
            else:
                messages.append(item)
        dead: list[tuple[int, tuple[str, Any]]] = []  # (position in the batch, item): log order
        records: list[Any] = []
        sequences: list[int] = []
        kept: list[int] = []
        loads = orjson.loads
        for position, message in enumerate(messages):
            partition, offset, value = message
            try:
                record = loads(value)
            except (orjson.JSONDecodeError, TypeError) as error:  # TypeError: a tombstone (no value)
                dead.append((position, dead_letter(message, DeadLetterReason.INVALID_JSON, f"invalid JSON: {error}")))
                continue
            if partition < 0:
                reason = f"Kafka error: {record.get('kafka_error')}"
                dead.append((position, dead_letter(message, DeadLetterReason.KAFKA_ERROR, reason)))
                continue
            records.append(record)
            sequences.append((offset << PARTITION_BITS) | partition)
            kept.append(position)
        METRICS.events_in.labels(source.name).inc(len(messages))
        out: list[tuple[str, Any]] = []
        newest: list[Progress] = []
        if records:
            checked = validate_records(schema, records)
            for index, problems in checked.rejected:
                reason = "; ".join(str(p) for p in problems)
                dead.append((kept[index], dead_letter(messages[kept[index]], DeadLetterReason.INVALID_RECORD, reason)))
            valid = checked.valid
            if valid.num_rows:
                positions = checked.positions
                seq = np.asarray(sequences if len(positions) == len(sequences) else [sequences[i] for i in positions])
                times = valid.column(event_time).cast(pa.int64()).to_numpy(zero_copy_only=False)
                future = times > source.future_limit(int(clock() * 1_000_000))
                if future.any():
                    for index in np.flatnonzero(future).tolist():
                        position = kept[positions[index]]
                        reason = source.future_reason(int(times[index]))
                        dead.append((position, dead_letter(messages[position], DeadLetterReason.FUTURE_EVENT, reason)))
                    keep = ~future
                    valid, seq, times = valid.filter(pa.array(keep)), seq[keep], times[keep]
            if valid.num_rows:
                out.append(("ok", valid.append_column("_seq", pa.array(seq, pa.int64()))))
                newest = _newest_per_partition(seq, times)
                for report in newest:  # each with the partition's newest event time of the batch
                    METRICS.read_event_time.advance((source.name, str(report.partition)), report.event_time or 0)
        dead.sort(key=lambda item: item[0])
        progress = [r for r in reports if r.status is not PartitionStatus.ENDED] + newest
        progress += [r for r in reports if r.status is PartitionStatus.ENDED]
        return [item for _, item in dead] + out + [("progress", report) for report in progress]

    return decode


def _newest_per_partition(sequences: np.ndarray, times: np.ndarray) -> list[Progress]:
    partitions = sequences & ((1 << PARTITION_BITS) - 1)
    first = int(partitions[0])
    if (partitions == first).all():  # a batch from one partition (what a Kafka source yields)
        return [Progress(first, event_time=int(times.max()))]
    found = pd.Series(times).groupby(partitions).max()
    return [Progress(int(p), event_time=int(t)) for p, t in zip(found.index.tolist(), found.tolist(), strict=True)]


def _events_for(
    view: ViewSpec, shards: int, inputs: tuple[str, ...]
) -> Callable[[pa.Table | Progress], list[tuple[str, Any]]]:
    """A validated table -> (shard, EventBatch) items; a progress report -> one copy per
    shard (every shard's watermark waits for every partition)."""
    every_shard = [str(shard) for shard in range(shards)]

    def to_events(table: pa.Table | Progress) -> list[tuple[str, Any]]:
        if isinstance(table, Progress):
            return [(shard, table) for shard in every_shard]
        frame = prepare_events(view, events_frame(table))
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


class _ShardLogic(StatefulBatchLogic[EventBatch | Progress, tuple[str, Any], Any]):
    """One shard's state: LatestState (online rows) or ViewState (every changelog row)."""

    def __init__(self, view: ViewSpec, drain: bool, emit: Emit, resume: Any) -> None:
        self.view = view
        self.emit = emit
        if isinstance(resume, bytes):
            self.state = pickle.loads(resume)  # noqa: S301 - our own snapshot, from the recovery store
        elif resume is not None:
            self.state = resume  # a snapshot from before snapshots were pickled here
        else:
            self.state = LatestState(view) if emit is Emit.LATEST else ViewState(view, emit)
        kept = self.state.view.version
        if kept != view.version:
            # The snapshot computes the definition it was taken with; resumed, it wrote that
            # definition's values under the new version's keys (a 1h count as count_10m).
            raise ConfigError(
                f"the recovery snapshot holds view `{view.name}` version {kept}, the plan runs version "
                f"{view.version}: start with a new --recovery-dir (a cold start rebuilds the state from the topic)"
            )
        self.drain = drain

    def on_batch(self, values: list[EventBatch | Progress]) -> tuple[Iterable[tuple[str, Any]], bool]:
        # Events are judged against the watermark as it was before this call's progress
        # reports (which come after the events they describe): never too strict.
        batches = [v for v in values if isinstance(v, EventBatch)]
        progress = [v for v in values if isinstance(v, Progress)]
        batch = EventBatch.concat(batches) if batches else None
        state = self.state
        watermark = state.watermark
        late_events: list[tuple[Any, int, int]] = []
        if isinstance(state, LatestState):
            rows, late = state.step(batch, progress)
            if len(late) and batch is not None:
                times, sequences = batch.times[late].tolist(), batch.sequences[late].tolist()
                late_events = [(batch.keys[i], times[n], sequences[n]) for n, i in enumerate(late.tolist())]
        else:
            plain, late_pairs = state.apply(_as_events(batch)) if batch is not None else ([], [])
            state.observe(progress)
            rows = rows_batch(self.view, plain + state.advance())
            late_events = [(entity, event[0], event[1]) for entity, event in late_pairs]
        if state.watermark is not None:
            METRICS.watermarks.set(self.view.name, id(self), state.watermark)
        out: list[tuple[str, Any]] = [("row", rows)] if len(rows) else []
        if late_events:
            METRICS.late.labels(self.view.name).inc(len(late_events))
            out.extend(
                (
                    "late",
                    {
                        "view": self.view.name,
                        "topic": self.view.source.topic,  # whose `.late` topic it goes to
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
        if not self.drain or sources_stopped():  # a stop (Ctrl-C) is not the end of the input either
            return [], StatefulBatchLogic.RETAIN
        state = self.state
        rows = state.flush() if isinstance(state, LatestState) else rows_batch(self.view, state.flush())
        return ([("row", rows)] if len(rows) else []), StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        # Bytewax keeps what this returns and pickles it later, after this shard may
        # already have applied the next epoch's events: the live state would then be
        # saved with them but beside the previous epoch's offsets, and a restart would
        # apply them twice. The state as of now, frozen here, is what belongs to them.
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)


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
    clock: Callable[[], float] = time.time,
) -> Dataflow:
    """The dataflow for every online view of the plan (or those named), reading each
    source's messages from `messages(flow, source)`: message batches with the sources'
    `Progress` reports (a source announces its partition count when a partition starts;
    without any announcement the partitions seen so far are all there is). With `drain`,
    the end of a bounded input emits every pending expiry. `emit` chooses every
    changelog row or only those that can become online values (what `tenx stream`
    runs). `clock` (seconds) bounds event times from the future."""
    flow = Dataflow(name)
    chosen = [plan.view(v) for v in views] if views else [v for v in plan.views if v.online]
    # Series at 0 from the start: `tenx_stream_late_total 0` says "none late", which a
    # missing series does not.
    for view in chosen:
        METRICS.late.labels(view.name)
        METRICS.rows_out.labels(view.name)
    for source in {view.source.name: view.source for view in chosen}.values():
        METRICS.events_in.labels(source.name)
        for why in DeadLetterReason:
            METRICS.dead_letters.labels(source.name, why.value)
        raw = messages(flow, source)
        decoded = op.flat_map_batch(f"decode_{source.name}", raw, _decoder(source, clock))
        split = op.branch(f"valid_{source.name}", decoded, lambda item: item[0] != "dlq")
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
    "KafkaSource",
    "OnlineSink",
    "Outputs",
    "StoreFactory",
    "build_dataflow",
    "check_topics",
    "kafka_messages",
    "kafka_topics",
    "rows_batch",
    "sequence",
    "sources_stopped",
]
