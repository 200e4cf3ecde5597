"""Where the stream job's messages come from: Kafka partitions or a JSON-lines file.

Every source yields micro-batches: lists of (partition, offset, raw bytes) messages, with
`Progress` reports about its partitions in between (`pipelines.stream.watermark`):

- when a partition starts (every start, resumed or not): its index and the partition
  count, so every shard knows whom to wait for;
- when a tailed Kafka partition has been caught up with its log (checked with the
  broker) and without a message for the source's `idle_timeout`: IDLE with the clock at
  the check, once a second while it stays so;
- when a bounded input reaches the end of a partition: ENDED.

A source stops early, between two batches, once `stop_sources()` was called (Ctrl-C in
`tenx stream`): the dataflow then ends as a bounded input does, with a last snapshot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from featurestore.errors import ConfigError, TransientError
from featurestore.plan.model import SourceSpec
from pipelines.stream.health import BROKER, kafka_client_config
from pipelines.stream.metrics import METRICS
from pipelines.stream.watermark import PartitionStatus, Progress

# (partition, offset, raw bytes): one message
Message = tuple[int, int, bytes]
Batch = list[Message | Progress]
PARTITION_BITS = 10  # sequence = offset << 10 | partition: log order within a partition
IDLE_REPORT_S = 1.0  # how often an idle partition says so (and checks with the broker)

_STOP = threading.Event()


def stop_sources() -> None:
    """Make every source of this process end at its next batch (a clean stop)."""
    _STOP.set()


def sources_stopped() -> bool:
    return _STOP.is_set()


def sequence(partition: int, offset: int) -> int:
    return (offset << PARTITION_BITS) | partition


# -- a JSON-lines file ---------------------------------------------------------------------


class _LinesPartition(StatefulSourcePartition[Batch, int]):
    def __init__(self, path: Path, resume: int | None, batch_size: int) -> None:
        self._file = path.open("rb")
        self._offset = 0
        self._batch = batch_size
        self._started = False
        self._ended = False
        for _ in range(resume or 0):
            self._file.readline()
            self._offset += 1

    def next_batch(self) -> list[Batch]:
        if self._ended or _STOP.is_set():
            raise StopIteration
        out: Batch = []
        if not self._started:
            self._started = True
            out.append(Progress(0, partitions=1))
        for _ in range(self._batch):
            line = self._file.readline()
            if not line:
                self._ended = True
                out.append(Progress(0, status=PartitionStatus.ENDED))
                break
            if line.strip():
                out.append((0, self._offset, line.rstrip(b"\n")))
            self._offset += 1
        return [out]

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._file.close()


class JsonLinesSource(FixedPartitionedSource[Batch, int]):
    """A JSON-lines file as a one-partition log (offset = line number): replay without
    Kafka, e.g. for the quickstart. Yields batches of lines; resumes from its snapshot."""

    def __init__(self, path: Path, batch_size: int = 5000) -> None:
        self.path = Path(path)
        self.batch_size = batch_size

    def list_parts(self) -> list[str]:
        return [str(self.path)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _LinesPartition:
        return _LinesPartition(self.path, resume_state, self.batch_size)


# -- Kafka ---------------------------------------------------------------------------------


class _KafkaSourcePartition(StatefulSourcePartition[Batch, int]):
    """One Kafka partition; yields each consumed batch as one item, snapshots the next
    offset (restored with the state of the same epoch: nothing lost or applied twice)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partition: int,
        offset: int,
        *,
        partitions: int,
        tail: bool,
        batch_size: int,
        idle_timeout_s: float,
        clock: Callable[[], float],
        options: Mapping[str, str],
    ) -> None:
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        self._eof_code = KafkaError._PARTITION_EOF
        self._consumer = Consumer(
            kafka_client_config(
                bootstrap,
                **options,
                **{
                    "group.id": "tenx-stream",  # offsets live in the recovery store, not in Kafka
                    "enable.auto.commit": False,
                    "enable.partition.eof": not tail,
                    "session.timeout.ms": 10000,
                    "fetch.wait.max.ms": 50,
                    # An offset retention has deleted: the oldest message left, never the end.
                    "auto.offset.reset": "earliest",
                },
            )
        )
        self._consumer.assign([TopicPartition(topic, partition, offset)])
        self._topic, self._partition = topic, partition
        self._offset = offset
        self._batch = batch_size
        self._eof = False
        self._polls = 0
        self._pending: Batch = [Progress(partition, partitions=partitions)]
        self._idle_timeout = idle_timeout_s
        self._clock = clock
        self._last_message = time.monotonic()
        self._next_idle_check = 0.0

    def next_batch(self) -> list[Batch]:
        if self._eof or _STOP.is_set():
            raise StopIteration
        consumed = self._consumer.consume(self._batch, 0.05)
        partition = self._partition
        out: Batch = [(partition, m.offset(), m.value()) for m in consumed if m.error() is None]  # type: ignore[misc]
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
            if isinstance(item, tuple) and item[0] >= 0:
                self._offset = item[1] + 1
                break
        if out:
            self._last_message = time.monotonic()
            BROKER.reachable()
        elif not self._eof:
            out = self._idle_report()
        if self._eof:
            out.append(Progress(partition, status=PartitionStatus.ENDED))
        if self._pending:
            out, self._pending = self._pending + out, []
        self._polls += 1
        if self._polls % 20 == 0:
            self._report_lag()
        return [out] if out else []

    def _idle_report(self) -> Batch:
        """IDLE once the partition has had no message for the idle timeout and the broker
        confirms nothing is left to read (a broker that does not answer is not idleness:
        its backlog may be waiting)."""
        from confluent_kafka import KafkaException, TopicPartition

        now = time.monotonic()
        if now - self._last_message < self._idle_timeout or now < self._next_idle_check:
            return []
        self._next_idle_check = now + IDLE_REPORT_S
        clock = self._clock()
        try:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, self._partition), timeout=1.0, cached=False
            )
        except KafkaException as error:
            BROKER.unreachable(str(error.args[0] if error.args else error))
            return []
        BROKER.reachable()
        METRICS.lag.labels(self._topic, str(self._partition)).set(max(high - max(self._offset, low), 0))
        if high > max(self._offset, low):
            return []  # messages are waiting: not idle, only slow
        return [Progress(self._partition, status=PartitionStatus.IDLE, clock=int(clock * 1_000_000))]

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


class KafkaSource(FixedPartitionedSource[Batch, int]):
    """A topic's partitions spread over workers. Each yields a consumed batch as one item.
    Without a snapshot a partition starts at the first message at or after
    `start_time_us` (Kafka's offsets for times; the end when there is none), or at the
    beginning when `start_time_us` is None. Every call to the broker has a timeout.
    `idle_timeout_s`: how long a caught-up partition stays quiet before it stops holding
    the watermark back (tailing only)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        tail: bool = True,
        batch_size: int = 20000,
        start_time_us: int | None = None,
        timeout_s: float = 10.0,
        idle_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.options = dict(options or {})  # librdkafka settings (SASL, TLS)
        self.tail = tail
        self.batch_size = batch_size
        self.start_time_us = start_time_us
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self._partition_count: int | None = None

    def _config(self) -> dict[str, Any]:
        return kafka_client_config(self.bootstrap, **self.options)

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
        self._partition_count = len(topic.partitions)
        return [str(p) for p in sorted(topic.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaSourcePartition:
        partition = int(for_part)
        if self._partition_count is None:  # Bytewax lists the parts on every worker first
            self.list_parts()
        offset = resume_state if resume_state is not None else self._start_offset(partition)
        return _KafkaSourcePartition(
            self.bootstrap,
            self.topic,
            partition,
            offset,
            partitions=int(self._partition_count or 0),
            tail=self.tail,
            batch_size=self.batch_size,
            idle_timeout_s=self.idle_timeout_s,
            clock=self.clock,
            options=self.options,
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


def kafka_topics(bootstrap: str, timeout_s: float = 10.0, options: Mapping[str, str] | None = None) -> set[str]:
    """The broker's topics; a TransientError saying so when it does not answer in time,
    a ConfigError when the client settings (`options`) are not librdkafka's."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient(kafka_client_config(bootstrap, **(options or {})))
    except KafkaException as error:
        raise ConfigError(f"Kafka client settings (kafka.options / TENX_KAFKA_OPTIONS): {_reason(error)}") from error
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as error:
        raise TransientError(f"cannot reach Kafka at {bootstrap} within {timeout_s:.0f} s: {_reason(error)}") from error
    return set(metadata.topics)


def _reason(error: Exception) -> str:
    """librdkafka's own words, without the KafkaError{code=...} wrapping."""
    first = error.args[0] if error.args else error
    return str(first.str() if hasattr(first, "str") else first)


def check_topics(
    bootstrap: str, topics: list[str], timeout_s: float = 10.0, options: Mapping[str, str] | None = None
) -> None:
    """Fail early, with what to do, when the broker is unreachable, the client settings
    are wrong or a topic is missing (inside the running dataflow any of them would end
    in a Bytewax traceback)."""
    known = kafka_topics(bootstrap, timeout_s, options)
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
    clock: Callable[[], float] = time.time,
    options: Mapping[str, str] | None = None,
) -> Any:
    """The source's topic as a stream of message batches (`KafkaSource`), with the
    source's idle timeout and the client settings `options`."""
    kafka = KafkaSource(
        bootstrap,
        source.topic,
        tail=tail,
        batch_size=batch_size,
        start_time_us=start_time_us,
        idle_timeout_s=source.idle_timeout / 1e6,
        clock=clock,
        options=options,
    )
    return op.input(f"kafka_{source.name}", flow, kafka)
